"""The per-array math of jopt's gradient transformations (`scale_by_*`).

Each function here states its update rule once, for a single array, and hands it
to :func:`jopt.lift.lift`, which makes it a transformation over any pytree or flat
buffer and stores its state through the chosen ``state_storage`` codec. The
formulas are written in the same algebraic order as optax's so that, in float32,
the trajectories agree to rounding.

Stateless pieces (weight decay, scaling by a learning rate, clipping) are optax's
own and are re-exported by :mod:`jopt`.
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from jopt import storage as storage_lib
from jopt._validation import check_in_range
from jopt.base import GradientTransformation
from jopt.lift import Moment, lift

__all__ = [
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
]

StateStorageLike = str | storage_lib.StateStorage | None


def _abs_sq(x: jax.Array) -> jax.Array:
    """|x|^2, real even for complex x."""
    if jnp.iscomplexobj(x):
        return (x.conj() * x).real
    return x**2


@functools.partial(jax.jit, inline=True)
def _bias_correction(moment: jax.Array, decay: Any, count: jax.Array) -> jax.Array:
    # decay**count is computed in float32 (or wider) before the cast, as low
    # precision would round it to 1 and divide by zero (same as optax). Jitted
    # (inlined into an enclosing jit) because outside jit ``decay ** count`` with a
    # concrete integer ``count`` is lax.integer_pow specialised on its value: every
    # step of an eager update loop would compile a new program (optax jits its
    # bias correction for the same reason).
    return moment / (1 - decay**count).astype(moment.dtype)


def _check_storage_and_dtype(state_storage: StateStorageLike, dtype_name: str, dtype: Any):
    if state_storage is not None and dtype is not None:
        raise ValueError(
            f"Pass either {dtype_name}={dtype!r} or state_storage={state_storage!r}, not "
            f"both: state_storage decides the dtype of every state array."
        )


class ScaleByMomentumState(NamedTuple):
    """State of :func:`scale_by_momentum`."""

    trace: Any  # tree like params; dtype per state_storage


def scale_by_momentum(
    decay: float = 0.9,
    *,
    nesterov: bool = False,
    dampening: float = 0.0,
    accumulator_dtype: Any = None,
    state_storage: StateStorageLike = None,
) -> GradientTransformation:
    r"""Accumulates a velocity: heavy-ball momentum, its EMA form, or Nesterov.

    .. math::
      v_t = \beta v_{t-1} + (1 - d)\, g_t, \qquad
      u_t = \begin{cases} g_t + \beta v_t & \text{Nesterov} \\ v_t & \text{otherwise}\end{cases}

    With ``dampening=0`` (default) this is heavy-ball momentum (Polyak 1964); with
    a constant learning rate ``α`` the step ``θ ← θ − α v_t`` is exactly
    ``θ_{t+1} = θ_t − α∇J(θ_t) + β(θ_t − θ_{t−1})``. With ``dampening=decay`` it is
    the exponential-moving-average form ``v ← βv + (1−β)g``, whose velocity is on
    the scale of the gradient. ``nesterov=True`` gives the look-ahead form of
    Sutskever et al. 2013 (as in optax's ``trace`` and PyTorch's SGD). The velocity
    starts at zero (PyTorch starts it at the first gradient instead, which only
    matters with dampening).

    Args:
      decay: the momentum coefficient ``β`` in [0, 1].
      nesterov: use Nesterov's look-ahead update.
      dampening: ``d`` in [0, 1); ``decay`` gives the EMA form.
      accumulator_dtype: storage dtype of the velocity (optax's name).
      state_storage: how the velocity is stored (see :mod:`jopt.storage`).

    Returns:
      A :class:`optax.GradientTransformation`.

    Example:
      >>> import jax.numpy as jnp, jopt
      >>> tx = jopt.scale_by_momentum(0.9)
      >>> g = {"w": jnp.ones(2)}
      >>> u, s = tx.update(g, tx.init(g))
      >>> u, s = tx.update(g, s)
      >>> u["w"]
      Array([1.9, 1.9], dtype=float32)

    References:
      Polyak, *Some methods of speeding up the convergence of iteration methods*, 1964.
      Sutskever et al., *On the importance of initialization and momentum in deep
      learning*, ICML 2013.
    """
    check_in_range("decay", decay, 0.0, 1.0, high_inclusive=True,
                   hint="Typical momentum values are 0.9 or 0.99.")
    check_in_range("dampening", dampening, 0.0, 1.0,
                   hint="Use dampening=decay for the EMA form, 0 for heavy-ball.")
    _check_storage_and_dtype(state_storage, "accumulator_dtype", accumulator_dtype)
    dampened = not (isinstance(dampening, (int, float)) and dampening == 0)

    def rule(grad, moments, count):
        del count
        (velocity,) = moments
        if dampened:
            velocity = decay * velocity + (1 - dampening) * grad
        else:
            velocity = grad + decay * velocity
        update = grad + decay * velocity if nesterov else velocity
        return update, (velocity,)

    return lift(
        rule,
        state_class=ScaleByMomentumState,
        moments=[Moment("trace", signed=True, dtype=accumulator_dtype)],
        state_storage=state_storage,
        name="scale_by_momentum",
    )


class ScaleByAdagradState(NamedTuple):
    """State of :func:`scale_by_adagrad`."""

    sum_of_squares: Any  # tree like params; dtype per state_storage


def scale_by_adagrad(
    initial_accumulator_value: float = 0.1,
    eps: float = 1e-7,
    *,
    state_storage: StateStorageLike = None,
) -> GradientTransformation:
    r"""Scales by the inverse root of the running sum of squared gradients (AdaGrad).

    .. math::
      s_t = s_{t-1} + g_t^2, \qquad u_t = \frac{g_t}{\sqrt{s_t + \epsilon}}

    (``u_t = 0`` where ``s_t = 0``). Equals optax's ``scale_by_rss``.

    Args:
      initial_accumulator_value: ``s_0`` (>= 0).
      eps: added inside the square root (>= 0).
      state_storage: how ``s`` is stored (see :mod:`jopt.storage`).

    Returns:
      A :class:`optax.GradientTransformation`.

    Example:
      >>> import jax.numpy as jnp, jopt
      >>> tx = jopt.scale_by_adagrad(initial_accumulator_value=0.0, eps=0.0)
      >>> g = {"w": jnp.array([3.0, -4.0])}
      >>> tx.update(g, tx.init(g))[0]["w"].round(6)  # GPUs' rsqrt is off in the last bit
      Array([ 1., -1.], dtype=float32)

    References:
      Duchi, Hazan & Singer, *Adaptive Subgradient Methods for Online Learning and
      Stochastic Optimization*, JMLR 2011.
    """
    check_in_range("initial_accumulator_value", initial_accumulator_value, 0.0)
    check_in_range("eps", eps, 0.0)

    def rule(grad, moments, count):
        del count
        (sum_of_squares,) = moments
        sum_of_squares = _abs_sq(grad) + sum_of_squares
        scale = jnp.where(sum_of_squares > 0, jax.lax.rsqrt(sum_of_squares + eps), 0.0)
        return scale * grad, (sum_of_squares,)

    return lift(
        rule,
        state_class=ScaleByAdagradState,
        moments=[Moment("sum_of_squares", signed=False,
                        initial_value=initial_accumulator_value)],
        state_storage=state_storage,
        name="scale_by_adagrad",
    )


class ScaleByRmsState(NamedTuple):
    """State of :func:`scale_by_rms` (``centered=False``)."""

    count: jax.Array  # shape=(), dtype=jnp.int32
    nu: Any  # tree like params


class ScaleByCenteredRmsState(NamedTuple):
    """State of :func:`scale_by_rms` (``centered=True``)."""

    count: jax.Array  # shape=(), dtype=jnp.int32
    mu: Any  # tree like params
    nu: Any  # tree like params


def scale_by_rms(
    decay: float = 0.9,
    eps: float = 1e-8,
    initial_scale: float = 0.0,
    eps_in_sqrt: bool = True,
    bias_correction: bool = False,
    *,
    centered: bool = False,
    state_storage: StateStorageLike = None,
) -> GradientTransformation:
    r"""Scales by the root of an EMA of squared gradients (RMSprop), optionally centered.

    .. math::
      \nu_t = \rho\,\nu_{t-1} + (1-\rho)\,g_t^2, \qquad
      u_t = \frac{g_t}{\sqrt{\nu_t - \mu_t^2 + \epsilon}}
      \;\text{or}\; \frac{g_t}{\sqrt{\nu_t - \mu_t^2} + \epsilon}

    where ``μ_t = ρμ_{t−1} + (1−ρ)g_t`` when ``centered`` (Graves 2013) and 0
    otherwise; ``eps_in_sqrt`` picks the first or second form. With
    ``bias_correction`` the moments are divided by ``1 − ρ^t``. ``centered=False``
    matches optax's ``scale_by_rms``, ``centered=True`` its ``scale_by_stddev``,
    except that ``ν_t − μ_t²`` is clamped at 0: rounding (of float32 when the
    variance is tiny against the mean) can make it negative, where optax's square
    root gives NaN.

    With a lossy ``state_storage`` (``"bfloat16"``, ``"int8"``) the centered form
    stores, in its ``nu`` field, the centered second moment ``s_t = ν_t − μ_t²``
    itself, by the exact recurrence ``s_t = ρ s_{t−1} + ρ(1−ρ)|g_t − μ_{t−1}|²``:
    the difference of two separately rounded moments would lose the variance
    whenever the mean gradient dominates it (a relative rounding error of 0.4%
    (bf16) to 3% (int8) of ``ν`` against a variance of, say, 0.01% of it gave NaN
    or 100x too large steps), while ``s_t`` is stored to its own precision. In
    exact arithmetic both forms give the same updates. (With ``bias_correction``
    the corrected variance is still a difference, ``ŝ`` rebuilt from ``s_t + μ_t²``,
    clamped at 0; it is ill-conditioned in the first steps in float32 too.)

    Args:
      decay: ``ρ`` in [0, 1).
      eps: >= 0.
      initial_scale: ``ν_0`` (>= 0).
      eps_in_sqrt: put ``eps`` inside (True) or outside the square root.
      bias_correction: divide the moments by ``1 − ρ^t``.
      centered: subtract the squared mean gradient (centered RMSprop).
      state_storage: how the moments are stored (see :mod:`jopt.storage`).

    Returns:
      A :class:`optax.GradientTransformation`.

    Example:
      >>> import jax.numpy as jnp, jopt
      >>> tx = jopt.scale_by_rms(decay=0.0, eps=0.0)
      >>> g = {"w": jnp.array([2.0, -0.5])}
      >>> tx.update(g, tx.init(g))[0]["w"].round(6)  # GPUs' rsqrt is off in the last bit
      Array([ 1., -1.], dtype=float32)

    References:
      Tieleman & Hinton, *Lecture 6.5 - RMSprop*, COURSERA: Neural Networks for
      Machine Learning, 2012. Graves, *Generating Sequences With Recurrent Neural
      Networks*, 2013 (the centered form).
    """
    check_in_range("decay", decay, 0.0, 1.0)
    check_in_range("eps", eps, 0.0)
    check_in_range("initial_scale", initial_scale, 0.0)

    def corrected(moment, count):
        return _bias_correction(moment, decay, count) if bias_correction else moment

    def scale(variance):
        return jax.lax.rsqrt(variance + eps) if eps_in_sqrt else 1 / (jnp.sqrt(variance) + eps)

    def centered_rule(grad, moments, count):
        """The centered form on (mu, s = nu - mu^2): no cancellation in storage."""
        old_mu, old_s = moments
        mu = (1 - decay) * grad + decay * old_mu
        s = decay * old_s + (decay * (1 - decay)) * _abs_sq(grad - old_mu)
        if bias_correction:  # nu_hat - mu_hat^2, with nu rebuilt in float32
            variance = jnp.maximum(
                corrected(s + _abs_sq(mu), count) - _abs_sq(corrected(mu, count)), 0.0)
        else:
            variance = s
        return scale(variance) * grad, (mu, s)

    def rule(grad, moments, count):
        nu = (1 - decay) * _abs_sq(grad) + decay * moments[-1]
        variance = corrected(nu, count)
        if centered:
            mu = (1 - decay) * grad + decay * moments[0]
            # Mathematically >= 0; the rounding of separately stored mu and nu (bf16,
            # int8, even float32 when the variance is tiny against the mean) can
            # make it negative, and rsqrt of that is NaN.
            variance = jnp.maximum(variance - _abs_sq(corrected(mu, count)), 0.0)
        return scale(variance) * grad, ((mu, nu) if centered else (nu,))

    nu = Moment("nu", signed=False, initial_value=initial_scale)
    if centered:
        lossy = _lossy(state_storage)
        return lift(centered_rule if lossy else rule, state_class=ScaleByCenteredRmsState,
                    moments=[Moment("mu", signed=True), nu],
                    state_storage=state_storage, name="scale_by_rms")
    return lift(rule, state_class=ScaleByRmsState, moments=[nu],
                state_storage=state_storage, name="scale_by_rms")


def _lossy(state_storage: StateStorageLike) -> bool:
    """Whether ``state_storage`` rounds float32 state (bf16, int8, custom codecs)."""
    codec = storage_lib.resolve_storage(state_storage)
    if isinstance(codec, storage_lib.ParamDtypeStorage):
        return False  # optax's behaviour: the parameter's own dtype
    if isinstance(codec, storage_lib.DtypeStorage):
        return jnp.finfo(codec.dtype).bits < 32
    return True


class ScaleByAdamState(NamedTuple):
    """State of :func:`scale_by_adam` (same fields as optax's)."""

    count: jax.Array  # shape=(), dtype=jnp.int32
    mu: Any  # tree like params; first moment
    nu: Any  # tree like params; second moment


class ScaleByAmsgradState(NamedTuple):
    """State of :func:`scale_by_adam` with ``amsgrad=True`` (same fields as optax's)."""

    count: jax.Array  # shape=(), dtype=jnp.int32
    mu: Any  # tree like params
    nu: Any  # tree like params
    nu_max: Any  # tree like params; running max of the corrected second moment


def scale_by_adam(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    eps_root: float = 0.0,
    mu_dtype: Any = None,
    *,
    nesterov: bool = False,
    amsgrad: bool = False,
    state_storage: StateStorageLike = None,
) -> GradientTransformation:
    r"""Scales updates by Adam's bias-corrected moment estimates (Kingma & Ba 2014).

    .. math::
      m_t = \beta_1 m_{t-1} + (1-\beta_1) g_t, \quad
      v_t = \beta_2 v_{t-1} + (1-\beta_2) g_t^2, \quad
      \hat m_t = \frac{m_t}{1-\beta_1^t}, \quad \hat v_t = \frac{v_t}{1-\beta_2^t}, \quad
      u_t = \frac{\hat m_t}{\sqrt{\hat v_t + \epsilon_{root}} + \epsilon}

    This is Algorithm 1 of Kingma & Ba (with ``ε`` outside the root, as there).
    ``nesterov=True`` uses ``\hat m_t = β_1 m_t/(1−β_1^{t+1}) + (1−β_1) g_t/(1−β_1^t)``
    (NAdam, Dozat 2016, as in optax). ``amsgrad=True`` divides by the running
    maximum of ``\hat v_t`` instead (Reddi et al. 2018; optax's ``amsgrad``).

    Args:
      b1: ``β_1`` in [0, 1).
      b2: ``β_2`` in [0, 1).
      eps: >= 0, added to the denominator outside the root.
      eps_root: >= 0, added inside the root.
      mu_dtype: storage dtype of ``m`` (optax's option).
      nesterov: use NAdam's look-ahead first moment.
      amsgrad: use AMSGrad's running maximum of the second moment.
      state_storage: how ``m``/``v`` are stored (see :mod:`jopt.storage`).

    Returns:
      A :class:`optax.GradientTransformation`.

    Example:
      The first Adam step has magnitude ~1 whatever the gradient's scale:

      >>> import jax.numpy as jnp, jopt
      >>> tx = jopt.scale_by_adam()
      >>> g = {"w": jnp.array([1e-3, -50.0])}
      >>> jnp.round(tx.update(g, tx.init(g))[0]["w"], 4)
      Array([ 1., -1.], dtype=float32)

    References:
      Kingma & Ba, *Adam: A Method for Stochastic Optimization*, ICLR 2015
      (arXiv:1412.6980). Dozat, *Incorporating Nesterov Momentum into Adam*, 2016.
      Reddi, Kale & Kumar, *On the Convergence of Adam and Beyond*, ICLR 2018.
    """
    check_in_range("b1", b1, 0.0, 1.0, hint="Adam's default is b1=0.9.")
    check_in_range("b2", b2, 0.0, 1.0, hint="Adam's default is b2=0.999.")
    check_in_range("eps", eps, 0.0)
    check_in_range("eps_root", eps_root, 0.0)
    _check_storage_and_dtype(state_storage, "mu_dtype", mu_dtype)

    def rule(grad, moments, count):
        mu, nu = moments[:2]
        mu = (1 - b1) * grad + b1 * mu
        nu = (1 - b2) * _abs_sq(grad) + b2 * nu
        if nesterov:
            mu_hat = (b1 * _bias_correction(mu, b1, count + 1)
                      + (1 - b1) * _bias_correction(grad, b1, count))
        else:
            mu_hat = _bias_correction(mu, b1, count)
        nu_hat = _bias_correction(nu, b2, count)
        if amsgrad:
            nu_max = jnp.maximum(moments[2], nu_hat)
            update = mu_hat / (jnp.sqrt(nu_max + eps_root) + eps)
            return update, (mu, nu, nu_max)
        update = mu_hat / (jnp.sqrt(nu_hat + eps_root) + eps)
        return update, (mu, nu)

    moments = [Moment("mu", signed=True, dtype=mu_dtype), Moment("nu", signed=False)]
    if amsgrad:
        return lift(rule, state_class=ScaleByAmsgradState,
                    moments=moments + [Moment("nu_max", signed=False)],
                    state_storage=state_storage, name="scale_by_adam")
    return lift(rule, state_class=ScaleByAdamState, moments=moments,
                state_storage=state_storage, name="scale_by_adam")
