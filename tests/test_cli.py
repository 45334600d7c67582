"""Tests of the `jopt` command line: a smoke run on real Fashion-MNIST, eval, errors, help."""

import dataclasses
import json
import pathlib

import pytest

from jopt import cli, data

DEFAULT_CONFIG = str(pathlib.Path(__file__).parents[1] / "configs" / "default.py")
SMALL = ["--config.dataset=fashion_mnist", "--config.num_epochs=1", "--config.batch_size=64",
         "--config.train_subset=1024", "--config.test_subset=500"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """One short epoch on real Fashion-MNIST through `jopt train`."""
    workdir = tmp_path_factory.mktemp("cli_run")
    status = cli.main(["train", "--config", DEFAULT_CONFIG, "--workdir", str(workdir), *SMALL])
    return status, workdir


def test_train_smoke_run_writes_metrics_curves_and_checkpoint(trained):
    status, workdir = trained
    assert status == 0
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    assert len(records) == 1 and records[0]["epoch"] == 1 and records[0]["step"] == 16
    assert records[0]["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
    assert (workdir / "curves.png").stat().st_size > 1000
    assert (workdir / "checkpoints" / "1").is_dir()
    assert json.loads((workdir / "config.json").read_text())["dataset"] == "fashion_mnist"


def test_eval_prints_and_returns_the_checkpoint_metrics(trained, capsys):
    status, workdir = trained
    capsys.readouterr()
    assert cli.main(["eval", "--workdir", str(workdir)]) == 0
    out = capsys.readouterr().out
    record = json.loads((workdir / "metrics.jsonl").read_text().splitlines()[-1])
    assert f"test_accuracy {100 * record['test_accuracy']:.2f}%" in out
    assert f"test_loss {record['test_loss']:.4f}" in out


def test_eval_without_checkpoint_says_how_to_fix_it(tmp_path, capsys):
    assert cli.main(["eval", "--workdir", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "No checkpoint in" in err and "jopt train --config" in err
    assert not (tmp_path / "checkpoints").exists()  # eval writes nothing


def test_rerun_of_a_finished_run_resumes_without_duplicate_epochs(trained, capsys):
    status, workdir = trained
    assert cli.main(["train", "--config", DEFAULT_CONFIG, "--workdir", str(workdir), *SMALL]) == 0
    assert "Resuming from" in capsys.readouterr().out
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1]


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.optimizer.lerning_rate=1e-3", "Unknown config key config.optimizer.lerning_rate"),
        ("--config.optimzer.name=sgd", "Unknown config key config.optimzer"),
        ("--config.num_epochs=ten", "config.num_epochs must be of type int; 'ten' is not"),
        ("--config.num_epochs=2.5", "config.num_epochs must be of type int; got '2.5' (float)"),
        ("--config.flat_params=maybe", "config.flat_params is a bool"),
        ("--config.optimizer.name=adamx", "config.optimizer.name='adamx' is not supported"),
        ("--config.optimizer.momentum=0.9", "config.optimizer.momentum=0.9 is not a hyper-parameter"),
        # None only for optional keys (learning_rate=None once ran gradient ascent).
        *[(f"--config.{key}={none}", f"config.{key} cannot be None: it is not optional")
          for key, none in [("optimizer.learning_rate", "None"), ("seed", "None"),
                            ("batch_size", "null"), ("model.hidden_sizes", "None"),
                            ("flat_params", "None")]],
    ],
)
def test_bad_override_is_an_error_naming_the_key(tmp_path, capsys, override, message):
    argv = ["train", "--config", DEFAULT_CONFIG, "--workdir", str(tmp_path), override]
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "metrics.jsonl").exists()  # failed before any work


def test_overrides_with_a_space_before_the_value(tmp_path, capsys):
    argv = ["train", "--config", DEFAULT_CONFIG, "--workdir", str(tmp_path),
            "--config.optimizer.name", "adamx"]
    assert cli.main(argv) == 2
    assert "config.optimizer.name='adamx'" in capsys.readouterr().err


def test_overrides_are_typed():
    config = cli.load_config(DEFAULT_CONFIG, [
        "--config.optimizer.learning_rate=3e-4", "--config.num_epochs=7",
        "--config.model.hidden_sizes=128,32", "--config.flat_params=false",
        "--config.optimizer.state_storage=int8", "--config.train_subset=100",
        "--config.optimizer.b1=1",
    ])
    assert config.optimizer.learning_rate == 3e-4
    assert config.num_epochs == 7
    assert tuple(config.model.hidden_sizes) == (128, 32)
    assert config.flat_params is False
    assert config.optimizer.state_storage == "int8"
    assert config.train_subset == 100
    assert config.optimizer.b1 == 1.0 and isinstance(config.optimizer.b1, float)


