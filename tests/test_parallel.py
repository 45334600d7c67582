"""Tests for jopt.parallel and jopt.distributed on 8 simulated CPU devices."""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax import lax
from jax.sharding import AxisType, Mesh
from jax.sharding import PartitionSpec as P

import jopt
from jopt import data, distributed, storage
from jopt.flat import FlatParams
from jopt.parallel import (
    DataParallel,
    check_batch_size,
    communication_bytes,
    int8_pmean,
)
from hlo_checks import convolutions_in_ynn_fusions

# Data parallelism over the 8 simulated CPU devices of conftest.py.
pytestmark = pytest.mark.eight_devices

GLOBAL_BATCH = 128
HIDDEN = 48  # 784-48-10: 38,170 params, so a ZeRO-1 slice on 8 devices (4,864) is int8-quantized


@pytest.fixture(scope="module")
def batches():
    """Fashion-MNIST, 2,048 training images: one epoch of 16 global batches of 128."""
    ds = data.subset(data.load("fashion_mnist", download=False), train=2048, test=16)
    steps = len(ds.train_images) // GLOBAL_BATCH
    return {"image": ds.train_images.reshape(steps, GLOBAL_BATCH, 28, 28),
            "label": ds.train_labels.reshape(steps, GLOBAL_BATCH)}


def _init_params(seed=0):
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {"hidden": {"w": jax.random.normal(k1, (784, HIDDEN)) / 28.0, "b": jnp.zeros(HIDDEN)},
            "out": {"w": jax.random.normal(k2, (HIDDEN, 10)) / HIDDEN**0.5, "b": jnp.zeros(10)}}


def _loss_fn(params, batch):
    x = batch["image"].reshape(batch["image"].shape[0], -1).astype(jnp.float32) / 255.0
    h = jax.nn.relu(x @ params["hidden"]["w"] + params["hidden"]["b"])
    logits = h @ params["out"]["w"] + params["out"]["b"]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean()
    return loss, {"accuracy": jnp.mean(jnp.argmax(logits, -1) == batch["label"])}


def _flat_loss_fn(flat, batch):
    return _loss_fn(flat.unpack(), batch)


def _train(strategy, optimizer, batches, *, params=None, epochs=1, loss_fn=_loss_fn, **kwargs):
    trainer = DataParallel(loss_fn, optimizer, strategy=strategy, **kwargs)
    state = trainer.init(_init_params() if params is None else params)
    for _ in range(epochs):
        state, metrics = trainer.train_epoch(state, batches)
    return trainer, state, metrics


def _host(tree):
    return jax.tree.map(np.asarray, tree)


