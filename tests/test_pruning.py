"""Tests for jopt.pruning: schedules, masks, the optimizer wrapper, sparse export."""

import doctest
import json
import pathlib

import hypothesis
import hypothesis.strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jopt
from jopt import data, pruning, train
from jopt.cli import load_config
from jopt.flat import FlatParams

from jax_events import compile_events


def _params(seed=0):
    """A small MLP-shaped tree: two kernels (prunable), two biases (not)."""
    k1, k2 = jax.random.split(jax.random.key(seed))
    return {
        "dense_0": {"kernel": jax.random.normal(k1, (16, 8)), "bias": jnp.full(8, 0.01)},
        "dense_1": {"kernel": 3.0 * jax.random.normal(k2, (8, 4)), "bias": jnp.full(4, 0.01)},
    }


def _loss(params, x, y):
    h = jnp.tanh(x @ params["dense_0"]["kernel"] + params["dense_0"]["bias"])
    return jnp.mean((h @ params["dense_1"]["kernel"] + params["dense_1"]["bias"] - y) ** 2)


# ----------------------------------------------------------------------------- schedules


def _zhu_gupta(t, s_i, s_f, t0, t1, power=3.0):
    p = min(max((t - t0) / (t1 - t0), 0.0), 1.0)
    return s_f + (s_i - s_f) * (1.0 - p) ** power


@hypothesis.settings(max_examples=40, deadline=None)
@hypothesis.given(
    s_i=st.floats(0.0, 0.5), extra=st.floats(0.0, 0.49), t0=st.integers(0, 1000),
    n=st.integers(1, 20), dt=st.integers(1, 100), offset=st.integers(-50, 2500),
)
def test_polynomial_schedule_matches_zhu_gupta(s_i, extra, t0, n, dt, offset):
    s_f = s_i + extra
    t1 = t0 + n * dt
    schedule = pruning.polynomial_decay(s_i, s_f, t0, t1, frequency=dt)
    t = max(t0 + offset, 0)
    np.testing.assert_allclose(float(schedule.sparsity(t)), _zhu_gupta(t, s_i, s_f, t0, t1),
                               rtol=1e-5, atol=1e-6)
    expected_update = t0 <= t <= t1 and (t - t0) % dt == 0
    assert bool(schedule.should_update(t)) == expected_update


def test_schedule_update_steps():
    poly = pruning.polynomial_decay(0.0, 0.9, 10, 45, frequency=10)
    # Every frequency steps in [begin, end], and the end step even when not aligned.
    assert [t for t in range(100) if poly.should_update(t)] == [10, 20, 30, 40, 45]
    assert float(poly.sparsity(0)) == 0.0 and float(poly.sparsity(45)) == pytest.approx(0.9)
    assert float(poly.sparsity(1000)) == pytest.approx(0.9)
    once = pruning.one_shot(0.8, step=7)
    assert [t for t in range(50) if once.should_update(t)] == [7]
    const = pruning.constant_sparsity(0.5, begin_step=3, end_step=13, frequency=5)
    assert [t for t in range(50) if const.should_update(t)] == [3, 8, 13]
    forever = pruning.constant_sparsity(0.5, frequency=4)
    assert [t for t in range(13) if forever.should_update(t)] == [0, 4, 8, 12]
    assert {float(const.sparsity(t)) for t in range(20)} == {0.5}


@hypothesis.settings(max_examples=60, deadline=None)
@hypothesis.given(
    values=st.lists(
        st.sampled_from([0.0, -0.0, 0.5, -0.5, 1.0, 2.5, float("inf"), -float("inf"),
                         float("nan"), 1e-30, -3.0])
        | st.floats(width=32, allow_subnormal=False),
        min_size=1, max_size=200),
    fraction=st.floats(0.0, 1.0),
)
def test_keep_largest_is_a_stable_sort_cut(values, fraction):
    """The mask equals the one read off a stable argsort (NumPy's, NaN last, -0.0 == 0.0):
    exactly ``num_pruned`` values pruned, ties cut by position. (No subnormals: XLA
    may flush them to zero, as CPUs and GPUs do in float32.)"""
    scores = np.asarray(values, np.float32)
    num_pruned = int(round(fraction * scores.size))
    order = np.argsort(scores, kind="stable")
    expected = np.ones(scores.size, bool)
    expected[order[:num_pruned]] = False
    keep = jax.jit(pruning._keep_largest)(jnp.asarray(scores), jnp.int32(num_pruned))
    np.testing.assert_array_equal(np.asarray(keep), expected)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, float("nan")])
