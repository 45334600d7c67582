"""jopt: a JAX functional optimization toolkit.

Optimizers are optax ``GradientTransformation``s (init/update pairs composed by
chaining), with their per-array math written once and lifted to any pytree or to
flat, dtype-grouped buffers, and their state stored in float32, bfloat16 or 8-bit
block-quantized form. Code written for optax runs after ``import jopt as optax``
for every name both have.
"""

from optax import (
    MultiSteps,
    add_decayed_weights,
    apply_if_finite,
    clip,
    clip_by_block_rms,
    clip_by_global_norm,
    global_norm,
    inject_hyperparams,
    masked,
    multi_transform,
    scale,
    scale_by_learning_rate,
    skip_not_finite,
    zero_nans,
)

from jopt import flat, lift, schedules, storage
from jopt.base import (
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
from jopt.optimizers import (
    adagrad,
    adam,
    adamw,
    gd,
    momentum,
    nadam,
    nadamw,
    nesterov,
    rmsprop,
    sgd,
)
from jopt.transforms import (
    ScaleByAdagradState,
    ScaleByAdamState,
    ScaleByAmsgradState,
    ScaleByCenteredRmsState,
    ScaleByMomentumState,
    ScaleByRmsState,
    scale_by_adagrad,
    scale_by_adam,
    scale_by_momentum,
    scale_by_rms,
)

__version__ = "0.1.0"

# Submodules that pull in Flax, orbax, matplotlib or the data layer load on first use,
# so `import jopt` stays as light as `import optax`.
_LAZY_SUBMODULES = (
    "checkpoints", "cli", "data", "distributed", "inspect", "models", "parallel", "pruning",
    "quantization", "train",
)


def __getattr__(name):
    if name in _LAZY_SUBMODULES:
        import importlib

        return importlib.import_module(f"jopt.{name}")
    raise AttributeError(f"module 'jopt' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_SUBMODULES))

__all__ = [
    # protocol (optax's)
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
    # optimizers
    "adagrad",
    "adam",
    "adamw",
    "gd",
    "momentum",
    "nadam",
    "nadamw",
    "nesterov",
    "rmsprop",
    "sgd",
    # per-array transformations
    "ScaleByAdagradState",
    "ScaleByAdamState",
    "ScaleByAmsgradState",
    "ScaleByCenteredRmsState",
    "ScaleByMomentumState",
    "ScaleByRmsState",
    "scale_by_adagrad",
    "scale_by_adam",
    "scale_by_momentum",
    "scale_by_rms",
    # optax's stateless pieces and wrappers, re-exported
    "MultiSteps",
    "add_decayed_weights",
    "apply_if_finite",
    "clip",
    "clip_by_block_rms",
    "clip_by_global_norm",
    "global_norm",
    "inject_hyperparams",
    "masked",
    "multi_transform",
    "scale",
    "scale_by_learning_rate",
    "skip_not_finite",
    "zero_nans",
    # submodules
    "flat",
    "lift",
    "schedules",
    "storage",
]
