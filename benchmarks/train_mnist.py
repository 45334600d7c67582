"""Benchmark: one training epoch of the Fashion-MNIST MLP (or CNN), jopt vs the usual loops.

On the same data (Fashion-MNIST, the full 60k training set) and the same model
(MLP 784-64(relu)-64(relu)-10, Adam 1e-3, batch 128, last partial batch dropped),
it times one epoch of:

  (a) jopt     - ``jopt.train``'s loop: uint8 data on the device, one jitted
                 ``lax.scan`` per epoch, donated state, flat parameters;
  (b) example  - the usual Flax + optax loop, as the Flax MNIST example writes it:
                 jitted ``apply_model`` and ``update_model`` called from Python for
                 each batch of the float32 data set;
  (b') step    - the same with one fused ``@jax.jit`` train step per batch, fed as
                 float32 numpy arrays (the leanest per-step loop);
  (c) scan     - Flax + optax with the epoch in one ``lax.scan`` over float32 data
                 already on the device;
  (d) torch    - the equivalent PyTorch loop (``torch.set_num_threads`` = cores),
                 when torch is importable.

Every loop is run once to compile / warm up; then the loops take turns for
``--repeats`` rounds and each one's best epoch time is kept (best of k: the
machine may be shared, and turns expose every loop to the same noise). In the
same rounds it measures the machine's float32 matmul rate (a jitted 2048x2048
matmul) and reports the fraction of it that jopt's epoch reaches, counting the
model's FLOPs: forward ``2·B·(784·64 + 64·64 + 64·10)`` per step for the MLP,
backward twice that minus the first layer's unneeded input gradient.

``--model cnn`` times the same loops with ``configs/cnn.py``'s network (3x3
convolutions of 32 and 64 channels with 2x2 average pooling, a 256-unit dense
layer; PyTorch's is the same network in NCHW) over the first ``--steps`` batches
(default 40: a CNN epoch takes tens of seconds on a CPU), and adds

  (a') jopt, lax conv - jopt's loop with the CNN's convolutions as plain
                 ``jax.lax.conv_general_dilated``: the cost of XLA:CPU compiling
                 their gradient inside the epoch's ``lax.scan`` to naive loops,
                 which :func:`jopt.models.conv_general_dilated` avoids.

Usage::

    python benchmarks/train_mnist.py               # table
    python benchmarks/train_mnist.py --json        # one JSON object
    python benchmarks/train_mnist.py --model cnn   # the CNN, 40 steps per epoch
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax.training import train_state

from jopt import data, train
from jopt.cli import load_config
from jopt.models import CNN, MLP

CONFIG_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
CONFIGS = {"mlp": os.path.join(CONFIG_DIR, "fashion_mnist_mlp.py"),
           "cnn": os.path.join(CONFIG_DIR, "cnn.py")}
CNN_FEATURES, CNN_HIDDEN = (32, 64), 256  # configs/cnn.py's network


def mlp_flops_per_step(batch: int, sizes=(784, 64, 64, 10)) -> int:
    layers = list(zip(sizes[:-1], sizes[1:]))
    return _training_flops([2 * batch * n_in * n_out for n_in, n_out in layers])


def cnn_flops_per_step(batch: int, side: int = 28) -> int:
    """configs/cnn.py's CNN: 3x3 'SAME' convolutions, each followed by 2x2 pooling,
    then the dense head (pooling, relu and the loss are not counted)."""
    layers, channels = [], 1
    for features in CNN_FEATURES:
        layers.append(2 * batch * side * side * 9 * channels * features)
        channels, side = features, side // 2
    sizes = (side * side * channels, CNN_HIDDEN, 10)
    layers += [2 * batch * n_in * n_out for n_in, n_out in zip(sizes[:-1], sizes[1:])]
    return _training_flops(layers)


def _training_flops(forward_per_layer: list[int]) -> int:
    """Forward, the weight gradients (as many FLOPs again) and the input gradients of
    every layer but the first (the images need none)."""
    forward = sum(forward_per_layer)
    return 2 * forward + sum(forward_per_layer[1:])


def matmul_runner(n: int = 2048):
    """A jitted n x n float32 matmul; returns (run, flops per run)."""
    a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    return (lambda: matmul(a, b).block_until_ready()), 2 * n**3


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


# --------------------------------------------------------------------------- (a) jopt


def jopt_epoch(dataset, batch_size, model_name="mlp", lax_conv=False):
    """``lax_conv``: compile the epoch with the CNN's convolutions as plain
    ``jax.lax.conv_general_dilated`` (loop (a'))."""
    config = load_config(CONFIGS[model_name], [f"--config.batch_size={batch_size}"])
    num_train = len(dataset.train_images)
    model = train.create_model(config, dataset.num_classes)
    if lax_conv:
        model = model.clone(conv=jax.lax.conv_general_dilated)
    tx = train.create_optimizer(config, num_train // batch_size)
    epoch_fn = train.build_epoch_fn(
        config, train.make_loss_fn(train.make_apply_fn(model)), tx)
    state = train.init_train_state(config, model, tx, dataset.train_images.shape[1:])
    images = jax.device_put(dataset.train_images)
    labels = jax.device_put(dataset.train_labels)
    holder = {"state": state, "epoch": 0}

    def run():  # exactly the timed part of an epoch in train_and_evaluate
        holder["epoch"] += 1
        key = train.epoch_key(config.seed, holder["epoch"])
        indices = train.shuffle_batches(key, num_train, batch_size)
        holder["state"], metrics = epoch_fn(holder["state"], images, labels, indices)
        return jax.device_get(metrics)

    return run


# --------------------------------------------------------------------------- (b), (c) Flax


def _flax_model(model_name):
    """The model as plain Flax writes it (``nn.Conv``'s own ``lax.conv_general_dilated``)."""
    if model_name == "mlp":
        return MLP()
    return CNN(CNN_FEATURES, (CNN_HIDDEN,), conv=jax.lax.conv_general_dilated)


def _flax_state(batch_size, model_name="mlp"):
    model = _flax_model(model_name)
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28)))
    return train_state.TrainState.create(apply_fn=model.apply, params=params,
                                         tx=optax.adam(1e-3))


