"""Tests of jopt.models: shapes, parameter counts, the compute dtype, the
convolution whose gradient stays canonical."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from jopt import models
from jopt.models import CNN, MLP, conv_general_dilated, num_params
from hlo_checks import convolutions_in_ynn_fusions


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


CONV_CASES = [  # (spatial dims, kernel, stride, padding, input size)
    (1, 3, 1, "SAME", 9), (1, 4, 2, "VALID", 9), (1, 2, 3, [(1, 1)], 10),
    *[(2, k, s, pad, n) for k, s in [(1, 1), (3, 1), (3, 2), (4, 2), (2, 3)]
      for pad in ("SAME", "VALID", "explicit") for n in (8, 9)],
]


@pytest.mark.parametrize("nd, k, stride, padding, n", CONV_CASES)
def test_conv_general_dilated_matches_lax_in_value_and_gradient(nd, k, stride, padding, n):
    if padding == "explicit":
        padding = [(min(1, k - 1), min(2, k - 1))] * nd
    dn = ("NWC", "WIO", "NWC") if nd == 1 else ("NHWC", "HWIO", "NHWC")
    rng = np.random.default_rng(k * 100 + stride * 10 + n)
    x = jnp.asarray(rng.normal(size=(3, *(n,) * nd, 4)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(*(k,) * nd, 4, 5)), jnp.float32)

    def loss(conv):
        return lambda x, w: jnp.sum(jnp.sin(conv(x, w, (stride,) * nd, padding,
                                                 dimension_numbers=dn)))

    jaxpr = str(jax.make_jaxpr(jax.grad(loss(conv_general_dilated)))(x, w))
    assert "_canonical_conv" in jaxpr  # the case takes the canonical path
    ours = jax.jit(jax.grad(loss(conv_general_dilated), (0, 1)))(x, w)
    want = jax.jit(jax.grad(loss(lax.conv_general_dilated), (0, 1)))(x, w)
    np.testing.assert_allclose(jax.jit(loss(conv_general_dilated))(x, w),
                               jax.jit(loss(lax.conv_general_dilated))(x, w), rtol=1e-6)
    for got, expected in zip(ours, want):
        np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    # The branch other platforms take is JAX's own gradient; it agrees too.
    y, vjp = jax.vjp(lambda x, w: lax.conv_general_dilated(x, w, (stride,) * nd, padding,
                                                           dimension_numbers=dn), x, w)
    dy = jnp.asarray(rng.normal(size=y.shape), jnp.float32)
    pads = padding if not isinstance(padding, str) else lax.padtype_to_pads(
        x.shape[1:-1], w.shape[:nd], (stride,) * nd, padding)
    pads = tuple(tuple(p) for p in pads)
    for branch in (models._canonical_conv_grads, models._jax_conv_grads):
        for got, expected in zip(branch((stride,) * nd, pads, None, x, w, dy), vjp(dy)):
            np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kwargs", [
    {"dimension_numbers": ("NCHW", "OIHW", "NCHW")},
    {"dimension_numbers": None},
    {"feature_group_count": 2},
    {"rhs_dilation": (2, 2)},
    {"lhs_dilation": (2, 1), "padding": [(1, 1), (1, 1)]},
    {"padding": [(3, 0), (1, 1)]},
    {"preferred_element_type": jnp.float32},
])
def test_conv_general_dilated_hands_other_cases_to_lax_unchanged(kwargs):
    kwargs = {"padding": "SAME", "dimension_numbers": ("NHWC", "HWIO", "NHWC"), **kwargs}
    nchw = kwargs["dimension_numbers"] is None or kwargs["dimension_numbers"][0] == "NCHW"
    x = jax.random.normal(jax.random.key(0), (2, 4, 8, 8) if nchw else (2, 8, 8, 4))
    in_features = 4 // kwargs.get("feature_group_count", 1)
    w_shape = (6, in_features, 3, 3) if nchw else (3, 3, in_features, 6)
    w = jax.random.normal(jax.random.key(1), w_shape)

    def loss(conv):
        return lambda x, w: jnp.sum(conv(x, w, (1, 1), **kwargs) ** 2)

    assert "_canonical_conv" not in str(jax.make_jaxpr(jax.grad(loss(conv_general_dilated)))(x, w))
    for got, expected in zip(jax.jit(jax.grad(loss(conv_general_dilated), (0, 1)))(x, w),
                             jax.jit(jax.grad(loss(lax.conv_general_dilated), (0, 1)))(x, w)):
        np.testing.assert_array_equal(got, expected)


def test_cnn_gradient_convolutions_stay_canonical_inside_a_scan():
    """XLA:CPU rewrites non-canonical convolutions into its fast layout only outside
    loops; JAX's own convolution gradient inside a ``lax.scan`` compiled to naive loops
    (``f01b_i01o->01bf``, 14x slower for configs/cnn.py). Every convolution of the CNN's
    training step inside a scan must be the canonical NHWC x HWIO one."""
    model = CNN(conv_features=(4, 8), hidden_sizes=(16,))
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28)))
    x = jax.random.uniform(jax.random.key(1), (8, 28, 28))
    labels = jnp.arange(8) % 10

    def loss(p):
        logits = model.apply(p, x)
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

    def epoch(p):
        def step(p, _):
            g = jax.grad(loss)(p)
            return jax.tree.map(lambda a, b: a - 0.1 * b, p, g), None
        return lax.scan(step, p, None, length=2)[0]

    hlo = jax.jit(epoch).lower(params).compile().as_text()
    labels_seen = re.findall(r"dim_labels=([^,\s]+)", hlo)
    # 2 forward, 1 input gradient (the first layer's is never needed), 2 kernel gradients
    assert len(labels_seen) == 5, labels_seen
    assert set(labels_seen) == {"b01f_01io->b01f"}, labels_seen
    assert "conditional" not in hlo  # the platform switch is resolved when compiling


def test_conv_compiler_options_keep_convolutions_in_xla_on_cpu_only():
    assert models.conv_compiler_options("gpu") == {}
    assert models.conv_compiler_options("tpu") == {}
    options = models.conv_compiler_options()
    assert options and models.conv_compiler_options("cpu") == options
    options["changed"] = "x"  # a copy: the caller may edit it
    assert "changed" not in models.conv_compiler_options()

    # configs/cnn.py's channels: jaxlib 0.10's defaults put all 5 convolutions of the
    # gradient in YNNPACK fusions.
    model = CNN(conv_features=(32, 64), hidden_sizes=(16,))
    params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 28, 28)))
    x = jnp.ones((8, 28, 28))
    step = jax.jit(jax.grad(lambda p: jnp.sum(model.apply(p, x) ** 2)),
                   compiler_options=models.conv_compiler_options())
    hlo = step.lower(params).compile().as_text()
    assert len(re.findall(r" convolution\(", hlo)) == 5  # 2 forward, 3 gradient
    assert convolutions_in_ynn_fusions(hlo) == 0
    # An MLP compiles to the same program with or without them. (If not, this jaxlib's
    # default YNN fusion list changed: update models._YNN_FUSIONS_WITHOUT_CONVOLUTIONS.)
    mlp = MLP(hidden_sizes=(8,))
    mlp_params = jax.jit(mlp.init)(jax.random.key(0), jnp.zeros((1, 28, 28)))
    grad = jax.grad(lambda p: jnp.sum(mlp.apply(p, x) ** 2))
    assert (jax.jit(grad, compiler_options=models.conv_compiler_options())
            .lower(mlp_params).compile().as_text()
            == jax.jit(grad).lower(mlp_params).compile().as_text())


def test_cnn_with_lax_convolution_supports_forward_mode():
    """jopt's convolution is reverse-mode only (a custom VJP); the ``conv`` attribute
    gives lax's back, with the same parameters and outputs."""
    x = jax.random.uniform(jax.random.key(1), (2, 8, 8))
    ours = CNN(conv_features=(2, 4), hidden_sizes=(8,))
    theirs = CNN(conv_features=(2, 4), hidden_sizes=(8,), conv=lax.conv_general_dilated)
    params = jax.jit(ours.init)(jax.random.key(0), x)
    np.testing.assert_allclose(ours.apply(params, x), theirs.apply(params, x), rtol=1e-6)
    with pytest.raises(TypeError, match="forward-mode"):
        jax.jvp(lambda p: ours.apply(p, x), (params,), (params,))
    _, tangent = jax.jvp(lambda p: theirs.apply(p, x), (params,), (params,))
    assert tangent.shape == (2, 10) and bool(jnp.all(jnp.isfinite(tangent)))


