"""Compression benchmark: prune and quantize the Fashion-MNIST MLP, report accuracy and size.

Trains the reference MLP (784-64-64-10, Adam 1e-3, batch 128) on the full
Fashion-MNIST training set with jopt's optimizers, side by side in one run:

* float32 (the baseline), then int8 post-training quantization of it, evaluated
  with real int8 x int8 -> int32 matmuls;
* magnitude pruning to 90% with Zhu & Gupta's polynomial schedule (per layer and
  global), and 2:4 structured pruning; sizes of the stripped ``.npz`` on disk;
* quantization-aware training with int8, int4, ternary and binary weights,
  evaluated with fake quantization and with the integer inference path.

Usage::

    python benchmarks/model_compression.py                   # 5 epochs, seed 0
    python benchmarks/model_compression.py --epochs 10 --seeds 0 1 2 --json

Accuracy is the test-set accuracy in percent; each row is the mean over seeds
(min and max are in the JSON). Run on an idle machine for timing; sizes and
accuracies do not depend on load.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from collections.abc import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

import jopt
from jopt import data as data_lib
from jopt import pruning, quantization


class MLP(nn.Module):
    """784-64-64-10 with ReLU; ``weights``/``activations`` switch on QAT."""

    weights: str | None = None
    activations: str | None = None

    @nn.compact
    def __call__(self, images):
        x = images.reshape(images.shape[0], -1).astype(jnp.float32) / 255.0
        for features in (64, 64):
            x = nn.relu(self._dense(features)(x))
        return self._dense(10)(x)

    def _dense(self, features):
        if self.weights is None and self.activations is None:
            return nn.Dense(features)
        return quantization.QuantDense(features, weights=self.weights,
                                       activations=self.activations)


def train(model: nn.Module, tx, dataset, *, epochs: int, batch_size: int, seed: int):
    """Plain training loop: one jitted ``lax.scan`` per epoch. Returns params, opt state."""
    images = jnp.asarray(dataset.train_images)
    labels = jnp.asarray(dataset.train_labels)
    params = model.init(jax.random.key(seed), images[:1])["params"]
    opt_state = tx.init(params)
    steps = len(images) // batch_size

    def loss_fn(params, x, y):
        logits = model.apply({"params": params}, x)
        return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

    @jax.jit
    def epoch(params, opt_state, permutation):
        def step(carry, indices):
            params, opt_state = carry
            loss, grads = jax.value_and_grad(loss_fn)(params, images[indices], labels[indices])
            updates, opt_state = tx.update(grads, opt_state, params)
            return (jopt.apply_updates(params, updates), opt_state), loss

        batches = permutation[: steps * batch_size].reshape(steps, batch_size)
        (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), batches)
        return params, opt_state, losses.mean()

    rng = np.random.default_rng(seed)
    for _ in range(epochs):
        permutation = jnp.asarray(rng.permutation(len(images)))
        params, opt_state, _ = epoch(params, opt_state, permutation)
    return params, opt_state


def accuracy(predict: Callable, params, dataset) -> float:
    logits = jax.jit(predict)(params, jnp.asarray(dataset.test_images))
    return 100.0 * float(jnp.mean(jnp.argmax(logits, -1) == jnp.asarray(dataset.test_labels)))


def float_predict(model):
    return lambda params, x: model.apply({"params": params}, x)


def int_predict(model):
    return lambda qparams, x: quantization.quantized_apply(model, {"params": qparams}, x)


def file_size(save: Callable, tree) -> int:
    with tempfile.TemporaryDirectory() as directory:
        return save(os.path.join(directory, "model.npz"), tree)


def dense_file_size(params) -> int:
    return file_size(pruning.save_sparse, pruning.strip(params, format="dense"))


def run_seed(dataset, seed: int, epochs: int, batch_size: int, only: set[str] | None,
             prune_window: tuple[float, float] = (0.2, 0.8)):
    rows: dict[str, dict] = {}
    steps = epochs * (len(dataset.train_images) // batch_size)

    def wanted(name):
        return only is None or name in only

    def timed_train(model, tx):
        start = time.perf_counter()
        params, opt_state = train(model, tx, dataset, epochs=epochs, batch_size=batch_size,
                                  seed=seed)
        return params, opt_state, time.perf_counter() - start

    float_model = MLP()
    params, _, seconds = timed_train(float_model, jopt.adam(1e-3))
    dense_bytes = dense_file_size(params)
    rows["float32"] = {"accuracy": accuracy(float_predict(float_model), params, dataset),
                       "file_bytes": dense_bytes, "compression": 1.0, "train_s": seconds}

    if wanted("int8 PTQ"):
        qparams = quantization.quantize_params(params, "int8")
        report = quantization.size_report(params, qparams)
        rows["int8 PTQ"] = {
            "accuracy": accuracy(int_predict(float_model), qparams, dataset),
            "file_bytes": file_size(quantization.save_quantized, qparams),
            "compression": report["ratio"], "weight_compression": report["weight_ratio"],
        }

    # By default prune from 20% to 80% of training (Zhu & Gupta's gradual schedule), then
    # fine-tune at the final sparsity.
    begin, end = (int(fraction * steps) for fraction in prune_window)
    pruned = {
        "pruned 90% per-layer": dict(schedule=pruning.polynomial_decay(
            0.0, 0.9, begin, end, frequency=50)),
        "pruned 90% global": dict(schedule=pruning.polynomial_decay(
            0.0, 0.9, begin, end, frequency=50), granularity="global"),
        "pruned 2:4": dict(schedule=pruning.one_shot(0.5, step=begin), structure="2:4"),
    }
    for name, kwargs in pruned.items():
        if not wanted(name):
            continue
        tx = pruning.prune(jopt.adam(1e-3), **kwargs)
        sparse_params, opt_state, seconds = timed_train(float_model, tx)
        masks = pruning.masks_from_state(opt_state)
        sparse_bytes = file_size(pruning.save_sparse, pruning.strip(sparse_params, masks))
        rows[name] = {
            "accuracy": accuracy(float_predict(float_model), sparse_params, dataset),
            "file_bytes": sparse_bytes, "compression": dense_bytes / sparse_bytes,
            "sparsity": pruning.sparsity(sparse_params), "train_s": seconds,
        }

    for mode in ("int8", "int4", "ternary", "binary"):
        name = f"QAT {mode}"
        if not wanted(name):
            continue
        model = MLP(weights=mode)
        qat_params, _, seconds = timed_train(model, jopt.adam(1e-3))
        qparams = quantization.quantize_params(qat_params, mode)
        report = quantization.size_report(qat_params, qparams)
        rows[name] = {
            "accuracy": accuracy(float_predict(model), qat_params, dataset),
            "int_inference_accuracy": accuracy(int_predict(model), qparams, dataset),
            "file_bytes": file_size(quantization.save_quantized, qparams),
            "compression": report["ratio"], "weight_compression": report["weight_ratio"],
            "train_s": seconds,
        }
    return rows


def summarize(per_seed: list[dict]) -> dict:
    summary = {}
    for name in per_seed[0]:
        values = [rows[name] for rows in per_seed]
        entry = {}
        for key in values[0]:
            column = [v[key] for v in values]
            entry[key] = float(np.mean(column))
            if key.endswith("accuracy") and len(column) > 1:
                entry[key + "_min"], entry[key + "_max"] = float(min(column)), float(max(column))
        summary[name] = entry
    base = summary["float32"]["accuracy"]
    for entry in summary.values():
        entry["delta_pt"] = entry["accuracy"] - base
    return summary


def print_table(summary: dict, args) -> None:
    print(f"Fashion-MNIST MLP 784-64-64-10, Adam 1e-3, batch {args.batch_size}, "
          f"{args.epochs} epochs, seeds {args.seeds}; jax {jax.__version__}, "
          f"{jax.devices()[0].platform}")
    print("| model | test acc. % | Δ vs float32 (pt) | int inference acc. % | file bytes "
          "| smaller on disk | weights smaller (in memory) |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    for name, e in summary.items():
        int_acc = e.get("int_inference_accuracy", e["accuracy"] if "PTQ" in name else None)
        weight = e.get("weight_compression")
        print(f"| {name} | {e['accuracy']:.2f} | {e['delta_pt']:+.2f} | "
              f"{'-' if int_acc is None else f'{int_acc:.2f}'} | {e['file_bytes']:,.0f} | "
              f"{summary['float32']['file_bytes'] / e['file_bytes']:.2f}x | "
              f"{'-' if weight is None else f'{weight:.2f}x'} |")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--only", nargs="*", help="row names to run (float32 always runs)")
    parser.add_argument("--train-size", type=int, default=None, help="subset for quick runs")
    parser.add_argument("--prune-window", type=float, nargs=2, default=(0.2, 0.8),
                        metavar=("BEGIN", "END"),
                        help="fractions of training where the polynomial schedule prunes")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    dataset = data_lib.load("fashion_mnist")
    if args.train_size:
        dataset = data_lib.subset(dataset, train=args.train_size)
    only = set(args.only) if args.only else None
    per_seed = [run_seed(dataset, seed, args.epochs, args.batch_size, only,
                         tuple(args.prune_window)) for seed in args.seeds]
    summary = summarize(per_seed)
    if args.json:
        json.dump({"config": vars(args), "results": summary}, sys.stdout, indent=2)
        print()
    else:
        print_table(summary, args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
