"""Weight quantization: fake quantization for QAT, int8 post-training quantization, int8 inference.

One piece of math serves training and export: a weight array is mapped to
integer *codes* times a float32 scale per output channel (the last axis of a Flax
kernel ``[..., in, out]``):

=========  ======================  =============================================  ====
mode       codes                   scale per output channel                       bits
=========  ======================  =============================================  ====
int8       ``round(w/s)`` in ±127  ``max|w| / 127`` (symmetric absmax)            8
int4       ``round(w/s)`` in ±7    ``max|w| / 7``                                 4
ternary    {−1, 0, +1}             ``mean |w|`` over ``|w| > Δ``, ``Δ = 0.7·mean|w|``  2
binary     {−1, +1} (sign)         ``mean |w|`` (XNOR-Net)                        1
=========  ======================  =============================================  ====

* **Quantization-aware training** (:func:`fake_quantize`, :class:`QuantDense`):
  the forward pass uses ``codes · scale``; the backward pass is a straight-through
  estimator (the gradient of the identity, zeroed outside the clipping range: the
  code range for int8/int4, ``|w| <= 1`` for binary). Optional int8 activations
  are quantized per row (per example) with a dynamic absmax scale.
* **Post-training quantization** (:func:`quantize_params`) turns the dense
  kernels (2-D arrays) of a trained float tree into :class:`QuantizedTensor`
  leaves (int8 codes + scales); convolution kernels, embeddings, biases and
  other leaves stay float. :func:`quantized_apply` runs a Flax model with them:
  every ``Dense`` layer quantizes its input per row to int8 and computes
  ``int8 × int8 → int32`` with ``lax.dot_general(..., preferred_element_type=int32)``,
  then rescales.
* :func:`size_report` compares the bytes of the float32 model and the quantized
  one (int4/ternary/binary codes counted packed; :func:`save_quantized` packs them
  on disk too).

Example:
  >>> import jax, jax.numpy as jnp, flax.linen as nn
  >>> from jopt import quantization
  >>> model = nn.Dense(3)
  >>> x = jnp.linspace(-1.0, 1.0, 8).reshape(2, 4)
  >>> variables = model.init(jax.random.key(0), x)
  >>> qvariables = quantization.quantize_params(variables)
  >>> qvariables["params"]["kernel"].codes.dtype
  dtype('int8')
  >>> y = quantization.quantized_apply(model, qvariables, x)
  >>> bool(jnp.allclose(y, model.apply(variables, x), atol=0.05))
  True

References:
  Jacob et al., *Quantization and Training of Neural Networks for Efficient
  Integer-Arithmetic-Only Inference*, CVPR 2018.
  Bengio et al., *Estimating or Propagating Gradients Through Stochastic Neurons*,
  2013 (the straight-through estimator).
  Hubara et al., *Binarized Neural Networks*, NeurIPS 2016 (STE clipped at 1).
  Li & Liu, *Ternary Weight Networks*, 2016 (arXiv:1605.04711) - ``Δ = 0.7·E|w|``.
  Rastegari et al., *XNOR-Net*, ECCV 2016 - binary weights scaled by ``mean |w|``.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jopt import _npz

__all__ = [
    "MODES",
    "QuantDense",
    "QuantizedTensor",
    "fake_quantize",
    "fake_quantize_activations",
    "int8_matmul",
    "load_quantized",
    "quantize",
    "quantize_params",
    "quantized_apply",
    "resolve_mode",
    "save_quantized",
    "size_report",
    "straight_through",
]

MODES = {"int8": 8, "int4": 4, "ternary": 2, "binary": 1}
"""Weight quantization modes and the bits each code takes when packed."""

_INT_MAX = {"int8": 127, "int4": 7}
_TERNARY_THRESHOLD = 0.7  # Li & Liu 2016, eq. (9): Δ ≈ 0.7·E|w|
_BINARY_CLIP = 1.0  # Hubara et al. 2016: the STE passes gradients for |w| <= 1


def resolve_mode(mode: str | int) -> str:
    """Canonical mode name from a name or a bit width (8, 4, 2 = ternary, 1 = binary).

    Raises:
      ValueError: an unsupported mode or bit width; the message lists the choices.
    """
    by_bits = {bits: name for name, bits in MODES.items()}
    if isinstance(mode, str) and mode in MODES:
        return mode
    if isinstance(mode, (int, np.integer)) and not isinstance(mode, bool) and mode in by_bits:
        return by_bits[int(mode)]
    choices = ", ".join(f"{name!r} ({bits})" for name, bits in MODES.items())
    raise ValueError(
        f"Unsupported weight quantization {mode!r}; choose one of {choices} (name or bits)."
    )


# --------------------------------------------------------------------------- the math


@jax.custom_vjp
def straight_through(x: jax.Array, quantized: jax.Array, passes: jax.Array) -> jax.Array:
    """Returns ``quantized``; its gradient flows to ``x`` unchanged where ``passes``.

    The straight-through estimator (Bengio et al. 2013): rounding has zero
    gradient almost everywhere, so the backward pass pretends the forward pass was
    the identity, within the range where the quantizer does not clip. Unlike
    ``x + stop_gradient(q - x)`` the forward value is exactly ``quantized``, and
    no gradient reaches the scales (they are statistics of ``x``, as in
    XNOR-Net's and the int8 absmax scales).

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jopt.quantization import straight_through
      >>> x = jnp.array([0.4, 2.0])
      >>> jax.grad(lambda x: straight_through(x, jnp.round(x), jnp.abs(x) <= 1).sum())(x)
      Array([1., 0.], dtype=float32)
    """
    del x, passes
    return quantized


def _straight_through_fwd(x, quantized, passes):
    return quantized, passes


def _straight_through_bwd(passes, grad):
    return jnp.where(passes, grad, jnp.zeros_like(grad)), None, None


straight_through.defvjp(_straight_through_fwd, _straight_through_bwd)


def _reduce_axes(ndim: int, channel_axis: int | None) -> tuple[int, ...]:
    if channel_axis is None:
        return tuple(range(ndim))
    channel_axis %= ndim
    return tuple(a for a in range(ndim) if a != channel_axis)


def _codes_and_scale(w: jax.Array, mode: str, channel_axis: int | None):
    """Integer codes (float32 values) and the per-channel scale (kept dims)."""
    w = jnp.asarray(w, jnp.float32)
    axes = _reduce_axes(w.ndim, channel_axis)
    magnitude = jnp.abs(w)
    if mode in _INT_MAX:
        qmax = _INT_MAX[mode]
        absmax = jnp.max(magnitude, axis=axes, keepdims=True)
        scale = jnp.where(absmax > 0, absmax / qmax, 1.0)
        codes = jnp.clip(jnp.round(w / scale), -qmax, qmax)
    elif mode == "ternary":
        delta = _TERNARY_THRESHOLD * jnp.mean(magnitude, axis=axes, keepdims=True)
        large = magnitude > delta
        count = jnp.sum(large, axis=axes, keepdims=True)
        total = jnp.sum(jnp.where(large, magnitude, 0.0), axis=axes, keepdims=True)
        scale = jnp.where(count > 0, total / jnp.maximum(count, 1), 1.0)
        codes = jnp.where(large, jnp.sign(w), 0.0)
    else:  # binary; sign(0) is taken as +1 so every weight carries one bit
        mean = jnp.mean(magnitude, axis=axes, keepdims=True)
        scale = jnp.where(mean > 0, mean, 1.0)
        codes = jnp.where(w >= 0, 1.0, -1.0)
    return codes, scale


def fake_quantize(w: jax.Array, mode: str | int = "int8", *, channel_axis: int | None = -1
                  ) -> jax.Array:
    r"""Quantize-dequantize ``w`` in the forward pass, straight-through in the backward pass.

    .. math::
      \hat w = s \cdot q(w / s), \qquad
      \frac{\partial \hat w}{\partial w} = \mathbb{1}[w \text{ inside the clipping range}]

    with codes ``q`` and scale ``s`` per output channel as in the module table.

    Args:
      w: a weight array, e.g. a Flax kernel ``[in, out]``.
      mode: ``"int8"``, ``"int4"``, ``"ternary"``, ``"binary"`` (or 8, 4, 2, 1).
      channel_axis: the axis with one scale per entry (-1: output channels of a
        Flax kernel); ``None`` for one scale for the whole array.

    Returns:
      An array like ``w`` (float32) holding at most ``2^bits`` distinct values per
      channel.

    Raises:
      ValueError: an unsupported mode.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jopt.quantization import fake_quantize
      >>> w = jnp.array([[0.5, -0.1], [-0.2, 0.3]])
      >>> fake_quantize(w, "binary")
      Array([[ 0.35, -0.2 ],
             [-0.35,  0.2 ]], dtype=float32)
      >>> jax.grad(lambda w: fake_quantize(w, "int4").sum())(w)
      Array([[1., 1.],
             [1., 1.]], dtype=float32)
    """
    mode = resolve_mode(mode)
    w = jnp.asarray(w)
    codes, scale = _codes_and_scale(w, mode, channel_axis)
    quantized = jax.lax.stop_gradient(codes * scale).astype(w.dtype)
    if mode == "binary":
        passes = jnp.abs(w) <= _BINARY_CLIP
    elif mode in _INT_MAX:
        passes = jnp.abs(w) <= _INT_MAX[mode] * jax.lax.stop_gradient(scale)
    else:
        passes = jnp.ones(w.shape, bool)
    return straight_through(w, quantized, passes)


def _per_row_int8(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """int8 codes and float32 scale [..., 1] of ``x``, one absmax scale per row."""
    x = jnp.asarray(x, jnp.float32)
    absmax = jnp.max(jnp.abs(x), axis=-1, keepdims=True)
    scale = jnp.where(absmax > 0, absmax / 127.0, 1.0)
    return jnp.clip(jnp.round(x / scale), -127, 127).astype(jnp.int8), scale


def fake_quantize_activations(x: jax.Array) -> jax.Array:
    """int8 fake quantization of activations, one dynamic absmax scale per row (example).

    The same quantizer as the int8 inference path of :func:`int8_matmul`, so a
    model trained with it sees at training time what it will see at inference.
    Straight-through gradient (absmax scales never clip).
    """
    x = jnp.asarray(x)
    codes, scale = _per_row_int8(x)
    quantized = jax.lax.stop_gradient(codes.astype(jnp.float32) * scale).astype(x.dtype)
    return straight_through(x, quantized, jnp.ones(x.shape, bool))


# --------------------------------------------------------------------------- QAT layer


class QuantDense(nn.Module):
    """A ``flax.linen.Dense`` whose kernel (and optionally input) is fake-quantized.

    Its parameters are named and shaped like ``nn.Dense``'s (``kernel`` ``[in,
    out]``, ``bias``), so a float checkpoint fine-tunes with QAT, and a QAT-trained
    tree goes through :func:`quantize_params` / :func:`quantized_apply` unchanged -
    with the same codes and scales it was trained with.

    Attributes:
      features: output size.
      weights: weight mode (``"int8"``, ``"int4"``, ``"ternary"``, ``"binary"``)
        or None for float weights.
      activations: ``"int8"`` to fake-quantize the input per row, or None.
      use_bias: add a bias (biases are not quantized).
      dtype: computation dtype (None: promote input and parameters), as in ``nn.Dense``.
      param_dtype: parameter dtype, as in ``nn.Dense``.
      kernel_init: as in ``nn.Dense``.
      bias_init: as in ``nn.Dense``.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jopt.quantization import QuantDense
      >>> layer = QuantDense(4, weights="binary")
      >>> params = layer.init(jax.random.key(0), jnp.ones((1, 3)))["params"]
      >>> sorted(params)
      ['bias', 'kernel']
    """

    features: int
    weights: str | int | None = "int8"
    activations: str | None = None
    use_bias: bool = True
    dtype: Any = None
    param_dtype: Any = jnp.float32
    kernel_init: Callable = nn.initializers.lecun_normal()
    bias_init: Callable = nn.initializers.zeros_init()

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        if self.activations not in (None, "int8"):
            raise ValueError(
                f"activations must be None or 'int8', got {self.activations!r}."
            )
        kernel = self.param("kernel", self.kernel_init, (jnp.shape(x)[-1], self.features),
                            self.param_dtype)
        bias = (self.param("bias", self.bias_init, (self.features,), self.param_dtype)
                if self.use_bias else None)
        if self.weights is not None:  # quantized in float32, then cast to the compute dtype
            kernel = fake_quantize(kernel, self.weights)
        if self.activations == "int8":
            x = fake_quantize_activations(x)
        x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
        y = jax.lax.dot_general(x, kernel, (((x.ndim - 1,), (0,)), ((), ())))
        return y if bias is None else y + bias


# --------------------------------------------------------------------------- PTQ


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedTensor:
    """An array stored as int8 codes times a float32 scale per output channel.

    A pytree (``codes`` and ``scale`` are its leaves), so it passes through ``jit``.

    Attributes:
      codes: int8 array with the weight's shape; values within the mode's range.
      scale: float32, broadcastable to ``codes`` (``[1, ..., 1, out]``).
      mode: ``"int8"``, ``"int4"``, ``"ternary"`` or ``"binary"`` (static).
    """

    codes: jax.Array
    scale: jax.Array
    mode: str = dataclasses.field(default="int8", metadata={"static": True})

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.codes.shape)

    @property
    def nbytes(self) -> int:
        """Bytes with codes packed at the mode's bit width, plus the scales."""
        code_bytes = -(-int(np.size(self.codes)) * MODES[self.mode] // 8)
        return code_bytes + int(np.size(self.scale)) * 4

    def dequantize(self) -> jax.Array:
        """``codes · scale`` in float32."""
        return self.codes.astype(jnp.float32) * self.scale


def quantize(w: jax.Array, mode: str | int = "int8", *, channel_axis: int | None = -1
             ) -> QuantizedTensor:
    """Quantizes one array (per output channel by default); see the module table.

    Example:
      >>> import jax.numpy as jnp
      >>> from jopt.quantization import quantize
      >>> q = quantize(jnp.array([[1.0, -0.5], [-2.0, 0.25]]))
      >>> q.codes
      Array([[  64, -127],
             [-127,   64]], dtype=int8)
    """
    mode = resolve_mode(mode)
    codes, scale = _codes_and_scale(w, mode, channel_axis)
    return QuantizedTensor(codes.astype(jnp.int8), scale.astype(jnp.float32), mode)


def _is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedTensor)


