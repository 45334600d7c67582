"""The table of jopt optimizers that drives the generic tests.

Each row names a jopt optimizer, its keyword arguments, and its capabilities: the
optax optimizer (and arguments) it must match, a learning rate that converges on the
test problems. Generic tests read capabilities from here; they never special-case
an optimizer by name.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import optax

import jopt


@dataclasses.dataclass(frozen=True)
class Row:
    id: str
    factory: Callable[..., Any]
    kwargs: dict
    # (optax factory, optax kwargs) with the same trajectory; None if optax has none.
    optax_twin: tuple[Callable[..., Any], dict] | None = None
    # learning rate that solves the quadratic and Rosenbrock tests.
    quadratic_lr: float = 0.1
    rosenbrock_lr: float = 1e-3
    rosenbrock_steps: int = 10_000

    def make(self, learning_rate):
        return self.factory(learning_rate, **self.kwargs)

    def make_twin(self, learning_rate):
        factory, kwargs = self.optax_twin
        return factory(learning_rate, **kwargs)


def _same(factory, **kwargs):
    return (factory, kwargs)


ROWS = [
    Row("sgd", jopt.sgd, {}, _same(optax.sgd)),
    Row("gd", jopt.gd, {}, _same(optax.sgd)),
    Row("sgd_momentum", jopt.sgd, {"momentum": 0.9}, _same(optax.sgd, momentum=0.9),
        quadratic_lr=0.02, rosenbrock_lr=2e-4),
    Row("sgd_nesterov", jopt.sgd, {"momentum": 0.9, "nesterov": True},
        _same(optax.sgd, momentum=0.9, nesterov=True), quadratic_lr=0.02, rosenbrock_lr=2e-4),
    Row("momentum", jopt.momentum, {"momentum": 0.5}, _same(optax.sgd, momentum=0.5),
        quadratic_lr=0.05, rosenbrock_lr=5e-4),
    Row("momentum_ema", jopt.momentum, {"momentum": 0.9, "dampening": 0.9},
        quadratic_lr=0.1, rosenbrock_lr=1e-3),
    Row("nesterov", jopt.nesterov, {"momentum": 0.9},
        _same(optax.sgd, momentum=0.9, nesterov=True), quadratic_lr=0.02, rosenbrock_lr=2e-4),
    Row("adagrad", jopt.adagrad, {}, _same(optax.adagrad), quadratic_lr=0.5,
        rosenbrock_lr=0.1),
    Row("adagrad_custom", jopt.adagrad, {"initial_accumulator_value": 0.5, "eps": 1e-4},
        _same(optax.adagrad, initial_accumulator_value=0.5, eps=1e-4), quadratic_lr=0.5,
        rosenbrock_lr=0.1),
    Row("rmsprop", jopt.rmsprop, {}, _same(optax.rmsprop), quadratic_lr=0.01,
        rosenbrock_lr=1e-3),
    Row("rmsprop_centered_momentum", jopt.rmsprop,
        {"centered": True, "momentum": 0.9, "eps_in_sqrt": False},
        _same(optax.rmsprop, centered=True, momentum=0.9, eps_in_sqrt=False),
        quadratic_lr=0.002, rosenbrock_lr=1e-4),
    Row("rmsprop_bias_corrected_nesterov", jopt.rmsprop,
        {"bias_correction": True, "momentum": 0.5, "nesterov": True, "decay": 0.95},
        _same(optax.rmsprop, bias_correction=True, momentum=0.5, nesterov=True, decay=0.95),
        quadratic_lr=0.005, rosenbrock_lr=5e-4),
    Row("adam", jopt.adam, {}, _same(optax.adam), quadratic_lr=0.05, rosenbrock_lr=0.01),
    Row("adam_betas", jopt.adam, {"b1": 0.5, "b2": 0.99, "eps": 1e-6, "eps_root": 1e-8},
        _same(optax.adam, b1=0.5, b2=0.99, eps=1e-6, eps_root=1e-8), quadratic_lr=0.05,
        rosenbrock_lr=0.01),
    Row("adam_nesterov", jopt.adam, {"nesterov": True}, _same(optax.nadam),
        quadratic_lr=0.05, rosenbrock_lr=0.01),
    # AMSGrad's running max keeps the large early second moments: it needs a larger step.
    Row("adam_amsgrad", jopt.adam, {"amsgrad": True}, _same(optax.amsgrad),
        quadratic_lr=0.05, rosenbrock_lr=0.1),
    Row("nadam", jopt.nadam, {}, _same(optax.nadam), quadratic_lr=0.05, rosenbrock_lr=0.01),
    Row("adamw", jopt.adamw, {"weight_decay": 1e-3}, _same(optax.adamw, weight_decay=1e-3),
        quadratic_lr=0.05, rosenbrock_lr=0.01),
    Row("nadamw", jopt.nadamw, {"weight_decay": 1e-3}, _same(optax.nadamw, weight_decay=1e-3),
        quadratic_lr=0.05, rosenbrock_lr=0.01),
]

ROW_IDS = [row.id for row in ROWS]
TWIN_ROWS = [row for row in ROWS if row.optax_twin is not None]
