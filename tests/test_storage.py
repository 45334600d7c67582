"""Tests for `jopt.storage`: codec error bounds, stochastic rounding, accounting, wrapper.

The int8 bounds are checked against an independent float64 computation of the code
levels: a decoded value must be one of the two levels around the true value
(stochastic rounding) or the nearer one (round to nearest).
"""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jopt
from jopt import storage

INT8 = storage.Int8BlockStorage(min_size=0)
INT8_NEAREST = storage.Int8BlockStorage(min_size=0, stochastic_rounding=False)
BF16_SR = storage.resolve_storage("bfloat16")

_encode_decode = jax.jit(
    lambda codec, x, signed: codec.decode(codec.encode(x, like=x, signed=signed)),
    static_argnums=(0, 2))


def neighbour_levels(x: np.ndarray, signed: bool):
    """The two int8 code levels around each value, in float64 (per 256-block)."""
    levels, power = (127, 4) if signed else (255, 8)
    flat = np.asarray(x, np.float64).reshape(-1)
    blocks = np.pad(flat, (0, -flat.size % 256)).reshape(-1, 256)
    scale = np.abs(blocks).max(axis=1, keepdims=True)
    scale = np.where(scale == 0, 1.0, scale)
    r = np.abs(blocks) / scale
    low = np.minimum(np.floor(levels * r ** (1 / power) + 1e-9), levels - 1)
    lo, hi = (low / levels) ** power * scale, ((low + 1) / levels) ** power * scale
    sign = np.where(blocks < 0, -1.0, 1.0)
    cut = lambda a: a.reshape(-1)[: flat.size].reshape(np.shape(x))  # noqa: E731
    return cut(sign * lo), cut(sign * hi), cut(sign * scale)


def assert_on_a_neighbour(x, decoded, signed, *, nearest):
    lo, hi, scale = neighbour_levels(x, signed)
    decoded = np.asarray(decoded, np.float64)
    x = np.asarray(x, np.float64)
    tol = 2e-6 * np.abs(scale)  # float32 arithmetic, relative to the block maximum
    on_lo, on_hi = np.abs(decoded - lo) <= tol, np.abs(decoded - hi) <= tol
    assert np.all(on_lo | on_hi)
    if nearest:
        nearer_lo = np.abs(x - lo) <= np.abs(x - hi)
        # A positive non-negative-coded value is never stored as 0 (the only level
        # below the smallest is 0), so it may go up although 0 is nearer.
        never_zero = (not signed) & (np.abs(lo) == 0) & (x > 0)
        assert np.all(np.where(nearer_lo & ~never_zero, on_lo, on_hi | (on_lo & ~never_zero)))


@pytest.mark.parametrize("signed", [True, False])
@pytest.mark.parametrize("codec, nearest", [(INT8, False), (INT8_NEAREST, True)])
def test_int8_decodes_to_a_neighbouring_level(codec, nearest, signed):
    rng = np.random.default_rng(0)
    # Magnitudes over 30 orders within each block, sizes not a multiple of 256.
    x = (rng.normal(size=(37, 29)) * 10.0 ** rng.uniform(-15, 15, size=(37, 29)))
    x = x.astype(np.float32) if signed else np.abs(x).astype(np.float32)
    decoded = _encode_decode(codec, jnp.asarray(x), signed)
    assert decoded.shape == x.shape and decoded.dtype == jnp.float32
    assert_on_a_neighbour(x, decoded, signed, nearest=nearest)
    decoded = np.asarray(decoded)
    if signed:  # values below the smallest level (3.8e-9 of the block max) become 0
        assert np.all((np.sign(decoded) == np.sign(x)) | (decoded == 0))
    else:  # a positive value is never stored as 0
        assert np.all(np.sign(decoded) == np.sign(x))


