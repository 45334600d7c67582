"""Tests of jopt.models: shapes, parameter counts, the compute dtype."""

import jax
import jax.numpy as jnp
import pytest

from jopt.models import CNN, MLP, num_params


def test_mlp_is_the_reference_784_64_64_10():
    model = MLP()
    params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28)))
    shapes = jax.tree.map(jnp.shape, params["params"])
    assert shapes == {
        "hidden_0": {"kernel": (784, 64), "bias": (64,)},
        "hidden_1": {"kernel": (64, 64), "bias": (64,)},
        "logits": {"kernel": (64, 10), "bias": (10,)},
    }
    assert num_params(params) == 784 * 64 + 64 + 64 * 64 + 64 + 64 * 10 + 10
    logits = model.apply(params, jnp.ones((3, 28, 28)))
    assert logits.shape == (3, 10) and logits.dtype == jnp.float32


def test_mlp_relu_layers_make_it_nonlinear():
    model = MLP(hidden_sizes=(8,), num_classes=2)
    params = model.init(jax.random.key(1), jnp.zeros((1, 4)))
    x = jax.random.normal(jax.random.key(2), (16, 4))
    apply = jax.jit(model.apply)
    # A linear map would satisfy f(x) + f(-x) = 2 f(0); relu breaks that.
    total = apply(params, x) + apply(params, -x)
    assert not jnp.allclose(total, 2 * apply(params, jnp.zeros_like(x)), atol=1e-4)


@pytest.mark.parametrize("model", [MLP(dtype=jnp.bfloat16), CNN((2, 4), (8,), dtype=jnp.bfloat16)])
def test_bfloat16_compute_with_float32_params_and_gradients(model):
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28)))
    assert {x.dtype for x in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
    x = jnp.ones((2, 28, 28))
    assert jax.eval_shape(model.apply, params, x).dtype == jnp.bfloat16
    grads = jax.jit(jax.grad(lambda p: model.apply(p, x).astype(jnp.float32).sum()))(params)
    assert {g.dtype for g in jax.tree.leaves(grads)} == {jnp.dtype(jnp.float32)}


def test_cnn_accepts_images_with_or_without_a_channel_axis():
    model = CNN(conv_features=(2, 4), hidden_sizes=(8,), num_classes=10)
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28)))
    assert params["params"]["head"]["hidden_0"]["kernel"].shape == (7 * 7 * 4, 8)
    x = jax.random.uniform(jax.random.key(1), (2, 28, 28))
    apply = jax.jit(model.apply)
    logits = apply(params, x)
    assert logits.shape == (2, 10)
    assert jnp.allclose(logits, apply(params, x[..., None]))


@pytest.mark.parametrize("shape, message", [
    ((2, 784), r"CNN takes a batch of images .* got shape \(2, 784\)"),
    ((2, 3, 3), r"must be at least 4, got \(3, 3\)"),
])
def test_cnn_rejects_inputs_it_cannot_convolve(shape, message):
    model = CNN(conv_features=(2, 4), hidden_sizes=(8,))
    with pytest.raises(ValueError, match=message):
        model.init(jax.random.key(0), jnp.zeros(shape))
