"""Named optimizers: each one is a chain of public transformations, nothing more.

Signatures mirror optax's where optax has the same optimizer (``import jopt as
optax`` keeps working); jopt's extra options are keyword-only, chiefly
``state_storage`` (``None`` | ``"float32"`` | ``"bfloat16"`` | ``"int8"``, see
:mod:`jopt.storage`). Every optimizer checks its hyper-parameters when it is built
and raises a `ValueError` naming the argument and its valid range.
"""

from __future__ import annotations

from typing import Any

import optax

from jopt import flat, transforms
from jopt import storage as storage_lib
from jopt._validation import check_in_range, check_learning_rate
from jopt.base import GradientTransformationExtraArgs, ScalarOrSchedule, chain, identity
from jopt.transforms import StateStorageLike

__all__ = [
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
]


def _learning_rate(learning_rate: ScalarOrSchedule):
    check_learning_rate(learning_rate)
    return optax.scale_by_learning_rate(learning_rate)


def sgd(
    learning_rate: ScalarOrSchedule,
    momentum: float | None = None,
    nesterov: bool = False,
    accumulator_dtype: Any = None,
    *,
    dampening: float = 0.0,
    state_storage: StateStorageLike = None,
) -> GradientTransformationExtraArgs:
    r"""Stochastic gradient descent, with optional (heavy-ball, EMA or Nesterov) momentum.

    Without momentum, ``θ ← θ − α g``. With momentum ``β`` the velocity
    ``v ← βv + (1−d)g`` is followed instead (``d`` = ``dampening``; see
    :func:`jopt.scale_by_momentum`), giving heavy-ball momentum
    ``θ_{t+1} = θ_t − α∇J(θ_t) + β(θ_t − θ_{t−1})`` for ``d = 0``, the EMA form for
    ``d = β``, and Nesterov's method for ``nesterov=True``.

    Args:
      learning_rate: ``α`` (>= 0) or a schedule ``step -> α``.
      momentum: ``β`` in [0, 1], or None for plain SGD.
      nesterov: Nesterov's look-ahead (needs ``momentum``).
      accumulator_dtype: storage dtype of the velocity (optax's option).
      dampening: ``d`` in [0, 1); ``dampening=momentum`` is the EMA form.
      state_storage: how the velocity is stored (see :mod:`jopt.storage`).

    Returns:
      A :class:`optax.GradientTransformationExtraArgs`.

    Example:
      Fit ``y = 3x`` by minibatch SGD with momentum:

      >>> import jax, jax.numpy as jnp, jopt
      >>> x = jnp.linspace(-1, 1, 64); y = 3.0 * x
      >>> loss = lambda w, xb, yb: jnp.mean((w * xb - yb) ** 2)
      >>> tx = jopt.sgd(0.1, momentum=0.9)
      >>> w = jnp.array(0.0); state = tx.init(w)
      >>> for step in range(200):
      ...   i = (step * 16) % 64
      ...   g = jax.grad(loss)(w, x[i:i + 16], y[i:i + 16])
      ...   updates, state = tx.update(g, state)
      ...   w = jopt.apply_updates(w, updates)
      >>> round(float(w), 3)
      3.0

    References:
      Robbins & Monro, *A Stochastic Approximation Method*, 1951. Polyak, 1964.
      Sutskever et al., ICML 2013.
    """
    if nesterov and momentum is None:
        raise ValueError("nesterov=True needs momentum; pass momentum=0.9, for example.")
    storage_lib.resolve_storage(state_storage)  # a bad name fails here, with momentum or not
    if momentum is None:
        if not (isinstance(dampening, (int, float)) and dampening == 0):
            raise ValueError("dampening needs momentum; pass momentum as well.")
        velocity = identity()
    else:
        check_in_range("momentum", momentum, 0.0, 1.0, high_inclusive=True,
                       hint="Typical momentum values are 0.9 or 0.99.")
        velocity = transforms.scale_by_momentum(
            momentum,
            nesterov=nesterov,
            dampening=dampening,
            accumulator_dtype=accumulator_dtype,
            state_storage=state_storage,
        )
    return chain(velocity, _learning_rate(learning_rate))


