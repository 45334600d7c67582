"""The optimizer protocol: optax's `GradientTransformation`, re-exported, not re-written.

jopt's transformations *are* optax transformations, so they mix with optax, Flax's
`TrainState` and `flax.nnx.Optimizer` by construction.
"""

from optax import (
    EmptyState,
    GradientTransformation,
    GradientTransformationExtraArgs,
    OptState,
    Params,
    Schedule,
    ScalarOrSchedule,
    Updates,
    apply_updates,
    chain,
    identity,
    with_extra_args_support,
)

__all__ = [
    "EmptyState",
    "GradientTransformation",
    "GradientTransformationExtraArgs",
    "OptState",
    "Params",
    "Schedule",
    "ScalarOrSchedule",
    "Updates",
    "apply_updates",
    "chain",
    "identity",
    "with_extra_args_support",
]
