"""State storage codecs: how each optimizer-state array is kept between steps.

Every stateful jopt transformation computes in (at least) float32 and stores its
per-parameter state through one of these codecs; :func:`with_state_storage` gives
the same choice to any optax transformation.

==============  ===================================================  =============
name            what is stored                                       bytes / value
==============  ===================================================  =============
``None``        the parameter's own dtype (optax's behaviour)        param itemsize
``"float32"``   float32                                              4
``"bfloat16"``  bfloat16, stochastically rounded                     2
``"int8"``      8-bit block-wise codes + a float32 scale per 256     ~1.016
==============  ===================================================  =============

**The int8 code** follows Dettmers et al. 2021 (*8-bit Optimizers via Block-wise
Quantization*): the array is cut into blocks of 256 values (the paper uses 2048;
smaller blocks isolate outliers better, for 0.016 instead of 0.002 bytes of scale
per value), each block is divided by its absolute maximum (kept in float32), and
the normalised value
``r ∈ [-1, 1]`` becomes an 8-bit code ``c``. The code is non-linear, so that values
far below the block maximum keep relative precision. Dettmers' dynamic tree code
needs a 256-entry table; a power (companding) code needs none and measured at
least as well (see below):

* signed state (momentum, first moments):  ``r = sign(c) · (|c|/127)^4``, int8;
* non-negative state (second moments):     ``r = (c/255)^8``, uint8 - a power-4
  code on ``sqrt(v)``, the quantity Adam divides by.

Two neighbouring levels near the block maximum are 3.1% apart (both codes); the
smallest non-zero levels are ``3.8e-9`` (signed) and ``5.6e-20`` (non-negative)
times the block maximum. A positive value is never coded as zero: a second moment
decodes to 0 only if it is exactly 0 - which for Adam means every past gradient was
0, so ``m`` is 0 too and ``m / (sqrt(v) + eps)`` cannot blow up to ``m / eps``.
(Rounding to the nearest level would not give this guarantee: ``m`` and ``v`` have
different block maxima, so a small ``v`` can round to 0 while ``m`` does not.)

**Rounding is stochastic** (``"int8"`` and ``"bfloat16"``): a value between two
levels ``lo < x < hi`` is stored as ``hi`` with probability ``(x - lo)/(hi - lo)``,
so the decoded value is exact in expectation. Round-to-nearest is *biased* for
moving averages, and that bias is the error that accumulates: whenever the
per-step change ``(1 - β)(g² - v)`` is below half a level (β = 0.999 moves ``v`` by
0.1% of ``g² - v`` a step; bf16 levels are 0.4-0.8% apart, int8 ones up to 3.1%),
``v`` rounds back to its old value and stops following the gradients. Measured
with the codecs of this module (4096 values, gradient scale dropping 10x at step
3000 while one value per block keeps the block maximum): 5000 steps later the
nearest-rounded ``v`` is 63x (int8) and 76x (bf16) too large, the stochastically
rounded one within 0.5%. With a constant gradient, bf16 round-to-nearest leaves
``v`` stuck at ``g²/4`` (Adam's steps 2x too large). Adam on a 16k-dimensional
ill-conditioned quadratic (3000 steps) stays within 0.4% (int8) and 0.1% (bf16)
of the float32 loss at every step; rounded to nearest it ends 35% and 41% off.

Why the error then does not accumulate: each step decodes, updates in float32 and
re-encodes, so the stored error follows ``e_t = β e_{t-1} + δ_t``, ``δ_t`` being
that step's rounding error. Stochastic rounding makes the ``δ_t`` zero-mean and
uncorrelated, so ``e_t`` is a zero-mean sum whose spread stays bounded
(``std e_t ≤ max std δ / sqrt(1 - β²)``) and which does not drift; a bias ``b``
per step would instead add up to ``b / (1 - β)``, 1000 ``b`` for β = 0.999. A
block's common decay ``v ← βv`` is carried exactly by its float32 scale. The
random bits come from a hash of (element index, an encode counter kept in the
state, a per-array salt), so no PRNG key is needed and runs are reproducible.
The salt gives each stored array its own noise stream: jopt passes
``encode(..., salt=)`` a crc32 of the moment's name and the leaf's key path in
the params tree (``"mu['hidden_0']['kernel']"``; under ``optax.masked`` or
``multi_transform`` a leaf keeps its path, so per-layer optimizers differ). Two
transformations chained on the same leaves with a moment of the same name (two
``nu``) share a stream; their values differ, so only their rounding draws agree.
Without the salt, leaves of one shape (a stack of identical
transformer layers) drew the same bits at every step, so where their values
agreed they rounded the same way: errors that should average out across layers
added up like one error. A leaf's ``nu`` drew ``mu``'s bits shifted by one
element. The salt is mixed into the hash, not added to the counter, so that two
salts give unrelated streams rather than shifted copies (see ``_hash_bits``).
Under ZeRO-1 (:mod:`jopt.parallel`) every device encodes its slice of the flat
buffers with the same salt; there each value's noise is drawn at its index in the
whole buffer, so the slices round independently (see ``_shard_of_whole``).

**Measured code choice** (real Adam states of the 784-64-64-10 MLP on
Fashion-MNIST after one epoch; RMS error of the resulting Adam update relative to
the update's RMS): first moment - power-4 1.3%, Dettmers' dynamic tree code 1.5%,
linear 3.5%; second moment - power-8 0.8%, dynamic tree code on ``sqrt v`` 1.2%,
dynamic tree code on ``v`` as bitsandbytes stores it 1700% (small ``v`` round to
0 while their ``m`` does not). Arrays with fewer than 4096 values (biases, norms)
stay float32: they cost little and are the most sensitive. Complex state is kept
in its own dtype. NaN and inf propagate (their block decodes to NaN). Values below
float32's normal range (1e-38) may be flushed to zero, as CPUs do in float32.

References:
  Dettmers, Lewis, Shleifer & Zettlemoyer, *8-bit Optimizers via Block-wise
  Quantization*, ICLR 2022 (arXiv:2110.02861).
  Zamirai, Zhang, Aberger & De Sa, *Revisiting BFloat16 Training*, 2020
  (arXiv:2010.06192) - stochastic rounding of low-precision updates.
"""

from __future__ import annotations

