"""Tests for jopt.quantization: fake quantization + STE, QuantDense, int8 PTQ and inference."""

import doctest
import json
import pathlib
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jopt
from jopt import cli, quantization, train
from jopt.cli import load_config
from jopt.models import MLP
from jopt.quantization import QuantDense, QuantizedTensor

MODES = ["int8", "int4", "ternary", "binary"]


def _kernel(seed=0, shape=(32, 6)):
    return 0.3 * jax.random.normal(jax.random.key(seed), shape)


class _MLP(nn.Module):
    weights: str | None = None
    activations: str | None = None

    @nn.compact
    def __call__(self, x):
        def dense(features, name):
            if self.weights is None:
                return nn.Dense(features, name=name)
            return QuantDense(features, weights=self.weights, activations=self.activations,
                              name=name)
        return dense(3, "out")(nn.relu(dense(16, "hidden")(x)))


# ----------------------------------------------------------------------------- fake quantization


@pytest.mark.parametrize("mode", ["int8", "int4"])
def test_integer_fake_quantization(mode):
    w = _kernel()
    qmax = {"int8": 127, "int4": 7}[mode]
    scale = np.abs(np.asarray(w)).max(axis=0) / qmax  # per output channel
    fq = np.asarray(quantization.fake_quantize(w, mode))
    codes = fq / scale
    np.testing.assert_allclose(codes, np.round(codes), atol=1e-4)
    assert np.abs(np.round(codes)).max() == qmax
    assert (np.abs(fq - np.asarray(w)) <= scale / 2 + 1e-6).all()


def test_ternary_and_binary_follow_their_papers():
    w = np.asarray(_kernel())
    magnitude = np.abs(w)
    delta = 0.7 * magnitude.mean(axis=0)  # TWN threshold per output channel
    alpha = np.array([magnitude[magnitude[:, j] > delta[j], j].mean() for j in range(w.shape[1])])
    expected = np.where(magnitude > delta, np.sign(w) * alpha, 0.0)
    np.testing.assert_allclose(quantization.fake_quantize(w, "ternary"), expected, rtol=1e-6)
    xnor = np.where(w >= 0, 1.0, -1.0) * magnitude.mean(axis=0)  # XNOR-Net: mean |w|
    np.testing.assert_allclose(quantization.fake_quantize(w, "binary"), xnor, rtol=1e-6)
    np.testing.assert_allclose(quantization.fake_quantize(w, 1), xnor, rtol=1e-6)


@pytest.mark.parametrize("mode", MODES)
def test_straight_through_gradient(mode):
    w = _kernel().at[0, 0].set(1.7)  # outside binary's clipping range |w| <= 1
    cotangent = jax.random.normal(jax.random.key(5), w.shape)
    grad = jax.grad(lambda w: jnp.sum(cotangent * quantization.fake_quantize(w, mode)))(w)
    expected = np.array(cotangent)
    if mode == "binary":
        expected[0, 0] = 0.0
    np.testing.assert_array_equal(grad, expected)


def test_straight_through_clipping_range():
    x = jnp.array([-3.0, -1.0, 0.2, 1.0, 2.5])
    q = jnp.clip(jnp.round(x), -1, 1)
    grad = jax.grad(lambda x: quantization.straight_through(x, q, jnp.abs(x) <= 1).sum())(x)
    np.testing.assert_array_equal(grad, [0.0, 1.0, 1.0, 1.0, 0.0])
    assert (quantization.straight_through(x, q, jnp.abs(x) <= 1) == q).all()
    activations = jax.grad(lambda x: quantization.fake_quantize_activations(x).sum())(x[None])
    np.testing.assert_array_equal(activations, np.ones((1, 5)))


@pytest.mark.parametrize("bad", [3, 16, "int3", "float", True, None])
def test_unsupported_modes(bad):
    with pytest.raises(ValueError, match=r"Unsupported weight quantization.*'int8' \(8\)"):
        quantization.fake_quantize(_kernel(), bad)
    with pytest.raises(ValueError, match="Unsupported weight quantization"):
        quantization.quantize_params({"w": _kernel()}, bad)


def test_quant_dense_errors_and_param_names():
    x = jnp.ones((2, 5))
    with pytest.raises(ValueError, match="activations must be None or 'int8'"):
        QuantDense(3, activations="int4").init(jax.random.key(0), x)
    with pytest.raises(ValueError, match="Unsupported weight quantization"):
        QuantDense(3, weights=5).init(jax.random.key(0), x)
    quantized = QuantDense(3).init(jax.random.key(0), x)
    plain = nn.Dense(3).init(jax.random.key(0), x)
    assert jax.tree.structure(quantized) == jax.tree.structure(plain)
    jax.tree.map(np.testing.assert_array_equal, quantized, plain)