@settings(max_examples=25, deadline=None)
@given(
    size=st.integers(1, 700),
    exponent=st.integers(-30, 30),
    spread=st.floats(0.0, 12.0),
    signed=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_int8_error_bound_property(size, exponent, spread, signed, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=size) * 10.0 ** (exponent + rng.uniform(-spread, 0, size=size))
    x = np.where(rng.uniform(size=size) < 0.1, 0.0, x).astype(np.float32)  # some zeros
    if not signed:
        x = np.abs(x)
    decoded = np.asarray(_encode_decode(INT8, jnp.asarray(x), signed))
    # Values below float32's normal range may be flushed to zero (CPUs and GPUs
    # do so in float32 arithmetic; the module docstring says so): they are
    # checked as the zeros they become. Without this, a block whose maximum is
    # subnormal (hypothesis found a single value of 9e-39) expects the top code.
    x = np.where(np.abs(x) < np.finfo(np.float32).tiny, np.float32(0), x)
    assert_on_a_neighbour(x, decoded, signed, nearest=False)
    assert np.all(decoded[x == 0] == 0)
    # One level is at most 3.2% of the block maximum apart near the top, so no
    # value is off by more than that fraction of its block's largest magnitude.
    _, _, scale = neighbour_levels(x, signed)
    assert np.all(np.abs(decoded - x) <= 0.032 * np.abs(scale) + 1e-30)


@pytest.mark.parametrize("signed", [True, False])
def test_int8_special_blocks(signed):
    zeros = jnp.zeros(300)
    equal = jnp.full(300, 3.25)
    tiny = jnp.linspace(1e-30, 2e-30, 300)
    huge = jnp.linspace(1.5e38, 3e38, 300)
    for x in (zeros, equal, tiny, huge):
        decoded = _encode_decode(INT8, x, signed)
        assert bool(jnp.all(jnp.isfinite(decoded)))
        # Values within [1/2, 1] of their block maximum sit on codes >= 106, whose
        # levels are < 4% apart.
        np.testing.assert_allclose(decoded, x, rtol=0.04)
    np.testing.assert_array_equal(_encode_decode(INT8, equal, signed), equal)  # exact
    stored = jax.jit(lambda x: INT8.encode(x, like=x, signed=signed))(zeros)
    np.testing.assert_array_equal(stored.scales, 1.0)


@pytest.mark.parametrize("dtype, low, high", [(jnp.int8, -128, 127), (jnp.uint8, 0, 255)])
def test_codes_leave_float32_by_their_bits_exactly(dtype, low, high):
    """The encode's float -> 8-bit conversion (an add and a mask, not XLA's
    saturating convert) gives every code the plain conversion gives; NaN gives 0."""
    codes = jnp.arange(low, high + 1, dtype=jnp.float32)
    converted = jax.jit(storage._integers_as, static_argnums=1)(codes, dtype)
    assert converted.dtype == dtype
    np.testing.assert_array_equal(converted, np.arange(low, high + 1).astype(dtype))
    assert int(storage._integers_as(jnp.float32(jnp.nan), dtype)) == 0
    assert int(storage._integers_as(jnp.float32(-0.0), dtype)) == 0


def test_int8_never_rounds_a_positive_second_moment_to_zero():
    x = jnp.zeros(256).at[0].set(1.0).at[1].set(1e-30)
    for codec in (INT8, INT8_NEAREST):
        decoded = _encode_decode(codec, x, False)
        assert float(decoded[1]) > 0.0  # the smallest level, 5.6e-20 of the block max
        assert float(decoded[1]) == pytest.approx((1 / 255) ** 8, rel=1e-5)
        assert float(decoded[2]) == 0.0


def test_non_finite_values_poison_only_their_block():
    x = jnp.ones(512).at[3].set(jnp.nan).at[300].set(jnp.inf)
    for signed in (True, False):
        decoded = _encode_decode(INT8, x, signed)
        assert bool(jnp.all(jnp.isnan(decoded[:256])))
        assert bool(jnp.all(jnp.isnan(decoded[256:])))
    y = jnp.ones(512).at[3].set(jnp.nan)
    decoded = _encode_decode(INT8, y, True)
    assert bool(jnp.all(decoded[256:] == 1.0))
    rounded = BF16_SR.decode(BF16_SR.encode(jnp.array([jnp.nan, jnp.inf, -jnp.inf, 1.0]),
                                            like=None, signed=True))
    assert bool(jnp.isnan(rounded[0])) and list(rounded[1:]) == [jnp.inf, -jnp.inf, 1.0]
    # NaNs whose payload is only in the low 16 bits, or all ones, stay NaN too.
    odd_nans = jax.lax.bitcast_convert_type(
        jnp.array([0x7F800001, 0xFF80FFFF, 0xFFFFFFFF, 0x7FFFFFFF], jnp.uint32), jnp.float32)
    for step in range(3):  # different noise each encode
        like = BF16_SR.encode(odd_nans, like=None, signed=True)
        for _ in range(step):
            like = BF16_SR.encode(odd_nans, like=like, signed=True)
        assert bool(jnp.all(jnp.isnan(BF16_SR.decode(like))))


@pytest.mark.parametrize("size", [4096 + 1, 5000, 40 * 256])
@pytest.mark.parametrize("signed", [True, False])
def test_int8_partial_block_layouts_give_the_same_codes(monkeypatch, size, signed):
    """CPU concatenates the last block's codes, GPU/TPU pad the array: same bits."""
    codec = storage.Int8BlockStorage()
    x = jax.random.normal(jax.random.key(size), (size,))
    value = x if signed else x * x
    like = codec.encode(value, like=value, signed=signed)  # a counter > 0
    stored = {}
    for pad in (False, True):
        monkeypatch.setattr(storage, "_pad_whole_array", lambda pad=pad: pad)
        stored[pad] = codec.encode(value, like=like, signed=signed)
    np.testing.assert_array_equal(stored[False].codes, stored[True].codes)
    np.testing.assert_array_equal(stored[False].scales, stored[True].scales)
    assert stored[True].codes.shape == (-(-size // 256), 256)


def test_small_arrays_stay_float32_and_the_threshold_is_4096():
    codec = storage.resolve_storage("int8")

    def stored(size, signed=True, dtype=jnp.float32):
        x = jax.ShapeDtypeStruct((size,), dtype)
        return jax.eval_shape(lambda v: codec.encode(v, like=v, signed=signed), x)

    assert not storage.is_encoded(stored(4095)) and stored(4095).dtype == jnp.float32
    big = stored(4096)
    assert isinstance(big, storage.QuantizedArray)
    assert big.codes.dtype == jnp.int8 and big.codes.shape == (16, 256)
    assert big.scales.shape == (16,) and big.step.dtype == jnp.uint32
    assert stored(4096, signed=False).codes.dtype == jnp.uint8
    assert stored(5000, dtype=jnp.complex64).dtype == jnp.complex64


@pytest.mark.parametrize("codec", [INT8, BF16_SR])
def test_stochastic_rounding_is_unbiased_and_uses_a_counter(codec):
    # Values between two levels; the mean of many encodes (each step its own
    # random bits) must be the value, not the nearer level.
    x = jnp.full(4096, 0.3).at[0].set(1.0) if codec is INT8 else jnp.full(4096, 1.0 + 2**-9)

    def body(stored, _):
        stored = codec.encode(x, like=stored, signed=False)
        return stored, codec.decode(stored)

    first = jax.jit(lambda v: codec.encode(v, like=v, signed=False))(x)
    last, decoded = jax.jit(lambda s: jax.lax.scan(body, s, None, length=64))(first)
    assert int(first.step) == 0 and int(last.step) == 64
    mean = float(jnp.mean(decoded[:, 1:]))
    assert mean == pytest.approx(float(x[1]), rel=2e-4)
    assert float(jnp.std(decoded[:, 1])) > 0  # the same element rounds both ways


def test_stochastic_rounding_keeps_a_moving_average_decaying():
    """The failure of round-to-nearest that the module docstring describes.

    One value per block holds the block maximum; the others' squared gradients
    drop 100x. Their exact second moment decays 20x in 3000 steps; rounded to the
    nearest int8 level it barely moves, stochastically rounded it follows.
    """
    size, b2 = 4096, 0.999
    keep_max = jnp.arange(size) % 256 == 0

    def run(codec):
        def step(carry, t):
            stored, exact = carry
            g2 = jnp.where(keep_max, 100.0, jnp.where(t < 1000, 1.0, 0.01))
            exact = b2 * exact + (1 - b2) * g2
            value = b2 * codec.decode(stored) + (1 - b2) * g2
            return (codec.encode(value, like=stored, signed=False), exact), None

        start = jnp.where(keep_max, 100.0, 1.0)
        stored = codec.encode(start, like=start, signed=False)
        (stored, exact), _ = jax.lax.scan(step, (stored, start), jnp.arange(4000))
        return float(jnp.mean(jnp.where(keep_max, 0, codec.decode(stored) / exact)) * 256 / 255)

    assert run(INT8) == pytest.approx(1.0, abs=0.1)
    assert run(INT8_NEAREST) > 5.0
    assert run(BF16_SR) == pytest.approx(1.0, abs=0.02)
    assert run(storage.DtypeStorage(jnp.bfloat16)) > 5.0


def test_bfloat16_rounds_to_a_neighbour():
    x = jax.random.normal(jax.random.key(0), (1000,)) * 10.0 ** jnp.linspace(-20, 20, 1000)
    decoded = BF16_SR.decode(BF16_SR.encode(x, like=x, signed=True))
    down = x.astype(jnp.bfloat16).astype(jnp.float32)  # nearest
    gap = jnp.abs(x) * 2.0**-7
    assert bool(jnp.all(jnp.abs(decoded - x) <= gap))
    assert bool(jnp.any(decoded != down))


def test_codecs_agree_under_jit_and_eagerly():
    x = jax.random.normal(jax.random.key(1), (300,))
    for codec in (INT8,):
        eager = codec.decode(codec.encode(x, like=x, signed=True))
        jitted = jax.jit(lambda v, c=codec: c.decode(c.encode(v, like=v, signed=True)))(x)
        np.testing.assert_array_equal(eager, jitted)


def test_resolve_storage_errors_name_the_choices():
    with pytest.raises(ValueError, match=r"state_storage='int4' is not a known storage.*"
                                         r"'bfloat16', 'float32', 'int8'"):
        storage.resolve_storage("int4")
    with pytest.raises(ValueError, match="bfloat16 storage only, not float16"):
        storage.DtypeStorage(jnp.float16, stochastic_rounding=True)
    with pytest.raises(ValueError, match="min_size must be >= 0"):
        storage.Int8BlockStorage(min_size=-1)
    assert repr(storage.resolve_storage("bfloat16")) == (
        "DtypeStorage('bfloat16', stochastic_rounding=True)")


def _million_param_tree():
    shapes = {"embed": (1024, 512), "dense": (512, 1000), "out": (1000, 10), "bias": (1000,)}
    return {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}


@pytest.mark.parametrize("name, low, high", [("float32", 8.0, 8.0001), ("bfloat16", 4.0, 4.0001),
                                             ("int8", 2.0, 2.1)])
def test_adam_state_bytes_per_parameter(name, low, high):
    params = _million_param_tree()
    count = sum(int(np.prod(p.shape)) for p in params.values())
    assert count > 1_000_000
    state = jax.eval_shape(jopt.adam(1e-3, state_storage=name).init, params)
    per_param = storage.state_nbytes(state) / count
    assert low <= per_param <= high
    if name == "int8":
        # 10000 values: quantized; 1000 values: float32
        assert isinstance(state[0].mu["out"], storage.QuantizedArray)
        assert state[0].mu["bias"].dtype == jnp.float32
        # Allocated, it has the size of the abstract state.
        small = {"w": jnp.zeros(5000), "b": jnp.zeros(10)}
        real = jax.jit(jopt.adam(1e-3, state_storage=name).init)(small)
        abstract = jax.eval_shape(jopt.adam(1e-3, state_storage=name).init, small)
        assert storage.state_nbytes(real) == storage.state_nbytes(abstract)


def quadratic(size=8192, seed=0):
    rng = np.random.default_rng(seed)
    curvature = jnp.asarray(np.exp(rng.normal(0, 1.5, size)), jnp.float32)
    target = jnp.asarray(rng.normal(size=size), jnp.float32)
    return lambda p: 0.5 * jnp.mean(curvature * (p["w"] - target) ** 2)


def losses(tx, loss, steps, size=8192):
    @jax.jit
    def run(params):
        def step(carry, _):
            params, state = carry
            value, grads = jax.value_and_grad(loss)(params)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), value
        return jax.lax.scan(step, (params, tx.init(params)), None, length=steps)[1]

    return np.asarray(run({"w": jnp.zeros(size)}))


def test_low_precision_adam_tracks_float32_on_a_quadratic():
    """int8/bf16 Adam stay within 5% of the float32 loss at every step.

    The state's rounding is zero-mean (stochastic), so the loss curves differ only
    by the noise it adds to each coordinate's step size; 5% leaves room for that
    noise over the 14-fold loss decrease (measured: under 1.5% for both).
    """
    loss = quadratic()
    reference = losses(jopt.adam(0.01), loss, 400)
    assert reference[-1] < reference[0] / 10
    for name in ("int8", "bfloat16"):
        other = losses(jopt.adam(0.01, state_storage=name), loss, 400)
        np.testing.assert_allclose(other, reference, rtol=0.05)


def test_wrapper_gives_optax_adam_the_same_state_as_jopt():
    loss = quadratic(5000)
    wrapped = storage.with_state_storage(optax.adam(0.01), "int8")
    params = {"w": jnp.zeros(5000)}
    state = jax.eval_shape(wrapped.init, params)
    assert isinstance(state[0].mu["w"], storage.QuantizedArray) and state[0].mu["w"].signed
    assert not state[0].nu["w"].signed  # "nu" is a known non-negative field
    assert state[0].count.dtype == jnp.int32  # counts are left alone
    # Same math, codec, counters and random bits as jopt's own int8 Adam.
    np.testing.assert_allclose(losses(wrapped, loss, 30, 5000),
                               losses(jopt.adam(0.01, state_storage="int8"), loss, 30, 5000),
                               rtol=1e-5)


def test_wrapper_on_lion_adafactor_and_hyperparameters():
    params = {"w": jnp.ones((64, 128)), "b": jnp.ones(8)}
    grads = jax.tree.map(lambda p: 0.01 * p, params)

    lion = storage.with_state_storage(optax.lion(1e-3), "bfloat16")

    @jax.jit
    def both(params, grads):
        state = lion.init(params)
        updates, _ = lion.update(grads, state, params)
        reference, _ = optax.lion(1e-3).update(grads, optax.lion(1e-3).init(params), params)
        return state, updates, reference

    state, updates, reference = both(params, grads)
    assert isinstance(state[0].mu["w"], storage.RoundedArray)
    np.testing.assert_allclose(updates["w"], reference["w"], rtol=1e-6)

    # Factored second moments are not shaped like the params: left as they are.
    square = {"w": jnp.ones((256, 256)), "b": jnp.ones(8)}
    factored = storage.with_state_storage(optax.adafactor(1e-3), "int8")
    state = jax.eval_shape(factored.init, square)
    leaves = jax.tree.leaves(state, is_leaf=storage.is_encoded)
    assert not any(storage.is_encoded(x) for x in leaves)
    assert state[0].v_row["w"].shape == (256,)
    updates, _ = jax.eval_shape(factored.update, square, state, square)
    assert updates["w"].shape == (256, 256)
    # Below adafactor's factoring size its full second moment is stored (signed:
    # "v" is not a name known to be non-negative everywhere).
    unfactored = jax.eval_shape(factored.init, params)[0].v["w"]
    assert isinstance(unfactored, storage.QuantizedArray) and unfactored.signed

    injected = storage.with_state_storage(
        optax.inject_hyperparams(optax.adam)(learning_rate=0.1), "bfloat16")
    state = jax.eval_shape(injected.init, params)
    assert state.hyperparams["learning_rate"].dtype == jnp.float32
    assert isinstance(state.inner_state[0].nu["w"], storage.RoundedArray)
    _, new_state = jax.eval_shape(injected.update, grads, state, params)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_wrapper_signedness_can_be_overridden():
    params = {"w": jnp.ones(5000)}
    by_name = storage.with_state_storage(optax.adam(0.1), "int8", nonnegative=())
    assert jax.eval_shape(by_name.init, params)[0].nu["w"].signed
    by_path = storage.with_state_storage(
        optax.adam(0.1), "int8",
        nonnegative=lambda path: jax.tree_util.keystr(path).endswith(".mu"))
    state = jax.eval_shape(by_path.init, params)
    assert not state[0].mu["w"].signed and state[0].nu["w"].signed
    # State that the inner transformation already stores encoded is kept as it is.
    nested = storage.with_state_storage(jopt.adam(0.1, state_storage="int8"), "bfloat16")
    state = jax.eval_shape(nested.init, params)
    assert isinstance(state[0].mu["w"], storage.QuantizedArray)
    _, new_state = jax.eval_shape(nested.update, params, state, params)
    assert jax.tree.structure(new_state) == jax.tree.structure(state)


def test_wrapper_keeps_sm3_momentum_signed():
    # optax.sm3 keeps its momentum (signed) in a field named "nu", the name of
    # Adam's second moment; the unsigned code would zero its negative half.
    params = jnp.zeros(5000)
    target = jnp.where(jnp.arange(5000) % 2 == 0, 1.0, -1.0)
    grad = jax.grad(lambda w: 0.5 * jnp.sum((w - target) ** 2))
    results = {}
    for name, tx in [("optax", optax.sm3(0.5)),
                     ("int8", storage.with_state_storage(optax.sm3(0.5), "int8"))]:
        w, state = params, tx.init(params)
        for _ in range(50):
            updates, state = tx.update(grad(w), state, w)
            w = w + updates
        results[name] = (w, state)
    momentum = results["int8"][1][0].nu
    assert isinstance(momentum, storage.QuantizedArray) and momentum.signed
    np.testing.assert_allclose(results["int8"][0], results["optax"][0], atol=0.02)


def test_wrapper_leaves_state_the_inner_optimizer_encodes_itself_alone():
    # jopt.adam with its own bf16 storage, wrapped: the wrapper must hand the
    # stored form back (with its rounding counter), so the run equals the bare one.
    params = {"w": jnp.linspace(-1.0, 1.0, 5000)}
    grads = {"w": jnp.cos(jnp.arange(5000.0))}
    bare = jopt.adam(0.01, state_storage="bfloat16")
    wrapped = storage.with_state_storage(jopt.adam(0.01, state_storage="bfloat16"), "float32")
    runs = []
    for tx in (bare, wrapped):
        state, out = tx.init(params), []
        for _ in range(4):
            updates, state = jax.jit(tx.update)(grads, state, params)
            out.append(updates["w"])
        runs.append((out, state))
    assert int(runs[1][1][0].nu["w"].step) == int(runs[0][1][0].nu["w"].step) == 4
    for a, b in zip(runs[0][0], runs[1][0]):
        np.testing.assert_array_equal(a, b)


def test_wrapper_never_encodes_hyperparameters_of_a_scalar_parameter():
    # With one 0-d parameter every float scalar of the state has its shape.
    tx = storage.with_state_storage(
        optax.inject_hyperparams(optax.adam)(learning_rate=0.1), "bfloat16")
    reference = optax.inject_hyperparams(optax.adam)(learning_rate=0.1)
    w = jnp.array(1.0)
    state, ref_state = tx.init(w), reference.init(w)
    assert state.hyperparams["b2"].dtype == jnp.float32
    for g in (0.5, -0.25, 1.0):
        updates, state = tx.update(jnp.array(g), state, w)
        ref_updates, ref_state = reference.update(jnp.array(g), ref_state, w)
        assert float(updates) == pytest.approx(float(ref_updates), rel=1e-2)
    assert float(state.hyperparams["b2"]) == pytest.approx(0.999, rel=1e-7)


def test_int8_keeps_empty_arrays_as_float32():
    codec = storage.Int8BlockStorage(min_size=0)
    stored = codec.encode(jnp.zeros((0, 3)), like=jnp.zeros((0, 3)), signed=True)
    assert stored.shape == (0, 3) and stored.dtype == jnp.float32
    assert codec.decode(stored).shape == (0, 3)


def test_wrapper_keeps_update_dtypes_and_masked_states():
    params = {"a": jnp.ones(5000, jnp.bfloat16), "b": jnp.ones(5000)}
    mask = {"a": True, "b": False}
    tx = storage.with_state_storage(optax.masked(optax.adam(0.1), mask), "int8")
    updates, state = jax.jit(lambda p: tx.update(p, tx.init(p), p))(params)
    assert updates["a"].dtype == jnp.bfloat16 and updates["b"].dtype == jnp.float32
    assert isinstance(state.inner_state[0].mu["a"], storage.QuantizedArray)
    np.testing.assert_array_equal(updates["b"], params["b"])  # masked out: passed through


# ------------------------------------------------------------------ noise streams
# Every stored array draws its own rounding noise (the ``salt`` of ``encode``): with
# one shared stream, same-shaped leaves rounded alike at every step and nu drew
# mu's bits shifted by one element.

def _stored_values(x):
    """What an encoded array holds, as a numpy array (int8 codes or bf16 values)."""
    return np.asarray(x.codes if isinstance(x, storage.QuantizedArray) else x.values)


@pytest.mark.parametrize("name", ["int8", "bfloat16"])
def test_same_shaped_leaves_round_independently(name):
    # Two leaves with the same values and gradients: each must land on a level next
    # to the float32 state, and independently of the other.
    x = jax.random.normal(jax.random.key(0), (64, 128))
    params = {"a": x, "b": x}
    grads = {"a": jnp.cos(7.0 * x), "b": jnp.cos(7.0 * x)}
    exact = jopt.adam(1e-3).update(grads, jopt.adam(1e-3).init(params), params)[1][0]
    tx = jopt.adam(1e-3, state_storage=name)
    state = jax.jit(tx.update)(grads, tx.init(params), params)[1][0]
    for field, signed in (("mu", True), ("nu", False)):
        a, b = getattr(state, field)["a"], getattr(state, field)["b"]
        # Stochastic rounding of each value goes the other way in about 1/3 of the
        # cases (2p(1 - p) for a uniform p); one shared stream made it 0.
        assert np.mean(_stored_values(a) != _stored_values(b)) > 0.2, field
        reference = np.asarray(getattr(exact, field)["a"], np.float64)
        for stored in (a, b):
            decoded = np.asarray(storage.resolve_storage(name).decode(stored), np.float64)
            if name == "int8":
                assert_on_a_neighbour(reference, decoded, signed, nearest=False)
            else:
                assert np.all(np.abs(decoded - reference) <= np.abs(reference) * 2.0**-7)
            error = decoded - reference  # unbiased: the mean error is within noise
            assert abs(error.mean()) < 4 * error.std() / np.sqrt(error.size)
    # The wrapper salts state as jopt does: optax.adam's state is jopt.adam's.
    wrapped = storage.with_state_storage(optax.adam(1e-3), name)
    wrapped_state = jax.jit(wrapped.update)(grads, wrapped.init(params), params)[1][0]
    for field in ("mu", "nu"):
        for leaf in ("a", "b"):
            np.testing.assert_array_equal(_stored_values(getattr(wrapped_state, field)[leaf]),
                                          _stored_values(getattr(state, field)[leaf]))


class _MuNu(NamedTuple):
    mu: Any
    nu: Any


@pytest.mark.parametrize("name", ["int8", "bfloat16"])
def test_mu_and_nu_noise_streams_are_not_shifted_copies(name):
    """Both moments are set to values halfway between two levels, so that each
    element's rounding direction shows one bit of its noise stream. The two
    streams must agree on about half the elements at every small shift; with the
    old ``salt + signed`` seed nu's bits were mu's shifted by one (agreement 1)."""
    n = 64 * 256
    keep_max = jnp.arange(n) % 256 == 0  # int8: each block's maximum is 1.0

    def halfway(signed):
        if name == "bfloat16":
            return 1.0 + 2.0**-8  # between 1 and 1 + 2^-7
        levels, power = (127, 4) if signed else (255, 8)
        k = levels * 3 // 4
        return 0.5 * ((k / levels) ** power + ((k + 1) / levels) ** power)

    values = {s: jnp.where(keep_max, 1.0, jnp.float32(halfway(s))) for s in (True, False)}

    def rule(grad, moments, count):
        del moments, count
        return grad, (values[True], values[False])

    tx = jopt.lift.lift(rule, state_class=_MuNu, moments=[
        jopt.lift.Moment("mu", signed=True), jopt.lift.Moment("nu", signed=False)],
        state_storage=name)
    w = jnp.zeros(n)
    state = jax.jit(tx.update)(w, tx.init(w))[1]
    codec = storage.resolve_storage(name)
    up_mu = np.asarray(codec.decode(state.mu) > values[True])
    up_nu = np.asarray(codec.decode(state.nu) > values[False])
    real = ~np.asarray(keep_max)
    assert 0.45 < up_mu[real].mean() < 0.55 and 0.45 < up_nu[real].mean() < 0.55
    for shift in range(-64, 65):  # mu's element i against nu's element i + shift
        i = np.arange(max(0, -shift), min(n, n - shift))
        both = real[i] & real[i + shift]
        agree = np.mean(up_mu[i][both] == up_nu[i + shift][both])  # sd 0.004 if unrelated
        assert 0.45 < agree < 0.55, (shift, agree)


def test_stream_keys_mix_every_input():
    # Keys of neighbouring salts, of signed/unsigned and of the two codecs are
    # unrelated 32-bit numbers (not key + 1); any int is a salt, a traced one is not.
    keys = {storage._stream_key(codec, signed, salt)
            for codec in (storage._INT8_STREAM, storage._BF16_STREAM)
            for signed in (True, False) for salt in (0, 1, 2, -1, 2**32, 2**40 + 1)}
    assert len(keys) == 2 * 2 * 6
    differences = {(a - b) % 2**32 for a in keys for b in keys if a != b}
    assert min(min(d, 2**32 - d) for d in differences) > 2**16
    with pytest.raises(TypeError):
        jax.jit(lambda s: INT8.encode(jnp.ones(4096), like=None, signed=True, salt=s))(3)


def test_rounding_noise_is_reproducible_across_processes():
    """Salts come from crc32 of names, not Python's per-process string hash: the
    same run in a fresh interpreter (another hash seed) stores the same bits."""
    script = """if True:
        import hashlib, jax, jax.numpy as jnp, numpy as np, jopt
        params = {"a": jnp.linspace(-1.0, 1.0, 4096), "b": jnp.linspace(-1.0, 1.0, 4096)}
        digest = hashlib.sha256()
        for name in ("int8", "bfloat16"):
            tx = jopt.adam(1e-3, state_storage=name)
            state = tx.init(params)
            for _ in range(3):
                _, state = jax.jit(tx.update)(params, state, params)
            for leaf in jax.tree.leaves(state):
                digest.update(np.asarray(leaf).tobytes())
        print(digest.hexdigest())
    """
    runs = [subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                           check=True, timeout=300,
                           env={**os.environ, "PYTHONHASHSEED": seed, "JAX_PLATFORMS": "cpu"})
            .stdout.strip() for seed in ("1", "2")]
    assert runs[0] == runs[1] and len(runs[0]) == 64


class _OldStyleHalf(storage.StateStorage):
    """A user codec written before ``salt`` existed: ``encode`` does not take it."""

    name = "float16"

    def encode(self, value, *, like, signed):
        del like, signed
        return value.astype(jnp.float16)

    def decode(self, stored):
        return stored.astype(jnp.float32)


class _Recording(storage.StateStorage):
    """Records the salt of every encode (float32 storage)."""

    name = "recording"

    def __init__(self):
        self.salts = []

    def encode(self, value, *, like, signed, salt=0):
        del like, signed
        self.salts.append(salt)
        return value.astype(jnp.float32)

    def decode(self, stored):
        return stored


def test_old_style_codecs_still_work_and_new_ones_get_a_salt_per_array():
    params = {"w": jnp.linspace(-1.0, 1.0, 5000), "v": jnp.ones(5000), "b": jnp.ones(3)}
    grads = jax.tree.map(lambda p: 0.5 * p + 0.25, params)
    reference = jopt.adam(0.1).update(grads, jopt.adam(0.1).init(params), params)[0]
    for tx in (jopt.adam(0.1, state_storage=_OldStyleHalf()),
               storage.with_state_storage(optax.adam(0.1), _OldStyleHalf())):
        updates, state = tx.update(grads, tx.init(params), params)
        assert state[0].mu["w"].dtype == jnp.float16
        for leaf in params:
            np.testing.assert_allclose(updates[leaf], reference[leaf], rtol=1e-2)

    salts = {}
    for name in ("jopt", "wrapped"):
        codec = _Recording()
        tx = (jopt.adam(0.1, state_storage=codec) if name == "jopt"
              else storage.with_state_storage(optax.adam(0.1), codec))
        state = tx.init(params)
        at_init, codec.salts = codec.salts, []
        for _ in range(2):
            _, state = tx.update(grads, state, params)
        # One salt per leaf and moment, the same at init and at every update.
        assert len(at_init) == len(set(at_init)) == 2 * len(params)
        assert sorted(codec.salts) == sorted(2 * at_init)
        salts[name] = set(at_init)
    assert salts["jopt"] == salts["wrapped"]  # the wrapper salts state as jopt does


@pytest.mark.eight_devices
@pytest.mark.parametrize("name", ["int8", "bfloat16"])
def test_slices_encoded_as_shards_draw_the_noise_of_the_whole_array(name):
    # ZeRO-1 encodes each device's slice of a flat buffer with the same salt and
    # counter. Inside storage._shard_of_whole a slice draws the noise of its values'
    # places in the whole array: 8 equal slices round independently, exactly as
    # the whole array does - not 8 times alike.
    from jax.sharding import Mesh, PartitionSpec as P

    codec = storage.resolve_storage(name)
    piece = 1.0 + jax.random.uniform(jax.random.key(1), (4096,))  # between levels
    whole = jnp.tile(piece, 8)  # every slice holds the same values
    mesh = Mesh(np.array(jax.devices()[:8]), ("i",))

    def encode_slices(shard_aware):
        def body(x):
            if not shard_aware:
                return codec.encode(x, like=x, signed=True)
            with storage._shard_of_whole("i", 8):
                return codec.encode(x, like=x, signed=True)

        shapes = jax.eval_shape(lambda x: codec.encode(x, like=x, signed=True), piece)
        specs = jax.tree.map(lambda s: P() if s.ndim == 0 else P("i"), shapes)
        return jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P("i"), out_specs=specs))(whole)

    expected = _stored_values(codec.encode(whole, like=whole, signed=True)).reshape(8, -1)
    slices = _stored_values(encode_slices(True)).reshape(8, -1)
    # The same noise; XLA may compile the two programs' float math a little
    # differently, which moves a value sitting on a rounding threshold (1 of 32768).
    assert np.mean(slices != expected) < 1e-3
    assert np.mean(slices[0] != slices[1]) > 0.2
    alike = _stored_values(encode_slices(False)).reshape(8, -1)  # outside the context
    np.testing.assert_array_equal(alike, np.broadcast_to(alike[0], alike.shape))


