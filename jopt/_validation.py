"""Argument checks shared by jopt's constructors: one place, one message style."""

from __future__ import annotations

import math
from typing import Any

import jax


def _concrete_float(value: Any) -> float | None:
    """The value as a float, or None when it is traced (e.g. `inject_hyperparams`)
    or not a number (strings such as ``"0.9"`` are not numbers here: they would
    only fail later, inside the update)."""
    if isinstance(value, jax.core.Tracer) or isinstance(value, (str, bytes)):
        return None
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def check_in_range(
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    high_inclusive: bool = False,
    hint: str = "",
) -> None:
    """Raises `ValueError` unless ``low <= value`` and ``value < high`` (or ``<=``).

    ``None``, strings and infinities are errors (an unbounded ``high`` is an open
    end). Traced values are not checked (they are checked where they were
    concrete); callables (schedules) are left to their callers.
    """
    if isinstance(value, jax.core.Tracer) or callable(value):
        return
    number = _concrete_float(value)
    if number is None:
        raise ValueError(f"{name} must be a number, got {value!r}. {hint}".strip())
    too_low = low is not None and number < low
    too_high = (math.isinf(number) if high is None else
                (number > high if high_inclusive else number >= high))
    if math.isnan(number) or too_low or too_high:
        lo = "-inf" if low is None else f"{low:g}"
        hi = "inf" if high is None else f"{high:g}"
        bracket = "]" if high_inclusive else ")"
        message = f"{name} must be in [{lo}, {hi}{bracket}, got {value!r}."
        raise ValueError(f"{message} {hint}".strip())


def check_learning_rate(learning_rate: Any, name: str = "learning_rate") -> None:
    """A learning rate is a non-negative number or a schedule (a callable of the step)."""
    if callable(learning_rate):
        return
    check_in_range(
        name,
        learning_rate,
        0.0,
        None,
        hint=(
            "Pass a non-negative step size (jopt's updates already point downhill) "
            "or a schedule such as jopt.schedules.exponential_decay(...)."
        ),
    )