def _flax_loss(params, apply_fn, images, labels):
    logits = apply_fn(params, images)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    return loss, logits


def flax_example_epoch(dataset, batch_size, model_name="mlp"):
    """The Flax MNIST example's ``train_epoch`` (examples/mnist/train.py), verbatim in
    structure: a jitted ``apply_model`` (gradients, loss, accuracy) and a jitted
    ``update_model`` per batch, the permutation from ``jax.random``, batches indexed
    out of the float32 data set (``jnp.float32(images) / 255.`` as there)."""
    train_ds = {"image": jnp.float32(dataset.train_images) / 255.0,
                "label": dataset.train_labels}

    @jax.jit
    def apply_model(state, images, labels):
        (loss, logits), grads = jax.value_and_grad(_flax_loss, has_aux=True)(
            state.params, state.apply_fn, images, labels)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return grads, loss, accuracy

    @jax.jit
    def update_model(state, grads):
        return state.apply_gradients(grads=grads)

    holder = {"state": _flax_state(batch_size, model_name), "rng": jax.random.key(0)}

    def run():
        holder["rng"], key = jax.random.split(holder["rng"])
        steps = len(train_ds["image"]) // batch_size
        perms = jax.random.permutation(key, len(train_ds["image"]))
        perms = perms[: steps * batch_size].reshape((steps, batch_size))
        epoch_loss, epoch_accuracy = [], []
        state = holder["state"]
        for perm in perms:
            batch_images = train_ds["image"][perm, ...]
            batch_labels = train_ds["label"][perm, ...]
            grads, loss, accuracy = apply_model(state, batch_images, batch_labels)
            state = update_model(state, grads)
            epoch_loss.append(loss)
            epoch_accuracy.append(accuracy)
        holder["state"] = state
        return float(np.mean(epoch_loss)), float(np.mean(epoch_accuracy))

    return run


def flax_step_epoch(dataset, batch_size, model_name="mlp"):
    """One fused jitted train step per batch, batches fed as float32 numpy arrays
    (the older Flax MNIST example's ``train_step``): a leaner per-step loop."""
    images = (dataset.train_images.astype(np.float32) / 255.0)
    labels = dataset.train_labels
    steps = len(images) // batch_size

    @jax.jit
    def train_step(state, images, labels):
        (loss, logits), grads = jax.value_and_grad(_flax_loss, has_aux=True)(
            state.params, state.apply_fn, images, labels)
        accuracy = jnp.mean(jnp.argmax(logits, -1) == labels)
        return state.apply_gradients(grads=grads), loss, accuracy

    holder = {"state": _flax_state(batch_size, model_name), "rng": np.random.default_rng(0)}

    def run():
        perm = holder["rng"].permutation(len(images))[: steps * batch_size]
        perm = perm.reshape(steps, batch_size)
        losses, accuracies = [], []
        state = holder["state"]
        for batch in perm:
            state, loss, accuracy = train_step(state, images[batch], labels[batch])
            losses.append(loss)
            accuracies.append(accuracy)
        holder["state"] = state
        return float(np.mean(losses)), float(np.mean(accuracies))

    return run