@pytest.mark.parametrize("name", ["int8", "bfloat16"])
def test_optimizer_per_layer_groups_round_independently(name):
    # Layer-wise settings (multi_transform, masked) hand each inner optimizer
    # MaskedNode for the other groups' leaves (or whole subtrees, for labels that
    # are a prefix of the params); a leaf's salt is its key path, so group "a"'s
    # layer and group "b"'s same-shaped layer do not round alike (both were leaf 0
    # of their group).
    x = jax.random.normal(jax.random.key(0), (64, 128))
    params = {"l0": x, "l1": x}
    grads = {"l0": jnp.cos(7.0 * x), "l1": jnp.cos(7.0 * x)}
    tx = optax.multi_transform({"a": jopt.adam(1e-3, state_storage=name),
                                "b": jopt.adam(5e-4, state_storage=name)},
                               {"l0": "a", "l1": "b"})
    state = jax.jit(tx.update)(grads, tx.init(params), params)[1]
    a = state.inner_states["a"].inner_state[0].mu["l0"]
    b = state.inner_states["b"].inner_state[0].mu["l1"]
    assert np.mean(_stored_values(a) != _stored_values(b)) > 0.2
    nested = {"l0": {"w": x, "v": x}, "l1": x}  # labels a prefix of the params
    tx = optax.multi_transform({"a": jopt.adam(1e-3, state_storage=name),
                                "b": jopt.adam(5e-4, state_storage=name)},
                               {"l0": "a", "l1": "b"})
    g = jax.tree.map(lambda p: jnp.cos(7.0 * p), nested)
    state = jax.jit(tx.update)(g, tx.init(nested), nested)[1]
    a = state.inner_states["a"].inner_state[0].mu["l0"]["w"]
    b = state.inner_states["b"].inner_state[0].mu["l1"]
    assert np.mean(_stored_values(a) != _stored_values(b)) > 0.2
    # optax.masked(jopt.adam) draws the noise of the wrapper around optax.masked(optax.adam).
    mask = {"l0": False, "l1": True}
    ours = optax.masked(jopt.adam(1e-3, state_storage=name), mask)
    wrapped = storage.with_state_storage(optax.masked(optax.adam(1e-3), mask), name)
    mu_ours = jax.jit(ours.update)(grads, ours.init(params), params)[1].inner_state[0].mu["l1"]
    mu_wrapped = jax.jit(wrapped.update)(grads, wrapped.init(params), params)[1]
    np.testing.assert_array_equal(_stored_values(mu_ours),
                                  _stored_values(mu_wrapped.inner_state[0].mu["l1"]))