def test_help_reads_well(capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["--help"])
    assert info.value.code == 0
    out = capsys.readouterr().out
    for text in ("train", "eval", "jopt train --config configs/default.py --workdir runs/mnist"):
        assert text in out
    with pytest.raises(SystemExit):
        cli.main(["train", "--help"])
    out = capsys.readouterr().out
    assert "usage: jopt train --config FILE --workdir DIR [--config.KEY=VALUE ...]" in out
    assert "--config.optimizer.name=adamw" in out and "metrics.jsonl" in out


def test_unknown_arguments_and_missing_files(tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(["train", "--config", DEFAULT_CONFIG, "--workdir", str(tmp_path), "--epochs=3"])
    assert info.value.code == 2
    assert "unrecognized arguments: --epochs=3" in capsys.readouterr().err
    assert cli.main(["train", "--config", str(tmp_path / "nope.py"), "--workdir", str(tmp_path)]) == 2
    assert "nope.py does not exist" in capsys.readouterr().err
    bad = tmp_path / "bad.py"
    bad.write_text("x = 1\n")
    assert cli.main(["train", "--config", str(bad), "--workdir", str(tmp_path)]) == 2
    assert "must define get_config()" in capsys.readouterr().err


def test_none_unsets_optional_keys_even_str_ones():
    qat = pathlib.Path(DEFAULT_CONFIG).with_name("fashion_mnist_qat_int4.py")
    assert cli.load_config(qat).quantization.weights == "int4"
    config = cli.load_config(qat, [
        "--config.quantization.weights=None", "--config.optimizer.state_storage=int8",
        "--config.optimizer.state_storage=none", "--config.data_dir=/tmp/d",
        "--config.data_dir=null", "--config.optimizer.amsgrad=None",
        "--config.train_subset=None",
    ])
    assert config.quantization.weights is None
    assert config.optimizer.state_storage is None
    assert config.data_dir is None
    assert config.optimizer.amsgrad is None
    assert config.train_subset is None
    # A key that is a str and not optional takes "none" as the string it is.
    assert cli.load_config(DEFAULT_CONFIG, ["--config.parallel=none"]).parallel == "none"


def test_fractional_layer_sizes_are_an_error(tmp_path, capsys):
    argv = ["train", "--config", DEFAULT_CONFIG, "--workdir", str(tmp_path),
            "--config.model.hidden_sizes=1.5,2.9"]
    assert cli.main(argv) == 2
    assert ("config.model.hidden_sizes must be positive integers (layer widths), got "
            "(1.5, 2.9)") in capsys.readouterr().err


def test_fashion_mnist_in_jopt_data_dir_is_not_used_for_mnist(tmp_path, capsys, monkeypatch):
    # configs/default.py trains MNIST; the files directly in $JOPT_DATA_DIR are
    # Fashion-MNIST's (same names): skipped, and with MNIST nowhere else, an error
    # that says why - not a silent run on the wrong data.
    fashion = pathlib.Path("/usr/share/datasets/fashion-mnist")
    if not fashion.is_dir():
        pytest.skip(f"{fashion} is missing")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("JOPT_DATA_DIR", str(fashion))
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", (str(tmp_path / "system"),))
    offline = dataclasses.replace(data.DATASETS["mnist"], mirrors=())
    monkeypatch.setattr(data, "DATASETS", {**data.DATASETS, "mnist": offline})
    argv = ["train", "--config", DEFAULT_CONFIG, "--workdir", str(tmp_path / "w"),
            "--config.num_epochs=1", "--config.train_subset=1000", "--config.test_subset=500"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert "jopt train: error: Could not find data set 'mnist'" in err
    assert (f"({fashion}: skipped, as files directly in $JOPT_DATA_DIR are used only if their "
            "SHA-256s identify them as mnist's, and train-images-idx3-ubyte.gz is "
            "fashion_mnist's train-images-idx3-ubyte.gz;") in err
    assert not (tmp_path / "w" / "metrics.jsonl").exists()


def test_corrupt_data_file_is_an_error_naming_it(tmp_path, capsys):
    directory = tmp_path / "data"
    directory.mkdir()
    for name in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte",
                 "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"):
        (directory / name).write_bytes(b"\0\0\x08\x01" + (100).to_bytes(4, "big") + b"\0" * 10)
    argv = ["train", "--config", DEFAULT_CONFIG, "--workdir", str(tmp_path / "w"),
            f"--config.data_dir={directory}"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert (f"jopt train: error: {directory}/train-images-idx3-ubyte is not a valid IDX file: "
            "its header promises 108 bytes for shape (100,) but it has 18") in err
    assert "delete it so that it is downloaded again" in err


def _copy_run(trained, tmp_path):
    import shutil

    status, workdir = trained
    assert status == 0
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    return copy


def test_damaged_checkpoint_is_an_error_naming_it(trained, tmp_path, capsys):
    workdir = _copy_run(trained, tmp_path)
    step = workdir / "checkpoints" / "1"
    for path in (step / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":  # the array data
            path.write_bytes(b"\0" * path.stat().st_size)
    for argv in (["eval", "--workdir", str(workdir)],
                 ["train", "--config", DEFAULT_CONFIG, "--workdir", str(workdir), *SMALL]):
        assert cli.main(argv) == 2
        err = capsys.readouterr().err
        assert f"error: The checkpoint {step} cannot be read (ValueError: " in err
        assert (f"If it is damaged (a disk error, a copy cut short) - it is the only "
                f"checkpoint - delete {step} to train from the start, or use a fresh "
                "--workdir.") in err


def test_truncated_metrics_line_is_dropped_and_a_damaged_one_named(trained, tmp_path, capsys,
                                                                   caplog):
    workdir = _copy_run(trained, tmp_path)
    metrics = workdir / "metrics.jsonl"
    good = metrics.read_text()
    metrics.write_text(good + '{"epoch": 2, "step": 3')  # a run killed mid-write
    argv = ["train", "--config", DEFAULT_CONFIG, "--workdir", str(workdir), *SMALL]
    assert cli.main(argv) == 0
    assert f"Ignoring the last line of {metrics}, cut short" in caplog.text
    assert metrics.read_text() == good  # rewritten from the records the checkpoint covers

    metrics.write_text('{"epoch": 1, "st\n' + good)
    assert cli.main(argv) == 2
    assert (f"jopt train: error: {metrics} is damaged: line 1 is not a metrics record "
            "(Unterminated string") in capsys.readouterr().err


# Real MNIST, installed by .ci/fetch_mnist.py (MNIST's own mirrors are out of reach in CI).
CI_MNIST = pathlib.Path(__file__).parents[1] / ".ci" / "data" / "mnist"


@pytest.mark.skipif(
    not all((CI_MNIST / name.removesuffix(".gz")).is_file() for name in data.DATASETS["mnist"].files),
    reason=f"{CI_MNIST} is missing: run python3 .ci/fetch_mnist.py {CI_MNIST}")
def test_reference_recipe_reaches_97_percent_on_real_mnist(tmp_path, monkeypatch):
    import hashlib

    # The files are MNIST's originals: the SHA-256s jopt.data pins for them.
    spec = data.DATASETS["mnist"]
    for gz_name in spec.files:
        digest = hashlib.sha256((CI_MNIST / gz_name.removesuffix(".gz")).read_bytes())
        assert digest.hexdigest() == spec.raw_sha256[gz_name], gz_name
    # Identified by those hashes, they are used even directly in $JOPT_DATA_DIR.
    monkeypatch.setenv("JOPT_DATA_DIR", str(CI_MNIST))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setattr(data, "SYSTEM_DATA_DIRS", ())
    # The reference recipe, unchanged: configs/default.py (Adam 1e-3, batch 128, 5 epochs).
    assert cli.main(["train", "--config", DEFAULT_CONFIG, "--workdir", str(tmp_path / "w")]) == 0
    records = [json.loads(line) for line in (tmp_path / "w" / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2, 3, 4, 5]
    assert records[-1]["test_accuracy"] >= 0.970  # the target (seeds 0-7: 97.05-97.35%)


def _fetch_mnist_module():
    import importlib.util

    path = pathlib.Path(__file__).parents[1] / ".ci" / "fetch_mnist.py"
    spec = importlib.util.spec_from_file_location("fetch_mnist", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_ci_mnist_fetch_refuses_a_directory_that_is_not_its_own(tmp_path, monkeypatch):
    # .ci/fetch_mnist.py never overwrites or deletes what is not its own, and says
    # why before downloading anything (the download itself is not reached here).
    fetch = _fetch_mnist_module()
    monkeypatch.setattr(fetch.urllib.request, "urlopen", lambda *a, **k: pytest.fail("download"))
    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("keep me")
    with pytest.raises(SystemExit, match=r"holds other files too \(notes.txt\)"):
        fetch.fetch(str(foreign))
    assert (foreign / "notes.txt").read_text() == "keep me"
    (tmp_path / "file").write_text("x")
    (tmp_path / "link").symlink_to(foreign)
    for name in ("file", "link"):
        with pytest.raises(SystemExit, match="is not a directory"):
            fetch.fetch(str(tmp_path / name))
    done = tmp_path / "done"  # all four files there: nothing to do
    done.mkdir()
    for name in fetch.FILES:
        (done / name).write_bytes(b"")
    (done / f".{fetch.FILES[0]}.tmp123").write_bytes(b"")  # an interrupted run's leftover
    fetch.fetch(str(done))
    assert sorted(p.name for p in done.iterdir()) == sorted(fetch.FILES)