def test_invalid_sparsity_is_rejected(bad):
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        pruning.one_shot(bad)
    with pytest.raises(ValueError, match=r"final_sparsity must be in \[0, 1\)"):
        pruning.polynomial_decay(0.0, bad, 0, 10)
    with pytest.raises(ValueError, match=r"sparsity must be in \[0, 1\)"):
        pruning.compute_masks(_params(), bad)


def test_invalid_schedule_arguments():
    with pytest.raises(ValueError, match="end_step must be an integer > begin_step"):
        pruning.polynomial_decay(0.0, 0.5, 10, 10)
    with pytest.raises(ValueError, match="frequency must be an integer >= 1"):
        pruning.polynomial_decay(0.0, 0.5, 0, 10, frequency=0)
    with pytest.raises(ValueError, match="must not exceed final_sparsity"):
        pruning.polynomial_decay(0.6, 0.5, 0, 10)
    with pytest.raises(TypeError, match="SparsitySchedule"):
        pruning.prune(jopt.sgd(0.1), 0.5)


# ----------------------------------------------------------------------------- masks


def test_per_layer_masks_prune_each_array_exactly():
    params = _params()
    masks = pruning.compute_masks(params, 0.75)
    for layer in ("dense_0", "dense_1"):
        kernel, keep = np.asarray(params[layer]["kernel"]), np.asarray(masks[layer]["kernel"])
        assert keep.dtype == bool and (~keep).sum() == round(0.75 * kernel.size)
        # The pruned entries are the smallest magnitudes of that array.
        assert np.abs(kernel[~keep]).max() <= np.abs(kernel[keep]).min()
        assert np.asarray(masks[layer]["bias"]).all()  # 1-D arrays are not pruned


def test_global_masks_use_one_threshold():
    params = _params()  # dense_1's kernel is 3x larger in scale than dense_0's
    masks = pruning.compute_masks(params, 0.5, granularity="global")
    kernels = [np.asarray(params[k]["kernel"]) for k in ("dense_0", "dense_1")]
    keeps = [np.asarray(masks[k]["kernel"]) for k in ("dense_0", "dense_1")]
    magnitudes = np.abs(np.concatenate([k.ravel() for k in kernels]))
    threshold = np.sort(magnitudes)[round(0.5 * magnitudes.size)]
    for kernel, keep in zip(kernels, keeps):
        np.testing.assert_array_equal(keep, np.abs(kernel) >= threshold)
    total_pruned = sum((~k).sum() for k in keeps)
    assert total_pruned == round(0.5 * magnitudes.size)
    # Unlike per-layer pruning, the small-scale layer loses more than half.
    assert (~keeps[0]).mean() > 0.5 > (~keeps[1]).mean()


def test_two_of_four_pattern_is_exact():
    w = jax.random.normal(jax.random.key(1), (3, 16, 6))  # [..., in, out]
    w = w.at[0, :4, 0].set(0.0)  # an all-tied group still keeps exactly 2
    keep = np.asarray(pruning.compute_masks({"w": w}, structure="2:4")["w"])
    groups = keep.reshape(3, 4, 4, 6)  # groups of 4 along the input axis
    assert (groups.sum(axis=2) == 2).all()
    magnitude = np.abs(np.asarray(w)).reshape(3, 4, 4, 6)
    kept_min = np.where(groups, magnitude, np.inf).min(axis=2)
    pruned_max = np.where(groups, -np.inf, magnitude).max(axis=2)
    assert (kept_min >= pruned_max).all()


@pytest.mark.parametrize(
    ("structure", "message"),
    [("3:2", "needs 0 < N < M"), ("4:4", "needs 0 < N < M"), ("0:4", "needs 0 < N < M"),
     ("2-4", "'unstructured' or 'N:M'"), ("dense", "'unstructured' or 'N:M'")],
)
def test_invalid_structure(structure, message):
    with pytest.raises(ValueError, match=message):
        pruning.compute_masks(_params(), structure=structure)
    with pytest.raises(ValueError, match=message):
        pruning.prune(jopt.sgd(0.1), pruning.one_shot(0.5), structure=structure)