@pytest.mark.parametrize("mask", [{"a": False, "b": True}, lambda p: {"a": False, "b": True}],
                         ids=["prefix_mask", "callable_prefix_mask"])
def test_wrapper_encodes_state_under_a_prefix_mask(mask):
    # optax.masked with a mask that is a prefix of the params keeps one MaskedNode
    # for the whole masked-out subtree "a": the wrapper left such state in float32
    # (8 bytes a parameter, silently). It is encoded, and equals jopt's own.
    x = jax.random.normal(jax.random.key(0), (64, 128))
    params = {"a": {"x": x, "y": x}, "b": x}
    grads = jax.tree.map(lambda p: jnp.cos(7.0 * p), params)
    wrapped = storage.with_state_storage(optax.masked(optax.adam(1e-3), mask), "int8")
    ours = optax.masked(jopt.adam(1e-3, state_storage="int8"), mask)
    state = wrapped.init(params)
    for _ in range(2):
        updates, state = jax.jit(wrapped.update)(grads, state, params)
    expected = ours.init(params)
    for _ in range(2):
        expected_updates, expected = jax.jit(ours.update)(grads, expected, params)
    adam, reference = state.inner_state[0], expected.inner_state[0]
    assert isinstance(adam.mu["a"], optax.MaskedNode)
    for field in ("mu", "nu"):
        assert isinstance(getattr(adam, field)["b"], storage.QuantizedArray)
        np.testing.assert_array_equal(_stored_values(getattr(adam, field)["b"]),
                                      _stored_values(getattr(reference, field)["b"]))
    np.testing.assert_array_equal(updates["a"]["x"], grads["a"]["x"])  # masked: passed through
    np.testing.assert_allclose(updates["b"], expected_updates["b"], rtol=1e-5, atol=1e-8)


