"""Prototype, not used by jopt yet: Adam with int8 state as ONE fused Pallas kernel.

jopt's int8 Adam is plain XLA. On a GPU it evaluates the update twice (see
``jopt.storage._recompute_for_encode``): once inside the block-max reduction, once
to encode (~22 bytes moved per parameter with whole blocks: 1.01x optax's float32
step at 10,002,432 parameters on an H100, 0.87x at 100M; before, XLA wrote the
new float32 moments out for the encode, ~32 bytes, 1.25-1.5x). This kernel does
the whole step for ``ROWS`` blocks of 256 values in one pass - decode the codes, update m, v and the parameters, take each block's
absmax, encode - moving ~16 bytes per parameter. It uses the same codes and the
same counter-hash stochastic rounding as :mod:`jopt.storage`, so it is checked
against ``jopt.adam(state_storage="int8")`` (params after 3 steps, and the
fraction of identical codes) before timing it against ``optax.adam`` and jopt,
all donated and jitted, round-robin, best of 30.

Measured on one H100 (JAX 0.11.2): 0.81-0.83x optax's time at 10M parameters and
0.66x at 100M (ROWS=4), codes identical to jopt's (mu 100%, nu 99.9998% after 3
steps), params within 5e-5. Limits of the prototype: Adam only, hyper-parameters
fixed below, size a multiple of 256*ROWS. Wiring it into :func:`jopt.lift.lift`
(any rule, any size) is the open step; there the optax protocol returns updates
that a separate ``apply_updates`` adds (8 more bytes per parameter).

On CPU it runs in Pallas's interpret mode: the correctness check only.

Usage::

    python benchmarks/fused_int8_adam.py [N] [ROWS]    # N a multiple of 256*ROWS
"""
import functools
import sys
import time

import jax
import jax.numpy as jnp
import optax
from jax.experimental import pallas as pl

import jopt
from jopt import storage as S

B = 256
ROWS = int(sys.argv[2]) if len(sys.argv) > 2 else 4
INTERPRET = jax.default_backend() == "cpu"
b1, b2, eps, lr = 0.9, 0.999, 1e-8, 1e-3  # Adam's defaults, learning rate 1e-3


def _encode(x, signed, index, step):
    """``jopt.storage._quantize_blocks`` as a kernel body: the block max as a plain
    ``max`` of ``|x|`` (Triton lowers no variadic reduce), no huge-scale prescale,
    and the rounding hash of the blocks' global element indices."""
    levels, power = S._SIGNED_CODE if signed else S._UNSIGNED_CODE
    absmax = jnp.max(jnp.abs(x), axis=1, keepdims=True)
    scale = jnp.where(absmax == 0, 1.0, absmax)
    mag = jnp.abs(x) * (1.0 / scale)
    if not signed:
        mag = jnp.where(x > 0, mag, 0.0)
    root = jnp.sqrt(jnp.sqrt(mag))
    if power == 8:
        root = jnp.sqrt(root)
    low = jnp.minimum(jnp.floor(levels * root), levels - 1)
    lo = S._power(low * (1.0 / levels), power)
    hi = S._power((low + 1) * (1.0 / levels), power)
    # jopt.adam's noise stream for this moment of the (single) leaf.
    key = S._stream_key(S._INT8_STREAM, signed, S._salt("mu" if signed else "nu"))
    bits = S._hash_bits(index, step, key) >> 8
    uniform = jax.lax.bitcast_convert_type(bits, jnp.int32).astype(jnp.float32)
    up = uniform * (2.0**-24 * (hi - lo)) < mag - lo
    codes = low + up.astype(jnp.float32)
    if signed:
        codes = jnp.where(x < 0, -codes, codes).astype(jnp.int8)
    else:
        codes = jnp.where(mag > 0, jnp.maximum(codes, 1.0), 0.0).astype(jnp.uint8)
    return codes, scale


def kernel(sc_ref, g_ref, p_ref, mc_ref, ms_ref, vc_ref, vs_ref,
           p_out, mc_out, ms_out, vc_out, vs_out):
    c1, c2, mstep, vstep = sc_ref[0], sc_ref[1], sc_ref[2], sc_ref[3]
    g = g_ref[...]
    m = b1 * S._normalised(mc_ref[...], True) * ms_ref[...] + (1 - b1) * g
    v = b2 * S._normalised(vc_ref[...], False) * vs_ref[...] + (1 - b2) * g * g
    p_out[...] = p_ref[...] - lr * ((m / c1) / (jnp.sqrt(v / c2) + eps))
    row = jax.lax.broadcasted_iota(jnp.uint32, g.shape, 0)
    col = jax.lax.broadcasted_iota(jnp.uint32, g.shape, 1)
    index = (pl.program_id(0).astype(jnp.uint32) * ROWS + row) * B + col
    mc, ms = _encode(m, True, index, jax.lax.bitcast_convert_type(mstep, jnp.uint32))
    vc, vs = _encode(v, False, index, jax.lax.bitcast_convert_type(vstep, jnp.uint32))
    mc_out[...] = mc
    ms_out[...] = ms
    vc_out[...] = vc
    vs_out[...] = vs