def test_n_m_shape_and_schedule_errors():
    tx = pruning.prune(jopt.sgd(0.1), pruning.one_shot(0.5), structure="2:4")
    with pytest.raises(ValueError, match=r"divisible by 4.*\['w'\] has shape \(6, 8\)"):
        tx.init({"w": jnp.ones((6, 8))})
    with pytest.raises(ValueError, match="fixes the sparsity at 0.5"):
        pruning.prune(jopt.sgd(0.1), pruning.one_shot(0.9), structure="2:4")
    with pytest.raises(ValueError, match="no global variant"):
        pruning.compute_masks(_params(), granularity="global", structure="2:4")
    with pytest.raises(ValueError, match="granularity must be one of"):
        pruning.compute_masks(_params(), 0.5, granularity="layer")


def test_prunable_function_and_tree():
    params = _params()
    everything = pruning.compute_masks(params, 0.5, prunable=lambda p: jax.tree.map(
        lambda _: True, p))
    assert not np.asarray(everything["dense_0"]["bias"]).all()
    only_first = jax.tree.map(lambda _: False, params)
    only_first["dense_0"]["kernel"] = True
    masks = pruning.compute_masks(params, 0.5, prunable=only_first)
    assert np.asarray(masks["dense_1"]["kernel"]).all()
    with pytest.raises(TypeError, match="structure of the parameters"):
        pruning.compute_masks(params, 0.5, prunable={"dense_0": True})


# ----------------------------------------------------------------------------- the wrapper


def test_update_is_minus_param_when_mask_turns_off():
    params = _params()
    grads = jax.tree.map(jnp.ones_like, params)
    tx = pruning.prune(jopt.sgd(0.1), pruning.one_shot(0.5))
    updates, state = tx.update(grads, tx.init(params), params)
    for layer in ("dense_0", "dense_1"):
        keep = state.masks[layer]["kernel"]
        u, w = updates[layer]["kernel"], params[layer]["kernel"]
        np.testing.assert_array_equal(u[~keep], -w[~keep])
        np.testing.assert_allclose(u[keep], -0.1)
    new_params = jopt.apply_updates(params, updates)
    assert pruning.sparsity(new_params) == 0.5


@pytest.mark.parametrize(
    "inner", [jopt.adam(0.05), jopt.sgd(0.05, momentum=0.9)], ids=["adam", "momentum"])
def test_params_stay_masked_over_many_steps(inner):
    params = _params()
    x = jax.random.normal(jax.random.key(2), (32, 16))
    y = jax.random.normal(jax.random.key(3), (32, 4))
    schedule = pruning.polynomial_decay(0.0, 0.8, 5, 35, frequency=6)
    tx = pruning.prune(inner, schedule)

    @jax.jit
    def run(params, state):
        def step(carry, _):
            params, state = carry
            grads = jax.grad(_loss)(params, x, y)
            updates, state = tx.update(grads, state, params)
            params = jopt.apply_updates(params, updates)
            # Entries outside the mask that are not exactly zero, after this step.
            leaks = sum(jnp.sum((p != 0) & ~m) for p, m in zip(
                jax.tree.leaves(params), jax.tree.leaves(state.masks)))
            pruned = sum(jnp.sum(~m) for m in jax.tree.leaves(state.masks))
            return (params, state), (leaks, pruned)
        return jax.lax.scan(step, (params, state), None, length=80)

    (final, state), (leaks, pruned) = run(params, tx.init(params))
    assert int(leaks.max()) == 0
    # s(t0) = s_i = 0: the first weights go at the second mask update, t0 + Δt.
    assert int(pruned[10]) == 0 and int(pruned[11]) > 0
    assert (np.diff(np.asarray(pruned)) >= 0).all()
    for layer in ("dense_0", "dense_1"):
        kernel = np.asarray(final[layer]["kernel"])
        assert (kernel == 0).sum() == round(0.8 * kernel.size)
        assert (np.asarray(final[layer]["bias"]) != 0).all()
    # The inner optimizer's own state still moves for pruned weights (it is the
    # wrapper, not the inner state, that keeps them at zero).
    keep = np.asarray(state.masks["dense_0"]["kernel"])
    inner_leaves = [np.asarray(leaf) for leaf in jax.tree.leaves(state.inner_state)
                    if np.shape(leaf) == keep.shape]
    assert any(np.abs(leaf[~keep]).max() > 0 for leaf in inner_leaves)
    assert _loss(final, x, y) < _loss(params, x, y)


@pytest.mark.parametrize("granularity, structure", [
    ("per_layer", "unstructured"), ("global", "unstructured"), ("per_layer", "2:4")])