def flax_scan_epoch(dataset, batch_size, model_name="mlp"):
    """Flax + optax with the epoch in one lax.scan over float32 data on the device."""
    images = jax.device_put(dataset.train_images.astype(np.float32) / 255.0)
    labels = jax.device_put(dataset.train_labels)
    steps = len(dataset.train_images) // batch_size

    @jax.jit
    def epoch(state, key, images, labels):
        perm = jax.random.permutation(key, images.shape[0])[: steps * batch_size]

        def body(state, batch):
            (loss, _), grads = jax.value_and_grad(_flax_loss, has_aux=True)(
                state.params, state.apply_fn, images[batch], labels[batch])
            return state.apply_gradients(grads=grads), loss

        state, losses = jax.lax.scan(body, state, perm.reshape(steps, batch_size))
        return state, losses.mean()

    holder = {"state": _flax_state(batch_size, model_name), "epoch": 0}

    def run():
        holder["epoch"] += 1
        holder["state"], loss = epoch(holder["state"], jax.random.key(holder["epoch"]),
                                      images, labels)
        return float(loss)

    return run


# --------------------------------------------------------------------------- (d) torch


def torch_model(model_name="mlp"):
    """jopt's MLP or CNN in PyTorch (the CNN in NCHW)."""
    from torch import nn

    if model_name == "mlp":
        layers = [nn.Linear(784, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10)]
    else:
        layers, channels, side = [], 1, 28
        for features in CNN_FEATURES:
            layers += [nn.Conv2d(channels, features, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2)]
            channels, side = features, side // 2
        layers += [nn.Flatten(), nn.Linear(channels * side * side, CNN_HIDDEN), nn.ReLU(),
                   nn.Linear(CNN_HIDDEN, 10)]
    return nn.Sequential(*layers)


def torch_epoch(dataset, batch_size, device="cpu", model_name="mlp"):
    """The PyTorch loop; ``device="cuda"`` keeps data and model on the GPU."""
    import torch

    torch.set_num_threads(os.cpu_count())
    torch.manual_seed(0)
    shape = (-1,) if model_name == "mlp" else (1, 28, 28)  # NCHW for the CNN
    images = torch.from_numpy(dataset.train_images.reshape(len(dataset.train_images), *shape)
                              .astype(np.float32) / 255.0).to(device)
    labels = torch.from_numpy(dataset.train_labels.astype(np.int64)).to(device)
    steps = len(images) // batch_size
    model = torch_model(model_name).to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    loss_fn = torch.nn.CrossEntropyLoss()

    def run():
        perm = torch.randperm(len(images), device=device)
        total = torch.zeros((), device=device)
        for i in range(steps):
            batch = perm[i * batch_size:(i + 1) * batch_size]
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(model(images[batch]), labels[batch])
            loss.backward()
            optimizer.step()
            total += loss.detach()
        return float(total) / steps

    return run, f"{torch.__version__} ({device})"