def test_quantization_aware_training_learns():
    """QAT of a tiny binary-weight classifier: straight-through gradients train it."""
    mode = "binary"
    x = jax.random.normal(jax.random.key(0), (256, 8))
    y = jnp.argmax(x[:, :3], axis=-1)
    model = _MLP(weights=mode, activations="int8")
    params = model.init(jax.random.key(1), x)["params"]
    # Decaying to 0 lets the latent weights settle: with a constant rate the signs
    # of the last step flip around (0.83-0.93 accuracy across JAX versions/seeds);
    # with cosine decay 10 data seeds all reached 0.91-0.95.
    tx = jopt.adam(jopt.schedules.cosine_decay_schedule(0.02, 300))

    def loss(params):
        logits = model.apply({"params": params}, x)
        return -jnp.mean(jax.nn.log_softmax(logits)[jnp.arange(256), y])

    @jax.jit
    def train(params):
        def step(carry, _):
            params, state = carry
            value, grads = jax.value_and_grad(loss)(params)
            updates, state = tx.update(grads, state, params)
            return (jopt.apply_updates(params, updates), state), value
        return jax.lax.scan(step, (params, tx.init(params)), None, length=300)

    (params, _), losses = train(params)
    assert losses[-1] < 0.5 * losses[0]
    qparams = quantization.quantize_params(params, mode)
    logits = quantization.quantized_apply(model, {"params": qparams}, x)
    assert float(jnp.mean(jnp.argmax(logits, -1) == y)) > 0.85


# ----------------------------------------------------------------------------- PTQ and int8 inference


def test_int8_matmul_matches_float_within_quantization_error():
    x = jax.random.normal(jax.random.key(7), (5, 32)) * jnp.arange(1, 6)[:, None]
    w = _kernel()
    q = quantization.quantize(w)
    y = np.asarray(quantization.int8_matmul(x, q))
    reference = np.asarray(x, np.float64) @ np.asarray(w, np.float64)
    # |x̂ŵ - xw| <= Σ_i |x_i| s_w/2 + |w_ij| s_x/2 + s_x s_w/4, per output.
    s_x = np.abs(np.asarray(x)).max(axis=1, keepdims=True) / 127
    s_w = np.asarray(q.scale).reshape(1, -1)
    bound = (np.abs(np.asarray(x)).sum(1, keepdims=True) * s_w / 2
             + s_x * np.abs(np.asarray(w)).sum(0, keepdims=True) / 2 + 32 * s_x * s_w / 4)
    assert (np.abs(y - reference) <= bound + 1e-5).all()
    assert np.abs(y - reference).max() < 0.02 * np.abs(reference).max()


def test_int8_matmul_really_multiplies_integers():
    q = quantization.quantize(_kernel())
    text = jax.jit(quantization.int8_matmul).lower(jnp.ones((4, 32)), q).as_text()
    assert re.search(r"dot_general.*tensor<4x32xi8>, tensor<32x6xi8>\) -> tensor<4x6xi32>", text)
    with pytest.raises(ValueError, match="in matches x's last axis"):
        quantization.int8_matmul(jnp.ones((4, 31)), q)


def test_quantized_apply_on_a_flax_model():
    model = _MLP()
    x = jax.random.normal(jax.random.key(3), (8, 20))
    params = model.init(jax.random.key(4), x)["params"]
    qparams = quantization.quantize_params(params)
    assert isinstance(qparams["hidden"]["kernel"], QuantizedTensor)
    assert qparams["hidden"]["bias"].dtype == jnp.float32
    y = jax.jit(lambda p, x: quantization.quantized_apply(model, {"params": p}, x))(qparams, x)
    reference = model.apply({"params": params}, x)
    np.testing.assert_allclose(y, reference, atol=0.03 * float(jnp.abs(reference).max()))
    text = jax.jit(lambda v, x: quantization.quantized_apply(model, v, x)).lower(
        {"params": qparams}, x).as_text()
    assert len(re.findall(r"xi8>\) -> tensor<\d+x\d+xi32>", text)) == 2
    # Float params through quantized_apply are the plain float model.
    np.testing.assert_allclose(
        quantization.quantized_apply(model, {"params": params}, x), reference)


