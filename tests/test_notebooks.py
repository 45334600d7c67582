"""Runs every notebook top to bottom on CPU with its small settings, and checks how they are stored.

Each notebook asserts the claims it teaches ("Check:" cells), so running it without an
error is a real test. The kernel is the interpreter running pytest, whatever kernels
Jupyter has registered.
"""

import importlib.util
import subprocess
import sys
from pathlib import Path

import nbformat
import pytest
from ipykernel.kernelspec import write_kernel_spec
from nbclient import NotebookClient

import jopt

NOTEBOOK_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(NOTEBOOK_DIR.glob("[0-9][0-9]_*.ipynb"))
CELL_TIMEOUT_S = 180
KERNEL_NAME = "jopt-notebook-tests"
# Notebooks that train on real data: MNIST's mirrors are out of reach in CI, Fashion-MNIST
# is installed from Debian (dataset-fashion-mnist), so they run on it - except 02, whose
# own data set is MNIST: it runs on the copy .ci/fetch_mnist.py installs, when present.
NEEDS_DATA = {"02_mnist_mlp", "03_data_parallel", "04_compression"}
CI_DATASET = "fashion_mnist"
CI_MNIST_ROOT = Path(__file__).resolve().parents[1] / ".ci" / "data"


def _load_build_script():
    spec = importlib.util.spec_from_file_location("notebooks_build", NOTEBOOK_DIR / "_build.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def this_interpreter_kernel(tmp_path, monkeypatch):
    """Registers a kernel that runs sys.executable, visible to this test only."""
    write_kernel_spec(tmp_path / "kernels" / KERNEL_NAME)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    return KERNEL_NAME


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_runs_with_small_settings(path, this_interpreter_kernel, monkeypatch):
    if path.stem == "02_mnist_mlp" and all(
            (CI_MNIST_ROOT / "mnist" / name.removesuffix(".gz")).is_file()
            for name in jopt.data.DATASETS["mnist"].files):
        monkeypatch.setenv("JOPT_DATA_DIR", str(CI_MNIST_ROOT))  # looked up as <dir>/mnist
        monkeypatch.setenv("JOPT_NOTEBOOK_DATASET", "mnist")
    elif path.stem in NEEDS_DATA:
        try:
            jopt.data.load(CI_DATASET, download=False)
        except jopt.data.DatasetNotFoundError as error:
            pytest.skip(f"{CI_DATASET} is not on disk: {error}")
        monkeypatch.setenv("JOPT_NOTEBOOK_DATASET", CI_DATASET)
    monkeypatch.setenv("JOPT_NOTEBOOK_SMALL", "1")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    nb = nbformat.read(path, as_version=4)
    client = NotebookClient(
        nb,
        kernel_name=this_interpreter_kernel,
        timeout=CELL_TIMEOUT_S,
        resources={"metadata": {"path": str(NOTEBOOK_DIR)}},
    )
    client.execute()  # raises CellExecutionError, naming the cell, on the first error
    errors = [out for cell in nb.cells for out in cell.get("outputs", [])
              if out.get("output_type") == "error"]
    assert not errors


def test_notebooks_are_generated_and_stored_without_outputs():
    build = _load_build_script()
    assert sorted(f"{name}.ipynb" for name in build.NOTEBOOKS) == [p.name for p in NOTEBOOKS]
    assert build.main(["--check"]) == 0, "run python notebooks/_build.py"
    for path in NOTEBOOKS:
        nb = nbformat.read(path, as_version=4)
        code_cells = [c for c in nb.cells if c.cell_type == "code"]
        assert all(not c.outputs and c.execution_count is None for c in code_cells), path.name
        assert 'find_spec("jopt")' in code_cells[0].source, path.name
        tagged = [c for c in code_cells if "parameters" in c.metadata.get("tags", [])]
        assert len(tagged) == 1 and "JOPT_NOTEBOOK_SMALL" in tagged[0].source, path.name


def _run_install_cell(monkeypatch, cwd, jopt_installed):
    """Executes the notebooks' install cell with git and pip replaced by a recorder."""
    calls = []
    monkeypatch.setattr(subprocess, "check_call", lambda cmd: calls.append(cmd))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: (
        real_find_spec(name, *a) if name != "jopt" or jopt_installed else None))
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(cwd)
    monkeypatch.delenv("JOPT_REPOSITORY", raising=False)
    namespace = {}
    exec(_load_build_script().install_cell().source, namespace)
    return calls, namespace["REPO"]


def test_install_cell_runs_no_pip_when_jopt_imports(monkeypatch):
    calls, repo = _run_install_cell(monkeypatch, NOTEBOOK_DIR, jopt_installed=True)
    assert calls == [] and repo == NOTEBOOK_DIR.parent


def test_install_cell_installs_this_clone(monkeypatch):
    (pip,), repo = _run_install_cell(monkeypatch, NOTEBOOK_DIR, jopt_installed=False)
    assert pip[1:] == ["-m", "pip", "install", "-q", "-e", str(NOTEBOOK_DIR.parent)]
    assert repo == NOTEBOOK_DIR.parent and sys.path[0] == str(repo)


def test_install_cell_clones_the_repository_elsewhere(monkeypatch, tmp_path):
    (git, pip), repo = _run_install_cell(monkeypatch, tmp_path, jopt_installed=False)
    assert git == ["git", "clone", "--depth", "1", _load_build_script().REPOSITORY,
                   str(tmp_path / "jopt-repo")]
    assert pip[-2:] == ["-e", str(tmp_path / "jopt-repo")] and repo == tmp_path / "jopt-repo"
