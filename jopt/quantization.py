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
* **Post-training quantization** (:func:`quantize_params`) turns a trained float
  tree into :class:`QuantizedTensor` leaves (int8 codes + scales).
  :func:`quantized_apply` runs a Flax model with them: every ``Dense`` layer
  quantizes its input per row to int8 and computes ``int8 × int8 → int32`` with
  ``lax.dot_general(..., preferred_element_type=int32)``, then rescales.
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


def quantize_params(params: Any, mode: str | int = "int8", *, include: Any = None) -> Any:
    """Post-training quantization of a float params tree.

    Args:
      params: a trained params tree (or Flax variables ``{"params": ...}``).
      mode: see :func:`quantize`.
      include: a tree of bools like ``params`` or a function returning one;
        default: arrays with ndim >= 2 (kernels). Other leaves stay float.

    Returns:
      ``params`` with :class:`QuantizedTensor` in place of the included arrays.
    """
    mode = resolve_mode(mode)
    if include is None:
        include = jax.tree.map(lambda p: jnp.ndim(p) >= 2, params)
    elif callable(include):
        include = include(params)
    return jax.tree.map(lambda p, flag: quantize(p, mode) if flag else p, params, include)


def int8_matmul(x: jax.Array, w: QuantizedTensor) -> jax.Array:
    r"""``x @ W`` computed in integers: int8 × int8 → int32, then rescaled to float32.

    .. math::
      y = \big(q_x \cdot q_W\big)_{\text{int32}} \; s_x \, s_W, \qquad
      q_x = \operatorname{round}(x / s_x),\; s_x = \max_j |x_{\cdot j}| / 127

    with one ``s_x`` per row of ``x`` (dynamic, per example) and one ``s_W`` per
    output channel. Products of int8 codes are at most 127², so the int32
    accumulator is exact for inputs of up to 133,000 features.

    Args:
      x: float activations ``[..., in]``.
      w: a 2-D :class:`QuantizedTensor` ``[in, out]`` (any mode: its codes are int8).

    Returns:
      float32 ``[..., out]``.

    Raises:
      ValueError: ``w`` is not 2-D or its input size does not match ``x``.
    """
    if w.codes.ndim != 2 or w.codes.shape[0] != jnp.shape(x)[-1]:
        raise ValueError(
            f"int8_matmul needs a 2-D [in, out] weight whose in matches x's last axis; "
            f"got x {jnp.shape(x)} and weight {w.shape}."
        )
    x_codes, x_scale = _per_row_int8(x)
    accumulated = jax.lax.dot_general(
        x_codes, w.codes, (((x_codes.ndim - 1,), (0,)), ((), ())),
        preferred_element_type=jnp.int32)
    return accumulated.astype(jnp.float32) * x_scale * w.scale.reshape(-1)


def _int8_dense_interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name != "__call__" or not isinstance(module, (nn.Dense, QuantDense)):
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


def _unpack_codes(packed: np.ndarray, mode: str, shape: tuple[int, ...]) -> np.ndarray:
    size = int(np.prod(shape, dtype=np.int64))
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


def load_quantized(path: str | os.PathLike[str], *, like: Any = None) -> Any:
    """Reads a :func:`save_quantized` file (``like``: as in :func:`jopt.pruning.load_sparse`)."""
    arrays, meta = _npz.read_npz(path)
    leaves = []
    for i, record in enumerate(meta):
        if "mode" in record:
            codes = _unpack_codes(arrays[f"{i}.codes"], record["mode"], tuple(record["shape"]))
            leaves.append(QuantizedTensor(jnp.asarray(codes), jnp.asarray(arrays[f"{i}.scale"]),
                                          record["mode"]))
        else:
            array = arrays[f"{i}.array"]
            dtype = jnp.dtype(record["dtype"])
            leaves.append(jnp.asarray(array if array.dtype == dtype else array.view(dtype)))
    return _npz.rebuild([r["path"] for r in meta], leaves, like, _is_quantized)
