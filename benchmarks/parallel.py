"""Data-parallel benchmark: ZeRO-1 state memory, data-parallel step overhead, bytes on the wire.

Measured side by side in one run, on the reference MLP 784-64-64-10 (55,050
parameters) with Adam on Fashion-MNIST, global batch 128:

1. **Optimizer-state bytes per device**, replicated (``"shard_map"``) vs ZeRO-1
   (``"zero1"``) on 8 devices - read from the arrays each device actually holds
   (``addressable_shards``), for float32 and int8 state.
2. **Step-time overhead on one device**: an epoch (468 steps, one ``lax.scan``) of
   ``"pmap"``, ``"shard_map"`` and ``"zero1"`` restricted to one device, over the
   plain jitted step (``"none"``) on the same device. Best of ``--repeats``.
3. **Bytes each device sends per step** on 8 devices, read from the compiled
   program's collectives (:func:`jopt.parallel.communication_bytes`), with and
   without int8 gradient compression; and the **accuracy effect** of compression:
   ``--epochs`` epochs of ``"shard_map"`` on 8 devices, float32 vs int8 gradient
   exchange, same seed and batches, test accuracy on the 10,000 test images.
4. Epoch time of each strategy on 8 devices - informative only: on a CPU the 8
   devices are simulated (``--xla_force_host_platform_device_count``) and share its
   cores, so they show overhead, not speed-up.

Needs 8 devices: without them the script re-runs itself in a subprocess with 8
simulated CPU devices. On a machine with 8 accelerators it uses those.

Usage::

    python benchmarks/parallel.py            # table
    python benchmarks/parallel.py --json     # one JSON object
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

NUM_DEVICES = 8
_CHILD = "JOPT_BENCHMARK_PARALLEL_CHILD"


def _rerun_with_simulated_devices(argv) -> int:
    """Runs this script again with ``argv`` (main's own, not necessarily sys.argv's)."""
    env = dict(os.environ, JAX_PLATFORMS="cpu", **{_CHILD: "1"})
    flag = f"--xla_force_host_platform_device_count={NUM_DEVICES}"
    env["XLA_FLAGS"] = (env.get("XLA_FLAGS", "") + " " + flag).strip()
    argv = sys.argv[1:] if argv is None else list(argv)
    return subprocess.call([sys.executable, os.path.abspath(__file__), *argv], env=env)


def _setup(hidden_sizes):
    import jax
    import jax.numpy as jnp
    import optax

    from jopt import data
    from jopt.models import MLP

    dataset = data.load("fashion_mnist")
    model = MLP(hidden_sizes=hidden_sizes, num_classes=10)
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28)))

    def loss_fn(params, batch):
        logits = model.apply(params, batch["image"].astype(jnp.float32) / 255.0)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
        return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}

    @jax.jit
    def accuracy(params, images, labels):
        logits = model.apply(params, images.astype(jnp.float32) / 255.0)
        return jnp.mean(jnp.argmax(logits, -1) == labels)

    return dataset, params, loss_fn, accuracy


def _epoch_batches(dataset, batch_size, epoch, seed=0):
    import numpy as np

    steps = len(dataset.train_images) // batch_size
    order = np.random.default_rng([seed, epoch]).permutation(len(dataset.train_images))
    order = order[: steps * batch_size].reshape(steps, batch_size)
    return {"image": dataset.train_images[order], "label": dataset.train_labels[order]}


def _device_state_bytes(state) -> int:
    import jax

    device = jax.devices()[0]
    return sum(shard.data.nbytes for leaf in jax.tree.leaves(state.opt_state)
               for shard in leaf.addressable_shards if shard.device == device)


def _epoch_times(trainers, params, batches, repeats):
    """Best wall time of one epoch for each trainer, timed round-robin.

    Each is compiled and warmed up first; taking turns spreads the noise of a
    shared machine evenly over the contenders.
    """
    import jax

    runs = {}
    for name, trainer in trainers.items():
        placed = trainer.shard_batches(batches)
        state, _ = trainer.train_epoch(trainer.init(params), placed)
        runs[name] = [trainer, jax.block_until_ready(state), placed]
    best = dict.fromkeys(trainers, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            trainer, state, placed = run
            start = time.perf_counter()
            state, metrics = trainer.train_epoch(state, placed)
            jax.block_until_ready((state, metrics))
            best[name] = min(best[name], time.perf_counter() - start)
            run[1] = state
    return best


def run(args) -> dict:
    import jax
    import numpy as np

    import jopt
    from jopt.parallel import DataParallel, communication_bytes

    dataset, params, loss_fn, accuracy = _setup((64, 64))
    batches = _epoch_batches(dataset, args.batch_size, epoch=0)
    devices = jax.devices()[:NUM_DEVICES]
    results: dict = {"platform": devices[0].platform, "num_devices": len(devices),
                     "num_params": int(sum(x.size for x in jax.tree.leaves(params))),
                     "batch_size": args.batch_size, "steps_per_epoch": len(batches["label"])}

    # 1. Optimizer-state bytes per device.
    memory = {}
    for storage in (None, "int8"):
        optimizer = jopt.adam(1e-3, state_storage=storage)
        per_device = {}
        for strategy in ("shard_map", "zero1"):
            trainer = DataParallel(loss_fn, optimizer, strategy=strategy, devices=devices)
            per_device[strategy] = _device_state_bytes(trainer.init(params))
        memory[storage or "float32"] = {
            "replicated_bytes_per_device": per_device["shard_map"],
            "zero1_bytes_per_device": per_device["zero1"],
            "ratio": per_device["zero1"] / per_device["shard_map"]}
    results["state_memory"] = memory
    results["zero1_state_ratio"] = memory["float32"]["ratio"]

    # 2. One-device overhead over the plain jitted step.
    optimizer = jopt.adam(1e-3)
    one_device = _epoch_times(
        {strategy: DataParallel(loss_fn, optimizer, strategy=strategy, devices=devices[:1])
         for strategy in ("none", "pmap", "shard_map", "zero1")}, params, batches, args.repeats)
    results["epoch_time_1_device_s"] = one_device
    for strategy in ("pmap", "shard_map", "zero1"):
        results[f"{strategy}_overhead_1_device"] = one_device[strategy] / one_device["none"]

    # 3. Bytes on the wire per step, and 4. epoch time on 8 devices.
    trainers = {}
    for strategy in ("pmap", "shard_map", "zero1"):
        for compression in (None, "int8"):
            trainers[strategy + ("+int8" if compression else "")] = DataParallel(
                loss_fn, optimizer, strategy=strategy, devices=devices, compression=compression)
    short = {k: v[:2] for k, v in batches.items()}
    wire = {name: communication_bytes(t.epoch_hlo(t.init(params), short), len(devices))
            for name, t in trainers.items()}
    eight = _epoch_times(trainers, params, batches, max(1, args.repeats // 2))
    results["bytes_per_step"] = {k: v["total"] for k, v in wire.items()}
    results["bytes_per_step_by_collective"] = wire
    results["compression_bytes_ratio"] = wire["shard_map+int8"]["total"] / wire["shard_map"]["total"]
    results["zero1_compression_bytes_ratio"] = wire["zero1+int8"]["total"] / wire["zero1"]["total"]
    results["epoch_time_8_devices_s"] = eight

    # Accuracy effect of compression.
    test_images = jax.device_put(dataset.test_images)
    test_labels = jax.device_put(dataset.test_labels)
    curves = {}
    for compression in (None, "int8"):
        trainer = DataParallel(loss_fn, optimizer, strategy="shard_map", devices=devices,
                               compression=compression)
        state = trainer.init(params)
        curve = []
        for epoch in range(args.epochs):
            state, _ = trainer.train_epoch(
                state, trainer.shard_batches(_epoch_batches(dataset, args.batch_size, epoch)))
            final = jax.device_get(jax.tree.map(lambda x: x.addressable_data(0),
                                                trainer.params(state)))
            curve.append(float(accuracy(final, test_images, test_labels)))
        curves["int8" if compression else "float32"] = curve
    results["test_accuracy"] = {k: v[-1] for k, v in curves.items()}
    results["test_accuracy_per_epoch"] = curves
    results["epochs"] = args.epochs
    results["compression_accuracy_delta_pt"] = 100 * (
        curves["int8"][-1] - curves["float32"][-1])
    results["repeats"] = args.repeats
    results["jax_version"] = jax.__version__
    del np
    return results


def _table(r: dict) -> str:
    lines = [f"jopt data-parallel benchmark - {r['platform']}, {r['num_devices']} devices, "
             f"MLP {r['num_params']:,} params, batch {r['batch_size']}, "
             f"{r['steps_per_epoch']} steps/epoch, jax {r['jax_version']}", ""]
    lines.append("optimizer state per device (Adam)      replicated      ZeRO-1    ratio")
    for storage, m in r["state_memory"].items():
        lines.append(f"  {storage:<36} {m['replicated_bytes_per_device']:>10,} B "
                     f"{m['zero1_bytes_per_device']:>9,} B   {m['ratio']:.3f}x")
    lines += ["", "epoch on 1 device (best of %d)      time     vs plain jit" % r["repeats"]]
    base = r["epoch_time_1_device_s"]["none"]
    for strategy, t in r["epoch_time_1_device_s"].items():
        lines.append(f"  {strategy:<32} {t * 1e3:8.1f} ms   {t / base:.3f}x")
    lines += ["", f"per step on {r['num_devices']} devices          bytes sent/device   "
              "epoch time"]
    for name, sent in r["bytes_per_step"].items():
        lines.append(f"  {name:<32} {sent:>12,.0f} B {r['epoch_time_8_devices_s'][name]:9.2f} s")
    lines.append(f"  int8 compression: {r['compression_bytes_ratio']:.3f}x the bytes "
                 f"(zero1: {r['zero1_compression_bytes_ratio']:.3f}x)")
    lines += ["", f"test accuracy after {r['epochs']} epochs (shard_map, 8 devices)"]
    for name, curve in r["test_accuracy_per_epoch"].items():
        lines.append(f"  {name:<10} " + "  ".join(f"{100 * a:.2f}%" for a in curve))
    lines.append(f"  int8 - float32: {r['compression_accuracy_delta_pt']:+.2f} pt")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs (best is kept)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the accuracy runs")
    parser.add_argument("--batch-size", type=int, default=128)
    args = parser.parse_args(argv)

    import jax

    if jax.device_count() < NUM_DEVICES:
        if os.environ.get(_CHILD):
            raise SystemExit(f"needs {NUM_DEVICES} devices, found {jax.device_count()}")
        return _rerun_with_simulated_devices(argv)
    results = run(args)
    print(json.dumps(results) if args.json else _table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
