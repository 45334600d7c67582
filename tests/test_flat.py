"""Tests for `jopt.flat`: packing, transformations on flat buffers, layouts and masks."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jopt
from jopt import storage
from jopt.flat import FlatLayout, FlatParams, masked


def nested_params():
    key = jax.random.key(0)
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "dense": {"kernel": jax.random.normal(k1, (6, 5)), "bias": jnp.zeros(5)},
        "norm": [jnp.ones(5, jnp.bfloat16), None],
        "scale": jnp.array(0.5),
        "embed": jax.random.normal(k2, (4, 3)).astype(jnp.bfloat16),
        "out": jax.random.normal(k3, (5, 2)),
    }


def nested_loss(params):
    x = jnp.linspace(-1.0, 1.0, 6)
    h = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"])
    h = h * params["norm"][0].astype(jnp.float32) * params["scale"]
    out = h @ params["out"]
    return jnp.sum(out**2) + jnp.sum(params["embed"].astype(jnp.float32) ** 2)


def max_abs_diff(a, b):
    return max(float(jnp.max(jnp.abs(x.astype(jnp.float32) - y.astype(jnp.float32))))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def test_pack_groups_by_dtype_and_unpacks_exactly():
    params = nested_params()
    flat = FlatParams.pack(params)
    assert list(flat.buffers) == ["float32", "bfloat16"]  # order of first appearance
    assert flat.buffers["float32"].shape == (30 + 5 + 1 + 10,)
    assert flat.buffers["bfloat16"].shape == (5 + 12,)
    assert flat.num_params == 63 and len(jax.tree.leaves(flat)) == 2
    back = flat.unpack()
    assert jax.tree.structure(back) == jax.tree.structure(params)
    assert back["norm"][1] is None and back["scale"].shape == ()
    for x, y in zip(jax.tree.leaves(back), jax.tree.leaves(params)):
        assert x.dtype == y.dtype and x.shape == y.shape
        np.testing.assert_array_equal(x, y)
    assert repr(flat) == "FlatParams(float32[46] + bfloat16[17]; 6 leaves, 63 params)"
    assert repr(flat.layout).startswith("FlatLayout(float32[46] + bfloat16[17]; 6 leaves; ")
    assert flat.layout.paths[0] == "['dense']['bias']"


def test_padding_for_sharding():
    flat = FlatParams.pack(nested_params(), pad_multiple=8)
    assert flat.layout.sizes == (48, 24)
    assert float(jnp.sum(jnp.abs(flat.buffers["float32"][46:]))) == 0.0
    assert flat.num_params == 63
    with pytest.raises(ValueError, match="pad_multiple must be an integer >= 1, got 0"):
        FlatParams.pack(nested_params(), pad_multiple=0)
    with pytest.raises(TypeError, match=r"leaf \['name'\] is a str, not an array"):
        FlatParams.pack({"name": "dense", "w": jnp.ones(2)})


def test_grad_jit_and_vmap_see_the_tree():
    params = nested_params()
    flat = FlatParams.pack(params, pad_multiple=16)

    @jax.jit
    def check(flat):
        flat_grads = jax.grad(lambda f: nested_loss(f.unpack()))(flat)
        tree_grads = jax.grad(nested_loss)(flat.unpack())
        # vmap over a batch of flat params; batched buffers unpack to batched leaves.
        batch = jax.vmap(lambda s: flat.map(lambda b: b * s.astype(b.dtype)))(jnp.arange(3.0))
        losses = jax.vmap(lambda f: nested_loss(f.unpack()))(batch)
        return flat_grads, tree_grads, batch, losses

    flat_grads, tree_grads, batch, losses = check(flat)
    assert isinstance(flat_grads, FlatParams) and flat_grads.layout == flat.layout
    assert max_abs_diff(flat_grads.unpack(), tree_grads) <= 1e-6
    # The padding's gradient is zero, so elementwise optimizers keep it at zero.
    assert float(jnp.sum(jnp.abs(flat_grads.buffers["float32"][46:]))) == 0.0
    assert batch.buffers["float32"].shape == (3, 48)
    np.testing.assert_allclose(losses[1], nested_loss(params), rtol=1e-5)
    assert batch.unpack()["dense"]["kernel"].shape == (3, 6, 5)


def test_flat_gradient_is_one_copy_loop_not_fused_into_the_update():
    """The gradient of ``unpack()`` is a concatenation of the leaves' gradients.

    XLA:CPU fuses a rank-1 concatenation into its consumer and then searches the
    pieces for every element (SGD's update on the MNIST MLP: 0.2-2.8 ms a step
    instead of 15 us). ``unpack`` splits a ``[1, size]`` view instead (and
    ``pack_like`` concatenates one), so the concatenation is rank 2, which
    XLA:CPU runs as its own copy loop. Forward-mode differentiation still works.
    """
    key = jax.random.key(0)
    params = {f"layer{i}": {"kernel": jax.random.normal(jax.random.fold_in(key, i), (32, 32)),
                            "bias": jnp.zeros(32)} for i in range(3)}
    flat = FlatParams.pack(params)

    def tree_loss(tree):
        x = jnp.ones(32)
        for layer in tree.values():
            x = jnp.tanh(x @ layer["kernel"] + layer["bias"])
        return jnp.sum(x**2)

    def loss(flat):
        return tree_loss(flat.unpack())

    def sgd(params, grads):
        return jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)

    def flat_step(flat):  # differentiating through unpack()
        return sgd(flat, jax.grad(loss)(flat))

    def packed_step(flat):  # a tree gradient packed by pack_like
        return sgd(flat, FlatParams.pack_like(jax.grad(tree_loss)(flat.unpack()), flat))

    for step in (flat_step, packed_step):
        report = jopt.inspect.inspect_step(step, flat)
        if report.platform == "cpu":
            assert report.op_counts["concatenate"] == 1, report.entry_hlo()
        new = jax.jit(step)(flat).unpack()
        assert max_abs_diff(new, jax.jit(sgd)(params, jax.grad(tree_loss)(params))) <= 1e-6
    # jvp through unpack: the derivative along the buffer itself is <grad, buffer>.
    _, tangent = jax.jvp(loss, (flat,), (flat,))
    np.testing.assert_allclose(tangent, jax.tree.reduce(
        jnp.add, jax.tree.map(jnp.vdot, jax.grad(loss)(flat), flat)), rtol=1e-5)


def run(tx, params, loss, steps):
    """``steps`` of ``tx`` on ``loss`` (of the tree), from ``params`` (tree or flat).

    The gradient is always taken on the tree (and packed for flat params), so that
    the runs compare the optimizers, not XLA's float rounding in two backward
    passes (which Adam's normalisation would amplify).
    """
    def gradient(params):
        if isinstance(params, FlatParams):
            return FlatParams.pack_like(jax.grad(loss)(params.unpack()), params)
        return jax.grad(loss)(params)

    @jax.jit
    def go(params):
        def step(carry, _):
            params, state = carry
            grads = gradient(params)
            updates, state = tx.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), None
        return jax.lax.scan(step, (params, tx.init(params)), None, length=steps)[0][0]
    return go(params)


def float32_params():
    """A nested float32 tree with a None leaf, a scalar and a list."""
    params = nested_params()
    return {"dense": params["dense"], "out": params["out"], "scale": params["scale"],
            "none": None, "list": [jnp.linspace(-1.0, 1.0, 7), None]}


def float32_loss(params):
    x = jnp.linspace(-1.0, 1.0, 6)
    h = jnp.tanh(x @ params["dense"]["kernel"] + params["dense"]["bias"]) * params["scale"]
    first = params["list"][0]
    return jnp.sum((h @ params["out"]) ** 2) + jnp.sum(jnp.cos(first) * first)


@pytest.mark.parametrize("make_tx", [
    lambda: jopt.adam(0.05),
    lambda: jopt.sgd(0.05, momentum=0.9, nesterov=True),
    lambda: jopt.rmsprop(0.01, centered=True, momentum=0.5),
    lambda: optax.adam(0.05),
    lambda: optax.adamw(0.05, weight_decay=0.1),
], ids=["jopt_adam", "jopt_sgd_nesterov", "jopt_rmsprop_centered", "optax_adam", "optax_adamw"])
def test_flat_trajectory_equals_the_tree_trajectory(make_tx):
    params = float32_params()
    tree_final = run(make_tx(), params, float32_loss, 10)
    flat_final = run(make_tx(), FlatParams.pack(params), float32_loss, 10)
    assert max_abs_diff(tree_final, flat_final.unpack()) <= 1e-6


def test_flat_trajectory_with_reductions_and_mixed_dtypes():
    # A global norm sums per buffer instead of per leaf: a different float32
    # summation order, whose last-bit differences Adam's steps then carry along.
    params = float32_params()
    tx = lambda: optax.chain(optax.clip_by_global_norm(1.0), optax.adam(0.05))  # noqa: E731
    tree_final = run(tx(), params, float32_loss, 10)
    flat_final = run(tx(), FlatParams.pack(params), float32_loss, 10)
    assert max_abs_diff(tree_final, flat_final.unpack()) <= 1e-4

    # bfloat16 leaves agree to one bfloat16 step: XLA may skip an intermediate
    # bfloat16 rounding inside a fusion (its default xla_allow_excess_precision),
    # and fusions differ between the modes. float32 leaves still agree to 1e-6.
    def separable_loss(params):  # each leaf's gradient depends on that leaf only
        return sum(jnp.sum(jnp.cos(3 * x.astype(jnp.float32)) * x.astype(jnp.float32))
                   for x in jax.tree.leaves(params))

    mixed = nested_params()
    tree_final = run(jopt.adam(0.05), mixed, separable_loss, 10)
    flat_final = run(jopt.adam(0.05), FlatParams.pack(mixed), separable_loss, 10).unpack()
    for x, y in zip(jax.tree.leaves(tree_final), jax.tree.leaves(flat_final)):
        tolerance = 1e-6 if x.dtype == jnp.float32 else 2.0**-7 * float(jnp.max(jnp.abs(x)))
        assert max_abs_diff(x, y) <= tolerance


def test_mismatched_layouts_raise_clear_errors():
    a = FlatParams.pack({"w": jnp.ones(3), "b": jnp.ones(2)})
    b = FlatParams.pack({"w": jnp.ones(3), "c": jnp.ones(2)})
    c = FlatParams.pack({"w": jnp.ones(3), "b": jnp.ones(2)}, pad_multiple=4)
    with pytest.raises(ValueError, match=r"FlatLayout\(float32\[5\]; 2 leaves; "
                                         r"PyTreeDef\(\{'b': \*, 'w': \*\}\)"):
        jopt.apply_updates(a, b)
    assert a.layout.difference(b.layout).startswith("the trees differ in structure")
    assert "different pad_multiple?" in a.layout.difference(c.layout)
    reshaped = FlatParams.pack({"w": jnp.ones(3), "b": jnp.ones((2, 1))})
    assert a.layout.difference(reshaped.layout) == (
        "leaf ['b'] is float32[2] at offset 0 vs float32[2, 1] at offset 0")
    tx = jopt.adam(0.1)
    with pytest.raises(TypeError, match=r"updates do not match the optimizer state.*"
                                        r"shape \(8,\) in the updates vs \(5,\)"):
        tx.update(c, tx.init(a))
    wrong = FlatParams({"float32": jnp.ones(7)}, a.layout)
    with pytest.raises(ValueError, match=r"buffer 'float32' has shape \(7,\) but the layout "
                                         r"expects 5 values"):
        wrong.unpack()
    with pytest.raises(ValueError, match="tree's structure .* differs from the packed tree's"):
        FlatParams.pack_like({"w": True}, a)
    with pytest.raises(ValueError, match=r"leaf \['w'\] has shape \(2,\) but its parameter "
                                         r"has shape \(3,\)"):
        FlatParams.pack_like({"w": jnp.ones(2), "b": True}, a)


def test_equal_layouts_share_compiled_code():
    traces = []

    @jax.jit
    def f(flat):
        traces.append(1)
        return flat.map(lambda b: b + 1)

    f(FlatParams.pack({"w": jnp.ones(3), "b": jnp.ones(2)}))
    f(FlatParams.pack({"w": jnp.zeros(3), "b": jnp.zeros(2)}))
    layout = FlatParams.pack({"w": jnp.ones(3)}).layout
    assert len(traces) == 1
    assert hash(layout) == hash(FlatParams.pack({"w": jnp.zeros(3)}).layout)
    assert isinstance(layout, FlatLayout)


def test_pack_like_builds_per_element_masks():
    params = nested_params()
    flat = FlatParams.pack(params, pad_multiple=4)
    mask = FlatParams.pack_like(jax.tree.map(lambda x: x.ndim > 1, params), flat)
    assert mask.buffers["float32"].dtype == jnp.bool_
    assert mask.layout == flat.layout
    back = mask.unpack()
    assert bool(jnp.all(back["dense"]["kernel"])) and not bool(jnp.any(back["dense"]["bias"]))
    assert not bool(jnp.any(mask.buffers["float32"][46:]))  # padding
    values = FlatParams.pack_like(jax.tree.map(lambda x: jnp.full(x.shape, 2.0), params), flat)
    assert values.buffers["bfloat16"].dtype == jnp.float32


def decay_matrices(p):
    return jax.tree.map(lambda x: x.ndim > 1, p)


def test_masked_weight_decay_is_the_same_on_flat_and_tree_params():
    params = float32_params()
    tx = lambda: optax.chain(  # noqa: E731
        jopt.scale_by_adam(),
        masked(optax.add_decayed_weights(0.5), decay_matrices),
        optax.scale(-0.05))
    tree_final = run(tx(), params, float32_loss, 10)
    flat_final = run(tx(), FlatParams.pack(params), float32_loss, 10)
    assert max_abs_diff(tree_final, flat_final.unpack()) <= 1e-6
    reference = optax.adamw(0.05, weight_decay=0.5, mask=decay_matrices)
    assert max_abs_diff(run(reference, params, float32_loss, 10), tree_final) <= 1e-6
    # optax.masked's per-leaf mask on a FlatParams sees whole buffers: decaying
    # nothing here, which is why jopt.flat.masked exists.
    flat = FlatParams.pack(params)
    optax_mask = optax.masked(optax.add_decayed_weights(0.5), decay_matrices)
    zeros = flat.map(jnp.zeros_like)
    updates, _ = optax_mask.update(zeros, optax_mask.init(flat), flat)
    assert float(jnp.sum(jnp.abs(updates.buffers["float32"]))) == 0.0
    updates, _ = masked(optax.add_decayed_weights(0.5), decay_matrices).update(
        zeros, None, flat)
    kernel = updates.unpack()["dense"]["kernel"]
    np.testing.assert_allclose(kernel, 0.5 * params["dense"]["kernel"], rtol=1e-6)


def test_masked_accepts_prefix_masks_and_flat_masks():
    params = {"a": {"w": jnp.ones(3), "b": jnp.ones(2)}, "c": jnp.ones(4)}
    flat = FlatParams.pack(params)
    prefix = {"a": True, "c": False}
    tx = masked(optax.scale(3.0), prefix)
    updates, _ = tx.update(flat, tx.init(flat))
    np.testing.assert_array_equal(updates.unpack()["a"]["w"], 3.0)
    np.testing.assert_array_equal(updates.unpack()["c"], 1.0)
    element_mask = FlatParams.pack_like({"a": {"w": jnp.array([True, False, True]), "b": False},
                                         "c": False}, flat)
    updates, _ = masked(optax.scale(3.0), element_mask).update(flat, None)
    np.testing.assert_array_equal(updates.unpack()["a"]["w"], [3.0, 1.0, 3.0])
    # On a tree, per-element array masks work too (elementwise selection).
    tree_mask = {"a": {"w": jnp.array([True, False, True]), "b": False}, "c": False}
    updates, _ = masked(optax.scale(3.0), tree_mask).update(params, None)
    np.testing.assert_array_equal(updates["a"]["w"], [3.0, 1.0, 3.0])
    with pytest.raises(ValueError, match="not a prefix of the params"):
        masked(optax.scale(3.0), {"x": True}).init(flat)


def test_int8_state_on_flat_buffers_unpacks_per_leaf():
    params = {"w": jnp.linspace(-1.0, 1.0, 6000).reshape(60, 100), "b": jnp.ones(7)}
    flat = FlatParams.pack(params, pad_multiple=256)
    tx = jopt.adam(0.1, state_storage="int8")
    state = jax.jit(tx.init)(flat)
    assert isinstance(state[0].mu.buffers["float32"], storage.QuantizedArray)
    grads = flat.map(lambda b: b * 0.5)
    _, state = jax.jit(tx.update)(grads, state, flat)
    mu = jax.jit(lambda m: m.unpack())(state[0].mu)  # decoded per leaf
    assert mu["w"].shape == (60, 100) and mu["w"].dtype == jnp.float32
    np.testing.assert_allclose(mu["w"], 0.05 * params["w"], atol=0.05 * 0.032)
    wrapped = storage.with_state_storage(optax.adam(0.1), "int8")
    wrapped_state = jax.eval_shape(wrapped.init, flat)
    assert isinstance(wrapped_state[0].nu.buffers["float32"], storage.QuantizedArray)


def test_which_optax_transformations_are_exact_on_flat_buffers():
    """Pins the module docstring: elementwise and global-norm transformations give
    the tree's updates on flat buffers; per-leaf-norm / factored ones do not."""
    params = {"w": jnp.full((4, 4), 10.0), "b": jnp.full(4, 0.01)}
    grads = {"w": jnp.ones((4, 4)), "b": jnp.linspace(1.0, 4.0, 4)}
    flat = FlatParams.pack(params, pad_multiple=8)
    flat_grads = FlatParams.pack(grads, pad_multiple=8)

    def bias_update_gap(tx):
        tree_updates, _ = tx.update(grads, tx.init(params), params)
        flat_updates, _ = tx.update(flat_grads, tx.init(flat), flat)
        return float(jnp.max(jnp.abs(tree_updates["b"] - flat_updates.unpack()["b"])))

    for tx in (optax.adam(0.1), optax.lion(0.1), optax.clip_by_global_norm(1.0),
               optax.add_decayed_weights(0.1), jopt.adam(0.1)):
        assert bias_update_gap(tx) < 1e-6
    # lamb's trust ratio ||p|| / ||u|| (and adafactor's parameter-RMS scaling) is
    # taken over the whole buffer, dominated by w: the bias update is about -0.89
    # (-0.82) on the buffer instead of -0.001 per leaf.
    assert bias_update_gap(optax.lamb(0.1)) > 0.5
    assert bias_update_gap(optax.adafactor(0.1)) > 0.5
    assert "optax.lamb" in jopt.flat.__doc__ and "clip_by_global_norm" in jopt.flat.__doc__
