"""Tests of jopt.train: the scan-fused loop, flat vs tree mode, determinism, outputs."""

import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jopt import checkpoints, data, models, train
from jopt.cli import load_config

DEFAULT_CONFIG = pathlib.Path(__file__).parents[1] / "configs" / "default.py"


@pytest.fixture(scope="module")
def fashion():
    return data.subset(data.load("fashion_mnist", download=False), train=2048, test=500)


def small_config(**overrides):
    config = load_config(DEFAULT_CONFIG)
    config.dataset = "fashion_mnist"
    config.num_epochs = 1
    config.batch_size = 64
    config.eval_batch_size = 128
    config.train_subset = 512
    config.test_subset = 300
    for key, value in overrides.items():
        *path, last = key.split(".")
        node = config
        for part in path:
            node = node[part]
        node[last] = value
    return config


def test_cnn_trains_with_its_compiler_options(tmp_path, fashion):
    """The CNN's programs compile with jopt.models.conv_compiler_options (the MLP's with
    XLA's defaults) and the CNN learns: 2 short epochs on 512 images."""
    config = small_config(**{"model.name": "cnn", "model.conv_features": (8, 16),
                             "model.hidden_sizes": (32,), "num_epochs": 2})
    assert train.compiler_options_for(config) == (models.conv_compiler_options() or None)
    assert train.compiler_options_for(small_config()) is None
    result = train.train_and_evaluate(config, tmp_path, dataset=fashion)
    losses = [record["train_loss"] for record in result.history]
    assert losses[1] < losses[0]
    assert result.metrics["test_accuracy"] > 0.3  # chance: 0.1


def _flat_leaves(tree):
    return [np.asarray(x) for x in jax.tree.leaves(tree)]


@pytest.fixture(scope="module")
def runs(tmp_path_factory, fashion):
    """Three 2-epoch runs: flat mode twice (determinism) and tree mode."""
    root = tmp_path_factory.mktemp("runs")
    results = {}
    for name, flat in (("flat", True), ("flat_again", True), ("tree", False)):
        config = small_config(flat_params=flat, num_epochs=2)
        results[name] = train.train_and_evaluate(config, root / name, dataset=fashion)
    results["root"] = root
    return results