import abc
import contextlib
import contextvars
import dataclasses
import functools
import inspect
import operator
import zlib
from collections.abc import Callable, Collection
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

__all__ = [
    "BLOCK_SIZE",
    "MIN_QUANTIZED_SIZE",
    "NONNEGATIVE_STATE_FIELDS",
    "StateStorage",
    "ParamDtypeStorage",
    "DtypeStorage",
    "Int8BlockStorage",
    "EncodedArray",
    "QuantizedArray",
    "RoundedArray",
    "compute_dtype",
    "is_encoded",
    "resolve_storage",
    "state_nbytes",
    "with_state_storage",
]

BLOCK_SIZE = 256
MIN_QUANTIZED_SIZE = 4096

# (levels, power) of the two codes: decode r = (|c| / levels) ** power.
_SIGNED_CODE = (127, 4)
_UNSIGNED_CODE = (255, 8)


def compute_dtype(dtype: Any) -> jnp.dtype:
    """The dtype state is computed in: at least float32 (float64 stays float64)."""
    return jnp.promote_types(dtype, jnp.float32)


# --------------------------------------------------------------------------------------
# Stored forms.
# --------------------------------------------------------------------------------------


class EncodedArray(abc.ABC):
    """Base of the pytrees a codec stores in place of an array (``.shape`` is the array's).

    ``jax.tree.map(f, state, is_leaf=jopt.storage.is_encoded)`` visits them whole.
    """

    shape: tuple[int, ...]

    @abc.abstractmethod
    def decode(self) -> jax.Array:
        """The stored array, in at least float32."""

    @property
    def nbytes(self) -> int:
        return state_nbytes(self)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class QuantizedArray(EncodedArray):
    """An array stored as block-wise 8-bit codes (see the module docstring).

    Attributes:
      codes: int8 (signed) or uint8 (non-negative) codes.
      scales: float32 absolute maximum of each block.
      step: how many times this state was encoded (seeds stochastic rounding).
      shape: the original array's shape (static).
      signed: whether the signed code is used (static).
    """

    codes: jax.Array  # shape=[blocks, BLOCK_SIZE], dtype=int8 | uint8
    scales: jax.Array  # shape=[blocks], dtype=float32
    step: jax.Array  # shape=(), dtype=uint32
    shape: tuple[int, ...] = dataclasses.field(metadata=dict(static=True))
    signed: bool = dataclasses.field(metadata=dict(static=True))

    def decode(self) -> jax.Array:
        return _dequantize(self)


@jax.tree_util.register_dataclass
@dataclasses.dataclass(frozen=True)
class RoundedArray(EncodedArray):
    """A low-precision array kept with stochastic rounding, and its encode counter.

    Attributes:
      values: the array, in the storage dtype (bfloat16).
      step: how many times this state was encoded (seeds stochastic rounding).
    """

    values: jax.Array  # shape=like the parameter, dtype=bfloat16
    step: jax.Array  # shape=(), dtype=uint32

    @property
    def shape(self) -> tuple[int, ...]:  # type: ignore[override]
        return tuple(self.values.shape)

    @property
    def dtype(self) -> jnp.dtype:
        return self.values.dtype

    def decode(self) -> jax.Array:
        return self.values.astype(compute_dtype(self.values.dtype))


def is_encoded(x: Any) -> bool:
    """Whether ``x`` is a codec's stored form (use as ``is_leaf`` to keep it whole)."""
    return isinstance(x, EncodedArray)


def _next_step(like: Any) -> jax.Array:
    if isinstance(like, (QuantizedArray, RoundedArray)):
        return like.step + jnp.uint32(1)
    return jnp.zeros([], jnp.uint32)


def _random_bits(shape: tuple[int, ...], step: jax.Array, key: int, first: int = 0) -> jax.Array:
    """Pseudo-random uint32 bits for each element of ``shape`` (flat index order).

    Counter-based: a hash of (element index, encode counter ``step``, stream
    ``key``), so no PRNG key is carried, every step draws fresh bits and a run is
    reproducible. ``first`` is the index of the first element, for a part of a
    larger array (a partial last block): the bits depend on where a value is in
    its array, not on how the array was cut into blocks.
    """
    index = jax.lax.iota(jnp.uint32, int(np.prod(shape, dtype=np.int64))).reshape(shape)
    return _hash_bits(index, step, key, first)


def _hash_bits(index: jax.Array, step: jax.Array, key: int, first: int = 0) -> jax.Array:
    """The hash of :func:`_random_bits`, of given uint32 element indices.

    The counter (index + first + a multiple of the step) is spread by a
    golden-ratio multiply (a Weyl sequence), xor-ed with the stream ``key`` (from
    :func:`_stream_key`) and mixed by murmur3's finaliser. Where the key enters
    matters. Added to the counter (as the per-codec constant ``+ signed`` was),
    two keys give one stream shifted by their difference: nu's bit of element
    i + 1 was mu's bit of element i. Xor-ed into the index, they give one stream
    permuted. Xor-ed into the scattered Weyl values, two streams share a value
    only where two random functions would. Measured on 2^20 values and 60 random
    key pairs: the joint histogram (16x16 cells) of two streams' top 4 bits, at
    the same index or shifted by 1, 2, 3 or 256, has chi^2 253 in the median of
    the 300 tests (255 degrees of freedom; largest 371), and over 337 lags the
    largest autocorrelation of a stream is |z| = 3.84 (numpy's PRNG: 3.92). The
    old hash (two multiplies) gave |z| up to 7.1 and, with random salts added to
    its counter, chi^2 up to 7268; with the key xor-ed in between its two rounds,
    up to 64043 (one multiply after the key does not mix it).

    Three multiplies per value, one more than before. murmur3's final ``h ^= h >>
    16`` is left out: it changes only the low 16 bits, which bfloat16 drops and
    int8 uses as the last 8 of its 24 (differences below 2^-16 of a level).
    Adam's jitted update of 10M values on a 2-core CPU (best of 10, four runs):
    int8 27.75-28.04 ms, before 27.77-27.90 ms (with that xorshift 28.7-28.9 ms);
    bfloat16 21.95-22.78 ms, before 21.63-21.87 ms.
    """
    # The step is added before the first multiply, so that inside a scan XLA
    # cannot hoist a per-element table out of the loop (4 bytes per value).
    first = jnp.asarray(first, jnp.uint32)  # an int, or a traced shard offset
    h = (index + (step * jnp.uint32(0x85EBCA77) + first)) * jnp.uint32(0x9E3779B9)
    h = h ^ jnp.uint32(key)
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    return h * jnp.uint32(0xC2B2AE35)