def test_eager_mask_updates_compile_nothing_new(granularity, structure):
    """Outside jit, recomputing the masks at every step must reuse JAX's compiled
    programs (the binary search's loop body was a new closure at each call: a model
    with 9k weights took 250 ms a step instead of 6)."""
    params, x, y = _params(), jnp.ones((2, 16)), jnp.ones((2, 4))
    schedule = (pruning.one_shot(0.5) if structure == "2:4"
                else pruning.polynomial_decay(0.0, 0.8, 0, 20, frequency=1))
    tx = pruning.prune(jopt.adam(0.01), schedule, granularity=granularity, structure=structure)
    carry = [params, tx.init(params)]

    def steps(n):
        for _ in range(n):
            grads = jax.grad(_loss)(carry[0], x, y)
            updates, carry[1] = tx.update(grads, carry[1], carry[0])
            carry[0] = jopt.apply_updates(carry[0], updates)
        jax.block_until_ready(carry)

    steps(2)
    assert compile_events(lambda: steps(3)) == []
    assert pruning.sparsity(carry[0]) > 0


def test_prune_on_flat_params_matches_tree():
    params = _params()
    flat = FlatParams.pack(params, pad_multiple=8)
    grads = jax.tree.map(jnp.ones_like, params)
    tx = pruning.prune(jopt.adam(0.1), pruning.constant_sparsity(0.6, frequency=2))

    @jax.jit
    def run(params, grads):
        def step(carry, _):
            params, state = carry
            updates, state = tx.update(grads, state, params)
            return (jopt.apply_updates(params, updates), state), None
        return jax.lax.scan(step, (params, tx.init(params)), None, length=4)[0]

    tree_params, tree_state = run(params, grads)
    flat_params, flat_state = run(flat, FlatParams.pack(grads, pad_multiple=8))
    assert isinstance(flat_state.masks, FlatParams)
    jax.tree.map(np.testing.assert_array_equal, flat_state.masks.unpack(), tree_state.masks)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6),
                 flat_params.unpack(), tree_params)
    assert pruning.sparsity(flat_params) == pytest.approx(0.6, abs=0.01)


def test_update_without_params_and_masks_from_state():
    params = _params()
    tx = jopt.chain(jopt.clip_by_global_norm(1.0),
                    pruning.prune(jopt.sgd(0.1), pruning.one_shot(0.5)))
    state = tx.init(params)
    with pytest.raises(ValueError, match="needs the parameters"):
        tx.update(params, state)
    _, state = tx.update(params, state, params)
    masks = pruning.masks_from_state(state)
    assert pruning.sparsity(masks) == 0.5
    with pytest.raises(ValueError, match="found 0"):
        pruning.masks_from_state(jopt.adam(0.1).init(params))


# ----------------------------------------------------------------------------- sparse export


@pytest.mark.parametrize("format", ["auto", "bitmask", "indices", "dense"])
def test_strip_round_trip(format, tmp_path):
    params = _params()
    masks = pruning.compute_masks(params, 0.9)
    masked = jax.tree.map(lambda p, m: jnp.where(m, p, 0), params, masks)
    masked["extra"] = jnp.asarray([[1.5, 0.0], [0.0, -2.0]], jnp.bfloat16)
    stripped = pruning.strip(masked, format=format)
    dense = pruning.densify(stripped)
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), masked, dense)
    path = tmp_path / "model.npz"
    size = pruning.save_sparse(path, stripped)
    assert size == path.stat().st_size
    loaded = pruning.load_sparse(path, dense=True)
    assert loaded["extra"].dtype == jnp.bfloat16
    jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), masked, loaded)
    like = pruning.load_sparse(path, like=masked, dense=True)
    assert jax.tree.structure(like) == jax.tree.structure(masked)