def test_flat_mode_matches_tree_mode(runs):
    flat_state = runs["flat"].state
    assert type(flat_state.params).__name__ == "FlatParams"
    assert int(flat_state.step) == 2 * (512 // 64)
    assert type(runs["tree"].state.params) is dict
    for a, b in zip(_flat_leaves(runs["flat"].params), _flat_leaves(runs["tree"].params)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert runs["flat"].metrics["test_accuracy"] == pytest.approx(
        runs["tree"].metrics["test_accuracy"], abs=1e-3)


def test_same_seed_same_run(runs):
    first, second = runs["flat"], runs["flat_again"]
    for a, b in zip(_flat_leaves(first.params), _flat_leaves(second.params)):
        np.testing.assert_array_equal(a, b)
    assert [r["train_loss"] for r in first.history] == [r["train_loss"] for r in second.history]
    assert first.history[-1]["test_accuracy"] > 0.6


def test_seed_changes_initialisation_and_shuffling():
    config, other = small_config(), small_config(seed=1)
    model = train.create_model(config)
    tx = train.create_optimizer(config, steps_per_epoch=8)
    params = [train.init_train_state(c, model, tx, (28, 28)).params for c in (config, other)]
    assert not np.array_equal(_flat_leaves(params[0])[0], _flat_leaves(params[1])[0])
    batches = [np.asarray(train.shuffle_batches(train.epoch_key(seed, 1), 512, 64))
               for seed in (0, 1)]
    assert not np.array_equal(*batches)


def test_metrics_file_and_curves(runs):
    workdir = runs["root"] / "flat"
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert records == runs["flat"].history
    assert [r["epoch"] for r in records] == [1, 2]
    for key in ("train_loss", "train_accuracy", "test_loss", "test_accuracy", "epoch_time_s"):
        assert all(np.isfinite(r[key]) for r in records), key
    assert records[1]["train_loss"] < records[0]["train_loss"]
    assert (workdir / "curves.png").read_bytes()[:4] == b"\x89PNG"


def test_curves_are_drawn_at_the_end_every_interval_and_when_interrupted(
        tmp_path, fashion, monkeypatch):
    drawn = []
    monkeypatch.setattr(train, "plot_curves",
                        lambda history, path: drawn.append([r["epoch"] for r in history]))
    # Within the interval: drawn once, after the last epoch, with every epoch.
    train.train_and_evaluate(small_config(num_epochs=3), tmp_path / "quick", dataset=fashion)
    assert drawn == [[1, 2, 3]]
    # An interval of 0: after every epoch.
    drawn.clear()
    monkeypatch.setattr(train, "CURVES_EVERY_S", 0.0)
    train.train_and_evaluate(small_config(num_epochs=2), tmp_path / "each", dataset=fashion)
    assert drawn == [[1], [1, 2]]
    # Interrupted in epoch 2 (Ctrl-C while checkpointing): epoch 1 is still drawn.
    drawn.clear()
    monkeypatch.setattr(train, "CURVES_EVERY_S", 3600.0)
    save = checkpoints.save

    def interrupt_second(manager, epoch, *args, **kwargs):
        if epoch == 2:
            raise KeyboardInterrupt
        return save(manager, epoch, *args, **kwargs)

    monkeypatch.setattr(checkpoints, "save", interrupt_second)
    with pytest.raises(KeyboardInterrupt):
        train.train_and_evaluate(small_config(num_epochs=3), tmp_path / "stopped",
                                 dataset=fashion)
    assert drawn == [[1, 2]]  # the record of epoch 2 was written before the checkpoint


def test_shuffle_is_a_permutation_dropping_the_remainder():
    indices = np.asarray(train.shuffle_batches(jax.random.key(0), 10, 3))
    assert indices.shape == (3, 3)
    assert len(set(indices.ravel())) == 9 and indices.max() < 10
    again = np.asarray(train.shuffle_batches(jax.random.key(0), 10, 3))
    np.testing.assert_array_equal(indices, again)
    assert indices.dtype == np.int32
    epochs = [train.shuffle_batches(train.epoch_key(0, epoch), 1000, 100) for epoch in (1, 2)]
    assert not np.array_equal(*epochs)
    assert sorted(epochs[0].ravel()) == list(range(1000))


def test_eval_handles_a_partial_last_batch():
    images = np.arange(5 * 4, dtype=np.uint8).reshape(5, 2, 2)
    labels = np.array([0, 1, 0, 1, 1], np.int32)
    eval_data = train.prepare_eval_data(images, labels, batch_size=2)
    assert eval_data.images.shape == (3, 2, 2, 2)
    # A "model" predicting class 1 always: accuracy 3/5, loss log(2) for equal logits.
    apply_fn = lambda params, x: jnp.tile(jnp.array([0.0, params]), (x.shape[0], 1))
    result = train.build_eval_fn(apply_fn)(jnp.float32(1.0), eval_data)
    assert float(result["accuracy"]) == pytest.approx(0.6)
    result = train.build_eval_fn(apply_fn)(jnp.float32(0.0), eval_data)
    assert float(result["loss"]) == pytest.approx(np.log(2.0), rel=1e-6)


def test_bfloat16_compute_keeps_float32_master_params(tmp_path, fashion):
    config = small_config(compute_dtype="bfloat16", flat_params=False)
    model = train.create_model(config)
    assert model.dtype == jnp.bfloat16
    result = train.train_and_evaluate(config, tmp_path, dataset=fashion)
    assert {x.dtype for x in jax.tree.leaves(result.params)} == {jnp.dtype(jnp.float32)}
    assert result.metrics["test_accuracy"] > 0.5


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"optimizer.name": "adamx"}, "config.optimizer.name='adamx'"),
        ({"optimizer.momentum": 0.9}, "config.optimizer.momentum=0.9 is not a hyper-parameter of 'adam'"),
        ({"optimizer.b1": 1.5}, "b1 must be in [0, 1)"),
        ({"optimizer.state_storage": "int4"}, "config.optimizer.state_storage"),
        ({"optimizer.schedule.name": "linear"}, "config.optimizer.schedule.name='linear'"),
        ({"optimizer.clip_global_norm": -1.0}, "config.optimizer.clip_global_norm must be > 0"),
        ({"model.name": "resnet"}, "config.model.name='resnet'"),
        ({"compute_dtype": "float16"}, "config.compute_dtype='float16'"),
        ({"batch_size": 0}, "config.batch_size must be >= 1"),
        ({"scan_unroll": -1}, "config.scan_unroll must be >= 0"),
        ({"seed": 2**32}, "config.seed must be in [0, 2**32), got 4294967296."),
        ({"optimizer.learning_rate": None},
         "config.optimizer.learning_rate must be a number >= 0 (the peak value when a "
         "schedule is used), got None."),
        ({"optimizer.learning_rate": -1e-3}, "config.optimizer.learning_rate must be a number"),
        ({"model.hidden_sizes": (1.5, 2.9)},
         "config.model.hidden_sizes must be positive integers (layer widths), got (1.5, 2.9)"),
        ({"model.hidden_sizes": (64, 0)}, "config.model.hidden_sizes must be positive integers"),
        ({"model.name": "cnn", "model.conv_features": (8.5,)},
         "config.model.conv_features must be positive integers"),
        ({"num_epochs": 1, "optimizer.schedule.name": "warmup_cosine",
          "optimizer.schedule.warmup_epochs": 1.0},
         "config.optimizer.schedule.warmup_epochs=1.0 must be >= 0 and shorter than "
         "config.num_epochs=1."),
        ({"num_epochs": 2, "optimizer.schedule.name": "warmup_cosine",
          "optimizer.schedule.warmup_epochs": -0.5},
         "config.optimizer.schedule.warmup_epochs=-0.5 must be >= 0"),
    ],
)
def test_bad_config_values_name_the_key(overrides, message):
    config = small_config(**overrides)
    with pytest.raises(train.ConfigError) as info:
        train.validate_config(config)
    assert message in str(info.value)