@pytest.mark.parametrize("mode", MODES)
def test_qat_model_and_integer_inference_agree(mode):
    """PTQ of a QAT tree reproduces the codes the model was trained with."""
    model = _MLP(weights=mode, activations="int8")
    x = jax.random.normal(jax.random.key(3), (8, 20))
    params = model.init(jax.random.key(4), x)["params"]
    qparams = quantization.quantize_params(params, mode)
    np.testing.assert_allclose(
        qparams["hidden"]["kernel"].dequantize(),
        quantization.fake_quantize(params["hidden"]["kernel"], mode), rtol=1e-6)
    # float32 matmuls in the QAT model: GPUs default to TF32 (1e-3 off), while
    # the integer path is exact.
    with jax.default_matmul_precision("float32"):
        fake = model.apply({"params": params}, x)
        real = quantization.quantized_apply(model, {"params": qparams}, x)
    np.testing.assert_allclose(real, fake, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_size_report_and_file_round_trip(mode, tmp_path):
    params = {"dense": {"kernel": _kernel(shape=(64, 10)), "bias": jnp.zeros(10)}}
    qparams = quantization.quantize_params(params, mode)
    report = quantization.size_report(params, qparams)
    bits = quantization.MODES[mode]
    assert report["float32_bytes"] == (640 + 10) * 4
    assert report["weight_quantized_bytes"] == 640 * bits // 8 + 10 * 4
    assert report["quantized_bytes"] == report["weight_quantized_bytes"] + 40
    if mode == "int8":
        assert report["weight_ratio"] == pytest.approx(2560 / 680)
    path = tmp_path / "q.npz"
    size = quantization.save_quantized(path, qparams)
    assert size == path.stat().st_size
    loaded = quantization.load_quantized(path)
    kernel = loaded["dense"]["kernel"]
    assert isinstance(kernel, QuantizedTensor) and kernel.mode == mode
    np.testing.assert_array_equal(kernel.codes, qparams["dense"]["kernel"].codes)
    np.testing.assert_array_equal(kernel.scale, qparams["dense"]["kernel"].scale)
    np.testing.assert_array_equal(loaded["dense"]["bias"], params["dense"]["bias"])


def test_int4_packing_covers_the_code_range(tmp_path):
    codes = np.arange(-7, 8, dtype=np.int8).reshape(15, 1)  # odd count: padded nibble
    tensor = QuantizedTensor(jnp.asarray(codes), jnp.ones((1, 1)), "int4")
    quantization.save_quantized(tmp_path / "q.npz", {"w": tensor})
    loaded = quantization.load_quantized(tmp_path / "q.npz", like={"w": 0})
    np.testing.assert_array_equal(loaded["w"].codes, codes)


def test_docstring_examples():
    result = doctest.testmod(quantization, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------- jopt train / quantize


CONFIG_DIR = pathlib.Path(__file__).parents[1] / "configs"


def _records(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


def test_qat_config_then_jopt_quantize(tmp_path, capsys):
    workdir = tmp_path / "int4"
    small = ["--config.batch_size=64", "--config.train_subset=640", "--config.test_subset=200"]
    assert cli.main(["train", "--config", str(CONFIG_DIR / "fashion_mnist_qat_int4.py"),
                     "--workdir", str(workdir), "--config.num_epochs=1", *small]) == 0
    (trained,) = _records(workdir)
    assert trained["quantized_bytes"] < trained["float32_bytes"] / 7
    assert cli.main(["quantize", "--workdir", str(workdir)]) == 0
    assert "int4" in capsys.readouterr().out
    exported = _records(workdir)[-1]
    assert exported["event"] == "quantize" and exported["mode"] == "int4"
    assert exported["epoch"] == 1 and (workdir / "quantized_int4.npz").exists()
    assert exported["quantized_bytes"] == trained["quantized_bytes"]
    # The export has the codes QAT trained with; only the int8 activations differ.
    assert abs(exported["test_accuracy"] - trained["test_accuracy"]) <= 0.02
    assert exported["file_bytes"] < exported["float32_bytes"] / 5
    # Resuming the run keeps the event record in the file and out of the epoch history.
    config = load_config(CONFIG_DIR / "fashion_mnist_qat_int4.py", ["--config.num_epochs=1",
                                                                      *small])
    result = train.train_and_evaluate(config, workdir)
    assert [r["epoch"] for r in result.history] == [1] and "event" not in result.metrics
    assert [r.get("event", "epoch") for r in _records(workdir)] == ["epoch", "quantize"]


def test_jopt_quantize_rejects_an_unknown_mode(tmp_path, capsys):
    with pytest.raises(SystemExit):
        cli.main(["quantize", "--workdir", str(tmp_path), "--mode", "int3"])
    assert "invalid choice: 'int3'" in capsys.readouterr().err


def test_quantization_config_errors_name_the_key():
    for overrides, message in [
        (["--config.quantization.weights=int3"], "config.quantization.weights"),
        (["--config.quantization.activations=int4"], "config.quantization.activations"),
    ]:
        config = load_config(CONFIG_DIR / "fashion_mnist_qat_int4.py", overrides)
        with pytest.raises(train.ConfigError, match=message):
            train.validate_config(config)


def test_models_quantization_option():
    float_model, qat_model = MLP(), MLP(quantize_weights="ternary")
    images = jnp.linspace(0.0, 1.0, 2 * 784).reshape(2, 28, 28)
    variables = float_model.init(jax.random.key(0), images)
    assert jax.tree.structure(qat_model.init(jax.random.key(0), images)) == jax.tree.structure(
        variables)
    ternary = jax.tree.map(
        lambda p: quantization.fake_quantize(p, "ternary") if p.ndim == 2 else p, variables)
    np.testing.assert_allclose(qat_model.apply(variables, images),
                               float_model.apply(ternary, images), rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- regressions


def test_cnn_quantizes_dense_kernels_and_keeps_convolutions_float():
    """quantize_params' default used to quantize conv kernels, which nn.Conv cannot run."""
    from jopt.models import CNN

    model = CNN(conv_features=(4, 8), hidden_sizes=(16,))
    images = jax.random.uniform(jax.random.key(0), (4, 28, 28))
    variables = model.init(jax.random.key(1), images)
    qvariables = quantization.quantize_params(variables, "int8")
    q, p = qvariables["params"], variables["params"]
    for conv in ("conv_0", "conv_1"):
        assert not isinstance(q[conv]["kernel"], QuantizedTensor)
        np.testing.assert_array_equal(q[conv]["kernel"], p[conv]["kernel"])
    for dense in ("hidden_0", "logits"):
        assert isinstance(q["head"][dense]["kernel"], QuantizedTensor)
    logits = jax.jit(lambda v, x: quantization.quantized_apply(model, v, x))(qvariables, images)
    reference = model.apply(variables, images)
    assert logits.shape == (4, 10)
    np.testing.assert_allclose(logits, reference, atol=0.03 * float(jnp.abs(reference).max()))
    # The size report counts the conv kernels as float and only the dense kernels as codes.
    report = quantization.size_report(variables, qvariables)
    dense_size = 7 * 7 * 8 * 16 + 16 * 10  # 28 -> 14 -> 7 after two 2x2 poolings
    assert report["weight_float32_bytes"] == dense_size * 4
    assert report["weight_quantized_bytes"] == dense_size + (16 + 10) * 4
    float_bytes = sum(x.size * 4 for x in jax.tree.leaves(variables))
    assert report["quantized_bytes"] == float_bytes - dense_size * 4 + dense_size + 26 * 4
    # Quantizing a conv kernel anyway gives a clear error instead of a TypeError.
    forced = quantization.quantize_params(variables, include=lambda v: jax.tree.map(
        lambda x: x.ndim == 4, v))
    with pytest.raises(ValueError, match=r"Conv 'conv_0' has quantized parameters \['kernel'\]"):
        quantization.quantized_apply(model, forced, images)


def test_embedding_tables_and_2d_biases_stay_float():
    class Model(nn.Module):
        @nn.compact
        def __call__(self, tokens):
            return nn.DenseGeneral((2, 3))(nn.Dense(5)(nn.Embed(10, 4)(tokens)))

    model, tokens = Model(), jnp.array([[1, 2, 3]])
    variables = model.init(jax.random.key(0), tokens)
    q = quantization.quantize_params(variables)["params"]
    assert isinstance(q["Dense_0"]["kernel"], QuantizedTensor)
    assert not isinstance(q["Embed_0"]["embedding"], QuantizedTensor)
    assert not isinstance(q["DenseGeneral_0"]["bias"], QuantizedTensor)  # 2-D bias
    assert not isinstance(q["DenseGeneral_0"]["kernel"], QuantizedTensor)  # 3-D kernel
    reference = model.apply(variables, tokens)
    y = quantization.quantized_apply(model, {"params": q}, tokens)
    np.testing.assert_allclose(y, reference, atol=0.03 * float(jnp.abs(reference).max()))


def test_int8_matmul_with_per_input_channel_scales():
    """channel_axis=0 scales used to be applied per output channel (94% error)."""
    rng = np.random.default_rng(0)
    w = jnp.asarray(rng.normal(size=(16, 16)).astype(np.float32)) * jnp.linspace(0.01, 10, 16)
    x = jnp.asarray(rng.normal(size=(4, 16)).astype(np.float32))
    for channel_axis in (-1, None, 0):
        q = quantization.quantize(w, "int8", channel_axis=channel_axis)
        reference = np.asarray(x @ q.dequantize())
        error = np.abs(np.asarray(quantization.int8_matmul(x, q)) - reference).max()
        assert error < 0.01 * np.abs(reference).max(), channel_axis
    full = QuantizedTensor(q.codes, jnp.ones((16, 16)), "int8")
    with pytest.raises(ValueError, match=r"per output channel \[1, 16\].*got scale shape"):
        quantization.int8_matmul(x, full)


def test_packed_lengths_match_the_packer():
    for mode in MODES:
        for size in (0, 1, 7, 8, 9, 15, 16, 17):
            packed = quantization._pack_codes(np.zeros(size, np.int8), mode)
            assert packed.size == quantization._packed_length(mode, size), (mode, size)


def _assert_bad_file(path, *, match):
    with pytest.raises(ValueError, match=match) as info:
        quantization.load_quantized(path)
    message = str(info.value)
    assert str(path) in message and "jopt quantize" in message
    assert "pickle" not in message


@pytest.mark.parametrize("mode", MODES)
def test_truncated_codes_are_rejected(mode, tmp_path):
    """Packed binary/ternary codes cut short used to load, zero-padded, without error."""
    from jopt import _npz

    q = quantization.quantize_params({"w": _kernel(shape=(64, 32))}, mode)
    path = tmp_path / "q.npz"
    quantization.save_quantized(path, q)
    arrays, meta = _npz.read_npz(path)
    short = dict(arrays, **{"0.codes": arrays["0.codes"][: arrays["0.codes"].size * 3 // 4]})
    _npz.write_npz(path, short, meta)
    expected = {"int8": 2048, "int4": 1024, "ternary": 512, "binary": 256}[mode]
    _assert_bad_file(path, match=rf"leaf 0 \(w\): {mode} codes of shape \[64, 32\] take "
                                 rf"{expected} .* but {expected * 3 // 4} ")


def test_corrupt_and_foreign_files_give_value_errors(tmp_path):
    from jopt import _npz, pruning

    path = tmp_path / "q.npz"
    quantization.save_quantized(path, quantization.quantize_params(
        {"w": _kernel(), "b": jnp.zeros(6)}, "int4"))
    raw = path.read_bytes()
    cases = {
        "empty.npz": (b"", "the file is empty"),
        "truncated.npz": (raw[: len(raw) // 2], "not an .npz .zip. archive, or it is truncated"),
        "random.npz": (np.random.default_rng(0).bytes(1000), "not an .npz"),
    }
    for name, (content, match) in cases.items():
        (tmp_path / name).write_bytes(content)
        _assert_bad_file(tmp_path / name, match=match)
    np.save(tmp_path / "single.npy", np.ones(3))
    _assert_bad_file(tmp_path / "single.npy", match="single .npy array")
    arrays, meta = _npz.read_npz(path)
    np.savez(tmp_path / "json.npz", **arrays, __jopt_meta__=np.array("{not json"))
    _assert_bad_file(tmp_path / "json.npz", match="header is not valid JSON")
    missing = {k: v for k, v in arrays.items() if k != "0.array"}
    _npz.write_npz(tmp_path / "missing.npz", missing, meta)
    _assert_bad_file(tmp_path / "missing.npz", match="has no '0.array'")
    pruning.save_sparse(tmp_path / "sparse.npz", pruning.strip({"w": np.eye(8, dtype=np.float32)}))
    _assert_bad_file(tmp_path / "sparse.npz", match="jopt.pruning.load_sparse")
    # The other direction: load_sparse on a quantized file names the right loader.
    with pytest.raises(ValueError, match="jopt.quantization.load_quantized"):
        pruning.load_sparse(path)
    # And load_quantized still reads the intact file.
    assert isinstance(quantization.load_quantized(path)["w"], QuantizedTensor)
