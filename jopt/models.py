"""Models: the Flax networks jopt's training loop trains (an MLP and a small CNN).

Both are Flax **Linen** modules. Linen keeps a model's description apart from its
parameters, so ``model.apply(params, images)`` is a pure function of a plain
parameter pytree - exactly what the training loop needs: the parameters are the
carry of a ``lax.scan``, they are packed into :class:`jopt.flat.FlatParams` and
unpacked inside the step, and they are what checkpoints store. Flax NNX would hold
the parameters inside mutable module objects and need ``nnx.split``/``nnx.merge``
around every step to get the same pure function.

Inputs are images ``[batch, height, width]`` (or ``[batch, height, width,
channels]``) already scaled to floats; the training loop keeps them ``uint8`` on the
device and scales them inside its step. ``dtype`` is the computation dtype (``None``:
the parameters' dtype): with ``dtype=jnp.bfloat16`` the float32 parameters and the
inputs are cast to bfloat16 inside each layer (mixed precision), and the gradients
still arrive in float32.

``quantize_weights`` / ``quantize_activations`` turn on quantization-aware training:
the dense layers become :class:`jopt.quantization.QuantDense` (same parameter names
and shapes, fake-quantized kernels with straight-through gradients), so the trained
tree exports with :func:`jopt.quantization.quantize_params`. Convolutions stay float.

The CNN's convolutions go through :func:`conv_general_dilated`, a drop-in for
``lax.conv_general_dilated`` whose gradient XLA:CPU compiles to fast convolutions
inside the training loop's ``lax.scan`` too (see its docstring: 14x per step), and
:func:`conv_compiler_options` are the XLA:CPU options :mod:`jopt.train` compiles a
convolutional network's programs with (2x per step again).

Example:
  >>> import jax, jax.numpy as jnp
  >>> from jopt.models import MLP
  >>> model = MLP(hidden_sizes=(64, 64), num_classes=10)
  >>> params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28)))
  >>> model.apply(params, jnp.zeros((5, 28, 28))).shape
  (5, 10)
  >>> sum(x.size for x in jax.tree.leaves(params))  # 784*64+64 + 64*64+64 + 64*10+10
  55050
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax

from jopt.quantization import QuantDense

__all__ = ["CNN", "MLP", "conv_compiler_options", "conv_general_dilated", "num_params"]


class MLP(nn.Module):
    """A multi-layer perceptron: flatten, ``Dense -> relu`` per hidden size, ``Dense``.

    With the defaults this is the Keras-tutorial model 784-64(relu)-64(relu)-10.

    Attributes:
      hidden_sizes: width of each hidden layer.
      num_classes: number of output logits.
      dtype: computation dtype (``None``: the parameters' dtype).
      param_dtype: dtype the parameters are created in.
      quantize_weights: QAT weight mode (``"int8"``, ``"int4"``, ``"ternary"``,
        ``"binary"``) or ``None`` for float weights.
      quantize_activations: ``"int8"`` to fake-quantize each layer's input, or ``None``.
      input_mean, input_std: the input is standardised as ``(x - mean) / std`` first;
        ``train.create_model`` sets the training set's pixel statistics
        (``jopt.data.DatasetSpec.pixel_mean``/``pixel_std``), as torchvision's MNIST
        example does. Standardised inputs train measurably better than ``[0, 1]``
        inputs (Fashion-MNIST reference recipe: 87.2% vs 86.4%, mean of 8 seeds).
    """

    hidden_sizes: Sequence[int] = (64, 64)
    num_classes: int = 10
    dtype: Any = None
    param_dtype: Any = jnp.float32
    quantize_weights: str | None = None
    quantize_activations: str | None = None
    input_mean: float = 0.0
    input_std: float = 1.0

    @nn.compact
    def __call__(self, images):
        x = _standardise(images, self.input_mean, self.input_std)
        x = x.reshape((x.shape[0], -1))
        for i, size in enumerate(self.hidden_sizes):
            x = nn.relu(self._dense(size, f"hidden_{i}")(x))
        return self._dense(self.num_classes, "logits")(x)

    def _dense(self, features: int, name: str) -> nn.Module:
        if self.quantize_weights is None and self.quantize_activations is None:
            return nn.Dense(features, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
        return QuantDense(features, weights=self.quantize_weights,
                          activations=self.quantize_activations, dtype=self.dtype,
                          param_dtype=self.param_dtype, name=name)


class CNN(nn.Module):
    """A small convolutional network: ``(Conv 3x3 -> relu -> avg-pool 2x2)`` per
    entry of ``conv_features``, then an :class:`MLP` head on the flattened maps.

    With the defaults it is the Flax MNIST example's CNN (32 and 64 channels, a
    256-unit hidden layer).

    Attributes:
      conv_features: channels of each convolution.
      hidden_sizes: hidden layers of the dense head.
      num_classes: number of output logits.
      dtype: computation dtype (``None``: the parameters' dtype).
      param_dtype: dtype the parameters are created in.
      quantize_weights: QAT weight mode of the dense head (see :class:`MLP`).
      quantize_activations: QAT activation mode of the dense head.
      input_mean, input_std: input standardisation (see :class:`MLP`).
      conv: the convolution the layers call, with ``lax.conv_general_dilated``'s
        signature (``None``: :func:`conv_general_dilated`, which keeps the gradient
        fast on CPU inside ``lax.scan`` but supports reverse-mode differentiation
        only; ``jax.lax.conv_general_dilated`` for forward mode). The parameters do
        not depend on it.
    """

    conv_features: Sequence[int] = (32, 64)
    hidden_sizes: Sequence[int] = (256,)
    num_classes: int = 10
    dtype: Any = None
    param_dtype: Any = jnp.float32
    quantize_weights: str | None = None
    quantize_activations: str | None = None
    input_mean: float = 0.0
    input_std: float = 1.0
    conv: Callable[..., jax.Array] | None = None

    @nn.compact
    def __call__(self, images):
        if images.ndim not in (3, 4):
            raise ValueError(
                f"CNN takes a batch of images [batch, height, width] or [batch, height, "
                f"width, channels], got shape {images.shape}; reshape flat inputs (e.g. "
                f"[batch, 784] -> [batch, 28, 28]), and add a batch axis to a single image.")
        smallest = 2 ** len(self.conv_features)
        if min(images.shape[1:3]) < smallest:
            raise ValueError(
                f"CNN halves the image {len(self.conv_features)} times: height and width "
                f"must be at least {smallest}, got {images.shape[1:3]}.")
        x = _standardise(images, self.input_mean, self.input_std)
        x = x if x.ndim == 4 else x[..., None]
        for i, features in enumerate(self.conv_features):
            x = nn.Conv(features, (3, 3), dtype=self.dtype, param_dtype=self.param_dtype,
                        conv_general_dilated=self.conv or conv_general_dilated,
                        name=f"conv_{i}")(x)
            x = nn.avg_pool(nn.relu(x), (2, 2), strides=(2, 2))
        head = MLP(tuple(self.hidden_sizes), self.num_classes, self.dtype,
                   self.param_dtype, self.quantize_weights, self.quantize_activations,
                   name="head")
        return head(x)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None,
                         rhs_dilation=None, dimension_numbers=None, feature_group_count=1,
                         batch_group_count=1, precision=None, preferred_element_type=None):
    """``lax.conv_general_dilated`` with a gradient that stays fast on CPU inside loops.

    Same arguments and same values as :func:`jax.lax.conv_general_dilated`; pass it to
    Flax as ``nn.Conv(..., conv_general_dilated=jopt.models.conv_general_dilated)``.

    Why: XLA:CPU runs a convolution with its fast (Eigen) kernel only in the canonical
    layout - input ``[batch, spatial..., features]``, kernel ``[spatial..., in, out]`` -
    and its pass that transposes other convolutions into that layout
    (``ConvCanonicalization``) visits only the program's entry computation. JAX's
    gradient of a convolution is two convolutions in other layouts (the kernel gradient
    treats the input's features as the batch), so inside a ``lax.scan`` or
    ``while_loop`` body - where :func:`jopt.train` runs an epoch - they fall to XLA's
    naive loop. For ``configs/cnn.py`` that made a training step inside the epoch's scan
    14x slower than the same step jitted on its own (0.97 s against 71 ms, batch 128).

    Here the gradient is written, on CPU, as canonical convolutions with explicit
    transposes - the rewrite XLA does itself outside loops:

    - input gradient: the output gradient, dilated by the strides and padded by
      ``kernel - 1 - padding``, correlated with the spatially flipped kernel whose
      in/out axes are swapped;
    - kernel gradient: the input with its feature and batch axes exchanged, correlated
      with the output gradient as the kernel (batch as its input axis), dilated by the
      strides.

    On other platforms (GPU/TPU compilers take any layout) the gradient is JAX's own, and
    so it is for anything outside the canonical case: other dimension orders, groups,
    input or kernel dilation, ``preferred_element_type``, padding below 0 or of a
    kernel's size or more. Values agree with JAX's gradient to float rounding.

    The gradient is a ``jax.custom_vjp``: reverse mode (``grad``, ``vjp``, also
    nested) works, forward mode (``jvp``, ``jacfwd``, ``hessian``) does not - JAX
    refuses it for custom-VJP functions. For forward mode use
    ``lax.conv_general_dilated`` (``CNN(conv=jax.lax.conv_general_dilated)``).
    """
    nd = lhs.ndim - 2
    ones = (1,) * nd
    strides = tuple(int(s) for s in window_strides)
    general = functools.partial(
        lax.conv_general_dilated, window_strides=window_strides, padding=padding,
        lhs_dilation=lhs_dilation, rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers, feature_group_count=feature_group_count,
        batch_group_count=batch_group_count, precision=precision,
        preferred_element_type=preferred_element_type)
    if (nd < 1 or rhs.ndim != lhs.ndim or dimension_numbers is None
            or (lax.conv_dimension_numbers(lhs.shape, rhs.shape, dimension_numbers)
                != _canonical(lhs.ndim))
            or feature_group_count != 1 or batch_group_count != 1
            or tuple(lhs_dilation or ones) != ones or tuple(rhs_dilation or ones) != ones
            or preferred_element_type is not None or lhs.dtype != rhs.dtype):
        return general(lhs, rhs)
    kernel = rhs.shape[:nd]
    if isinstance(padding, str):
        pads = lax.padtype_to_pads(lhs.shape[1:-1], kernel, strides, padding)
    else:
        pads = padding
    pads = tuple((int(lo), int(hi)) for lo, hi in pads)
    if any(not 0 <= p < k for (lo, hi), k in zip(pads, kernel) for p in (lo, hi)):
        return general(lhs, rhs)
    return _canonical_conv(lhs, rhs, strides, pads, precision)


# XLA:CPU's default library fusions in jaxlib 0.10 are REDUCE, INDIVIDUAL_DOT and
# INDIVIDUAL_CONVOLUTION; this is that list without the convolutions.
_YNN_FUSIONS_WITHOUT_CONVOLUTIONS = {
    "xla_cpu_experimental_ynn_fusion_type":
        "LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


def conv_compiler_options(backend: str | None = None) -> dict[str, str]:
    """XLA options to jit a convolutional network's training or evaluation with on CPU.

    XLA:CPU (jaxlib 0.10) hands each convolution to YNNPACK by default, and YNNPACK is
    slow at the ones a gradient makes: for ``configs/cnn.py`` on 2 cores the kernel
    gradient of the second convolution (a 14x14 window over 128 images, 3x3 output)
    ran at 34 GFLOP/s against 125 GFLOP/s in XLA's Eigen convolution, and the whole
    training step took 75 ms against 38 ms with these options. They keep XLA's
    other YNNPACK fusions (reductions, matrix products) as they are; a network without
    convolutions compiles to the same program.

    Use: ``jax.jit(train_step, compiler_options=conv_compiler_options())``.
    :mod:`jopt.train` does so for ``config.model.name = "cnn"``.

    Args:
      backend: the platform the program compiles for (default: JAX's default backend).

    Returns:
      the options on CPU, if this XLA knows them; otherwise ``{}`` (other platforms
      choose their own convolution kernels).
    """
    if (backend or jax.default_backend()) != "cpu" or not _xla_takes_ynn_fusion_option():
        return {}
    return dict(_YNN_FUSIONS_WITHOUT_CONVOLUTIONS)


@functools.cache
def _xla_takes_ynn_fusion_option() -> bool:
    # The option is experimental: a jaxlib that renamed it must still compile jopt.
    try:
        x = jax.device_put(jnp.zeros((), jnp.float32), jax.local_devices(backend="cpu")[0])
        jax.jit(lambda x: x + 1).lower(x).compile(dict(_YNN_FUSIONS_WITHOUT_CONVOLUTIONS))
    except jax.errors.JaxRuntimeError:
        return False
    return True


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _canonical_conv(x, w, strides, pads, precision):
    return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=_canonical(x.ndim),
                                    precision=precision)


def _canonical(ndim: int) -> lax.ConvDimensionNumbers:
    nd = ndim - 2
    return lax.ConvDimensionNumbers(
        (0, nd + 1, *range(1, nd + 1)), (nd + 1, nd, *range(nd)), (0, nd + 1, *range(1, nd + 1)))


def _canonical_conv_fwd(x, w, strides, pads, precision):
    return _canonical_conv(x, w, strides, pads, precision), (x, w)


def _canonical_conv_bwd(strides, pads, precision, residuals, dy):
    x, w = residuals
    return lax.platform_dependent(
        x, w, dy, cpu=functools.partial(_canonical_conv_grads, strides, pads, precision),
        default=functools.partial(_jax_conv_grads, strides, pads, precision))


_canonical_conv.defvjp(_canonical_conv_fwd, _canonical_conv_bwd)


def _jax_conv_grads(strides, pads, precision, x, w, dy):
    conv = functools.partial(lax.conv_general_dilated, window_strides=strides, padding=pads,
                             dimension_numbers=_canonical(x.ndim), precision=precision)
    return jax.vjp(conv, x, w)[1](dy)


def _canonical_conv_grads(strides, pads, precision, x, w, dy):
    """Both cotangents of a canonical convolution as canonical convolutions (see
    :func:`conv_general_dilated`). The convolution's last window along a spatial axis
    stops ``rest`` elements short of the padded input's end; those elements get no
    gradient and do not touch the kernel's."""
    nd = x.ndim - 2
    kernel = w.shape[:nd]
    ones = (1,) * nd
    rest = [(n + lo + hi - k) % s
            for n, k, s, (lo, hi) in zip(x.shape[1:-1], kernel, strides, pads)]
    dn = _canonical(x.ndim)
    flipped = jnp.swapaxes(lax.rev(w, tuple(range(nd))), -1, -2)     # [k..., out, in]
    dx = lax.conv_general_dilated(
        dy, flipped, ones,
        [(k - 1 - lo, k - 1 - hi + r) for k, (lo, hi), r in zip(kernel, pads, rest)],
        lhs_dilation=strides, dimension_numbers=dn, precision=precision)
    # Kernel gradient: [in, spatial..., batch] input, [out spatial..., batch, out] kernel.
    xt = jnp.moveaxis(x, (0, x.ndim - 1), (x.ndim - 1, 0))
    cut = [max(r - hi, 0) for (lo, hi), r in zip(pads, rest)]
    if any(cut):
        xt = xt[(slice(None), *(slice(0, n - c) for n, c in zip(x.shape[1:-1], cut)))]
    dwt = lax.conv_general_dilated(
        xt, jnp.moveaxis(dy, 0, -2), ones,
        [(lo, max(hi - r, 0)) for (lo, hi), r in zip(pads, rest)],
        rhs_dilation=strides, dimension_numbers=dn, precision=precision)
    return dx.astype(x.dtype), jnp.moveaxis(dwt, 0, -2).astype(w.dtype)


def _standardise(x: jax.Array, mean: float, std: float) -> jax.Array:
    if std <= 0:
        raise ValueError(f"input_std must be > 0, got {std}.")
    if mean == 0.0 and std == 1.0:
        return x
    return (x - mean) * (1.0 / std)


def num_params(params: Any) -> int:
    """Number of parameters (array elements) in a parameter pytree."""
    return sum(int(x.size) for x in jax.tree.leaves(params))