def _max_diff(a, b):
    return max(float(np.max(np.abs(np.asarray(x) - np.asarray(y))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


@pytest.fixture(scope="module")
def single_device(batches):
    """The reference: one device, Adam, one epoch."""
    trainer, state, metrics = _train("none", jopt.adam(1e-3), batches)
    return _host(trainer.params(state)), _host(metrics)


# ------------------------------------------------------------------ equivalence


@pytest.mark.parametrize("strategy", ["pmap", "shard_map", "zero1"])
def test_data_parallel_matches_single_device(strategy, batches, single_device):
    assert jax.device_count() == 8
    trainer, state, metrics = _train(strategy, jopt.adam(1e-3), batches)
    expected_params, expected_metrics = single_device
    params = trainer.params(state)
    assert _max_diff(params, expected_params) < 1e-5
    assert _max_diff(params, _init_params()) > 1e-3  # it trained
    np.testing.assert_allclose(metrics.loss, expected_metrics.loss, rtol=1e-5)
    np.testing.assert_allclose(metrics.aux["accuracy"], expected_metrics.aux["accuracy"],
                               atol=1e-6)
    # Replicated results come back unstacked (out_axes=None / out_specs=P()): no
    # leading device axis, one logical copy, nothing to unreplicate.
    leaf = params["hidden"]["w"]
    assert leaf.shape == (784, HIDDEN) and leaf.sharding.is_fully_replicated
    assert len(leaf.sharding.device_set) == 8


def test_zero1_with_int8_state_shards_the_codes(batches):
    optimizer = jopt.adam(1e-3, state_storage="int8")
    # Reference: the same optimizer on the same flat buffer on one device.
    reference, ref_state, ref_metrics = _train(
        "none", optimizer, batches, loss_fn=_flat_loss_fn, params=FlatParams.pack(_init_params()))
    expected = reference.params(ref_state).unpack()
    # On one device ZeRO-1 is the same computation: same blocks, same codes.
    one, state, _ = _train("zero1", optimizer, batches, devices=jax.devices()[:1])
    assert _max_diff(one.params(state), expected) < 1e-6

    trainer, state, metrics = _train("zero1", optimizer, batches)
    mu = state.opt_state[0].mu.buffers["float32"]
    assert isinstance(mu, storage.QuantizedArray)  # each slice is big enough to quantize
    padded = state.params.layout.sizes[0]
    assert padded % (8 * 256) == 0
    for shard in mu.codes.addressable_shards:  # each device holds its 1/8 of the codes
        assert shard.data.shape == (padded // 8 // 256, 256)
    device = jax.devices()[0]
    per_device = sum(s.data.nbytes for leaf in jax.tree.leaves(state.opt_state)
                     for s in leaf.addressable_shards if s.device == device)
    assert per_device / storage.state_nbytes(ref_state.opt_state) <= 0.13
    # On 8 devices the gradient is summed in another order, and int8 rounding turns
    # float32-level differences into code flips: close, not identical.
    np.testing.assert_allclose(metrics.loss, ref_metrics.loss, rtol=1e-2)
    assert _max_diff(trainer.params(state), expected) < 0.05


class _MuNu(NamedTuple):
    mu: Any
    nu: Any


def test_zero1_slices_draw_their_own_rounding_noise(batches):
    # Each device updates its slice with the same optimizer: same salt, same
    # counter. Moments that ignore the gradient and repeat every 256 values are the
    # same on every slice, halfway between int8 levels: the slices' codes must still
    # round independently (they were identical), as the whole buffer's would.
    def rule(grad, moments, count):
        del moments, count
        block_max = jnp.arange(grad.shape[-1]) % 256 == 0
        mu = jnp.where(block_max, 1.0, 0.6) + 0.0 * grad  # + 0 g: varies over devices
        return jnp.zeros_like(grad), (mu, mu * mu)

    optimizer = jopt.lift.lift(rule, state_class=_MuNu, moments=[
        jopt.lift.Moment("mu", signed=True), jopt.lift.Moment("nu", signed=False)],
        state_storage="int8")
    one_batch = jax.tree.map(lambda x: x[:1], batches)
    _, state, _ = _train("zero1", optimizer, one_batch, check_optimizer=False)
    for field in ("mu", "nu"):
        codes = np.asarray(getattr(state.opt_state, field).buffers["float32"].codes)
        slices = codes.reshape(8, -1)
        assert all(np.mean(slices[0] != other) > 0.2 for other in slices[1:]), field


def test_zero1_traces_a_jitted_optimizer_update_again(batches):
    # An update the user jitted is cached across traces: the slice's place in the
    # buffer must come from the axis name at trace time, not from a tracer captured
    # by the first trace (an epoch of another length traces the step again).
    inner = jopt.adam(1e-3, state_storage="int8")
    optimizer = optax.GradientTransformation(inner.init, jax.jit(inner.update))
    trainer = DataParallel(_loss_fn, optimizer, strategy="zero1", check_optimizer=False)
    state = trainer.init(_init_params())
    for steps in (2, 1):
        state, _ = trainer.train_epoch(state, jax.tree.map(lambda x: x[:steps], batches))
    codes = np.asarray(state.opt_state[0].mu.buffers["float32"].codes).reshape(8, -1)
    assert np.mean(codes[0] != codes[1]) > 0.5  # the slices hold different values


def test_zero1_rejects_non_elementwise_optimizer():
    optimizer = optax.chain(jopt.clip_by_global_norm(1.0), jopt.adam(1e-3))
    with pytest.raises(ValueError, match="must be elementwise.*clip_by_global_norm"):
        DataParallel(_loss_fn, optimizer, strategy="zero1").init(_init_params())
    # The same optimizer is fine with replicated state.
    DataParallel(_loss_fn, optimizer, strategy="shard_map").init(_init_params())


# ------------------------------------------------------------------ checkpoints


def test_resume_on_another_device_count(batches):
    short = jax.tree.map(lambda x: x[:4], batches)
    optimizer = jopt.adagrad(0.05)  # non-zero initial state: the padding must keep it
    # Uninterrupted: two epochs on 8 devices.
    trainer, state, _ = _train("zero1", optimizer, short, epochs=2)
    expected = _host(trainer.params(state))

    trainer, state, _ = _train("zero1", optimizer, short)
    saved = _host(trainer.checkpoint_state(state))  # what a checkpoint holds
    raw = saved._replace(opt_state=_host(state.opt_state))  # the sharded form, gathered
    assert saved.opt_state[0].sum_of_squares.buffers["float32"].shape == (38170,)
    for strategy, devices in [("zero1", jax.devices()[:2]), ("zero1", jax.devices()[2:5]),
                              ("shard_map", jax.devices()[:4])]:
        if strategy == "shard_map":  # replicated flat state reads the same checkpoint
            resumed = DataParallel(_flat_loss_fn, optimizer, strategy=strategy,
                                   devices=devices)
            saved_flat = saved._replace(params=FlatParams.pack(saved.params))
            state = resumed.restore_state(saved_flat)
            state, _ = resumed.train_epoch(state, short)
            got = resumed.params(state).unpack()
        else:
            if len(devices) == 3:  # 4 x 128 rows do not split over 3 devices
                continue
            resumed = DataParallel(_loss_fn, optimizer, strategy=strategy, devices=devices)
            state, _ = resumed.train_epoch(resumed.restore_state(saved), short)
            got = resumed.params(state)
        assert _max_diff(got, expected) < 1e-5, (strategy, len(devices))

    on_two = DataParallel(_loss_fn, optimizer, strategy="zero1", devices=jax.devices()[:2])
    with pytest.raises(ValueError, match="another number of devices"):
        on_two.restore_state(raw)
    with pytest.raises(ValueError, match="another model or optimizer"):
        on_two.restore_state(saved._replace(opt_state=jopt.adam(1e-3).init(
            FlatParams.pack(saved.params))))


@pytest.mark.parametrize("state_storage", ["int8", "bfloat16"])
def test_zero1_low_precision_state_resumes_exactly(batches, state_storage):
    # A checkpoint holds the state in the replicated layout: int8 codes are decoded
    # and encoded again on restore. Their encode counters travel with them, so the
    # resumed run draws the rounding noise the uninterrupted one drew (the counter
    # restarted at 0 and the resumed run replayed the first step's noise).
    short = jax.tree.map(lambda x: x[:4], batches)
    optimizer = jopt.adam(1e-3, state_storage=state_storage)
    trainer, state, _ = _train("zero1", optimizer, short, epochs=2)
    expected = _host(trainer.params(state))
    trainer, state, _ = _train("zero1", optimizer, short)
    saved = _host(trainer.checkpoint_state(state))
    resumed = DataParallel(_loss_fn, optimizer, strategy="zero1")
    state, _ = resumed.train_epoch(resumed.restore_state(saved), short)
    assert _max_diff(resumed.params(state), expected) == 0.0


def test_zero1_stores_a_small_slice_as_the_whole_buffer_is_stored(batches):
    # 784-8-10: 6,370 params, 1,024 per device slice - under int8's min_size (4096),
    # over it as a whole buffer. The slices are int8 as the replicated state (and
    # a checkpoint) would be, so a checkpoint round trip changes nothing: they were
    # float32, quantized only in the checkpoint, and the resumed run drifted.
    k1, k2 = jax.random.split(jax.random.key(0))
    params = {"hidden": {"w": jax.random.normal(k1, (784, 8)) / 28.0, "b": jnp.zeros(8)},
              "out": {"w": jax.random.normal(k2, (8, 10)) / 8.0, "b": jnp.zeros(10)}}
    short = jax.tree.map(lambda x: x[:2], batches)
    optimizer = jopt.adam(1e-3, state_storage="int8")
    trainer, state, _ = _train("zero1", optimizer, short, params=params)
    mu = state.opt_state[0].mu.buffers["float32"]
    assert isinstance(mu, storage.QuantizedArray) and mu.codes.shape[0] * 256 // 8 == 1024
    saved = _host(trainer.checkpoint_state(state))
    expected, _ = trainer.train_epoch(state, short)
    resumed = DataParallel(_loss_fn, optimizer, strategy="zero1")
    got, _ = resumed.train_epoch(resumed.restore_state(saved), short)
    assert _max_diff(resumed.params(got), trainer.params(expected)) == 0.0


def test_checkpoint_reencode_gives_the_int8_codes_back():
    # ZeRO-1 checkpoints decode int8 state and encode it again (twice per round
    # trip). The values sit on levels up to float rounding, so round-to-nearest
    # returns every code; stochastic rounding moved a few per million.
    from jopt.parallel import _decode, _encode_like

    codec = storage.Int8BlockStorage(min_size=0)
    v = jax.random.normal(jax.random.key(0), (1 << 20,)) * jnp.exp(
        jax.random.normal(jax.random.key(1), (1 << 20,)))
    for value, signed in ((v, True), (v * v, False)):
        stored = jax.jit(lambda x: codec.encode(x, like=x, signed=signed))(value)
        again = jax.jit(lambda q: _encode_like(_decode(q), q, q.step))(stored)
        np.testing.assert_array_equal(np.asarray(again.codes), np.asarray(stored.codes))
        np.testing.assert_array_equal(np.asarray(again.scales), np.asarray(stored.scales))
        assert int(again.step) == int(stored.step)


# ------------------------------------------------------------------ compression


def test_int8_pmean_error_feedback_keeps_the_sum():
    """Sum of applied means == sum of true means - residuals (the feedback identity)."""
    n, size, steps = 8, 8 * 512, 5
    mesh = Mesh(np.asarray(jax.devices()), ("batch",), axis_types=(AxisType.Auto,))
    grads = np.random.default_rng(0).normal(size=(steps, n, size)).astype(np.float32)
    grads *= np.geomspace(1e-3, 1.0, size, dtype=np.float32)  # many scales per block

    def run(g):
        def step(carry, g_t):
            worker, server, total = carry
            mean, worker, server = int8_pmean(g_t[0], worker, server, "batch")
            return (worker, server, total + mean), mean
        init = (jnp.zeros(size), jnp.zeros(size // n), jnp.zeros(size))
        (worker, server, total), means = lax.scan(step, init, g)
        return total, lax.all_gather(worker, "batch"), lax.all_gather(server, "batch",
                                                                       tiled=True), means
    total, worker, server, means = jax.jit(jax.shard_map(
        run, mesh=mesh, in_specs=P(None, "batch"), out_specs=P(), check_vma=False))(grads)
    true_mean = grads.mean(axis=1)
    # One step: error at most half a quantization step of each of the two stages.
    block_max = np.abs(true_mean[0]).reshape(-1, 256).max(1).repeat(256)
    assert np.all(np.abs(means[0] - true_mean[0]) <= 2 * block_max / 127 + 1e-6)
    # Over all steps nothing is lost except what the residuals still hold.
    np.testing.assert_allclose(
        total, true_mean.sum(0) - np.asarray(worker).mean(0) - np.asarray(server), atol=1e-5)


def test_compression_sends_a_quarter_of_the_bytes(batches, single_device):
    short = jax.tree.map(lambda x: x[:4], batches)
    sent = {}
    for compression in (None, "int8"):
        trainer, state, metrics = _train("shard_map", jopt.adam(1e-3), short,
                                         compression=compression)
        sent[compression] = communication_bytes(trainer.epoch_hlo(state, short), 8)
    params = 38170
    assert sent[None]["all-reduce"] == pytest.approx(2 * 7 / 8 * 4 * params, rel=0.01)
    ratio = sent["int8"]["total"] / sent[None]["total"]
    assert 0.24 < ratio < 0.27
    assert set(state.residuals) == {"worker", "server"}
    assert state.residuals["worker"]["float32"].shape == (8, 38912)  # one row per device
    # Training still follows the uncompressed run closely over these 4 steps.
    np.testing.assert_allclose(metrics.loss, single_device[1].loss[:4], rtol=2e-3)


# ------------------------------------------------------------------ errors


def test_batch_not_divisible_names_both_numbers_and_the_fix(batches):
    with pytest.raises(ValueError, match=r"global batch size 100 .* 8 devices.* 96 or 104"):
        check_batch_size(100, 8)
    check_batch_size(96, 8)
    trainer = DataParallel(_loss_fn, jopt.sgd(0.1), strategy="shard_map")
    uneven = jax.tree.map(lambda x: x[:, :100], batches)
    with pytest.raises(ValueError, match="global batch size 100"):
        trainer.shard_batches(uneven)


def test_bad_arguments():
    with pytest.raises(ValueError, match="strategy='ddp' is not one of"):
        DataParallel(_loss_fn, jopt.sgd(0.1), strategy="ddp")
    with pytest.raises(ValueError, match="compression='fp8'"):
        DataParallel(_loss_fn, jopt.sgd(0.1), compression="fp8")
    with pytest.raises(ValueError, match="strategy='none' exchanges nothing"):
        DataParallel(_loss_fn, jopt.sgd(0.1), strategy="none", compression="int8")


def test_distributed_settings_from_flags_and_environment():
    assert distributed.resolve(environ={}) is None
    assert distributed.resolve("h:1", 1, 0, environ={}) is None  # one process: nothing to join
    env = {"JOPT_COORDINATOR": "10.0.0.1:9876", "JOPT_NUM_PROCESSES": "4",
           "JOPT_PROCESS_ID": "3"}
    assert distributed.resolve(environ=env) == distributed.DistributedConfig(
        "10.0.0.1:9876", 4, 3)
    assert distributed.resolve(process_id=1, environ=env).process_id == 1  # flags win
    with pytest.raises(ValueError, match=r"--process-id 2 is out of range for "
                                         r"--num-processes 2: .* 0 \.\. 1"):
        distributed.resolve("127.0.0.1:1234", 2, 2, environ={})
    with pytest.raises(ValueError, match="needs --coordinator HOST:PORT"):
        distributed.resolve(None, 2, 0, environ={})
    with pytest.raises(ValueError, match="is not HOST:PORT"):
        distributed.resolve("127.0.0.1", 2, 0, environ={})
    with pytest.raises(ValueError, match="needs --process-id"):
        distributed.resolve("127.0.0.1:1234", 2, None, environ={})
    with pytest.raises(ValueError, match="needs --num-processes"):
        distributed.resolve("127.0.0.1:1234", None, 0, environ={})
    with pytest.raises(ValueError, match="must be an integer"):
        distributed.resolve("127.0.0.1:1234", "two", 0, environ={})


# ------------------------------------------------------------------ jopt train's loop


def test_loop_epochs_follow_the_one_device_loop():
    """LoopEpochs keeps train.build_epoch_fn's contract and results."""
    from jopt import train
    from jopt.cli import load_config
    from jopt.parallel import LoopEpochs

    config = load_config("configs/fashion_mnist_mlp.py")
    ds = data.subset(data.load("fashion_mnist", download=False), train=1024, test=16)
    model = train.create_model(config)
    tx = train.create_optimizer(config, steps_per_epoch=8)
    loss_fn = train.make_loss_fn(train.make_apply_fn(model))
    images, labels = jax.device_put(ds.train_images), jax.device_put(ds.train_labels)

    def two_epochs(epoch_fn, restore):
        state = train.init_train_state(config, model, tx, (28, 28))
        for epoch in (1, 2):
            indices = train.shuffle_batches(train.epoch_key(0, epoch), 1024, GLOBAL_BATCH)
            state, metrics = epoch_fn(state, images, labels, indices)
            if restore:  # as if restored from a checkpoint: a state it did not hand out
                state = jax.tree.map(jnp.copy, state)
        return state, jax.device_get(metrics)

    expected, expected_metrics = two_epochs(train.build_epoch_fn(config, loss_fn, tx), False)
    state, metrics = two_epochs(
        LoopEpochs(loss_fn, tx, strategy="zero1", batch_size=GLOBAL_BATCH), True)
    assert jax.tree.structure(state) == jax.tree.structure(expected)  # checkpoints agree
    assert int(state.step) == 16 and metrics["num_correct"] == expected_metrics["num_correct"]
    np.testing.assert_allclose(metrics["loss_sum"], expected_metrics["loss_sum"], rtol=1e-5)
    assert _max_diff(state, expected) < 1e-5
    with pytest.raises(ValueError, match="global batch size 100 does not split evenly"):
        LoopEpochs(loss_fn, tx, strategy="shard_map", batch_size=100)


def test_jopt_train_rejects_what_data_parallelism_cannot_do(tmp_path, capsys):
    from jopt import cli

    config = "configs/fashion_mnist_zero1.py"
    cases = [
        (["--config.optimizer.clip_global_norm=1.0"], "'zero1' cannot clip by the global norm"),
        (["--config.pruning.schedule=one_shot"], "'zero1' cannot prune"),
        (["--config.parallel=none", "--config.gradient_compression=int8"],
         "compresses the gradient exchange between devices"),
        (["--config.gradient_compression=fp8"], "gradient_compression='fp8' is not supported"),
        (["--config.batch_size=100", "--config.train_subset=512"],
         "global batch size 100 does not split evenly over 8 devices"),
        (["--coordinator", "127.0.0.1:1", "--num-processes", "2", "--process-id", "2"],
         "--process-id 2 is out of range for --num-processes 2"),
    ]
    for arguments, message in cases:
        assert cli.main(["train", "--config", config, "--workdir", str(tmp_path),
                         *arguments]) == 2, arguments
        assert message in capsys.readouterr().err


@pytest.mark.parametrize("strategy", ["none", "pmap", "shard_map", "zero1"])
def test_epochs_compile_once(strategy, batches, caplog):
    # The state from init() is placed like the epoch's outputs, so the second epoch
    # reuses the first one's executable (it used to recompile for "none").
    trainer, state, _ = _train(strategy, jopt.adam(1e-3), batches)
    batches = trainer.shard_batches(batches)
    with jax.log_compiles(True), caplog.at_level("WARNING"):
        for _ in range(2):
            state, metrics = trainer.train_epoch(state, batches)
        jax.block_until_ready(metrics)
    compiled = [r.getMessage() for r in caplog.records if "Compiling" in r.getMessage()]
    assert compiled == []  # the first epoch logs its compilations the same way


# ------------------------------------------------------------------ regressions


def _linear_loss(params, batch):
    return jnp.mean((batch["x"] @ params["w"] + params["b"] - batch["y"]) ** 2), {}


def _linear_problem(steps=2, batch=16):
    rng = np.random.default_rng(0)
    batches = {"x": rng.normal(size=(steps, batch, 5)).astype(np.float32),
               "y": rng.normal(size=(steps, batch, 2)).astype(np.float32)}
    params = {"w": jnp.asarray(rng.normal(size=(5, 2)), jnp.float32), "b": jnp.ones(2)}
    return params, batches


def _run_linear(strategy, optimizer, params, batches, **kwargs):
    loss_fn = kwargs.pop("loss_fn", _linear_loss)
    trainer = DataParallel(loss_fn, optimizer, strategy=strategy, **kwargs)
    state, metrics = trainer.train_epoch(trainer.init(params), batches)
    return _host(trainer.params(state)), _host(metrics), state


def _no_bias(params):
    return jax.tree.map(lambda x: x.ndim > 1, params)


@pytest.mark.parametrize("mask", ["tree", "function"])
def test_zero1_applies_masked_weight_decay(mask):
    """ZeRO-1 shards resolve jopt masks per element (they used to decay nothing or crash)."""
    mask = {"w": True, "b": False} if mask == "tree" else _no_bias
    params, batches = _linear_problem()
    expected, _, _ = _run_linear("none", jopt.adamw(0.1, weight_decay=0.5, mask=mask),
                                 params, batches)
    undecayed, _, _ = _run_linear("none", jopt.adamw(0.1, weight_decay=0.0), params, batches)
    assert _max_diff(expected, undecayed) > 0.05  # the decay of "w" matters
    got, _, _ = _run_linear("zero1", jopt.adamw(0.1, weight_decay=0.5, mask=mask),
                            params, batches)
    assert _max_diff(got, expected) < 1e-5
    # jopt.flat.masked around any elementwise transformation, and a flat-mode run
    # (the mask function always sees the original tree).
    masked_decay = optax.chain(jopt.scale_by_adam(),
                               jopt.flat.masked(optax.add_decayed_weights(0.5), mask),
                               optax.scale(-0.1))
    got, _, _ = _run_linear("zero1", masked_decay, params, batches)
    assert _max_diff(got, expected) < 1e-5
    flat_loss = lambda f, b: _linear_loss(f.unpack(), b)  # noqa: E731
    flat_params = FlatParams.pack(params)
    got, _, _ = _run_linear("zero1", jopt.adamw(0.1, weight_decay=0.5, mask=mask),
                            flat_params, batches, loss_fn=flat_loss)
    assert _max_diff(got.unpack(), expected) < 1e-5


def test_zero1_rejects_optimizers_that_differ_on_packed_buffers():
    """optax's own masks see two 1-D buffers under ZeRO-1: an error, not lost decay."""
    params, batches = _linear_problem()
    for mask in (_no_bias, {"w": True, "b": False}):
        optimizer = optax.adamw(0.1, weight_decay=0.5, mask=mask)
        with pytest.raises(ValueError, match=r"packed.*differently.*jopt\.adamw\(mask="):
            DataParallel(_linear_loss, optimizer, strategy="zero1").init(params)
        # With replicated state the tree reaches the optimizer: fine.
        DataParallel(_linear_loss, optimizer, strategy="shard_map").init(params)
    # Unmasked, optax.adamw is elementwise on the buffers and passes.
    expected, _, _ = _run_linear("none", optax.adamw(0.1, weight_decay=0.5), params, batches)
    got, _, _ = _run_linear("zero1", optax.adamw(0.1, weight_decay=0.5), params, batches)
    assert _max_diff(got, expected) < 1e-5


@pytest.mark.parametrize("strategy, bad", [("shard_map", np.inf), ("shard_map", np.nan),
                                           ("zero1", np.inf)])
def test_int8_compression_recovers_from_a_non_finite_gradient(strategy, bad):
    """One inf/NaN gradient reaches the optimizer as non-finite (a NaN block used to
    decode as finite garbage), and no longer poisons the residuals for good."""
    params, batches = _linear_problem(steps=4)
    batches["x"][0, 3, 0] = bad  # one bad example in the first step only
    if strategy == "zero1":  # elementwise: drop the non-finite entries of the update
        finite = optax.stateless(lambda u, p: jax.tree.map(
            lambda x: jnp.where(jnp.isfinite(x), x, 0.0), u))
        optimizer = optax.chain(finite, optax.adam(0.1))
    else:  # skips the step: a reduction over all parameters
        optimizer = optax.apply_if_finite(optax.adam(0.1), 10)
    expected, expected_metrics, _ = _run_linear("none", optimizer, params, batches)
    got, metrics, state = _run_linear(strategy, optimizer, params, batches,
                                      compression="int8")
    assert all(np.isfinite(np.asarray(r)).all() for r in jax.tree.leaves(state.residuals))
    assert not np.isfinite(metrics.loss[0]) and np.isfinite(metrics.loss[1:]).all()
    assert _max_diff(got, params) > 0.1  # later steps were applied...
    np.testing.assert_allclose(metrics.loss[1:], expected_metrics.loss[1:], rtol=0.02)
    assert _max_diff(got, expected) < 0.02  # ...as without compression, up to int8 rounding


def test_pmap_splits_jax_array_batches_like_host_arrays():
    params, batches = _linear_problem(batch=16)
    expected, expected_metrics, _ = _run_linear("none", jopt.adam(0.1), params, batches)
    on_device = jax.tree.map(jnp.asarray, batches)
    got, metrics, _ = _run_linear("pmap", jopt.adam(0.1), params, on_device)
    assert _max_diff(got, expected) < 1e-5
    np.testing.assert_allclose(metrics.loss, expected_metrics.loss, rtol=1e-5)
    trainer = DataParallel(_linear_loss, jopt.adam(0.1), strategy="pmap")
    state = trainer.init(params)
    _, uneven = _linear_problem(batch=3)
    with pytest.raises(ValueError, match="global batch size 3 does not split evenly"):
        trainer.train_epoch(state, jax.tree.map(jnp.asarray, uneven))
    # shard_batches' output is taken as it is (no second split).
    state, metrics = trainer.train_epoch(state, trainer.shard_batches(batches))
    np.testing.assert_allclose(metrics.loss, expected_metrics.loss, rtol=1e-5)


def test_compiler_options_reach_the_data_parallel_epoch(batches):
    """jopt train's CNN options (convolutions out of YNNPACK on CPU) apply to the
    jit-compiled strategies too: DataParallel passes ``compiler_options`` to the epoch."""
    from jopt import models, train
    from jopt.cli import load_config
    from jopt.models import CNN

    config = load_config("configs/cnn.py", ["--config.parallel=shard_map"])
    model = train.create_model(config)
    tx = train.create_optimizer(config, steps_per_epoch=1)
    loop = train.build_epoch_fn(config, train.make_loss_fn(train.make_apply_fn(model)), tx)
    assert loop.trainer.compiler_options == (models.conv_compiler_options() or None)

    cnn = CNN(conv_features=(32, 64), hidden_sizes=(16,))  # 8 images per device

    def loss_fn(params, batch):
        logits = cnn.apply(params, batch["image"].astype(jnp.float32) / 255.0)
        return optax.softmax_cross_entropy_with_integer_labels(logits, batch["label"]).mean(), {}

    params = jax.jit(cnn.init)(jax.random.key(0), jnp.zeros((1, 28, 28)))
    short = jax.tree.map(lambda x: x[:1, :64], batches)
    trainer = DataParallel(loss_fn, optax.sgd(0.1), strategy="shard_map",
                           compiler_options=models.conv_compiler_options())
    hlo = trainer.epoch_hlo(trainer.init(params), short)
    convolutions = [line for line in hlo.splitlines() if " convolution(" in line]
    assert len(convolutions) == 5
    assert convolutions_in_ynn_fusions(hlo) == 0