def gd(learning_rate: ScalarOrSchedule) -> GradientTransformationExtraArgs:
    r"""Plain gradient descent, ``θ ← θ − α∇J(θ)``: :func:`sgd` on full batches.

    Args:
      learning_rate: ``α`` (>= 0) or a schedule.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs`.

    Example:
      Full-batch gradient descent on linear regression ``y = 3x + 1``:

      >>> import jax, jax.numpy as jnp, jopt
      >>> x = jnp.linspace(-1, 1, 100); y = 3 * x + 1
      >>> loss = lambda p: jnp.mean((p["w"] * x + p["b"] - y) ** 2)
      >>> params = {"w": 0.0, "b": 0.0}
      >>> tx = jopt.gd(0.5); state = tx.init(params)
      >>> for _ in range(200):
      ...   updates, state = tx.update(jax.grad(loss)(params), state)
      ...   params = jopt.apply_updates(params, updates)
      >>> round(float(params["w"]), 3), round(float(params["b"]), 3)
      (3.0, 1.0)

    References:
      Cauchy, *Méthode générale pour la résolution des systèmes d'équations
      simultanées*, 1847.
    """
    return sgd(learning_rate)


def momentum(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.9,
    *,
    dampening: float = 0.0,
    state_storage: StateStorageLike = None,
) -> GradientTransformationExtraArgs:
    r"""Heavy-ball momentum, or its EMA form with ``dampening=momentum``.

    ``v ← βv + (1−d)g``, ``θ ← θ − αv``; with ``d = 0`` this is Polyak's
    ``θ_{t+1} = θ_t − α∇J(θ_t) + β(θ_t − θ_{t−1})``, with ``d = β`` the velocity is an
    exponential moving average of the gradients. Same as
    ``sgd(learning_rate, momentum, dampening=...)``.

    Args:
      learning_rate: ``α`` (>= 0) or a schedule.
      momentum: ``β`` in [0, 1].
      dampening: ``d`` in [0, 1).
      state_storage: how the velocity is stored (see :mod:`jopt.storage`).

    Example:
      >>> import jax.numpy as jnp, jopt
      >>> tx = jopt.momentum(0.1, 0.9, dampening=0.9)  # v <- 0.9 v + 0.1 g
      >>> g = jnp.array([1.0]); state = tx.init(g)
      >>> updates, state = tx.update(g, state)
      >>> jnp.round(updates, 4)
      Array([-0.01], dtype=float32)

    References:
      Polyak, *Some methods of speeding up the convergence of iteration methods*, 1964.
    """
    return sgd(learning_rate, momentum, dampening=dampening, state_storage=state_storage)


def nesterov(
    learning_rate: ScalarOrSchedule,
    momentum: float = 0.9,
    *,
    state_storage: StateStorageLike = None,
) -> GradientTransformationExtraArgs:
    r"""Nesterov's accelerated gradient in momentum form.

    ``v ← βv + g``, ``θ ← θ − α(g + βv)``: the parameters are the look-ahead points
    ``y_t = θ_t + β(θ_t − θ_{t−1})`` of the classic form
    ``θ_{t+1} = y_t − α∇J(y_t)`` (Sutskever et al. 2013). Same as
    ``sgd(learning_rate, momentum, nesterov=True)``.

    Args:
      learning_rate: ``α`` (>= 0) or a schedule.
      momentum: ``β`` in [0, 1].
      state_storage: how the velocity is stored (see :mod:`jopt.storage`).

    Example:
      >>> import jax.numpy as jnp, jopt
      >>> tx = jopt.nesterov(0.1, 0.9)
      >>> g = jnp.array([1.0]); state = tx.init(g)
      >>> updates, state = tx.update(g, state)
      >>> jnp.round(updates, 4)  # -0.1 * (1 + 0.9 * 1)
      Array([-0.19], dtype=float32)

    References:
      Nesterov, *A method for solving the convex programming problem with convergence
      rate O(1/k^2)*, 1983. Sutskever et al., ICML 2013.
    """
    return sgd(learning_rate, momentum, nesterov=True, state_storage=state_storage)


def adagrad(
    learning_rate: ScalarOrSchedule,
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
    *,
    state_storage: StateStorageLike = None,
) -> GradientTransformationExtraArgs:
    r"""AdaGrad: per-coordinate steps that shrink with the gradients seen so far.

    ``s ← s + g²``, ``θ ← θ − α g / sqrt(s + ε)`` with ``s_0`` =
    ``initial_accumulator_value`` (see :func:`jopt.scale_by_adagrad`).

    Args:
      learning_rate: ``α`` (>= 0) or a schedule.
      initial_accumulator_value: ``s_0`` (>= 0).
      eps: ``ε`` (>= 0), inside the square root.
      state_storage: how ``s`` is stored (see :mod:`jopt.storage`).

    Example:
      >>> import jax.numpy as jnp, jopt
      >>> tx = jopt.adagrad(learning_rate=0.1, initial_accumulator_value=0.0, eps=0.0)
      >>> g = jnp.array([3.0, -4.0]); state = tx.init(g)
      >>> tx.update(g, state)[0].round(6)  # GPUs' rsqrt is off in the last bit
      Array([-0.1,  0.1], dtype=float32)

    References:
      Duchi, Hazan & Singer, *Adaptive Subgradient Methods for Online Learning and
      Stochastic Optimization*, JMLR 2011.
    """
    return chain(
        transforms.scale_by_adagrad(
            initial_accumulator_value, eps, state_storage=state_storage
        ),
        _learning_rate(learning_rate),
    )


