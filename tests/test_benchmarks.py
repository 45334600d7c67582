"""The update benchmark runs end to end at toy sizes and reports what the issue asks for.

Timings are not checked here (speed goals live in the benchmark's own output); this
guards the script against bit rot: every case compiles and runs, and the JSON
carries the required keys with sane values.
"""

import argparse
import importlib.util
import json
import math
import subprocess
import sys
from pathlib import Path

import jax
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _load(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_update_benchmark_json_has_the_required_keys():
    update = _load("update")
    args = argparse.Namespace(
        json=True, size=5000, leaves=6, leaf_size=50, steps=2, repeats=1)
    result = json.loads(json.dumps(update.run(args)))  # JSON-serialisable
    for key in ("flat_step_speedup_vs_optax", "flat_compile_speedup_vs_optax",
                "jopt_vs_bandwidth_limit", "int8_encode_only_vs_optax_float32"):
        assert math.isfinite(result[key]) and result[key] > 0, key
    assert set(result["state_bytes_per_param"]) == {"optax", "float32", "bfloat16", "int8"}
    per_param = result["state_bytes_per_param"]  # counters add a few bytes in all
    assert per_param["optax"] == pytest.approx(8.0, abs=0.01)
    assert per_param["float32"] == pytest.approx(8.0, abs=0.01)
    assert per_param["bfloat16"] == pytest.approx(4.0, abs=0.01)
    assert per_param["int8"] < 2.1
    assert set(result["update_time_vs_optax_float32"]) == {"float32", "bfloat16", "int8"}
    assert set(result["many_leaves"]["ms_per_step"]) == {"optax", "jopt_tree", "jopt_flat"}
    blocks = result["single_leaf"]["int8_whole_blocks"]  # 5000 -> 20 whole blocks
    assert blocks["size"] == 5120 and math.isfinite(blocks["vs_optax_float32"])
    assert "jopt_int8_whole_blocks" in result["single_leaf"]["seconds"]


@pytest.mark.slow
def test_update_benchmark_command_line_prints_one_json_object():
    out = subprocess.run(
        [sys.executable, str(BENCHMARKS / "update.py"), "--json", "--size", "4096",
         "--leaves", "3", "--leaf-size", "10", "--steps", "2", "--repeats", "1"],
        capture_output=True, text=True, check=True, timeout=600)
    result = json.loads(out.stdout)
    assert result["platform"] == jax.default_backend()  # the same JAX_PLATFORMS
    assert result["single_leaf"]["size"] == 4096


def test_train_benchmark_counts_each_models_flops():
    bench = _load("train_mnist")
    # Per example. MLP forward 2*(784*64 + 64*64 + 64*10); weight gradients as much;
    # input gradients of the 2nd and 3rd layers.
    assert bench.mlp_flops_per_step(1) == 2 * 109_824 + 2 * (64 * 64 + 64 * 10)
    # CNN: 3x3 convolutions 1->32 at 28x28 and 32->64 at 14x14, dense 3136->256->10.
    layers = [2 * 784 * 9 * 32, 2 * 196 * 9 * 32 * 64, 2 * 3136 * 256, 2 * 256 * 10]
    assert bench.cnn_flops_per_step(1) == 2 * sum(layers) + sum(layers[1:])
    assert bench.cnn_flops_per_step(128) == 128 * bench.cnn_flops_per_step(1)
    from jopt.cli import load_config

    config = load_config(bench.CONFIGS["cnn"])  # the network jopt's loop trains
    assert tuple(config.model.conv_features) == bench.CNN_FEATURES
    assert tuple(config.model.hidden_sizes) == (bench.CNN_HIDDEN,)


def test_train_benchmark_torch_networks_are_jopts():
    bench = _load("train_mnist")
    torch = pytest.importorskip("torch")
    from jopt.models import num_params

    for name in ("mlp", "cnn"):
        flax_model = bench._flax_model(name)
        params = jax.eval_shape(flax_model.init, jax.random.key(0), jax.ShapeDtypeStruct(
            (1, 28, 28), jax.numpy.float32))
        torch_params = sum(p.numel() for p in bench.torch_model(name).parameters())
        assert num_params(params) == torch_params, name
        if name == "cnn":
            assert bench.torch_model(name)(torch.zeros(2, 1, 28, 28)).shape == (2, 10)