def _two_pass_cases():
    adam = lambda: jopt.adam(1e-2, state_storage="int8")  # noqa: E731
    return {
        "adam": adam,
        "amsgrad": lambda: jopt.adam(1e-2, amsgrad=True, state_storage="int8"),
        "every_leaf_int8": lambda: jopt.adam(  # one partial block of 100 values too
            1e-2, state_storage=storage.Int8BlockStorage(min_size=0)),
        "momentum": lambda: jopt.sgd(1e-2, momentum=0.9, state_storage="int8"),
        "wrapped_optax_adam": lambda: storage.with_state_storage(optax.adam(1e-2), "int8"),
        "wrapped_prefix_mask": lambda: storage.with_state_storage(
            optax.masked(optax.adam(1e-2), {"a": False, "b": True, "c": True}), "int8"),
        "chained_with_weight_decay": lambda: optax.chain(
            optax.add_decayed_weights(1e-2), jopt.scale_by_adam(state_storage="int8"),
            optax.scale(-1e-2)),
    }


@pytest.mark.parametrize("name", list(_two_pass_cases()))
def test_two_pass_encode_gives_the_same_bits(monkeypatch, name):
    """int8 state is computed twice, first for its block maxima (see
    storage._recompute_for_encode): updates and stored state equal the one-pass
    computation's bit for bit - whole and partial blocks, a float32 small leaf."""
    x = jnp.linspace(-1.0, 1.0, 10_000)
    params = {"a": x, "b": jnp.cos(x[:8192]).reshape(64, 128), "c": x[:100]}
    results, programs = {}, {}
    for two_pass in (False, True):
        monkeypatch.setattr(storage, "_TWO_PASS", two_pass)
        tx = _two_pass_cases()[name]()
        step = jax.jit(lambda g, s, p, tx=tx: (lambda u, s: (optax.apply_updates(p, u), s))(
            *tx.update(g, s, p)))
        state, p = tx.init(params), params
        programs[two_pass] = str(jax.make_jaxpr(tx.update)(params, state, params))
        for i in range(4):
            g = jax.tree.map(lambda w, i=i: jnp.sin(3.1 * (i + 1) * w) + 0.1 * i, p)
            p, state = step(g, state, p)
        results[two_pass] = (p, state)
    assert "optimization_barrier" in programs[True]  # the second evaluation ran
    assert "optimization_barrier" not in programs[False]
    flat = [jax.tree.leaves(r) for r in (results[False], results[True])]
    assert len(flat[0]) == len(flat[1])
    for one, two in zip(*flat):
        np.testing.assert_array_equal(one, two)
    quantized = [x for x in jax.tree.leaves(results[True][1], is_leaf=storage.is_encoded)
                 if isinstance(x, storage.QuantizedArray)]
    assert quantized  # int8 state was really encoded