# --------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed epochs per loop (best kept)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--no-torch", action="store_true", help="skip the PyTorch loop")
    parser.add_argument("--model", choices=("mlp", "cnn"), default="mlp",
                        help="the MLP (configs/fashion_mnist_mlp.py) or the CNN (configs/cnn.py)")
    parser.add_argument("--steps", type=int, default=None,
                        help="batches per timed epoch (default: all for the MLP, 40 for the CNN)")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args()

    dataset = data.load("fashion_mnist")
    steps = args.steps
    if steps is None and args.model == "cnn":
        steps = 40
    if steps is not None:
        if steps < 1 or steps * args.batch_size > len(dataset.train_images):
            parser.error(f"--steps must be in [1, {len(dataset.train_images) // args.batch_size}]"
                         f" at batch size {args.batch_size}, got {steps}")
        dataset = data.subset(dataset, train=steps * args.batch_size)
    model = args.model
    loops = {"jopt": jopt_epoch(dataset, args.batch_size, model)}
    if model == "cnn":
        loops["jopt_lax_conv"] = jopt_epoch(dataset, args.batch_size, model, lax_conv=True)
    loops.update({
        "flax_example": flax_example_epoch(dataset, args.batch_size, model),
        "flax_optax_step": flax_step_epoch(dataset, args.batch_size, model),
        "flax_optax_scan": flax_scan_epoch(dataset, args.batch_size, model),
    })
    torch_version = None
    if not args.no_torch:
        try:
            # Same accelerator as JAX: on a GPU machine PyTorch runs on CUDA too.
            device = "cuda" if jax.devices()[0].platform == "gpu" else "cpu"
            loops["torch"], torch_version = torch_epoch(dataset, args.batch_size, device, model)
        except ImportError:
            pass

    # The matmul peak is timed in the same rounds as the loops, so that a busy
    # machine slows both alike and the fraction of it stays meaningful.
    matmul, matmul_flops = matmul_runner()
    first = {name: _timed(run) for name, run in loops.items()}  # compile + warm-up
    matmul()
    times = {name: [] for name in loops}
    matmul_times = []
    for _ in range(args.repeats):
        for name, run in loops.items():
            times[name].append(_timed(run))
        matmul_times.append(min(_timed(matmul) for _ in range(3)))
    best = {name: min(t) for name, t in times.items()}

    peak = matmul_flops / min(matmul_times)
    steps = len(dataset.train_images) // args.batch_size
    per_step = (mlp_flops_per_step if model == "mlp" else cnn_flops_per_step)(args.batch_size)
    flops = steps * per_step
    result = {
        "model": model,
        "epoch_s": best,
        "first_epoch_s": first,
        "all_epoch_s": times,
        "speedup_vs_flax_example": best["flax_example"] / best["jopt"],
        "speedup_vs_flax_optax_step": best["flax_optax_step"] / best["jopt"],
        "speedup_vs_flax_optax_scan": best["flax_optax_scan"] / best["jopt"],
        "speedup_vs_torch": best["torch"] / best["jopt"] if "torch" in best else None,
        "speedup_vs_lax_conv": (best["jopt_lax_conv"] / best["jopt"]
                                if "jopt_lax_conv" in best else None),
        "matmul_peak_gflops": peak / 1e9,
        "jopt_gflops": flops / best["jopt"] / 1e9,
        "fraction_of_matmul_peak": flops / best["jopt"] / peak,
        "flops_per_epoch": flops,
        "steps_per_epoch": steps,
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        "cpu_count": os.cpu_count(),
        "device": str(jax.devices()[0]),
        "machine": platform.processor() or platform.machine(),
        "versions": {"jax": jax.__version__, "flax": flax.__version__,
                     "optax": optax.__version__, "torch": torch_version},
    }
    if args.json:
        print(json.dumps(result))
        return
    network = ("MLP 784-64-64-10" if model == "mlp" else
               f"CNN conv{CNN_FEATURES}-dense{CNN_HIDDEN}-10")
    print(f"Fashion-MNIST {network}, Adam 1e-3, batch {args.batch_size}, "
          f"{steps} steps/epoch; best of {args.repeats} epochs after a warm-up, "
          f"{os.cpu_count()} cores, {result['device']}")
    labels = {"jopt": "(a) jopt", "jopt_lax_conv": "(a') jopt with lax's convolution",
              "flax_example": "(b) Flax MNIST example loop",
              "flax_optax_step": "(b') Flax+optax, one jit per step",
              "flax_optax_scan": "(c) Flax+optax, lax.scan epoch", "torch": "(d) PyTorch"}
    for name, seconds in best.items():
        ratio = seconds / best["jopt"]
        print(f"  {labels[name]:<34} {seconds:7.3f} s/epoch   {ratio:5.2f}x jopt's time   "
              f"(first epoch {first[name]:.2f} s)")
    print(f"  matmul peak {result['matmul_peak_gflops']:.1f} GFLOP/s; jopt reaches "
          f"{result['jopt_gflops']:.1f} GFLOP/s = {100 * result['fraction_of_matmul_peak']:.0f}% "
          f"of it ({flops / 1e9:.2f} GFLOP per epoch)")


if __name__ == "__main__":
    main()