def _mix32(x: int) -> int:
    """murmur3's 32-bit finaliser (a bijection with full avalanche), in Python."""
    x &= 0xFFFFFFFF
    x ^= x >> 16
    x = (x * 0x85EBCA6B) & 0xFFFFFFFF
    x ^= x >> 13
    x = (x * 0xC2B2AE35) & 0xFFFFFFFF
    return x ^ (x >> 16)


# Codec ids in the stream keys: int8 and bf16 encodes of one array draw unrelated bits.
_INT8_STREAM = 0x2545F491
_BF16_STREAM = 0x5BD1E995


def _stream_key(codec_id: int, signed: bool, salt: int) -> int:
    """The 32-bit key of one array's rounding noise (a static Python int).

    ``codec_id``, ``signed`` and ``salt`` (any int, taken modulo 2^64) are absorbed
    one 32-bit word at a time through :func:`_mix32`, so any change to one of them
    gives an unrelated key (not key + 1).
    """
    salt = operator.index(salt)  # a static int: a traced salt would need a traced key
    key = codec_id
    for word in (int(signed), salt & 0xFFFFFFFF, (salt >> 32) & 0xFFFFFFFF):
        key = _mix32(key ^ word)
    return key


def _salt(name: str) -> int:
    """A stable salt for the array called ``name`` (crc32 of its UTF-8 bytes).

    Python's ``hash`` of a string changes from process to process; this does not,
    so a run draws the same rounding noise each time it is repeated.
    """
    return zlib.crc32(name.encode())


_SHARDS: contextvars.ContextVar = contextvars.ContextVar("jopt_storage_shards", default=None)


@contextlib.contextmanager
def _shard_of_whole(axis_name: str | None, num_shards: int):
    """Encodes inside are of one of ``num_shards`` equal contiguous slices of each
    array, the slice of this device along mesh axis ``axis_name``.

    ZeRO-1 (:mod:`jopt.parallel`) updates each device's slice of the flat buffers
    with the same optimizer, so every slice is encoded with the same salt and
    counter. Inside this context (entered while tracing inside ``shard_map``) each
    value's rounding noise is drawn at its index in the whole array,
    ``axis_index * size + i``: the slices draw unrelated noise - the noise the
    unsharded array would draw - instead of the same noise 8 times. And the int8
    codec's ``min_size`` is compared with the whole array's size, so a slice is
    stored as the whole buffer would be (a checkpoint, which holds the whole
    buffer, stores it the same way). ``axis_name=None`` (shape evaluation outside
    ``shard_map``) applies the size rule only. The context holds the axis *name*,
    not a traced index: an update that the user wrapped in ``jax.jit`` is cached
    across traces and must not capture a stale tracer.
    """
    token = _SHARDS.set((axis_name, int(num_shards)))
    try:
        yield
    finally:
        _SHARDS.reset(token)


def _whole_size(size: int) -> int:
    """The size of the array that this ``size``-value array is a slice of."""
    shards = _SHARDS.get()
    return size if shards is None else size * shards[1]


def _shard_offset(size: int) -> Any:
    """Index in the whole array of the first element of this ``size``-value shard."""
    shards = _SHARDS.get()
    if shards is None or shards[0] is None:
        return 0
    index = jax.lax.axis_index(shards[0])
    return jnp.asarray(index, jnp.uint32) * jnp.uint32(size)