def _is_dense_kernel(path: tuple, leaf: Any) -> bool:
    """A 2-D array not named ``bias`` or ``embedding``: a ``Dense`` kernel ``[in, out]``.

    Convolution kernels (``[*window, in, out]``) and ``DenseGeneral`` / attention
    kernels have ndim > 2, ``nn.Embed`` tables are named ``embedding``:
    :func:`quantized_apply` could not run any of them quantized.
    """
    name = _npz.key_name(path[-1]) if path else None
    return jnp.ndim(leaf) == 2 and name not in ("bias", "embedding")


def quantize_params(params: Any, mode: str | int = "int8", *, include: Any = None) -> Any:
    """Post-training quantization of a float params tree.

    Args:
      params: a trained params tree (or Flax variables ``{"params": ...}``).
      mode: see :func:`quantize`.
      include: a tree of bools like ``params`` or a function returning one;
        default: the dense kernels, i.e. every 2-D array not named ``"bias"``
        or ``"embedding"`` (``nn.Embed`` tables). Convolution kernels (ndim > 2),
        biases and all other leaves stay float, as :func:`quantized_apply` needs
        (it runs only ``Dense`` layers in integers).

    Returns:
      ``params`` with :class:`QuantizedTensor` in place of the included arrays.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jopt import quantization
      >>> from jopt.models import CNN
      >>> model = CNN(conv_features=(4,), hidden_sizes=(8,))
      >>> variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8)))
      >>> q = quantization.quantize_params(variables)["params"]
      >>> type(q["conv_0"]["kernel"]).__name__, type(q["head"]["logits"]["kernel"]).__name__
      ('ArrayImpl', 'QuantizedTensor')
    """
    mode = resolve_mode(mode)
    if include is None:
        include = jax.tree_util.tree_map_with_path(_is_dense_kernel, params)
    elif callable(include):
        include = include(params)
    return jax.tree.map(lambda p, flag: quantize(p, mode) if flag else p, params, include)


