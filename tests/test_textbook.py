"""Each classic algorithm against a direct NumPy implementation of its textbook formula.

The NumPy versions are written from the papers' update rules, in float64, sharing no
code with jopt; the loss is a fixed least-squares problem whose gradient is computed
by hand, so nothing but the update rule is under test.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jopt

STEPS = 50
RNG = np.random.default_rng(0)
A = RNG.normal(size=(20, 5)) / np.sqrt(5)
B = RNG.normal(size=20)
THETA0 = RNG.normal(size=5)
BATCHES = [RNG.choice(20, size=8, replace=False) for _ in range(STEPS)]


def gradient(theta, rows=None):
    """Gradient of 0.5 * mean((A θ - b)^2) over `rows` (all rows when None)."""
    a, b = (A, B) if rows is None else (A[rows], B[rows])
    return a.T @ (a @ theta - b) / len(b)


def run_jopt(tx, stochastic=False):
    theta = jnp.asarray(THETA0, jnp.float32)
    state = tx.init(theta)
    for t in range(STEPS):
        grad = gradient(np.asarray(theta, np.float64), BATCHES[t] if stochastic else None)
        updates, state = tx.update(jnp.asarray(grad, jnp.float32), state, theta)
        theta = jopt.apply_updates(theta, updates)
    return np.asarray(theta, np.float64)


def textbook_gd(lr, stochastic=False):
    theta = THETA0.copy()
    for t in range(STEPS):
        theta = theta - lr * gradient(theta, BATCHES[t] if stochastic else None)
    return theta


def textbook_heavy_ball(lr, beta):
    # Polyak: θ_{t+1} = θ_t − α∇J(θ_t) + β(θ_t − θ_{t−1}), with θ_{−1} = θ_0.
    previous, theta = THETA0.copy(), THETA0.copy()
    for _ in range(STEPS):
        previous, theta = theta, theta - lr * gradient(theta) + beta * (theta - previous)
    return theta


def textbook_ema_momentum(lr, beta):
    # v ← βv + (1−β)g ; θ ← θ − αv, with v_0 = 0.
    theta, velocity = THETA0.copy(), np.zeros(5)
    for _ in range(STEPS):
        velocity = beta * velocity + (1 - beta) * gradient(theta)
        theta = theta - lr * velocity
    return theta


def textbook_nesterov(lr, beta):
    # Nesterov's accelerated gradient: gradient at the look-ahead point.
    # y_t = θ_t + β(θ_t − θ_{t−1}); θ_{t+1} = y_t − α∇J(y_t).
    # The momentum form (Sutskever et al. 2013; optax, PyTorch, jopt) keeps the
    # look-ahead point y_t as "the parameters": y_{t+1} = y_t − α∇J(y_t) − αβv_t with
    # v_t = βv_{t−1} + ∇J(y_t) follows from the two lines above with d_t = −αv_t.
    previous, theta = THETA0.copy(), THETA0.copy()
    for _ in range(STEPS):
        lookahead = theta + beta * (theta - previous)
        previous, theta = theta, lookahead - lr * gradient(lookahead)
    return theta + beta * (theta - previous)


def textbook_adagrad(lr, initial, eps):
    # Duchi et al. 2011: s ← s + g²; θ ← θ − α g / sqrt(s + ε).
    theta, total = THETA0.copy(), np.full(5, initial)
    for _ in range(STEPS):
        g = gradient(theta)
        total = total + g * g
        theta = theta - lr * g / np.sqrt(total + eps)
    return theta


def textbook_rmsprop(lr, rho, eps):
    # Tieleman & Hinton 2012: ν ← ρν + (1−ρ)g²; θ ← θ − α g / sqrt(ν + ε).
    theta, nu = THETA0.copy(), np.zeros(5)
    for _ in range(STEPS):
        g = gradient(theta)
        nu = rho * nu + (1 - rho) * g * g
        theta = theta - lr * g / np.sqrt(nu + eps)
    return theta


def textbook_adam(lr, b1, b2, eps):
    # Kingma & Ba 2014, Algorithm 1.
    theta, m, v = THETA0.copy(), np.zeros(5), np.zeros(5)
    for t in range(1, STEPS + 1):
        g = gradient(theta)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat = m / (1 - b1**t)
        v_hat = v / (1 - b2**t)
        theta = theta - lr * m_hat / (np.sqrt(v_hat) + eps)
    return theta


def textbook_adamw(lr, b1, b2, eps, weight_decay):
    # Loshchilov & Hutter 2019, Algorithm 2 (schedule multiplier η_t = 1, α folded in).
    theta, m, v = THETA0.copy(), np.zeros(5), np.zeros(5)
    for t in range(1, STEPS + 1):
        g = gradient(theta)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        m_hat, v_hat = m / (1 - b1**t), v / (1 - b2**t)
        theta = theta - lr * (m_hat / (np.sqrt(v_hat) + eps) + weight_decay * theta)
    return theta


CASES = {
    "gd": (jopt.gd(0.3), lambda: textbook_gd(0.3)),
    "heavy_ball": (jopt.sgd(0.1, momentum=0.8), lambda: textbook_heavy_ball(0.1, 0.8)),
    "ema_momentum": (jopt.momentum(0.3, 0.9, dampening=0.9),
                     lambda: textbook_ema_momentum(0.3, 0.9)),
    "nesterov": (jopt.nesterov(0.1, 0.8), lambda: textbook_nesterov(0.1, 0.8)),
    "adagrad": (jopt.adagrad(0.2, initial_accumulator_value=0.1, eps=1e-7),
                lambda: textbook_adagrad(0.2, 0.1, 1e-7)),
    "rmsprop": (jopt.rmsprop(0.01, decay=0.9, eps=1e-8), lambda: textbook_rmsprop(0.01, 0.9, 1e-8)),
    "adam": (jopt.adam(0.05, b1=0.9, b2=0.999, eps=1e-8),
             lambda: textbook_adam(0.05, 0.9, 0.999, 1e-8)),
    "adamw": (jopt.adamw(0.05, weight_decay=0.1), lambda: textbook_adamw(0.05, 0.9, 0.999, 1e-8, 0.1)),
}


@pytest.mark.parametrize("name", sorted(CASES))
def test_matches_textbook_formula(name):
    tx, textbook = CASES[name]
    ours = run_jopt(tx)
    expected = textbook()
    assert np.max(np.abs(expected - THETA0)) > 1e-2  # the parameters really moved
    np.testing.assert_allclose(ours, expected, atol=2e-5, rtol=0)


def test_sgd_matches_textbook_on_minibatches():
    ours = run_jopt(jopt.sgd(0.3), stochastic=True)
    np.testing.assert_allclose(ours, textbook_gd(0.3, stochastic=True), atol=2e-5, rtol=0)


def test_nesterov_differs_from_heavy_ball():
    # Guards against both tests passing with one shared (wrong) implementation.
    assert np.max(np.abs(textbook_nesterov(0.1, 0.8) - textbook_heavy_ball(0.1, 0.8))) > 1e-3


def test_jitted_adam_matches_textbook():
    tx = jopt.adam(0.05)
    theta = jnp.asarray(THETA0, jnp.float32)
    a, b = jnp.asarray(A, jnp.float32), jnp.asarray(B, jnp.float32)

    def step(carry, _):
        theta, state = carry
        grad = a.T @ (a @ theta - b) / b.shape[0]
        updates, state = tx.update(grad, state)
        return (jopt.apply_updates(theta, updates), state), None

    (theta, _), _ = jax.jit(lambda c: jax.lax.scan(step, c, None, length=STEPS))(
        (theta, tx.init(theta))
    )
    np.testing.assert_allclose(np.asarray(theta), textbook_adam(0.05, 0.9, 0.999, 1e-8), atol=2e-5)
