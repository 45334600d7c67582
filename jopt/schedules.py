"""Learning-rate schedules: optax's, re-exported, plus the classic ones optax lacks.

A schedule is a function ``step -> value``; pass one anywhere a learning rate is
accepted (``jopt.adam(jopt.schedules.warmup_cosine_decay_schedule(...))``).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
from optax.schedules import (
    InjectHyperparamsState,
    InjectStatefulHyperparamsState,
    Schedule,
    StatefulSchedule,
    WrappedSchedule,
    constant_schedule,
    cosine_decay_schedule,
    cosine_onecycle_schedule,
    exponential_decay,
    inject_hyperparams,
    inject_stateful_hyperparams,
    join_schedules,
    linear_onecycle_schedule,
    linear_schedule,
    piecewise_constant_schedule,
    piecewise_interpolate_schedule,
    polynomial_schedule,
    sgdr_schedule,
    warmup_constant_schedule,
    warmup_cosine_decay_schedule,
    warmup_exponential_decay_schedule,
)

from jopt._validation import check_in_range

__all__ = [
    "InjectHyperparamsState",
    "InjectStatefulHyperparamsState",
    "Schedule",
    "StatefulSchedule",
    "WrappedSchedule",
    "constant_schedule",
    "cosine_decay_schedule",
    "cosine_onecycle_schedule",
    "exponential_decay",
    "inject_hyperparams",
    "inject_stateful_hyperparams",
    "inverse_time_decay",
    "join_schedules",
    "linear_onecycle_schedule",
    "linear_schedule",
    "piecewise_constant_schedule",
    "piecewise_interpolate_schedule",
    "polynomial_schedule",
    "sgdr_schedule",
    "step_decay_schedule",
    "warmup_constant_schedule",
    "warmup_cosine_decay_schedule",
    "warmup_exponential_decay_schedule",
]


def inverse_time_decay(
    init_value: float, decay_rate: float, decay_steps: int = 1, staircase: bool = False
) -> Schedule:
    r"""The classic ``α_t = α_0 / (1 + k · t / T)`` decay (Robbins-Monro style).

    Its step sizes sum to infinity while their squares do not, the condition under
    which SGD converges on convex problems. optax has no such schedule.

    Args:
      init_value: ``α_0`` (>= 0).
      decay_rate: ``k`` (>= 0).
      decay_steps: ``T`` (> 0).
      staircase: use ``floor(t / T)`` (decay in steps).

    Example:
      >>> import jopt
      >>> schedule = jopt.schedules.inverse_time_decay(0.1, decay_rate=1.0, decay_steps=10)
      >>> round(float(schedule(10)), 6)
      0.05
    """
    check_in_range("init_value", init_value, 0.0)
    check_in_range("decay_rate", decay_rate, 0.0)
    if decay_steps <= 0:
        raise ValueError(f"decay_steps must be > 0, got {decay_steps!r}.")

    def schedule(count):
        progress = jnp.asarray(count, jnp.float32) / decay_steps
        if staircase:
            progress = jnp.floor(progress)
        return init_value / (1.0 + decay_rate * progress)

    return schedule


def step_decay_schedule(
    init_value: float, decay_factor: float, step_size: int
) -> Schedule:
    r"""Multiplies the value by ``decay_factor`` every ``step_size`` steps.

    ``α_t = α_0 · γ^{floor(t / s)}`` (PyTorch's ``StepLR``); a special case of
    ``exponential_decay(..., staircase=True)`` with a more familiar name.

    Example:
      >>> import jopt
      >>> schedule = jopt.schedules.step_decay_schedule(0.1, 0.5, step_size=100)
      >>> round(float(schedule(250)), 6)
      0.025
    """
    check_in_range("init_value", init_value, 0.0)
    check_in_range("decay_factor", decay_factor, 0.0, 1.0, high_inclusive=True)
    if step_size <= 0:
        raise ValueError(f"step_size must be > 0, got {step_size!r}.")
    if decay_factor == 0:  # optax reads a decay rate of 0 as "constant"
        # floor(t / s) >= 1 from step ceil(s) on, as in the staircase rule.
        return piecewise_constant_schedule(init_value, {math.ceil(step_size): 0.0})
    return exponential_decay(init_value, step_size, decay_factor, staircase=True)