def int8_matmul(x: jax.Array, w: QuantizedTensor) -> jax.Array:
    r"""``x @ W`` computed in integers: int8 × int8 → int32, then rescaled to float32.

    .. math::
      y = \big(q_x \cdot q_W\big)_{\text{int32}} \; s_x \, s_W, \qquad
      q_x = \operatorname{round}(x / s_x),\; s_x = \max_j |x_{\cdot j}| / 127

    with one ``s_x`` per row of ``x`` (dynamic, per example) and one ``s_W`` per
    output channel (``channel_axis=-1``, the default of :func:`quantize`) or one
    for the whole weight (``channel_axis=None``). A weight quantized per *input*
    channel (``channel_axis=0``, scale ``[in, 1]``) has its scale folded into
    ``x`` before ``x`` is quantized: ``x · (q_W s_W) = (x s_W^T) · q_W``. Products
    of int8 codes are at most 127², so the int32 accumulator is exact for inputs
    of up to 133,000 features.

    Args:
      x: float activations ``[..., in]``.
      w: a 2-D :class:`QuantizedTensor` ``[in, out]`` (any mode: its codes are int8)
        with scale ``[1, out]``, ``[in, 1]`` or ``[1, 1]``.

    Returns:
      float32 ``[..., out]``.

    Raises:
      ValueError: ``w`` is not 2-D, its input size does not match ``x``, or its
        scale is not one per output channel, per input channel or per tensor.
    """
    if w.codes.ndim != 2 or w.codes.shape[0] != jnp.shape(x)[-1]:
        raise ValueError(
            f"int8_matmul needs a 2-D [in, out] weight whose in matches x's last axis; "
            f"got x {jnp.shape(x)} and weight {w.shape}."
        )
    fan_in, fan_out = w.codes.shape
    scale = jnp.asarray(w.scale, jnp.float32)
    if scale.ndim <= 2:
        scale = scale.reshape((1,) * (2 - scale.ndim) + scale.shape)
    if scale.ndim == 2 and scale.shape[0] == 1 and scale.shape[1] in (1, fan_out):
        output_scale = scale.reshape(-1)  # per output channel (or per tensor)
    elif scale.ndim == 2 and scale.shape == (fan_in, 1):
        x = jnp.asarray(x, jnp.float32) * scale.reshape(-1)  # per input channel: fold into x
        output_scale = jnp.float32(1.0)
    else:
        raise ValueError(
            f"int8_matmul needs one weight scale per output channel [1, {fan_out}] "
            f"(quantize(..., channel_axis=-1), the default), per input channel "
            f"[{fan_in}, 1] (channel_axis=0) or per tensor (channel_axis=None); got scale "
            f"shape {tuple(w.scale.shape)} for weight {w.shape}.")
    x_codes, x_scale = _per_row_int8(x)
    accumulated = jax.lax.dot_general(
        x_codes, w.codes, (((x_codes.ndim - 1,), (0,)), ((), ())),
        preferred_element_type=jnp.int32)
    return accumulated.astype(jnp.float32) * x_scale * output_scale


