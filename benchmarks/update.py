"""Optimizer-update benchmark: fused flat updates and low-memory state vs optax.

Measured side by side in one run (float32 parameters, Adam):

1. **One 10M-parameter leaf**: jopt, optax, and a same-bytes fused elementwise
   kernel - the bandwidth limit: it reads ``g, m, v, p`` and writes ``m, v, p``
   with Adam's dataflow but almost no arithmetic. Each is reported in GB/s of the
   nominal 28 bytes per parameter and as a fraction of the limit (limit time /
   time).
2. **1000 leaves x 1000 parameters** inside a ``lax.scan`` of 20 steps (params and
   Adam state as the carry, a cheap synthetic gradient ``g = 0.01 p + 0.001`` per
   step): time per step and compile time for optax (per leaf), jopt on the tree,
   and jopt on :class:`jopt.flat.FlatParams`. Compile time is
   ``jax.jit(f).lower(...).compile()`` of a fresh function (no cache).
3. **State storage**: state bytes per parameter of Adam with float32 / bfloat16 /
   int8 state (optax: 8), and the 10M-leaf update time of each relative to optax;
   int8 also at the next size that is whole blocks of 256 (10,000,128), where a
   GPU writes the params and the codes in one loop.
   Beside them, the int8 codec's *encode alone* - both moments, from float32
   arrays already in memory, no update math - as a fraction of optax's whole
   step: a floor that no schedule of the int8 step's loops can go below.

Times are the best of ``--repeats`` runs with ``block_until_ready``; state and
params buffers are donated, as in a training loop. Nothing here assumes a CPU: on
a GPU the same script reports that platform.

Usage::

    python benchmarks/update.py            # table
    python benchmarks/update.py --json     # one JSON object
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
import optax

import jopt
from jopt import storage as storage_lib
from jopt.flat import FlatParams

LEARNING_RATE = 1e-3


class _Timer:
    """Best-of-k wall and process-CPU times of several steps, measured round-robin.

    Each case keeps its own carry (donated buffers are replaced by the outputs).
    Interleaving the cases spreads the load of a shared machine evenly over them;
    the CPU time (all threads of this process) is less sensitive to that load.
    """

    def __init__(self):
        self.cases = {}

    def add(self, name, fn, carry, consts=(), calls=3):
        carry = jax.block_until_ready(fn(*consts, *carry))  # compile and warm up
        self.cases[name] = [fn, carry, consts, calls, float("inf"), float("inf")]

    def run(self, repeats: int) -> tuple[dict, dict]:
        for _ in range(repeats):
            for case in self.cases.values():
                fn, carry, consts, calls = case[:4]
                wall, cpu = time.perf_counter(), time.process_time()
                for _ in range(calls):
                    carry = fn(*consts, *carry)
                jax.block_until_ready(carry)
                case[1] = carry
                case[4] = min(case[4], (time.perf_counter() - wall) / calls)
                case[5] = min(case[5], (time.process_time() - cpu) / calls)
        wall = {name: case[4] for name, case in self.cases.items()}
        cpu = {name: case[5] for name, case in self.cases.items()}
        self.cases = {}
        return wall, cpu


def _adam_step(tx):
    def step(grads, state, params):
        updates, state = tx.update(grads, state, params)
        return state, optax.apply_updates(params, updates)

    return jax.jit(step, donate_argnums=(1, 2))


def _int8_encode_only(m, v, stored_m, stored_v):
    """The int8 codec's encode of Adam's two moments, nothing else."""
    codec = storage_lib.Int8BlockStorage()
    return (codec.encode(m, like=stored_m, signed=True),
            codec.encode(v, like=stored_v, signed=False))


def _fused_limit(grads, state, params):
    """Adam's reads and writes with the least math: the bandwidth limit.

    It has Adam's dataflow (new ``m`` and ``v`` from the gradient, new ``p`` from
    them), so XLA lays it out in the same loops and it moves the same bytes:
    XLA:CPU emits one loop per output (no multi-output fusion), 40 bytes per
    parameter instead of the ideal 28 - for Adam and for this kernel alike.
    """
    m, v = state
    m, v = m + grads, v + grads
    return (m, v), params + (m - v)


def single_leaf(size: int, repeats: int) -> dict:
    """Adam on one float32 leaf: jopt, optax and the same-bytes fused kernel."""
    key = jax.random.key(0)
    params = jax.random.normal(key, (size,), jnp.float32)
    grads = jax.random.normal(jax.random.fold_in(key, 1), (size,), jnp.float32)
    nbytes = 7 * 4 * size  # read g, m, v, p; write m, v, p

    timer = _Timer()
    zeros = jnp.zeros_like(params)
    # Fresh buffers for every case: each call donates (overwrites) its carry.
    timer.add("limit", jax.jit(_fused_limit, donate_argnums=(1, 2)),
              ((zeros, zeros + 0.0), params + 0.0), consts=(grads,))
    for name, tx in [
        ("optax", optax.adam(LEARNING_RATE)),
        ("jopt", jopt.adam(LEARNING_RATE)),
        ("jopt_bfloat16", jopt.adam(LEARNING_RATE, state_storage="bfloat16")),
        ("jopt_int8", jopt.adam(LEARNING_RATE, state_storage="int8")),
    ]:
        p = params + 0.0
        timer.add(name, _adam_step(tx), (tx.init(p), p), consts=(grads,))
    # int8 state on a size that is whole blocks of 256 too: on GPUs/TPUs the step
    # then writes the params and the codes from one loop (see
    # jopt.storage._recompute_for_encode); a partial last block gives the codes
    # another length than the params, and XLA a loop more.
    whole = size + (-size) % storage_lib.BLOCK_SIZE
    if whole != size:
        more = jax.random.normal(jax.random.fold_in(key, 2), (whole - size,), jnp.float32)
        p_whole, g_whole = jnp.concatenate([params, more]), jnp.concatenate([grads, more])
        for name, tx in [("optax_whole_blocks", optax.adam(LEARNING_RATE)),
                         ("jopt_int8_whole_blocks",
                          jopt.adam(LEARNING_RATE, state_storage="int8"))]:
            p = p_whole + 0.0
            timer.add(name, _adam_step(tx), (tx.init(p), p), consts=(g_whole,))
    # Moments of a realistic magnitude profile (m ~ g, v ~ g^2): the encode's cost
    # does not depend on the values, only on their count.
    codec = storage_lib.Int8BlockStorage()
    moments = (0.1 * grads, 0.01 * grads * grads)
    timer.add("int8_encode_only", jax.jit(_int8_encode_only, donate_argnums=(2, 3)),
              (codec.encode(moments[0], like=params, signed=True),
               codec.encode(moments[1], like=params, signed=False)), consts=moments)
    results, cpu = timer.run(repeats)

    out = {"size": size, "bytes_per_step": nbytes,
           "seconds": results, "cpu_seconds": cpu,
           "gbytes_per_second": {k: nbytes / t / 1e9 for k, t in results.items()}}
    out["jopt_vs_limit"] = results["limit"] / results["jopt"]
    out["optax_vs_limit"] = results["limit"] / results["optax"]
    out["update_time_vs_optax_float32"] = {
        "float32": results["jopt"] / results["optax"],
        "bfloat16": results["jopt_bfloat16"] / results["optax"],
        "int8": results["jopt_int8"] / results["optax"],
    }
    out["update_cpu_time_vs_optax_float32"] = {
        "float32": cpu["jopt"] / cpu["optax"],
        "bfloat16": cpu["jopt_bfloat16"] / cpu["optax"],
        "int8": cpu["jopt_int8"] / cpu["optax"],
    }
    # What the int8 step cannot go below: encoding its two moments.
    out["int8_encode_only_vs_optax_float32"] = results["int8_encode_only"] / results["optax"]
    out["int8_whole_blocks"] = {"size": whole, "vs_optax_float32": (
        results["jopt_int8_whole_blocks"] / results["optax_whole_blocks"]
        if whole != size else out["update_time_vs_optax_float32"]["int8"])}
    return out


def _synthetic_grads(params):
    return jax.tree.map(lambda p: 0.01 * p + 0.001, params)


def _scan_fn(tx, steps: int, grad_fn):
    def run(params, state):
        def body(carry, _):
            params, state = carry
            updates, state = tx.update(grad_fn(params), state, params)
            return (optax.apply_updates(params, updates), state), None

        return jax.lax.scan(body, (params, state), None, length=steps)[0]

    return run


def many_leaves(leaves: int, leaf_size: int, steps: int, repeats: int) -> dict:
    """Adam inside ``lax.scan`` on ``leaves`` arrays: per leaf vs flat buffers."""
    tree = {f"layer_{i:04d}": jnp.full((leaf_size,), 0.01 * (i % 7), jnp.float32)
            for i in range(leaves)}
    cases = [
        ("optax", optax.adam(LEARNING_RATE), tree, _synthetic_grads),
        ("jopt_tree", jopt.adam(LEARNING_RATE), tree, _synthetic_grads),
        ("jopt_flat", jopt.adam(LEARNING_RATE), FlatParams.pack(tree), _synthetic_grads),
    ]
    out = {"leaves": leaves, "leaf_size": leaf_size, "scan_steps": steps,
           "compile_seconds": {}}
    timer = _Timer()
    for name, tx, params, grad_fn in cases:
        state = tx.init(params)
        start = time.perf_counter()
        # A fresh function object each time: nothing cached from earlier cases.
        compiled = jax.jit(_scan_fn(tx, steps, grad_fn), donate_argnums=(0, 1)).lower(
            params, state).compile()
        out["compile_seconds"][name] = time.perf_counter() - start
        timer.add(name, compiled, jax.tree.map(lambda x: x + 0, (params, state)), calls=1)
    wall, cpu = timer.run(repeats)
    out["ms_per_step"] = {name: 1e3 * t / steps for name, t in wall.items()}
    out["cpu_ms_per_step"] = {name: 1e3 * t / steps for name, t in cpu.items()}
    step, comp = out["ms_per_step"], out["compile_seconds"]
    out["flat_step_speedup_vs_optax"] = step["optax"] / step["jopt_flat"]
    out["flat_compile_speedup_vs_optax"] = comp["optax"] / comp["jopt_flat"]
    out["tree_step_speedup_vs_optax"] = step["optax"] / step["jopt_tree"]
    return out


def state_bytes(size: int) -> dict:
    """Adam state bytes per parameter for each storage, without allocating it."""
    params = {"w": jax.ShapeDtypeStruct((size,), jnp.float32)}
    out = {"optax": storage_lib.state_nbytes(jax.eval_shape(optax.adam(1e-3).init, params))
           / size}
    for name in ("float32", "bfloat16", "int8"):
        tx = jopt.adam(LEARNING_RATE, state_storage=name)
        out[name] = storage_lib.state_nbytes(jax.eval_shape(tx.init, params)) / size
    return out


def run(args) -> dict:
    device = jax.devices()[0]
    result = {"platform": device.platform, "device_kind": device.device_kind,
              "jax": jax.__version__, "optax": optax.__version__}
    result["single_leaf"] = single_leaf(args.size, args.repeats)
    result["many_leaves"] = many_leaves(args.leaves, args.leaf_size, args.steps, args.repeats)
    result["state_bytes_per_param"] = state_bytes(args.size)
    many = result["many_leaves"]
    for key in ("flat_step_speedup_vs_optax", "flat_compile_speedup_vs_optax"):
        result[key] = many[key]
    result["jopt_vs_bandwidth_limit"] = result["single_leaf"]["jopt_vs_limit"]
    result["update_time_vs_optax_float32"] = result["single_leaf"]["update_time_vs_optax_float32"]
    result["int8_encode_only_vs_optax_float32"] = (
        result["single_leaf"]["int8_encode_only_vs_optax_float32"])
    return result


def print_table(r: dict) -> None:
    one, many = r["single_leaf"], r["many_leaves"]
    print(f"platform: {r['platform']} ({r['device_kind']}), jax {r['jax']}, optax {r['optax']}")
    print(f"\n1) Adam, one leaf of {one['size']:,} float32 params "
          f"({one['bytes_per_step'] / 1e6:.0f} MB moved per step)")
    print(f"   {'':16s} {'ms/step':>9s} {'GB/s':>8s} {'vs limit':>9s} {'cpu ms':>8s}")
    for name in ("limit", "optax", "jopt", "jopt_bfloat16", "jopt_int8"):
        t = one["seconds"][name]
        print(f"   {name:16s} {1e3 * t:9.2f} {one['gbytes_per_second'][name]:8.1f} "
              f"{one['seconds']['limit'] / t:9.2f} {1e3 * one['cpu_seconds'][name]:8.2f}")
    print(f"\n2) Adam, {many['leaves']} leaves x {many['leaf_size']} params, "
          f"lax.scan of {many['scan_steps']} steps")
    print(f"   {'':12s} {'ms/step':>9s} {'cpu ms/step':>12s} {'compile s':>10s}")
    for name in many["ms_per_step"]:
        print(f"   {name:12s} {many['ms_per_step'][name]:9.3f} "
              f"{many['cpu_ms_per_step'][name]:12.3f} {many['compile_seconds'][name]:10.2f}")
    print(f"   flat vs optax: {many['flat_step_speedup_vs_optax']:.1f}x faster per step, "
          f"{many['flat_compile_speedup_vs_optax']:.1f}x faster to compile")
    print("\n3) Adam state storage")
    print(f"   {'':10s} {'B/param':>8s} {'time vs optax fp32':>19s} {'cpu time vs optax':>18s}")
    print(f"   {'optax':10s} {r['state_bytes_per_param']['optax']:8.3f} {1.0:19.2f} {1.0:18.2f}")
    for name in ("float32", "bfloat16", "int8"):
        print(f"   {name:10s} {r['state_bytes_per_param'][name]:8.3f} "
              f"{r['update_time_vs_optax_float32'][name]:19.2f} "
              f"{one['update_cpu_time_vs_optax_float32'][name]:18.2f}")
    blocks = one["int8_whole_blocks"]
    print(f"   int8 at {blocks['size']:,} params (whole blocks of 256): "
          f"{blocks['vs_optax_float32']:.2f}x optax float32")
    print(f"   int8 encode of both moments alone: "
          f"{1e3 * one['seconds']['int8_encode_only']:.2f} ms = "
          f"{one['int8_encode_only_vs_optax_float32']:.2f}x optax's whole step")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--size", type=int, default=10_000_000, help="single-leaf size")
    parser.add_argument("--leaves", type=int, default=1000)
    parser.add_argument("--leaf-size", type=int, default=1000)
    parser.add_argument("--steps", type=int, default=20, help="lax.scan length")
    parser.add_argument("--repeats", type=int, default=5, help="best of this many runs")
    args = parser.parse_args(argv)
    result = run(args)
    if args.json:
        json.dump(result, sys.stdout)
        print()
    else:
        print_table(result)


if __name__ == "__main__":
    main()