@pytest.mark.parametrize("num_epochs, warmup", [(1, 0.6), (2, 1.5), (1, 0.99)])
def test_fractional_warmup_shorter_than_the_run_is_valid(num_epochs, warmup):
    config = small_config(**{"num_epochs": num_epochs, "optimizer.schedule.name": "warmup_cosine",
                             "optimizer.schedule.warmup_epochs": warmup})
    train.validate_config(config)  # checked in epochs, not in steps of a 1-step epoch
    schedule = train.create_schedule(config, steps_per_epoch=10)
    peak = min(int(round(warmup * 10)), 10 * num_epochs - 1)  # >= 1 step after the warmup
    assert float(schedule(0)) == 0.0
    assert float(schedule(peak)) == pytest.approx(1e-3)
    assert float(schedule(10 * num_epochs)) == pytest.approx(0.0, abs=1e-9)


def test_appending_after_a_cut_last_line_keeps_the_file_readable(tmp_path):
    # jopt quantize appends to metrics.jsonl without rewriting it first.
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "test_accuracy": 0.8}\n{"epoch": 2, "test_acc')
    for _ in range(2):
        train._append_record(path, {"epoch": 1, "event": "quantize"})
    assert train.read_metrics(path) == [{"epoch": 1, "test_accuracy": 0.8},
                                        {"epoch": 1, "event": "quantize"},
                                        {"epoch": 1, "event": "quantize"}]


def test_read_metrics_drops_a_cut_last_line_and_names_a_damaged_one(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"epoch": 1, "test_loss": 0.5}\n\n{"epoch": 2, "test_lo')
    assert train.read_metrics(path) == [{"epoch": 1, "test_loss": 0.5}]
    assert f"Ignoring the last line of {path}, cut short" in caplog.text
    path.write_text('{"epoch": 1}\n\x00\x00\x00\n{"epoch": 2}\n')
    with pytest.raises(train.WorkdirError) as info:
        train.read_metrics(path)
    assert str(info.value).startswith(
        f"{path} is damaged: line 2 is not a metrics record (Expecting value")
    path.write_text('{"epoch": 1}\n[1, 2]\n{"epoch": 2}\n')
    with pytest.raises(train.WorkdirError, match="line 2 is not a metrics record "
                                                 r"\(not a record with an epoch\)"):
        train.read_metrics(path)


def test_batch_larger_than_subset_is_a_config_error(tmp_path, fashion):
    with pytest.raises(train.ConfigError, match="config.batch_size=1024 is larger"):
        train.train_and_evaluate(small_config(batch_size=1024), tmp_path, dataset=fashion)


def test_optimizer_families_and_schedules_build():
    for name in train.OPTIMIZERS:
        tx = train.create_optimizer(small_config(**{"optimizer.name": name}), steps_per_epoch=10)
        state = tx.init({"w": jnp.zeros(3)})
        updates, _ = tx.update({"w": jnp.ones(3)}, state, {"w": jnp.zeros(3)})
        assert float(updates["w"][0]) < 0, name
    config = small_config(**{"num_epochs": 4, "optimizer.schedule.name": "warmup_cosine",
                             "optimizer.schedule.warmup_epochs": 1.0})
    schedule = train.create_schedule(config, steps_per_epoch=10)
    assert float(schedule(0)) == 0.0
    assert float(schedule(10)) == pytest.approx(1e-3)
    assert float(schedule(40)) == pytest.approx(0.0, abs=1e-9)
    config = small_config(**{"optimizer.schedule.name": "exponential",
                             "optimizer.schedule.decay_rate": 0.5})
    assert float(train.create_schedule(config, 10)(20)) == pytest.approx(2.5e-4)


# --------------------------------------------------------------------------- checkpoints


def _jopt_command():
    script = pathlib.Path(sys.executable).with_name("jopt")
    return [str(script)] if script.exists() else [sys.executable, "-m", "jopt.cli"]


def test_resume_after_sigkill_matches_an_uninterrupted_run(tmp_path):
    # Full training set, small batches: epoch 2 takes long enough that the kill,
    # sent as soon as epoch 1's checkpoint exists, lands inside it.
    overrides = ["--config.dataset=fashion_mnist", "--config.num_epochs=2",
                 "--config.batch_size=32", "--config.test_subset=500"]
    reference = train.train_and_evaluate(
        load_config(DEFAULT_CONFIG, overrides), tmp_path / "reference")

    workdir = tmp_path / "killed"
    command = [*_jopt_command(), "train", "--config", str(DEFAULT_CONFIG),
               "--workdir", str(workdir), *overrides]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 300
    while not (workdir / "checkpoints" / "1").is_dir():
        assert process.poll() is None, process.stderr.read().decode()
        assert time.monotonic() < deadline, "no checkpoint after 300 s"
        time.sleep(0.01)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()
    process.stderr.close()
    assert process.returncode == -signal.SIGKILL
    assert [r["epoch"] for r in train.read_metrics(workdir / "metrics.jsonl")] == [1]

    subprocess.run(command, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _, _, resumed, meta = train.load_checkpoint(workdir)
    assert meta["epoch"] == 2
    reference_leaves = jax.tree.leaves(reference.state)
    resumed_leaves = jax.tree.leaves(resumed)
    assert len(resumed_leaves) == len(reference_leaves)
    for a, b in zip(resumed_leaves, reference_leaves):
        assert np.array_equal(np.asarray(a), np.asarray(b))
    records = train.read_metrics(workdir / "metrics.jsonl")
    assert [r["epoch"] for r in records] == [1, 2]
    assert records[1]["test_accuracy"] == reference.metrics["test_accuracy"]


def test_checkpoints_keep_the_last_few(runs):
    directory = runs["root"] / "flat" / "checkpoints"
    assert sorted(int(p.name) for p in directory.iterdir() if p.name.isdigit()) == [1, 2]
    config, model, state, meta = train.load_checkpoint(runs["root"] / "flat")
    assert meta["epoch"] == 2 and config.optimizer.name == "adam"
    for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(runs["flat"].state)):
        assert np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize(
    "overrides, expected",
    [
        ({"optimizer.name": "sgd"}, "config.optimizer.name: checkpoint 'adam', config 'sgd'"),
        ({"model.hidden_sizes": (32,)}, "config.model: checkpoint"),
        ({"optimizer.state_storage": "int8"},
         "config.optimizer.state_storage: checkpoint None, config 'int8'"),
        ({"optimizer.clip_global_norm": 1.0}, "another structure"),
        ({"quantization.weights": "int4"},
         "config.quantization: checkpoint None, config {'weights': 'int4'"),
    ],
)
def test_checkpoint_of_another_run_is_a_clear_error(runs, fashion, tmp_path, overrides, expected):
    workdir = tmp_path / "run"
    shutil.copytree(runs["root"] / "flat", workdir)
    config = small_config(num_epochs=3, **overrides)
    with pytest.raises(checkpoints.CheckpointMismatchError) as info:
        train.train_and_evaluate(config, workdir, dataset=fashion)
    message = str(info.value)
    assert expected in message
    assert "fresh --workdir" in message


def test_rerunning_a_finished_run_with_fewer_epochs_trains_nothing_and_keeps_its_config(
        runs, fashion, tmp_path, capsys):
    workdir = tmp_path / "run"
    shutil.copytree(runs["root"] / "flat", workdir)
    before = (workdir / "config.json").read_text()
    result = train.train_and_evaluate(small_config(num_epochs=1), workdir, dataset=fashion)
    assert "already holds 2 epochs (config.num_epochs=1): nothing to train" in (
        capsys.readouterr().err)
    assert (workdir / "config.json").read_text() == before  # still says num_epochs 2
    assert [r["epoch"] for r in result.history] == [1, 2]
    for a, b in zip(_flat_leaves(result.params), _flat_leaves(runs["flat"].params)):
        np.testing.assert_array_equal(a, b)


def test_damaged_checkpoint_names_it_and_deleting_it_resumes_from_the_previous(
        runs, fashion, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(runs["root"] / "flat", workdir)
    step = workdir / "checkpoints" / "2"
    (step / "meta" / "metadata").write_text('{"epoch": 2, "ident')  # cut short
    with pytest.raises(checkpoints.CheckpointReadError) as info:
        train.load_checkpoint(workdir)
    assert str(info.value) == (
        f"The checkpoint {step} cannot be read (JSONDecodeError: Unterminated string starting "
        f"at: line 1 column 14 (char 13)). If it is damaged (a disk error, a copy cut short), "
        f"delete {step} to resume from the previous checkpoint, {step.parent / '1'}, or use "
        f"a fresh --workdir.")
    shutil.rmtree(step)  # as the message says
    resumed = train.train_and_evaluate(small_config(num_epochs=2), workdir, dataset=fashion)
    for a, b in zip(_flat_leaves(resumed.params), _flat_leaves(runs["flat"].params)):
        np.testing.assert_array_equal(a, b)


def test_chunked_epochs_match_whole_epoch_scans(runs, fashion, tmp_path):
    # 8 steps per epoch in chunks of 3, 3 and 2: same steps, same order.
    chunked = train.train_and_evaluate(
        small_config(num_epochs=2, steps_per_chunk=3), tmp_path, dataset=fashion)
    for a, b in zip(_flat_leaves(chunked.params), _flat_leaves(runs["flat"].params)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)
    assert chunked.history[-1]["step"] == runs["flat"].history[-1]["step"] == 16


def test_unrolled_epoch_scan_matches_and_auto_depends_on_the_platform(runs, fashion, tmp_path):
    assert train.scan_unroll(small_config()) == (1 if jax.default_backend() == "cpu" else 4)
    assert train.scan_unroll(small_config(scan_unroll=3)) == 3
    unrolled = train.train_and_evaluate(
        small_config(num_epochs=2, scan_unroll=3), tmp_path, dataset=fashion)
    for a, b in zip(_flat_leaves(unrolled.params), _flat_leaves(runs["flat"].params)):
        np.testing.assert_allclose(a, b, atol=1e-6, rtol=0)


def test_epoch_recorded_but_not_checkpointed_is_redone_once(runs, fashion, tmp_path):
    # As if killed after writing epoch 2's metrics but before its checkpoint.
    workdir = tmp_path / "run"
    shutil.copytree(runs["root"] / "flat", workdir)
    shutil.rmtree(workdir / "checkpoints" / "2")
    assert len(train.read_metrics(workdir / "metrics.jsonl")) == 2
    resumed = train.train_and_evaluate(small_config(num_epochs=2), workdir, dataset=fashion)
    assert [r["epoch"] for r in train.read_metrics(workdir / "metrics.jsonl")] == [1, 2]
    for a, b in zip(_flat_leaves(resumed.params), _flat_leaves(runs["flat"].params)):
        np.testing.assert_array_equal(a, b)


def test_compressed_data_parallel_run_resumes_exactly(fashion, tmp_path):
    # int8 gradient compression keeps error-feedback residuals per device; they are
    # checkpointed with the state, so resuming ends where an uninterrupted run ends.
    config = dict(parallel="shard_map", gradient_compression="int8")
    whole = train.train_and_evaluate(
        small_config(num_epochs=2, **config), tmp_path / "whole", dataset=fashion)
    train.train_and_evaluate(small_config(num_epochs=1, **config), tmp_path / "cut",
                             dataset=fashion)
    resumed = train.train_and_evaluate(
        small_config(num_epochs=2, **config), tmp_path / "cut", dataset=fashion)
    for a, b in zip(_flat_leaves(resumed.params), _flat_leaves(whole.params), strict=True):
        np.testing.assert_array_equal(a, b)