def _quantized_leaves_of(module: nn.Module) -> list[str]:
    """Names of ``module``'s own (not its children's) params that are QuantizedTensors."""
    own = module.variables.get("params", {})
    return sorted(name for name, value in own.items() if isinstance(value, QuantizedTensor))


def _int8_dense_interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__":
        return next_fun(*args, **kwargs)
    if not isinstance(module, (nn.Dense, QuantDense)):
        names = _quantized_leaves_of(module)
        if names:
            where = "/".join(module.scope.path) or type(module).__name__
            raise ValueError(
                f"quantized_apply runs only nn.Dense / QuantDense layers in integers, but "
                f"{type(module).__name__} {where!r} has quantized parameters {names}. Keep "
                f"them float: quantize_params' default quantizes only dense kernels, or "
                f"pass include= to choose.")
        return next_fun(*args, **kwargs)
    kernel = module.get_variable("params", "kernel")
    if not isinstance(kernel, QuantizedTensor):
        return next_fun(*args, **kwargs)
    y = int8_matmul(args[0], kernel)
    if module.use_bias:
        y = y + module.get_variable("params", "bias").astype(jnp.float32)
    return y if module.dtype is None else y.astype(module.dtype)


def quantized_apply(model: nn.Module, variables: Any, *args, **kwargs) -> Any:
    """``model.apply`` for :func:`quantize_params` output, in integer arithmetic.

    Every ``nn.Dense`` / :class:`QuantDense` whose kernel is a
    :class:`QuantizedTensor` runs :func:`int8_matmul` (intercepted with
    ``flax.linen.intercept_methods``); everything else (convolutions, float
    kernels) runs as usual. Jit it like ``model.apply``.

    Args:
      model: the Linen module the variables were trained with.
      variables: as for ``model.apply`` (``{"params": ...}``), kernels quantized.
      *args: forwarded to ``model.apply``.
      **kwargs: forwarded to ``model.apply``.
    """
    with nn.intercept_methods(_int8_dense_interceptor):
        return model.apply(variables, *args, **kwargs)