def rmsprop(
    learning_rate: ScalarOrSchedule,
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    centered: bool = False,
    momentum: float | None = None,
    nesterov: bool = False,
    bias_correction: bool = False,
    *,
    state_storage: StateStorageLike = None,
) -> GradientTransformationExtraArgs:
    r"""RMSprop (Tieleman & Hinton 2012): plain, centered, and with momentum.

    ``ν ← ρν + (1−ρ)g²``, ``θ ← θ − α g / sqrt(ν + ε)`` (see :func:`jopt.scale_by_rms`
    for the centered and bias-corrected forms); with ``momentum`` the scaled step is
    then accumulated by heavy-ball (or Nesterov) momentum, as in optax. (Centered
    with ``bias_correction`` divides by ``sqrt(ε)`` at the first step, where the
    variance estimate is exactly 0: a legal but unstable combination.)

    Args:
      learning_rate: ``α`` (>= 0) or a schedule.
      decay: ``ρ`` in [0, 1).
      eps, initial_scale, eps_in_sqrt, centered, bias_correction: see
        :func:`jopt.scale_by_rms`.
      momentum: ``β`` in [0, 1] or None.
      nesterov: Nesterov momentum (needs ``momentum``).
      state_storage: how the moments are stored (see :mod:`jopt.storage`).

    Example:
      >>> import jax.numpy as jnp, jopt
      >>> tx = jopt.rmsprop(0.01, decay=0.0, eps=0.0)
      >>> g = jnp.array([2.0, -0.5]); state = tx.init(g)
      >>> tx.update(g, state)[0]
      Array([-0.01,  0.01], dtype=float32)

    References:
      Tieleman & Hinton, *Lecture 6.5 - RMSprop*, 2012. Graves, *Generating Sequences
      With Recurrent Neural Networks*, 2013 (centered).
    """
    if nesterov and momentum is None:
        raise ValueError("nesterov=True needs momentum; pass momentum=0.9, for example.")
    if momentum is not None:
        check_in_range("momentum", momentum, 0.0, 1.0, high_inclusive=True,
                       hint="Typical momentum values are 0.9 or 0.99.")
    return chain(
        transforms.scale_by_rms(
            decay, eps, initial_scale, eps_in_sqrt, bias_correction,
            centered=centered, state_storage=state_storage,
        ),
        _learning_rate(learning_rate),
        identity() if momentum is None else transforms.scale_by_momentum(
            momentum, nesterov=nesterov, state_storage=state_storage
        ),
    )


def adam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    *,
    nesterov: bool = False,
    amsgrad: bool = False,
    state_storage: StateStorageLike = None,
) -> GradientTransformationExtraArgs:
    r"""Adam (Kingma & Ba 2014), with NAdam and AMSGrad options.

    ``θ ← θ − α \hat m_t / (sqrt(\hat v_t) + ε)`` with bias-corrected moments; see
    :func:`jopt.scale_by_adam`. (Some tutorials print
    ``θ ← θ − α(∇J + βθ_{t−1} + γ(θ_t − θ_{t−1}))`` as "Adam": that is SGD with
    weight decay and momentum, not Adam.)

    Args:
      learning_rate: ``α`` (>= 0) or a schedule.
      b1, b2, eps, eps_root, mu_dtype: as in :func:`jopt.scale_by_adam`.
      nesterov: NAdam.
      amsgrad: AMSGrad (same trajectory as ``optax.amsgrad``).
      state_storage: ``None`` | ``"float32"`` | ``"bfloat16"`` | ``"int8"``.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs`.

    Example:
      >>> import jax, jax.numpy as jnp, jopt
      >>> params = {"w": jnp.array([1.0, -2.0])}
      >>> tx = jopt.adam(learning_rate=0.1, state_storage="bfloat16")
      >>> state = tx.init(params)
      >>> grads = jax.grad(lambda p: jnp.sum(p["w"] ** 2))(params)
      >>> updates, state = tx.update(grads, state)
      >>> jnp.round(jopt.apply_updates(params, updates)["w"], 4)
      Array([ 0.9, -1.9], dtype=float32)

    References:
      Kingma & Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015.
    """
    return chain(
        transforms.scale_by_adam(
            b1, b2, eps, eps_root, mu_dtype,
            nesterov=nesterov, amsgrad=amsgrad, state_storage=state_storage,
        ),
        _learning_rate(learning_rate),
    )


def adamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any = None,
    *,
    nesterov: bool = False,
    amsgrad: bool = False,
    state_storage: StateStorageLike = None,
) -> GradientTransformationExtraArgs:
    r"""AdamW: Adam with decoupled weight decay (Loshchilov & Hutter 2019).

    ``θ ← θ − α (\hat m_t / (sqrt(\hat v_t) + ε) + λ θ)``: the decay ``λ`` is applied
    to the parameters directly, not added to the gradient, so it is not rescaled by
    Adam's denominator. ``mask`` (a tree of booleans like the params, or a function
    of the params returning one) selects the parameters that decay; biases and
    norms are commonly excluded. The mask function always sees the params as a tree,
    also when they are packed into :class:`jopt.flat.FlatParams`.

    Example:
      >>> import jax, jax.numpy as jnp, jopt
      >>> params = {"w": jnp.ones((2, 2)), "b": jnp.ones(2)}
      >>> no_bias = lambda p: jax.tree.map(lambda x: x.ndim > 1, p)
      >>> tx = jopt.adamw(1e-3, weight_decay=0.01, mask=no_bias)
      >>> state = tx.init(params)

    References:
      Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, ICLR 2019.
    """
    if not callable(weight_decay):
        check_in_range("weight_decay", weight_decay, 0.0,
                       hint="Use weight_decay=0 to turn decay off.")
    return chain(
        transforms.scale_by_adam(
            b1, b2, eps, eps_root, mu_dtype,
            nesterov=nesterov, amsgrad=amsgrad, state_storage=state_storage,
        ),
        _decayed_weights(weight_decay, mask),
        _learning_rate(learning_rate),
    )


def _decayed_weights(weight_decay, mask):
    # jopt.flat.masked is optax.masked on trees, and also selects per element on
    # FlatParams, where optax's per-leaf mask would see two 1-D buffers instead of
    # the model's kernels and biases.
    if mask is None:
        return optax.add_decayed_weights(weight_decay)
    return flat.masked(optax.add_decayed_weights(weight_decay), mask)


def nadam(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    *,
    nesterov: bool = True,
    state_storage: StateStorageLike = None,
) -> GradientTransformationExtraArgs:
    r"""NAdam: Adam with a Nesterov look-ahead first moment (:func:`adam`, ``nesterov=True``).

    ``\hat m_t = β_1 m_t/(1−β_1^{t+1}) + (1−β_1) g_t/(1−β_1^t)`` replaces Adam's
    bias-corrected ``m_t`` (the form optax uses; Dozat's Algorithm 2 also scales
    ``\hat v_t`` by ``β_2``, which optax and jopt omit).

    Example:
      >>> import jax.numpy as jnp, jopt

      The first step looks ahead: ``0.9·0.1/(1−0.9²) + 0.1/(1−0.9) ≈ 1.474`` times Adam's.

      >>> tx = jopt.nadam(0.1)
      >>> g = jnp.array([1.0]); state = tx.init(g)
      >>> jnp.round(tx.update(g, state)[0], 3)
      Array([-0.147], dtype=float32)

    References:
      Dozat, *Incorporating Nesterov Momentum into Adam*, ICLR workshop 2016.
    """
    return adam(learning_rate, b1, b2, eps, eps_root, mu_dtype,
                nesterov=nesterov, state_storage=state_storage)


def nadamw(
    learning_rate: ScalarOrSchedule,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    weight_decay: ScalarOrSchedule = 1e-4,
    mask: Any = None,
    *,
    nesterov: bool = True,
    state_storage: StateStorageLike = None,
) -> GradientTransformationExtraArgs:
    r"""NAdamW: NAdam's first moment with AdamW's decoupled weight decay.

    :func:`adamw` with ``nesterov=True`` (see :func:`nadam` for the first moment).

    Example:
      >>> import jax.numpy as jnp, jopt
      >>> tx = jopt.nadamw(0.1, weight_decay=0.0)
      >>> g = jnp.array([1.0]); state = tx.init(g)
      >>> jnp.round(tx.update(g, state, g)[0], 3)
      Array([-0.147], dtype=float32)

    References:
      Dozat 2016; Loshchilov & Hutter, *Decoupled Weight Decay Regularization*, 2019.
    """
    return adamw(learning_rate, b1, b2, eps, eps_root, mu_dtype, weight_decay, mask,
                 nesterov=nesterov, state_storage=state_storage)