@functools.partial(jax.jit, donate_argnums=(1, 2))


def fused_step(g, state, p):
    count, mu, nu = state.count, state.mu, state.nu
    nb = g.size // B
    count = count + 1
    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = 1 - b2 ** count.astype(jnp.float32)
    msn, vsn = mu.step + 1, nu.step + 1
    sc = jnp.stack([c1, c2, jax.lax.bitcast_convert_type(msn, jnp.float32),
                    jax.lax.bitcast_convert_type(vsn, jnp.float32)])
    blk = pl.BlockSpec((ROWS, B), lambda i: (i, 0))
    sblk = pl.BlockSpec((ROWS, 1), lambda i: (i, 0))
    full = pl.BlockSpec((4,), lambda i: (0,))
    out = pl.pallas_call(
        kernel, grid=(nb // ROWS,),
        in_specs=[full, blk, blk, blk, sblk, blk, sblk],
        out_specs=[blk, blk, sblk, blk, sblk],
        out_shape=[jax.ShapeDtypeStruct((nb, B), jnp.float32),
                   jax.ShapeDtypeStruct((nb, B), jnp.int8), jax.ShapeDtypeStruct((nb, 1), jnp.float32),
                   jax.ShapeDtypeStruct((nb, B), jnp.uint8), jax.ShapeDtypeStruct((nb, 1), jnp.float32)],
        input_output_aliases={2: 0, 3: 1, 4: 2, 5: 3, 6: 4},
        interpret=INTERPRET,
    )(sc, g.reshape(nb, B), p.reshape(nb, B), mu.codes, mu.scales[:, None], nu.codes, nu.scales[:, None])
    pn, mc, ms, vc, vs = out
    mu = S.QuantizedArray(mc, ms[:, 0], msn, mu.shape, True)
    nu = S.QuantizedArray(vc, vs[:, 0], vsn, nu.shape, False)
    return state._replace(count=count, mu=mu, nu=nu), pn.reshape(-1)


def main():
    N = int(sys.argv[1]) if len(sys.argv) > 1 else 256 * ROWS * 8
    key = jax.random.key(0)
    p0 = jax.random.normal(key, (N,))
    g = jax.random.normal(jax.random.fold_in(key, 1), (N,))
    tx = jopt.scale_by_adam(state_storage="int8")  # the state layout; the kernel adds -lr
    full_tx = jopt.adam(lr, state_storage="int8")
    # correctness: 3 steps fused vs jopt
    s_ref, p_ref = full_tx.init(p0), p0
    s, p = tx.init(p0), p0 + 0
    for _ in range(3):
        u, s_ref = full_tx.update(g, s_ref, p_ref)
        p_ref = optax.apply_updates(p_ref, u)
        s, p = fused_step(g, s, p)
    adam_ref = s_ref[0]
    print("max |p - p_ref|:", float(jnp.max(jnp.abs(p - p_ref))),
          "mu codes equal:", float(jnp.mean(s.mu.codes == adam_ref.mu.codes)),
          "nu codes equal:", float(jnp.mean(s.nu.codes == adam_ref.nu.codes)))
    if INTERPRET:
        return
    def step(tx):
        def f(g, st, p):
            u, st = tx.update(g, st, p)
            return st, optax.apply_updates(p, u)
        return jax.jit(f, donate_argnums=(1, 2))
    cases = {"optax": (step(optax.adam(lr)), optax.adam(lr).init(p0), p0 + 0),
             "jopt_int8": (step(full_tx), full_tx.init(p0), p0 + 0),
             "fused_int8": (lambda g, s, p: fused_step(g, s, p), tx.init(p0), p0 + 0)}
    carry = {}
    for k, (f, s0, pp) in cases.items():
        carry[k] = jax.block_until_ready(f(g, s0, pp))
    best = {k: 1e9 for k in cases}
    for _ in range(30):
        for k, (f, _, _) in cases.items():
            t = time.perf_counter()
            for _ in range(5):
                carry[k] = f(g, *carry[k])
            jax.block_until_ready(carry[k])
            best[k] = min(best[k], (time.perf_counter() - t) / 5)
    for k in cases:
        print(f"N={N} rows={ROWS} {k:11s} {best[k]*1e3:7.3f} ms  {best[k]/best['optax']:.2f}x optax")

if __name__ == "__main__":
    main()