def test_two_pass_is_the_default_for_int8_only(monkeypatch):
    x = jnp.ones(8192)
    tx = jopt.adam(1e-3, state_storage="int8")
    assert "optimization_barrier" in str(jax.make_jaxpr(tx.update)(x, tx.init(x), x))
    # Eagerly nothing is fused: the state is computed once.
    calls = []
    prepass = storage._prepass
    monkeypatch.setattr(storage, "_prepass", lambda *a: calls.append(1) or prepass(*a))
    for wrapped in (tx, storage.with_state_storage(optax.adam(1e-3), "int8")):
        state = wrapped.update(x, wrapped.init(x), x)[1]
        assert any(isinstance(s, storage.QuantizedArray)
                   for s in jax.tree.leaves(state, is_leaf=storage.is_encoded))
    assert not calls
    tx = jopt.adam(1e-3, state_storage="int8")  # (make_jaxpr caches the trace of the first)
    jax.make_jaxpr(tx.update)(x, tx.init(x), x)
    assert calls  # and under a trace it is computed twice
    # Float32 and bfloat16 state need no maxima: no second evaluation.
    for name in ("float32", "bfloat16"):
        tx = jopt.adam(1e-3, state_storage=name)
        assert "optimization_barrier" not in str(jax.make_jaxpr(tx.update)(x, tx.init(x), x))


