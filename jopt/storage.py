"""State storage codecs: how each optimizer-state array is kept between steps.

Every stateful jopt transformation computes in (at least) float32 and stores its
per-parameter state through one of these codecs:

==============  =================================================  ==============
name            what is stored                                     bytes / value
==============  =================================================  ==============
``None``        the parameter's own dtype (optax's behaviour)      param itemsize
``"float32"``   float32                                            4
``"bfloat16"``  bfloat16 (8-bit mantissa, float32 range)           2
``"int8"``      8-bit block-wise quantized codes + float32 scale   ~1.016
==============  =================================================  ==============

The int8 codec follows the idea of Dettmers et al. 2021, *8-bit Optimizers via
Block-wise Quantization*: the array is cut into blocks of 256 values, each block is
normalised by its own absolute maximum (kept in float32), and the normalised value
``r`` is stored as an 8-bit code. Like Dettmers' dynamic code, our code is
non-linear so that values much smaller than the block maximum keep *relative*
precision; we use a power (companding) code, which needs no lookup table:

* signed state (first moments, momentum):  ``c = round(127 · sign(r) · |r|^(1/4))``
  in int8, decoded as ``r = sign(c) · (|c|/127)^4``;
* non-negative state (second moments):     ``c = round(255 · r^(1/8))`` in uint8,
  decoded as ``r = (c/255)^8``.

Error. Rounding moves ``c`` by at most 1/2, so a decoded value has relative error at
most ``p / (2|c|)`` (``p`` = 4 or 8): about 1.6% for values near the block maximum,
and it grows only for values far below it (the smallest non-zero magnitudes are
``3.8e-9`` and ``5.6e-20`` times the block maximum). Since Adam divides by
``sqrt(v)``, the non-negative code's finer dynamic range guarantees that whenever
``v`` rounds to zero, the matching ``m`` (range ``sqrt(5.6e-20) < 3.8e-9``) rounds
to zero too, so the update never blows up to ``m / eps``.

Why the error does not accumulate: state is decoded, updated in float32 and
re-encoded every step, so each step injects at most one rounding error, and every
earlier error is multiplied by the moment's decay (``b1``, ``b2`` < 1) at each later
step: the total stays bounded by ``max_error / (1 - decay)`` and in practice far
below it, because (i) the block maximum is stored exactly in float32, so the
uniform decay ``m ← b·m`` of a whole block is represented exactly by its scale
(the codes do not change), and (ii) rounding errors of different steps have
different signs. Arrays with fewer than 4096 values (biases, norms) stay float32:
they cost little and are the most sensitive.
"""

from __future__ import annotations

import abc
import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = [
    "BLOCK_SIZE",
    "MIN_QUANTIZED_SIZE",
    "StateStorage",
    "ParamDtypeStorage",
    "DtypeStorage",
    "Int8BlockStorage",
    "QuantizedArray",
    "resolve_storage",
    "state_nbytes",
]

BLOCK_SIZE = 256
MIN_QUANTIZED_SIZE = 4096