def test_conv_general_dilated_takes_precision_as_lax_does():
    x = jax.random.normal(jax.random.key(0), (2, 6, 6, 3))
    w = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
    dn = ("NHWC", "HWIO", "NHWC")
    for precision in ("highest", lax.Precision.HIGHEST, (lax.Precision.HIGHEST,) * 2):
        def loss(conv, precision=precision):
            return lambda w: jnp.sum(conv(x, w, (1, 1), "SAME", dimension_numbers=dn,
                                          precision=precision) ** 2)
        np.testing.assert_allclose(jax.grad(loss(conv_general_dilated))(w),
                                   jax.grad(loss(lax.conv_general_dilated))(w), rtol=1e-5)


@pytest.mark.parametrize("case", ["strides", "rhs_ndim", "channels", "pads"])
def test_conv_general_dilated_rejects_bad_arguments_as_lax_does(case):
    x, w = jnp.ones((2, 8, 8, 3)), jnp.ones((3, 3, 3, 4))
    args = {"strides": (x, w, (1,), "SAME"), "rhs_ndim": (x, w[0], (1, 1), "SAME"),
            "channels": (x, jnp.ones((3, 3, 5, 4)), (1, 1), "SAME"),
            "pads": (x, w, (1, 1), [(1, 1)])}[case]
    dn = ("NHWC", "HWIO", "NHWC")
    with pytest.raises((TypeError, ValueError)) as expected:
        lax.conv_general_dilated(*args, dimension_numbers=dn)
    with pytest.raises(expected.type, match=re.escape(str(expected.value).splitlines()[0])):
        conv_general_dilated(*args, dimension_numbers=dn)
