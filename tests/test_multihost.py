"""Multi-host data parallelism: 2 processes x 2 CPU devices on 127.0.0.1 (gloo).

The first test starts this file as a script twice (``--process-id 0`` and ``1``);
each process joins the run through :func:`jopt.distributed.initialize`, feeds only
its own rows of each global batch, trains a few steps with each strategy and writes
its parameters. They must equal one process training on 4 devices. The second runs
``jopt train --coordinator ...`` in two processes end to end.
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

STRATEGIES = ("pmap", "shard_map", "zero1")
GLOBAL_BATCH = 16
STEPS = 3


def _problem():
    """A tiny classification problem, identical in every process (fixed seed)."""
    rng = np.random.default_rng(7)
    params = {"w1": rng.normal(size=(12, 16)).astype(np.float32) * 0.3,
              "b1": np.zeros(16, np.float32),
              "w2": rng.normal(size=(16, 3)).astype(np.float32) * 0.3}
    batches = {"x": rng.normal(size=(STEPS, GLOBAL_BATCH, 12)).astype(np.float32),
               "y": rng.integers(0, 3, size=(STEPS, GLOBAL_BATCH)).astype(np.int32)}
    return params, batches


def _loss_fn(params, batch):
    import jax
    import jax.numpy as jnp

    logits = jnp.tanh(batch["x"] @ params["w1"] + params["b1"]) @ params["w2"]
    labels = jax.nn.one_hot(batch["y"], 3)
    return jnp.mean(jnp.sum(-labels * jax.nn.log_softmax(logits), -1)), {}


def _train(strategy, devices=None):
    """Trains with ``strategy``; returns the final parameters as host arrays."""
    import jax

    import jopt
    from jopt.parallel import DataParallel

    params, batches = _problem()
    trainer = DataParallel(_loss_fn, jopt.adam(1e-2), strategy=strategy, devices=devices)
    state = trainer.init(params)
    rows = trainer.process_rows(GLOBAL_BATCH)
    local = trainer.shard_batches(jax.tree.map(lambda x: x[:, rows], batches))
    state, _ = trainer.train_epoch(state, local)
    return {k: np.asarray(v.addressable_data(0)) for k, v in trainer.params(state).items()}


def _worker(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("--coordinator", required=True)
    parser.add_argument("--num-processes", type=int, required=True)
    parser.add_argument("--process-id", type=int, required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args(argv)

    from jopt import distributed

    distributed.initialize(args.coordinator, args.num_processes, args.process_id,
                           initialization_timeout=60)
    import jax

    assert jax.process_count() == args.num_processes and jax.device_count() == 4
    results = {}
    for strategy in STRATEGIES:
        for name, value in _train(strategy).items():
            results[f"{strategy}/{name}"] = value
    np.savez(os.path.join(args.out, f"params_{args.process_id}.npz"), **results)
    jax.distributed.shutdown()


REPO = Path(__file__).resolve().parents[1]


def _run_processes(commands, env, timeout=120):
    """Runs the commands concurrently; returns their outputs; fails on a non-zero exit."""
    procs = [subprocess.Popen(command, env=env, cwd=REPO, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for command in commands]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=timeout)[0])
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for i, (proc, output) in enumerate(zip(procs, outputs)):
        assert proc.returncode == 0, f"process {i} failed:\n{output[-3000:]}"
    return outputs


def _env():
    return dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=2",
                JAX_PLATFORMS="cpu", PYTHONWARNINGS="error")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.multiprocess
def test_two_processes_match_one_process_with_four_devices(tmp_path):
    import jax

    address = f"127.0.0.1:{_free_port()}"
    _run_processes([[sys.executable, __file__, "--coordinator", address, "--num-processes",
                     "2", "--process-id", str(i), "--out", str(tmp_path)] for i in range(2)],
                   _env())

    per_process = [np.load(tmp_path / f"params_{i}.npz") for i in range(2)]
    for strategy in STRATEGIES:
        reference = _train(strategy, devices=jax.devices()[:4])
        for name, expected in reference.items():
            for i, got in enumerate(per_process):
                np.testing.assert_allclose(
                    got[f"{strategy}/{name}"], expected, atol=1e-6, rtol=0,
                    err_msg=f"{strategy}: process {i}'s {name} differs from 1 process x 4")
        # Training moved the parameters (the comparison is not of two initial states).
        assert np.abs(reference["w1"] - _problem()[0]["w1"]).max() > 1e-3


@pytest.mark.multiprocess
def test_jopt_train_on_two_processes_is_one_run(tmp_path):
    """``jopt train --coordinator`` in 2 processes: one set of logs, one-device results."""
    from jopt import train
    from jopt.cli import load_config

    overrides = ["--config.train_subset=1024", "--config.test_subset=500",
                 "--config.num_epochs=1", "--config.batch_size=64"]
    config_file = str(REPO / "configs" / "fashion_mnist_zero1.py")
    address = f"127.0.0.1:{_free_port()}"
    outputs = _run_processes([
        [sys.executable, "-m", "jopt.cli", "train", "--config", config_file,
         "--workdir", str(tmp_path / "run"), *overrides, "--coordinator", address,
         "--num-processes", "2", "--process-id", str(i)] for i in range(2)], _env())
    assert all("epoch 1/1" in output for output in outputs)
    records = train.read_metrics(tmp_path / "run" / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1]  # written once, by process 0
    assert (tmp_path / "run" / "checkpoints" / "1").is_dir()

    config = load_config(REPO / "configs" / "fashion_mnist_mlp.py", overrides)
    expected = train.train_and_evaluate(config, tmp_path / "one_device").metrics
    for key in ("train_loss", "test_loss"):
        assert records[0][key] == pytest.approx(expected[key], rel=1e-5), key
    for key in ("train_accuracy", "test_accuracy"):
        assert records[0][key] == expected[key], key



@pytest.mark.multiprocess
def test_compressed_two_process_run_resumes_exactly(tmp_path):
    """int8 gradient compression over 2 processes: residuals (gathered from both
    processes) are checkpointed, so 1 epoch + resume == 2 epochs uninterrupted."""
    from jopt import checkpoints, train

    config_file = str(REPO / "configs" / "fashion_mnist_shard_map.py")

    def run(workdir, epochs):
        address = f"127.0.0.1:{_free_port()}"
        _run_processes([
            [sys.executable, "-m", "jopt.cli", "train", "--config", config_file,
             "--workdir", str(workdir), "--config.train_subset=1024",
             "--config.test_subset=500", "--config.batch_size=64",
             f"--config.num_epochs={epochs}", "--config.gradient_compression=int8",
             "--coordinator", address, "--num-processes", "2", "--process-id", str(i)]
            for i in range(2)], _env())
        return train.read_metrics(workdir / "metrics.jsonl")

    whole = run(tmp_path / "whole", 2)
    run(tmp_path / "cut", 1)
    resumed = run(tmp_path / "cut", 2)
    with checkpoints.manager(tmp_path / "cut", keep=2) as mngr:
        assert checkpoints.read_meta(mngr)["residuals"]
    for key in ("train_loss", "test_loss", "test_accuracy"):
        assert resumed[-1][key] == whole[-1][key], key


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    _worker(sys.argv[1:])