_SIGNED_POWER = 4  # decode: r = sign(c) * (|c| / 127) ** 4
_UNSIGNED_POWER = 8  # decode: r = (c / 255) ** 8


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype state is computed in: at least float32 (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


class StateStorage(abc.ABC):
    """How one per-parameter state array is kept between steps.

    ``encode`` receives the freshly computed state (float32 or wider) together with
    the parameter it belongs to; ``decode`` returns it for computation, in at least
    float32. Encoded values must be pytrees of arrays (so they jit, checkpoint and
    shard like any state).
    """

    name: str

    @abc.abstractmethod
    def encode(self, value: jax.Array, *, like: jax.Array, signed: bool) -> Any:
        """Stores ``value`` (the state of parameter ``like``)."""

    @abc.abstractmethod
    def decode(self, stored: Any) -> jax.Array:
        """Returns the stored state as an array of at least float32."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class ParamDtypeStorage(StateStorage):
    """State kept in its parameter's dtype (optax's default)."""

    name = "param"

    def encode(self, value, *, like, signed):
        del signed
        return value.astype(like.dtype)

    def decode(self, stored):
        return stored.astype(compute_dtype(stored.dtype))


@dataclasses.dataclass(frozen=True, repr=False)
class DtypeStorage(StateStorage):
    """State kept in a fixed floating dtype (``"float32"``, ``"bfloat16"``)."""

    dtype: Any

    @property
    def name(self) -> str:  # type: ignore[override]
        return jnp.dtype(self.dtype).name

    def encode(self, value, *, like, signed):
        del like, signed
        return value.astype(self.dtype)

    def decode(self, stored):
        return stored.astype(compute_dtype(stored.dtype))


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """An array stored as block-wise 8-bit codes (see the module docstring).

    Attributes:
      codes: int8 (signed) or uint8 (non-negative) codes, shape ``[blocks, 256]``.
      scales: float32 absolute maximum of each block, shape ``[blocks]``.
      shape: the original array's shape (static).
      signed: whether the signed code is used (static).
    """

    codes: jax.Array  # shape=[blocks, BLOCK_SIZE], dtype=int8 | uint8
    scales: jax.Array  # shape=[blocks], dtype=float32
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    signed: bool = dataclasses.field(metadata=dict(static=True))

    @property
    def nbytes(self) -> int:
        return self.codes.nbytes + self.scales.nbytes


def _quantize(value: jax.Array, signed: bool) -> QuantizedArray:
    flat = value.reshape(-1).astype(jnp.float32)
    padding = -flat.size % BLOCK_SIZE
    blocks = jnp.pad(flat, (0, padding)).reshape(-1, BLOCK_SIZE)
    absmax = jnp.max(jnp.abs(blocks), axis=1)
    # An all-zero block keeps scale 1 so decoding never divides by zero.
    scales = jnp.where(absmax > 0, absmax, 1.0)
    normalised = blocks / scales[:, None]
    if signed:
        magnitude = jnp.sqrt(jnp.sqrt(jnp.abs(normalised)))
        codes = jnp.round(127.0 * magnitude) * jnp.sign(normalised)
        codes = codes.astype(jnp.int8)
    else:
        # Non-negative by contract; clip guards against -0.0 and rounding noise.
        magnitude = jnp.sqrt(jnp.sqrt(jnp.sqrt(jnp.maximum(normalised, 0.0))))
        codes = jnp.round(255.0 * magnitude).astype(jnp.uint8)
    return QuantizedArray(codes, scales, tuple(value.shape), signed)


def _dequantize(stored: QuantizedArray) -> jax.Array:
    codes = stored.codes.astype(jnp.float32)
    if stored.signed:
        q = codes * (1.0 / 127.0)
        q2 = q * q
        normalised = q * jnp.abs(q) * q2  # sign(q) * q**4
    else:
        q = codes * (1.0 / 255.0)
        q2 = q * q
        q4 = q2 * q2
        normalised = q4 * q4
    values = (normalised * stored.scales[:, None]).reshape(-1)
    size = int(np.prod(stored.shape, dtype=np.int64))
    return values[:size].reshape(stored.shape)


class Int8BlockStorage(StateStorage):
    """Block-wise 8-bit state (Dettmers et al. 2021); small arrays stay float32."""

    name = "int8"

    def __init__(self, min_size: int = MIN_QUANTIZED_SIZE):
        self.min_size = min_size

    def encode(self, value, *, like, signed):
        del like
        if value.size < self.min_size:
            return value.astype(jnp.float32)
        return _quantize(value, signed)

    def decode(self, stored):
        if isinstance(stored, QuantizedArray):
            return _dequantize(stored)
        return stored.astype(compute_dtype(stored.dtype))


_NAMED = {
    "float32": lambda: DtypeStorage(jnp.float32),
    "bfloat16": lambda: DtypeStorage(jnp.bfloat16),
    "int8": Int8BlockStorage,
}


def resolve_storage(spec: str | StateStorage | None) -> StateStorage:
    """Turns a ``state_storage=`` argument into a codec.

    Args:
      spec: ``None`` (the parameter's dtype), ``"float32"``, ``"bfloat16"``,
        ``"int8"``, or a :class:`StateStorage` instance.

    Raises:
      ValueError: for an unknown name.
    """
    if spec is None:
        return ParamDtypeStorage()
    if isinstance(spec, StateStorage):
        return spec
    if isinstance(spec, str) and spec in _NAMED:
        return _NAMED[spec]()
    raise ValueError(
        f"state_storage={spec!r} is not a known storage; use None (the parameter's "
        f"dtype), one of {sorted(_NAMED)}, or a jopt.storage.StateStorage instance."
    )


def state_nbytes(tree: Any) -> int:
    """Total bytes of the arrays in an optimizer state (or any pytree).

    Works on ``jax.ShapeDtypeStruct`` leaves too, so ``state_nbytes(jax.eval_shape(
    tx.init, params))`` accounts for a state without allocating it.
    """
    return sum(
        int(np.prod(x.shape, dtype=np.int64)) * jnp.dtype(x.dtype).itemsize
        for x in jax.tree.leaves(tree)
    )
