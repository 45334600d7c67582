"""Tests for jopt.inspect: cost analysis, kernel counts and reports of jitted steps."""

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jopt
from jopt.inspect import StepReport, _cost_dict, compare, inspect_step


def _spec(*shape):
    return jax.ShapeDtypeStruct(shape, jnp.float32)


def test_matmul_flops_and_bytes_are_exact():
    m, k, n = 64, 32, 16
    report = inspect_step(jnp.matmul, _spec(m, k), _spec(k, n))
    assert isinstance(report, StepReport)
    assert report.flops == 2 * m * k * n
    assert report.transcendentals == 0
    # Reads both operands and writes the product once, nothing more.
    assert report.bytes_accessed == 4 * (m * k + k * n + m * n)
    assert report.argument_bytes == 4 * (m * k + k * n)
    assert report.output_bytes == 4 * m * n
    assert report.platform == jax.default_backend()
    assert report.num_jaxpr_eqns == 1
    assert "dot_general" in str(report.jaxpr)
    assert "stablehlo.dot_general" in report.stablehlo_text
    assert report.hlo_text.startswith("HloModule")
    assert report.compile_time_s > 0 and report.trace_time_s > 0


def test_elementwise_chain_fuses_into_one_kernel():
    n = 1000
    report = inspect_step(lambda x: jnp.tanh(2.0 * x + 1.0), jnp.ones(n))
    assert report.num_kernels == 1
    assert report.num_fusions == 1
    assert report.transcendentals == n
    assert report.arithmetic_intensity == pytest.approx(report.flops / report.bytes_accessed)
    assert "fusion(" in report.entry_hlo()


def test_loop_bodies_are_counted_and_nested_jaxprs_included():
    def scanned(x):
        body = lambda carry, _: (jnp.sin(carry) * 2.0, None)
        return jax.lax.scan(body, x, None, length=7)[0]

    report = inspect_step(scanned, jnp.ones(256))
    assert report.op_counts["while"] == 1
    entry = report.entry_hlo()
    entry_kernels = sum(f" {op}(" in line for line in entry.splitlines()
                        for op in ("fusion", "copy"))
    # The loop body's kernel runs inside the while loop, not in the entry computation.
    assert report.num_kernels > entry_kernels
    # scan + the two equations of its body.
    assert report.num_jaxpr_eqns == 3
    assert report.primitive_counts == {"scan": 1, "sin": 1, "mul": 1}


def test_jitted_function_keeps_its_static_arguments():
    power = jax.jit(lambda x, n: x ** n, static_argnums=1)
    report = inspect_step(power, jnp.ones(4), 3)
    assert report.name == "<lambda>"
    assert "integer_pow" in str(report.jaxpr) and "y=3" in str(report.jaxpr)


def test_optimizer_step_on_flat_buffers_has_fewer_kernels():
    params = {f"w{i}": jnp.ones((8 + i, 4)) for i in range(12)}
    tx = jopt.adam(1e-3)

    def step(p, state):
        grads = jax.tree.map(jnp.cos, p)
        updates, state = tx.update(grads, state, p)
        return jopt.apply_updates(p, updates), state

    per_leaf = inspect_step(step, params, tx.init(params))
    flat = jopt.flat.FlatParams.pack(params)
    packed = inspect_step(step, flat, tx.init(flat))
    assert packed.num_kernels < per_leaf.num_kernels
    assert packed.flops == pytest.approx(per_leaf.flops, rel=0.05)


@pytest.mark.skipif(jax.device_count() < 2, reason="one device: XLA removes the psum")
def test_collectives_are_counted():
    mesh = jax.make_mesh((len(jax.devices()),), ("x",))
    total = jax.jit(jax.shard_map(lambda x: jax.lax.psum(x.sum(), "x"),
                                  mesh=mesh, in_specs=P("x"), out_specs=P()))
    x = jax.ShapeDtypeStruct((len(jax.devices()), 4), jnp.float32,
                             sharding=NamedSharding(mesh, P("x")))
    report = inspect_step(total, x)
    assert report.num_collectives == 1
    assert report.op_counts["all-reduce"] == 1


def test_summary_repr_and_compare():
    a = inspect_step(jnp.sin, jnp.ones(8))
    b = inspect_step(jnp.matmul, _spec(4, 4), _spec(4, 4))
    assert "flops=" in repr(a) and "kernels=1" in repr(a)
    summary = a.summary()
    assert summary.startswith(f"StepReport for 'sin' on {jax.default_backend()}")
    assert "transcendentals   8" in summary
    table = compare({"sin": a, "matmul": b})
    lines = table.splitlines()
    assert lines[0].split() == ["metric", "sin", "matmul"]
    # sin is a transcendental, not a FLOP; the 4x4 matmul costs 2 * 4**3.
    assert ["FLOPs", "0", "128"] in [line.split() for line in lines]
    assert "metadata=" not in a.entry_hlo()


def test_cost_dict_accepts_every_shape_jax_has_returned():
    assert _cost_dict(None) == {}
    assert _cost_dict({"flops": 2}) == {"flops": 2.0}
    # Older jax: one dictionary per device program.
    assert _cost_dict([{"flops": 2.0}, {"flops": 3.0, "bytes accessed": 1}]) == {
        "flops": 5.0, "bytes accessed": 1.0}


def test_bad_input_errors_name_the_fix():
    with pytest.raises(TypeError, match="pass the step itself"):
        inspect_step(3, jnp.ones(2))
    with pytest.raises(ValueError, match="at least one report"):
        compare({})