# --------------------------------------------------------------------------- sizes & files


def size_report(params: Any, qparams: Any) -> dict[str, float]:
    """Bytes of the float32 model vs the quantized one (codes counted packed).

    Returns:
      ``float32_bytes`` (every leaf as float32), ``quantized_bytes`` (codes +
      scales + the leaves left float), ``ratio``, and the same for the quantized
      weights only: ``weight_float32_bytes``, ``weight_quantized_bytes``,
      ``weight_ratio`` (scales included).
    """
    float_bytes = sum(int(np.size(p)) * 4 for p in jax.tree.leaves(params))
    leaves = jax.tree.leaves(qparams, is_leaf=_is_quantized)
    quantized = [leaf for leaf in leaves if isinstance(leaf, QuantizedTensor)]
    rest = [leaf for leaf in leaves if not isinstance(leaf, QuantizedTensor)]
    weight_float = sum(int(np.size(q.codes)) * 4 for q in quantized)
    weight_quantized = sum(q.nbytes for q in quantized)
    total = weight_quantized + sum(int(np.asarray(leaf).nbytes) for leaf in rest)
    return {
        "float32_bytes": float_bytes,
        "quantized_bytes": total,
        "ratio": float_bytes / total if total else float("inf"),
        "weight_float32_bytes": weight_float,
        "weight_quantized_bytes": weight_quantized,
        "weight_ratio": weight_float / weight_quantized if weight_quantized else float("inf"),
    }