def _leaf_names(tree: Any) -> list[str]:
    """The key path (``keystr``) of each leaf of ``tree``: its name in salts."""
    return [jax.tree_util.keystr(path)
            for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


@functools.lru_cache(maxsize=None)
def _encode_takes_salt(cls: type) -> bool:
    try:
        parameters = inspect.signature(cls.encode).parameters.values()
    except (TypeError, ValueError):
        return False
    return any(p.name == "salt" or p.kind == p.VAR_KEYWORD for p in parameters)


def _encode(codec: StateStorage, value: jax.Array, *, like: Any, signed: bool,
            salt: int, absmax: jax.Array | None = None) -> Any:
    """``codec.encode(value, like=like, signed=signed, salt=salt)``, for any codec.

    Codecs written before ``salt`` existed (``encode(self, value, *, like,
    signed)``) are called without it: they keep working, and draw whatever noise
    they drew before. ``absmax``: the block maxima of ``value`` from
    :func:`_prepass` (int8 only), computed from an earlier evaluation of it.
    """
    if absmax is not None:
        return _quantize(value, signed, _next_step(like), codec.stochastic_rounding, salt,
                         absmax)
    if _encode_takes_salt(type(codec)):
        return codec.encode(value, like=like, signed=signed, salt=salt)
    return codec.encode(value, like=like, signed=signed)


# Tests set this to False to compare with the one-pass encode.
_TWO_PASS: bool = True


def _recompute_for_encode(inputs: Any) -> bool:
    """Whether int8 state computed from ``inputs`` (a pytree) is computed twice
    per step: once for its block maxima, once to encode it. Yes under a trace
    (``jit``, on every backend; tests turn it off to compare); not eagerly, where
    nothing is fused and the second evaluation would only cost time
    (``with_state_storage(optax.adam, "int8")`` on 54k values: 40 -> 58 ms a step).

    An int8 encode needs each block's maximum before it can encode the block's
    first value. Computed once, the new state must be kept whole between the two:
    XLA:GPU fuses the update into the block-max reduction and writes the new
    float32 moments out for the encode to read back - 8 bytes per value and
    moment more than the step's own reads and writes (int8 Adam on an H100 took
    1.2-1.5x optax's float32 step). Computing it twice, the first time only for
    the maxima, reads the (small) old state and the gradient twice instead. The
    second evaluation reads its inputs through ``lax.optimization_barrier``, so
    XLA cannot merge the two back into one.

    Both ways give the same codes: the second evaluation is the same
    computation as the first.

    Measured on one H100 (JAX 0.11.2, Adam, one float32 leaf, update and
    ``apply_updates`` in one jitted step, best of 30 round-robin): 10,002,432 and
    10,000,128 values (whole blocks of 256) 1.25-1.28x -> 1.01-1.02x optax's float32
    step; 100M values 1.52x -> 0.87x. The step is then one reduction and one loop
    that writes the params and both moments' codes. With a partial last block
    (10,000,000 values) there is no gain (1.44-1.50x either way): the padded codes
    are longer than the params, so XLA writes them in loops of their own: pack
    flat buffers with ``FlatParams.pack(params, pad_multiple=BLOCK_SIZE)`` to get
    whole blocks (ZeRO-1 already does).

    On a CPU, where the step is bound by the encode's arithmetic, XLA recomputes
    the new state in each of its loops either way; computed twice, the block
    maxima of both moments come from one loop instead of one per moment. 10M-value
    Adam on a 2-core CPU (best of 15 round-robin, two runs): 27.4 -> 26.2 ms;
    ``with_state_storage(optax.adam)``: 27.2 -> 26.5 ms; the int8 MNIST-MLP epoch
    is unchanged (55k values: the matmuls dominate).
    """
    return _TWO_PASS and any(isinstance(x, jax.core.Tracer) for x in jax.tree.leaves(inputs))


def _prepass(codecs: list[StateStorage], values: list[jax.Array]) -> list[jax.Array | None]:
    """What the encode of each of ``values`` (of one leaf) by its codec needs of the
    whole array before it can encode its first value: the int8 codec's block
    maxima; None for other codecs."""
    # Not for a subclass with its own encode: the second pass would bypass it.
    needed = [i for i, (c, v) in enumerate(zip(codecs, values))
              if isinstance(c, Int8BlockStorage) and type(c).encode is Int8BlockStorage.encode
              and c._quantizes(v)]
    maxima = [None] * len(values)
    for i, m in zip(needed, _absmax_of([values[i] for i in needed]) if needed else []):
        maxima[i] = m
    return maxima


# --------------------------------------------------------------------------------------
# Codecs.
# --------------------------------------------------------------------------------------


class StateStorage(abc.ABC):
    """How one per-parameter state array is kept between steps.

    ``encode`` receives the freshly computed state (float32 or wider) and ``like``:
    the parameter at ``init``, the previously stored value at ``update`` (codecs
    with stochastic rounding read their counter from it). ``salt`` (a static
    Python int) tells the arrays of one state apart: jopt passes a different one
    for each leaf and moment (see the module docstring for the one exception), the
    same at every step, and a codec that rounds
    randomly must draw unrelated noise for different salts (see the module
    docstring). Codecs written without a ``salt`` parameter still work: jopt
    passes it only to an ``encode`` that accepts it. ``decode`` returns the state
    for computation, in at least float32. Encoded values must be pytrees of
    arrays (so they jit, checkpoint and shard like any state).
    """

    name: str

    @abc.abstractmethod
    def encode(self, value: jax.Array, *, like: Any, signed: bool, salt: int = 0) -> Any:
        """Stores ``value`` (``signed=False`` promises it is non-negative)."""

    @abc.abstractmethod
    def decode(self, stored: Any) -> jax.Array:
        """Returns the stored state as an array of at least float32."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


class ParamDtypeStorage(StateStorage):
    """State kept in its parameter's dtype (optax's default)."""

    name = "param"

    def encode(self, value, *, like, signed, salt=0):
        del signed, salt
        return value.astype(like.dtype)

    def decode(self, stored):
        return stored.astype(compute_dtype(stored.dtype))


@dataclasses.dataclass(frozen=True, repr=False)
class DtypeStorage(StateStorage):
    """State kept in a fixed floating dtype (``"float32"``, ``"bfloat16"``).

    Args:
      dtype: the storage dtype.
      stochastic_rounding: round to the dtype stochastically (bfloat16 only; see
        the module docstring). Values are then stored as :class:`RoundedArray`.
    """

    dtype: Any
    stochastic_rounding: bool = False

    def __post_init__(self):
        if self.stochastic_rounding and jnp.dtype(self.dtype) != jnp.bfloat16:
            raise ValueError(
                f"stochastic_rounding is implemented for bfloat16 storage only, not "
                f"{jnp.dtype(self.dtype).name}; use stochastic_rounding=False."
            )

    @property
    def name(self) -> str:  # type: ignore[override]
        return jnp.dtype(self.dtype).name

    def encode(self, value, *, like, signed, salt=0):
        if jnp.iscomplexobj(value):
            return value  # no complex bfloat16; keep the compute dtype
        if not self.stochastic_rounding:
            return value.astype(self.dtype)
        step = _next_step(like)
        value = value.astype(jnp.float32)
        bits = jax.lax.bitcast_convert_type(value, jnp.uint32)
        # bfloat16 is the top half of float32: adding 16 uniform random bits below
        # it and truncating rounds up with probability equal to the dropped
        # fraction. The noise never carries out of an inf (its low bits are 0).
        noise = _random_bits(value.shape, step, _stream_key(_BF16_STREAM, signed, salt),
                             _shard_offset(value.size)) >> 16
        # NaN gets no noise and its quiet bit set, so that it stays NaN. Written
        # as integer arithmetic: a select of bfloat16 lanes is scalarised by
        # XLA:CPU's LLVM backend (the whole encode ran 2x slower).
        nan = jnp.isnan(value).astype(jnp.uint32)
        top = ((bits + (noise & (nan - 1))) >> 16) | (nan << 6)
        rounded = jax.lax.bitcast_convert_type(top.astype(jnp.uint16), jnp.bfloat16)
        return RoundedArray(rounded, step)

    def decode(self, stored):
        if isinstance(stored, EncodedArray):
            return stored.decode()
        return stored.astype(compute_dtype(stored.dtype))

    def __repr__(self) -> str:
        sr = ", stochastic_rounding=True" if self.stochastic_rounding else ""
        return f"DtypeStorage({self.name!r}{sr})"


def _blocks(value: jax.Array) -> list[jax.Array]:
    """``value`` as rows of ``BLOCK_SIZE`` values, the last one zero-padded: one
    ``[n, 256]`` array, or two (whole blocks, then the partial last block) on CPU."""
    flat = value.reshape(-1).astype(jnp.float32)
    full = flat.size - flat.size % BLOCK_SIZE
    if full < flat.size and _pad_whole_array():
        # XLA:GPU/TPU fuse the pad into the encode; concatenating the codes of the
        # last block instead costs an extra kernel (int8 Adam on 10M values on an
        # H100: 1.9x optax's step time with the concatenation, 1.2x padded).
        flat = jnp.pad(flat, (0, BLOCK_SIZE - flat.size + full))
        full = flat.size
    # Whole blocks are a reshape of the value; on CPU only a partial last block is
    # padded (XLA:CPU materialises a padded float32 copy of the whole array).
    parts = [flat[:full].reshape(-1, BLOCK_SIZE)] if full else []
    if full < flat.size:
        parts.append(jnp.pad(flat[full:], (0, BLOCK_SIZE - flat.size + full))[None])
    return parts


def _rows_absmax(arrays: list[jax.Array]) -> list[jax.Array]:
    """The absolute maximum of each row of each of ``arrays`` (all ``[n, 256]``;
    NaN where a row holds one), in one reduction."""
    # One variadic (max, min) reduction: XLA fuses the producer (the whole update
    # of the state) into it. A plain reduce_max of |x| becomes a library call that
    # needs |x| materialised first - a full float32 temporary, ~10x slower on CPU.
    # Several arrays in one reduction: a GPU reads the inputs they are computed
    # from (a gradient, the old codes) once, not once per array.
    extremes = jax.lax.reduce(
        tuple(a for a in arrays for _ in range(2)),
        tuple(jnp.float32(x) for _ in arrays for x in (-jnp.inf, jnp.inf)),
        _max_min_reducer(len(arrays)),
        (1,))
    return [jnp.maximum(high, -low) for high, low in zip(extremes[::2], extremes[1::2])]


@functools.cache
def _max_min_reducer(num_arrays: int) -> Callable:
    """The (max, min) * ``num_arrays`` reduction computation of :func:`_rows_absmax`.

    One function object per arity: ``lax.reduce`` caches its program by the
    computation's identity, so a fresh lambda per call would compile anew at every
    step of an eager (un-jitted) update loop.
    """
    def reducer(a, b):
        return tuple(f(x, y) for x, y, f in zip(a, b, [jnp.maximum, jnp.minimum] * num_arrays))
    return reducer


def _absmax_of(values: list[jax.Array]) -> list[jax.Array]:
    """The block maxima that :func:`_quantize` of each of ``values`` (arrays of one
    size) would compute, in one reduction."""
    maxima = [[] for _ in values]
    # The whole blocks, then (on CPU) a partial last one.
    for blocks in zip(*[_blocks(value) for value in values]):
        for column, m in zip(maxima, _rows_absmax(list(blocks))):
            column.append(m)
    return [column[0] if len(column) == 1 else jnp.concatenate(column) for column in maxima]


def _quantize(value: jax.Array, signed: bool, step: jax.Array, stochastic: bool, salt: int,
              absmax: jax.Array | None = None):
    """Codes and scales of ``value``; ``absmax``: its block maxima, if already known
    (:func:`_absmax_of`, see :func:`_recompute_for_encode`)."""
    key = _stream_key(_INT8_STREAM, signed, salt)
    # The slice's place in the whole array (ZeRO-1): its unpadded size counts.
    offset = _shard_offset(value.size)
    encoded, first_row = [], 0
    for blocks in _blocks(value):
        rows = blocks.shape[0]
        own = None if absmax is None else absmax[first_row:first_row + rows]
        encoded.append(_quantize_blocks(blocks, signed, step, stochastic, key,
                                        offset + first_row * BLOCK_SIZE, own))
        first_row += rows
    if len(encoded) == 1:
        codes, scales = encoded[0]
    else:
        codes, scales = (jnp.concatenate(x) for x in zip(*encoded))
    return QuantizedArray(codes, scales, step, tuple(value.shape), signed)


def _pad_whole_array() -> bool:
    """Whether to pad a partial last block by padding the whole array (not on CPU).

    Either way the codes are the same, bit for bit: the rounding noise hashes each
    value's index in the whole array.
    """
    return jax.default_backend() != "cpu"


def _quantize_blocks(blocks, signed, step, stochastic, key, first, absmax=None):
    """Codes and scales of ``blocks`` ``[n, 256]``, whose first value is the array's
    element ``first`` (it places the rounding noise).

    ``key``: the array's noise stream (:func:`_stream_key`). ``absmax``: the rows'
    absolute maxima, if already known.
    """
    levels, power = _SIGNED_CODE if signed else _UNSIGNED_CODE
    if absmax is None:
        (absmax,) = _rows_absmax([blocks])
    # An all-zero block keeps scale 1 (no 0/0); NaN and inf stay in the scale so
    # that the block decodes to NaN instead of hiding them.
    scales = jnp.where(absmax == 0, 1.0, absmax)
    # 1/scale is subnormal - flushed to zero on CPUs - for scales above 2^126, so
    # such blocks are first brought down by an exact power of two.
    prescale = jnp.where(absmax > 2.0**100, jnp.float32(2.0**-64), jnp.float32(1.0))
    inverse = 1.0 / (scales * prescale)
    magnitude = (jnp.abs(blocks) * prescale[:, None]) * inverse[:, None]
    if not signed:
        magnitude = jnp.where(blocks > 0, magnitude, 0.0)  # -0.0 and noise below 0
    root = jnp.sqrt(jnp.sqrt(magnitude))  # r ** (1/4)
    if power == 8:
        root = jnp.sqrt(root)
    low = jnp.minimum(jnp.floor(levels * root), levels - 1)
    # Choose between the two neighbouring levels in value space: exact in
    # expectation (stochastic) or the nearer one.
    lo = _power(low * (1.0 / levels), power)
    hi = _power((low + 1) * (1.0 / levels), power)
    if stochastic:
        bits = _random_bits(blocks.shape, step, key, first) >> 8
        uniform = jax.lax.bitcast_convert_type(bits, jnp.int32).astype(jnp.float32)
        up = uniform * (2.0**-24 * (hi - lo)) < magnitude - lo
    else:
        up = magnitude - lo > hi - magnitude
    codes = low + up
    if signed:
        codes = _integers_as(jnp.where(blocks < 0, -codes, codes), jnp.int8)
    else:
        codes = _integers_as(jnp.where(magnitude > 0, jnp.maximum(codes, 1.0), 0.0), jnp.uint8)
    return codes, scales


_ROUNDING_MAGIC = 1.5 * 2.0**23


def _integers_as(codes: jax.Array, dtype: Any) -> jax.Array:
    """Integer-valued float32 ``codes`` in [-128, 255] as 8-bit ``dtype``, exactly.

    Adding 1.5 * 2^23 moves an integer below 2^22 in magnitude into the low bits
    of the float's mantissa, in two's complement: the sum's low byte is the code.
    ``codes.astype(int8)`` gives the same bytes, but XLA converts a float to an
    integer with saturation and a NaN check: on an AVX2 CPU 15 of the encode
    loop's ~75 instructions per 8 values, and with this add and mask instead an
    int8 encode of 10M values took 5.7-6.0 ms instead of 7.8-8.0 ms (best of 25).
    A NaN gives 0, as the conversion does (its block's scale is NaN anyway).
    """
    bits = jax.lax.bitcast_convert_type(codes + jnp.float32(_ROUNDING_MAGIC), jnp.int32)
    return jax.lax.bitcast_convert_type((bits & 0xFF).astype(jnp.uint8), dtype)


def _power(q: jax.Array, power: int) -> jax.Array:
    q2 = q * q
    q4 = q2 * q2
    return q4 if power == 4 else q4 * q4


def _normalised(codes: jax.Array, signed: bool) -> jax.Array:
    """Codes -> values relative to their block's scale, in [-1, 1] (float32)."""
    levels, power = _SIGNED_CODE if signed else _UNSIGNED_CODE
    q = codes.astype(jnp.float32) * (1.0 / levels)
    if signed:
        return q * jnp.abs(q) * (q * q)  # sign(q) q^4
    return _power(q, power)


def _dequantize(stored: QuantizedArray) -> jax.Array:
    normalised = _normalised(stored.codes, stored.signed)
    values = (normalised * stored.scales[:, None]).reshape(-1)
    size = int(np.prod(stored.shape, dtype=np.int64))
    return values[:size].reshape(stored.shape)


class Int8BlockStorage(StateStorage):
    """Block-wise 8-bit state (Dettmers et al. 2021); small arrays stay float32.

    Args:
      min_size: arrays with fewer values are stored in float32 (under ZeRO-1 the
        whole buffer's size counts, not one device's slice of it).
      stochastic_rounding: round stochastically (default; unbiased, see the module
        docstring) or to the nearest level.

    Example:
      >>> import jax.numpy as jnp, jopt
      >>> codec = jopt.storage.Int8BlockStorage(min_size=0)
      >>> x = jnp.linspace(-1.0, 1.0, 1000)
      >>> stored = codec.encode(x, like=x, signed=True)
      >>> stored.codes.dtype, stored.codes.shape
      (dtype('int8'), (4, 256))
      >>> bool(jnp.max(jnp.abs(codec.decode(stored) - x)) < 0.032)
      True
    """

    name = "int8"

    def __init__(self, min_size: int = MIN_QUANTIZED_SIZE, *, stochastic_rounding: bool = True):
        if min_size < 0:
            raise ValueError(f"min_size must be >= 0, got {min_size}.")
        self.min_size = min_size
        self.stochastic_rounding = stochastic_rounding

    def _quantizes(self, value) -> bool:
        return not (value.size == 0 or _whole_size(value.size) < self.min_size
                    or jnp.iscomplexobj(value))

    def encode(self, value, *, like, signed, salt=0):
        if not self._quantizes(value):
            return value.astype(compute_dtype(value.dtype))
        return _quantize(value, signed, _next_step(like), self.stochastic_rounding, salt)

    def decode(self, stored):
        if isinstance(stored, EncodedArray):
            return stored.decode()
        return stored.astype(compute_dtype(stored.dtype))

    def __repr__(self) -> str:
        sr = "" if self.stochastic_rounding else ", stochastic_rounding=False"
        return f"Int8BlockStorage(min_size={self.min_size}{sr})"


_NAMED = {
    "float32": lambda: DtypeStorage(jnp.float32),
    "bfloat16": lambda: DtypeStorage(jnp.bfloat16, stochastic_rounding=True),
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


# --------------------------------------------------------------------------------------
# State storage for any optax transformation.
# --------------------------------------------------------------------------------------

# Fields of optax/jopt states known to hold non-negative trees (second moments,
# sums of squares). Anything else is treated as signed, which is always correct.
NONNEGATIVE_STATE_FIELDS = frozenset({
    "nu",  # adam, rmsprop, adabelief, yogi, ... (optax and jopt; not sm3, see below)
    "nu_max",  # amsgrad
    "sum_of_squares",  # adagrad
    "e_g", "e_x",  # adadelta
    "exp_avg_sq",  # dadapt_adamw
    "grad_sum_sq",  # madgrad
})


# (state class name, field) pairs whose field name is in NONNEGATIVE_STATE_FIELDS
# but which hold a signed tree: optax.sm3 keeps its momentum in ``nu``.
_SIGNED_FIELDS_OF = {("ScaleBySM3State", "nu")}

# State fields that are never per-parameter state, whatever their shapes (with a
# single 0-d parameter every float scalar has "the params' layout").
_NOT_PARAMETER_STATE = frozenset({"count", "hyperparams", "hyperparams_states"})


def _signed_paths(state: Any) -> set:
    """Key paths of fields listed in ``_SIGNED_FIELDS_OF`` within ``state``."""
    paths = set()

    def visit(path, node):
        for field in (f for cls, f in _SIGNED_FIELDS_OF if type(node).__name__ == cls):
            paths.add(path + (jax.tree_util.GetAttrKey(field),))
        return node

    is_marked = lambda x: any(type(x).__name__ == cls for cls, _ in _SIGNED_FIELDS_OF)  # noqa: E731
    jax.tree_util.tree_map_with_path(visit, state, is_leaf=is_marked)
    return paths


def _is_parameter_state(path: tuple) -> bool:
    return not any(
        (isinstance(k, jax.tree_util.GetAttrKey) and k.name in _NOT_PARAMETER_STATE)
        or (isinstance(k, jax.tree_util.DictKey) and k.key in _NOT_PARAMETER_STATE)
        for k in path)


def _field_name(path: tuple) -> str | None:
    """The last named key (attribute or dict key) of a key path."""
    for key in reversed(path):
        if isinstance(key, jax.tree_util.GetAttrKey):
            return key.name
        if isinstance(key, jax.tree_util.DictKey) and isinstance(key.key, str):
            return key.key
    return None


def _stored_shape(x: Any) -> tuple[int, ...] | None:
    if isinstance(x, EncodedArray) or hasattr(x, "shape"):
        return tuple(x.shape)
    return None


def _masked_or_encoded(x: Any) -> bool:
    return isinstance(x, (optax.MaskedNode, EncodedArray))


def _aligned(treedef: Any, node: Any) -> tuple[list, Callable[[list], Any]]:
    """``node``'s parts, one per leaf of the params ``treedef``, and the function
    that puts new parts back into ``node``'s own structure.

    ``optax.masked`` / ``multi_transform`` with a mask that is a *prefix* of the
    params keep a single ``MaskedNode`` for a whole masked-out subtree; here it
    stands for each of that subtree's leaves (and is kept as it is on the way
    back). Raises ``ValueError`` / ``TypeError`` if ``node`` is not laid out like
    the params.
    """
    try:
        return treedef.flatten_up_to(node), treedef.unflatten
    except (ValueError, TypeError):
        if not any(isinstance(x, optax.MaskedNode)
                   for x in jax.tree.leaves(node, is_leaf=_masked_or_encoded)):
            raise
    slots = treedef.unflatten(range(treedef.num_leaves))
    expanded = jax.tree.map(
        lambda n, sub: jax.tree.map(lambda _: n, sub) if isinstance(n, optax.MaskedNode) else n,
        node, slots, is_leaf=_masked_or_encoded)

    def rebuild(parts):
        new = treedef.unflatten(parts)
        return jax.tree.map(lambda n, sub: n if isinstance(n, optax.MaskedNode) else sub,
                            node, new, is_leaf=_masked_or_encoded)

    return treedef.flatten_up_to(expanded), rebuild


def _params_like(treedef: Any, shapes: list) -> Callable[[Any], bool]:
    """A predicate: is a (state) subtree laid out like the params?

    It is if it has the params' structure and every leaf is an array (or a codec's
    stored form) of its parameter's shape, or holds no array (``None``, optax's
    ``MaskedNode``).
    """

    def predicate(node):
        try:
            parts, _ = _aligned(treedef, node)
        except (ValueError, TypeError):
            return False
        found = False
        for part, shape in zip(parts, shapes):
            part_shape = _stored_shape(part)
            if part_shape is None:
                if jax.tree.leaves(part):
                    return False
            elif part_shape != shape:
                return False
            else:
                found = True
        return found

    return predicate


def with_state_storage(
    inner: optax.GradientTransformation,
    storage: str | StateStorage,
    *,
    nonnegative: Collection[str] | Callable[[tuple], bool] = NONNEGATIVE_STATE_FIELDS,
) -> optax.GradientTransformationExtraArgs:
    """Stores the parameter-shaped state of any transformation through a codec.

    ``inner``'s state is kept encoded between steps: every subtree of it laid out
    like the params (same structure, each leaf of its parameter's shape - e.g. the
    ``mu`` and ``nu`` of ``optax.adam``; under ``optax.masked`` or
    ``multi_transform`` a ``MaskedNode`` may stand for a leaf or, with a mask that
    is a prefix of the params, a whole subtree) has its floating arrays encoded by
    ``storage``; everything else (step counts, hyper-parameters, factored
    statistics of another shape) is left as it is. ``update`` decodes the state to
    (at least) float32, calls ``inner.update``, and encodes the new state; the
    updates keep the gradients' dtypes. The returned state has ``inner``'s own
    structure with the encoded arrays in place, so fields stay reachable by name.

    Signedness decides the int8 code (see the module docstring): a subtree is
    treated as non-negative when the name of the state field that holds it (the
    last attribute or dict key on its path, e.g. ``nu``) is in ``nonnegative``;
    everything else gets the signed code, which is correct for any sign but has
    less range. Unknown non-negative fields thus only lose precision, never sign.
    (``optax.sm3`` keeps its signed momentum in a field named ``nu``: it is
    recognised by its state class and kept signed.) Fields named ``count``,
    ``hyperparams`` or ``hyperparams_states`` are never encoded, and state that
    ``inner`` already stores encoded (a jopt optimizer given its own
    ``state_storage``) is passed to it as it is, so its rounding counter advances.
    Each encoded array draws its own rounding noise, salted by its field name and
    its leaf's key path as jopt's optimizers salt theirs (``"mu['w']"``):
    wrapping ``optax.adam`` gives the state of ``jopt.adam``, bit for bit (float32
    params; optax keeps the moments of bfloat16 params in bfloat16).

    Args:
      inner: any optax (or jopt) transformation.
      storage: ``"float32"``, ``"bfloat16"``, ``"int8"`` or a :class:`StateStorage`.
      nonnegative: field names whose trees are non-negative, or a predicate on the
        key path of each params-shaped subtree of the state.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs`.

    Raises:
      ValueError: at ``update`` if ``inner`` changed the structure of its state.

    Example:
      >>> import jax.numpy as jnp, optax, jopt
      >>> params = {"w": jnp.zeros(1 << 16)}
      >>> tx = jopt.storage.with_state_storage(optax.adam(1e-3), "int8")
      >>> state = tx.init(params)
      >>> type(state[0].nu["w"]).__name__, state[0].nu["w"].codes.dtype
      ('QuantizedArray', dtype('uint8'))
      >>> round(jopt.storage.state_nbytes(state) / params["w"].size, 2)
      2.03
    """
    codec = resolve_storage(storage)
    inner = optax.with_extra_args_support(inner)
    if callable(nonnegative):
        def is_nonnegative(path, signed_paths):
            del signed_paths  # the caller's predicate decides alone
            return nonnegative(path)
    else:
        names = frozenset(nonnegative)

        def is_nonnegative(path, signed_paths):
            return path not in signed_paths and _field_name(path) in names

    def layout_of(tree):
        leaves, treedef = jax.tree.flatten(tree)
        return treedef, [tuple(jnp.shape(x)) for x in leaves]

    own_states: dict = {}

    def own_state_of(params):
        """``inner.init(params)`` as shapes, traced once per layout of ``params``:
        ``jax.eval_shape`` traces ``inner.init`` at every call, which an eager
        (un-jitted) update loop would pay at every step."""
        leaves, treedef = jax.tree.flatten(params)
        key = (treedef, tuple(jax.typeof(x) for x in leaves))
        if key not in own_states:
            if len(own_states) >= 16:  # a bound for callers with ever-new layouts
                own_states.clear()
            own_states[key] = jax.eval_shape(inner.init, params)
        return own_states[key]

    def stream_names(state, match, is_leaf):
        """Names the params-shaped subtrees of ``state`` for their salts.

        A subtree is named by its field (``mu``), as :func:`jopt.lift.lift` names
        its moments, so that wrapping ``optax.adam`` draws the rounding noise of
        ``jopt.adam``; fields whose name occurs twice (a chain of two optimizers
        with a ``mu`` each) are named by their whole key path.
        """
        paths = []
        jax.tree_util.tree_map_with_path(
            lambda path, node: paths.append(path) if match(path, node) else None,
            state, is_leaf=is_leaf)
        fields = [_field_name(path) for path in paths]
        return {path: field if field is not None and fields.count(field) == 1
                else jax.tree_util.keystr(path) for path, field in zip(paths, fields)}

    def encodable(v):
        # Not counts, masks, or state that ``inner`` already stores encoded.
        return (not isinstance(v, EncodedArray) and _stored_shape(v) is not None
                and jnp.issubdtype(v.dtype, jnp.inexact))

    def encode_subtree(path, node, like, treedef, signed_paths, names, leaves,
                       maxima=None):
        # ``leaves``: the params' leaf names (:func:`_leaf_names`) for the salts;
        # ``maxima``: the int8 block maxima of each leaf from a first evaluation.
        signed = not is_nonnegative(path, signed_paths)
        values, rebuild = _aligned(treedef, node)
        likes, _ = _aligned(treedef, like)
        maxima = [None] * len(values) if maxima is None else maxima[path]
        out = [
            _encode(codec, v, like=l, signed=signed, salt=_salt(f"{names[path]}{leaf}"),
                    absmax=m)
            if encodable(v) else v
            for v, l, leaf, m in zip(values, likes, leaves, maxima)
        ]
        return rebuild(out)

    def prepass(new_state, match, is_leaf, treedef):
        """The int8 block maxima of each encoded leaf, by subtree path (or None
        when nothing needs them; see :func:`_recompute_for_encode`). The moments
        of one leaf (``mu`` and ``nu``) are reduced together."""
        subtrees = {}
        jax.tree_util.tree_map_with_path(
            lambda path, node: subtrees.__setitem__(path, _aligned(treedef, node)[0])
            if match(path, node) else None,
            new_state, is_leaf=is_leaf)
        maxima = {path: [None] * treedef.num_leaves for path in subtrees}
        for i in range(treedef.num_leaves):
            paths = [p for p, values in subtrees.items() if encodable(values[i])]
            found = _prepass([codec] * len(paths), [subtrees[p][i] for p in paths])
            for path, m in zip(paths, found):
                maxima[path][i] = m
        needed = any(m is not None for ms in maxima.values() for m in ms)
        return maxima if needed else None

    def decode_subtree(node, own, treedef):
        # ``own``: inner's state as inner itself lays it out; where inner stores a
        # value encoded (a jopt optimizer given its own state_storage), inner also
        # decodes it, and needs the stored form (its rounding counter) back.
        values, rebuild = _aligned(treedef, node)
        out = [
            v if isinstance(o, EncodedArray)
            else codec.decode(v) if isinstance(v, EncodedArray) or encodable(v)
            else v
            for v, o in zip(values, _aligned(treedef, own)[0])
        ]
        return rebuild(out)

    def matcher(treedef, shapes):
        like_params = _params_like(treedef, shapes)
        return lambda path, node: like_params(node) and _is_parameter_state(path)

    def init_fn(params):
        treedef, shapes = layout_of(params)
        match = matcher(treedef, shapes)
        state = inner.init(params)
        signed_paths = _signed_paths(state)
        is_leaf = _params_like(treedef, shapes)
        names, leaves = stream_names(state, match, is_leaf), _leaf_names(params)
        return jax.tree_util.tree_map_with_path(
            lambda path, node: encode_subtree(
                path, node, params, treedef, signed_paths, names, leaves)
            if match(path, node) else node,
            state, is_leaf=is_leaf)

    def update_fn(updates, state, params=None, **extra_args):
        treedef, shapes = layout_of(updates)
        match = matcher(treedef, shapes)
        is_leaf = _params_like(treedef, shapes)
        own = own_state_of(updates if params is None else params)
        signed_paths = _signed_paths(own)

        def apply_inner(updates, state, params):
            decoded = jax.tree_util.tree_map_with_path(
                lambda path, node, own_node: decode_subtree(node, own_node, treedef)
                if match(path, node) else node,
                state, own, is_leaf=is_leaf)
            return inner.update(updates, decoded, params, **extra_args)

        new_updates, new_state = apply_inner(updates, state, params)
        names, leaves = stream_names(new_state, match, is_leaf), _leaf_names(updates)
        try:
            maxima = (prepass(new_state, match, is_leaf, treedef)
                      if _recompute_for_encode((updates, state)) else None)
            if maxima is not None:
                # int8: the state again, now to be encoded with the block maxima
                # of the first evaluation (see _recompute_for_encode).
                new_updates, new_state = apply_inner(
                    *jax.lax.optimization_barrier((updates, state, params)))
            new_state = jax.tree_util.tree_map_with_path(
                lambda path, node, old: encode_subtree(
                    path, node, old, treedef, signed_paths, names, leaves, maxima)
                if match(path, node) else node,
                new_state, state, is_leaf=is_leaf)
        except ValueError as e:
            raise ValueError(
                "with_state_storage: the inner transformation returned a state whose "
                f"structure differs from the one it was given ({e}). Only "
                "transformations with a fixed state structure can be wrapped."
            ) from None
        new_updates = jax.tree.map(
            lambda u, g: u.astype(g.dtype)
            if jnp.issubdtype(u.dtype, jnp.floating) and jnp.issubdtype(g.dtype, jnp.floating)
            else u,
            new_updates, updates)
        return new_updates, new_state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