@pytest.mark.parametrize("format, damage, message", [
    ("dense", lambda a: {**a, "0.values": a["0.values"][: a["0.values"].size // 2]},
     "stored values for"),
    ("bitmask", lambda a: {**a, "0.positions": a["0.positions"][:-3]}, "a bitmask of"),
    ("bitmask", lambda a: {**a, "0.values": a["0.values"][:-1]}, "stored values for"),
    ("indices", lambda a: {**a, "0.positions": a["0.positions"] + 60000}, "indices outside"),
    ("indices", lambda a: {**a, "0.values": a["0.values"].astype(np.float64)},
     "expected a flat array of float32"),
])
def test_damaged_sparse_files_name_the_leaf_and_the_problem(tmp_path, format, damage, message):
    from jopt import _npz

    w = np.asarray(jax.random.normal(jax.random.key(5), (64, 32)))
    keep = np.asarray(pruning.compute_masks({"w": w}, 0.8)["w"])
    path = tmp_path / "model.npz"
    pruning.save_sparse(path, pruning.strip({"w": w * keep}, {"w": keep}, format=format))
    arrays, meta = _npz.read_npz(path)
    _npz.write_npz(path, damage(dict(arrays)), meta)
    with pytest.raises(ValueError, match=f"leaf 0 \\(w\\): .*{message}"):
        pruning.load_sparse(path)


def test_stripped_size_reflects_sparsity(tmp_path):
    w = np.asarray(jax.random.normal(jax.random.key(4), (256, 128)))
    keep = np.asarray(pruning.compute_masks({"w": w}, 0.9)["w"])
    sparse = pruning.strip({"w": w}, {"w": keep})["w"]
    kept = keep.sum()
    assert sparse.format == "bitmask"
    assert sparse.nbytes == w.size // 8 + 4 * kept
    np.testing.assert_array_equal(sparse.todense(), np.where(keep, w, 0))
    dense_file = pruning.save_sparse(tmp_path / "d.npz", pruning.strip({"w": w}, format="dense"))
    sparse_file = pruning.save_sparse(tmp_path / "s.npz", {"w": sparse})
    assert dense_file / sparse_file > 5
    report = pruning.size_report({"w": w * keep})
    assert report["sparsity"] == pytest.approx(0.9, abs=1e-3)
    assert report["compression"] == pytest.approx(w.nbytes / sparse.nbytes)
    very_sparse = pruning.strip({"w": np.where(np.abs(w) > 3.0, w, 0)})["w"]
    assert very_sparse.format == "indices" and very_sparse.positions.dtype == np.uint16


def test_load_rejects_foreign_files(tmp_path):
    path = tmp_path / "plain.npz"
    np.savez(path, w=np.ones(3))
    with pytest.raises(ValueError, match="not written by jopt"):
        pruning.load_sparse(path)


def test_docstring_examples():
    result = doctest.testmod(pruning, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


# ----------------------------------------------------------------------------- jopt train integration


CONFIG_DIR = pathlib.Path(__file__).parents[1] / "configs"


@pytest.fixture(scope="module")
def fashion_small():
    return data.subset(data.load("fashion_mnist", download=False), train=640, test=200)


def test_pruned_config_trains_sparse_and_logs_sizes(tmp_path, fashion_small):
    # 10 steps per epoch; pruning from step 5 to step 15, masks every 2 steps.
    config = load_config(CONFIG_DIR / "fashion_mnist_pruned.py", [
        "--config.num_epochs=2", "--config.batch_size=64", "--config.pruning.begin_epoch=0.5",
        "--config.pruning.end_epoch=1.5", "--config.pruning.frequency=2"])
    result = train.train_and_evaluate(config, tmp_path, dataset=fashion_small)
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in records] == [1, 2]
    assert 0 < records[0]["sparsity"] < 0.9
    assert records[1]["sparsity"] == pytest.approx(0.9, abs=1e-4)
    assert records[1]["dense_bytes"] / records[1]["sparse_bytes"] > 5
    masks = pruning.masks_from_state(result.state.opt_state)
    params = result.state.params
    assert all(bool(jnp.all(jnp.where(m, True, p == 0)))
               for p, m in zip(jax.tree.leaves(params), jax.tree.leaves(masks)))
    assert records[1]["test_accuracy"] > 0.5


def test_pruning_config_errors_name_the_key(fashion_small, tmp_path):
    for overrides, message in [
        (["--config.pruning.final_sparsity=1.0"], r"config.pruning: final_sparsity must be in"),
        (["--config.pruning.schedule=gradual"], r"config.pruning.schedule='gradual'"),
        (["--config.pruning.end_epoch=0.5"], r"config.pruning.end_epoch"),
        (["--config.pruning.structure=2:4"], r"config.pruning: N:M .* no global variant"),
        (["--config.pruning.structure=2:4", "--config.pruning.granularity=per_layer"],
         r"config.pruning: structure '2:4' fixes the sparsity at 0.5"),
    ]:
        config = load_config(CONFIG_DIR / "fashion_mnist_pruned.py", overrides)
        with pytest.raises(train.ConfigError, match=message):
            train.validate_config(config)