def _pack_codes(codes: np.ndarray, mode: str) -> np.ndarray:
    flat = np.asarray(codes, np.int8).reshape(-1)
    if mode == "int8":
        return flat
    if mode == "int4":
        nibbles = (flat.astype(np.int16) & 0xF).astype(np.uint8)
        if nibbles.size % 2:
            nibbles = np.append(nibbles, np.uint8(0))
        return nibbles[0::2] | (nibbles[1::2] << 4)
    if mode == "ternary":  # two bit planes: nonzero, negative
        return np.concatenate([np.packbits(flat != 0), np.packbits(flat < 0)])
    return np.packbits(flat < 0)  # binary


def _packed_length(mode: str, size: int) -> int:
    """Length of :func:`_pack_codes`'s output for ``size`` codes."""
    if mode == "int8":
        return size
    if mode == "int4":
        return -(-size // 2)
    return -(-size // 8) * (2 if mode == "ternary" else 1)  # bit planes padded to bytes


def _unpack_codes(packed: np.ndarray, mode: str, shape: tuple[int, ...]) -> np.ndarray:
    """Codes of ``shape`` from :func:`_pack_codes` output (ValueError if it does not fit)."""
    size = int(np.prod(shape, dtype=np.int64))
    packed = np.asarray(packed)
    expected = _packed_length(mode, size)
    want_dtype = np.int8 if mode == "int8" else np.uint8
    if packed.ndim != 1 or packed.size != expected or packed.dtype != want_dtype:
        raise ValueError(
            f"{mode} codes of shape {list(shape)} take {expected} {np.dtype(want_dtype).name} "
            f"bytes packed, but {packed.size} {packed.dtype.name} values of shape "
            f"{list(packed.shape)} are stored (truncated or corrupt)")
    if mode == "int8":
        flat = packed.astype(np.int8)
    elif mode == "int4":
        nibbles = np.stack([packed & 0xF, packed >> 4], axis=-1).reshape(-1)[:size]
        flat = ((nibbles.astype(np.int16) ^ 8) - 8).astype(np.int8)  # sign-extend 4 bits
    elif mode == "ternary":
        half = packed.size // 2
        nonzero = np.unpackbits(packed[:half], count=size).astype(bool)
        negative = np.unpackbits(packed[half:], count=size).astype(bool)
        flat = np.where(nonzero, np.where(negative, -1, 1), 0).astype(np.int8)
    else:
        flat = np.where(np.unpackbits(packed, count=size).astype(bool), -1, 1).astype(np.int8)
    if mode in _INT_MAX and flat.size and int(flat.min()) < -_INT_MAX[mode]:
        raise ValueError(f"{mode} codes hold {int(flat.min())}, outside ±{_INT_MAX[mode]}")
    return flat.reshape(shape)


def save_quantized(path: str | os.PathLike[str], qparams: Any) -> int:
    """Writes :func:`quantize_params` output to ``.npz`` with codes bit-packed; returns bytes.

    Example:
      >>> import jax.numpy as jnp, os, tempfile
      >>> from jopt import quantization
      >>> q = quantization.quantize_params({"w": jnp.ones((64, 64))}, "binary")
      >>> path = os.path.join(tempfile.mkdtemp(), "model.npz")
      >>> _ = quantization.save_quantized(path, q)
      >>> loaded = quantization.load_quantized(path)
      >>> bool((loaded["w"].codes == q["w"].codes).all())
      True
    """
    arrays, meta = {}, []
    for i, (names, leaf) in enumerate(_npz.leaf_records(qparams, _is_quantized)):
        if isinstance(leaf, QuantizedTensor):
            arrays[f"{i}.codes"] = _pack_codes(np.asarray(leaf.codes), leaf.mode)
            arrays[f"{i}.scale"] = np.asarray(leaf.scale, np.float32)
            meta.append({"path": names, "mode": leaf.mode, "shape": list(leaf.shape)})
        else:
            arrays[f"{i}.array"] = np.asarray(leaf)
            meta.append({"path": names, "dtype": jnp.dtype(np.asarray(leaf).dtype).name})
    _npz.write_npz(path, arrays, meta)
    return os.path.getsize(path)


_FILE_REMEDY = "Re-create it with `jopt quantize` (or jopt.quantization.save_quantized)."


def _load_quantized_leaf(arrays: dict, i: int, record: dict) -> Any:
    """One leaf of a :func:`save_quantized` file; ValueError saying what is wrong."""
    if "mode" in record:
        mode, shape = record["mode"], record["shape"]
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}")
        if not (isinstance(shape, list) and all(
                isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape)):
            raise ValueError(f"bad shape {shape!r}")
        shape = tuple(shape)
        codes = _unpack_codes(arrays[f"{i}.codes"], mode, shape)
        scale = arrays[f"{i}.scale"]
        try:
            fits = (scale.dtype == np.float32 and scale.ndim == len(shape)
                    and np.broadcast_shapes(scale.shape, shape) == shape)
        except ValueError:
            fits = False
        if not fits:
            raise ValueError(f"its scale ({scale.dtype.name}{list(scale.shape)}) does not "
                             f"broadcast to the codes' shape {list(shape)} as float32")
        return QuantizedTensor(jnp.asarray(codes), jnp.asarray(scale), mode)
    if "format" in record:  # every save_sparse record has one
        raise ValueError(f"it is a leaf of {_npz.describe_kind('sparse')}")
    array = arrays[f"{i}.array"]
    try:
        dtype = jnp.dtype(record["dtype"])
    except TypeError:
        raise ValueError(f"unknown dtype {record['dtype']!r}") from None
    if array.dtype != dtype:
        # write_npz stores bfloat16 & co. as unsigned ints of the same size
        if array.dtype != np.dtype(f"uint{8 * dtype.itemsize}") or dtype.kind != "V":
            raise ValueError(f"it is stored as {array.dtype.name}, not {dtype.name}")
        array = array.view(dtype)
    return jnp.asarray(array)


def load_quantized(path: str | os.PathLike[str], *, like: Any = None) -> Any:
    """Reads a :func:`save_quantized` file (``like``: as in :func:`jopt.pruning.load_sparse`).

    Raises:
      ValueError: the file is empty, truncated or corrupt (e.g. fewer packed codes
        than its recorded shape needs), or not a :func:`save_quantized` file; the
        message names the file and the problem.
      OSError: the file cannot be opened (e.g. FileNotFoundError).
    """
    arrays, meta = _npz.read_npz(path, remedy=_FILE_REMEDY)
    if _npz.file_kind(meta) == "sparse":
        raise _npz.bad_file(path, f"it is {_npz.describe_kind('sparse')}, not a quantized "
                                  f"model", _FILE_REMEDY)
    leaves = _npz.load_leaves(path, arrays, meta, _load_quantized_leaf, _FILE_REMEDY)
    return _npz.rebuild([r["path"] for r in meta], leaves, like, _is_quantized)