@pytest.mark.eight_devices
def test_two_pass_encode_of_shards_gives_the_same_bits(monkeypatch):
    # Under ZeRO-1 each device updates its slice inside storage._shard_of_whole:
    # the second evaluation draws the noise of the slice's place in the whole
    # buffer too, so both ways agree on every device.
    from jax.sharding import Mesh, PartitionSpec as P

    mesh = Mesh(np.array(jax.devices()[:8]), ("i",))
    whole = jax.random.normal(jax.random.key(2), (8 * 4096,))
    grads = jnp.sin(5.0 * whole)
    results = {}
    for two_pass in (False, True):
        monkeypatch.setattr(storage, "_TWO_PASS", two_pass)
        tx = jopt.adam(1e-2, state_storage="int8")

        def body(g, p, tx=tx, axis="i"):
            with storage._shard_of_whole(axis, 8):
                state = tx.init(p)
                for _ in range(2):
                    updates, state = tx.update(g, state, p)
            return updates, state

        shapes = jax.eval_shape(lambda g, p: body(g, p, axis=None), grads[:4096], whole[:4096])
        specs = jax.tree.map(lambda s: P() if s.ndim == 0 else P("i"), shapes)
        results[two_pass] = jax.jit(jax.shard_map(
            body, mesh=mesh, in_specs=(P("i"), P("i")), out_specs=specs))(grads, whole)
    for one, two in zip(jax.tree.leaves(results[False]), jax.tree.leaves(results[True])):
        np.testing.assert_array_equal(one, two)
    mu = results[True][1][0].mu
    assert isinstance(mu, storage.QuantizedArray) and mu.codes.shape == (8 * 16, 256)


def test_two_pass_leaves_a_codec_subclass_with_its_own_encode_alone(monkeypatch):
    # The second pass encodes through storage._quantize directly; a subclass that
    # overrides encode must still be called, so it gets the one-pass path.
    calls = []

    class Counting(storage.Int8BlockStorage):
        def encode(self, value, *, like, signed, salt=0):
            calls.append(signed)
            return super().encode(value, like=like, signed=signed, salt=salt)

    monkeypatch.setattr(storage, "_TWO_PASS", True)
    x = jnp.ones(8192)
    tx = jopt.adam(1e-3, state_storage=Counting())
    state = tx.init(x)
    calls.clear()
    program = str(jax.make_jaxpr(tx.update)(x, state, x))
    assert calls == [True, False]  # mu, then nu, each through the subclass's encode
    assert "optimization_barrier" not in program
