"""What XLA runs for a jitted step: its jaxpr, optimized HLO, cost analysis and kernels.

:func:`inspect_step` traces, lowers and compiles a function once, ahead of time,
and returns a :class:`StepReport` with

* ``jaxpr`` - JAX's own program (what you wrote, after tracing),
* ``stablehlo_text`` / ``hlo_text`` - the program handed to XLA and the one XLA
  will run after its optimisation passes (fusion, layout, scheduling),
* ``flops``, ``transcendentals``, ``bytes_accessed`` - XLA's static cost
  analysis of the optimized program,
* ``op_counts`` / ``num_kernels`` / ``num_fusions`` - the operations XLA launches,
* ``compile_time_s`` and the executable's memory footprint.

It answers questions such as "does my optimizer update fuse into one kernel?" or
"how many bytes does one step move?" (divide by the step time to get the
achieved bandwidth)::

    report = jopt.inspect.inspect_step(train_step, params, opt_state, batch)
    print(report.summary())
    print(jopt.inspect.compare({"per-leaf": per_leaf, "flat": flat}))

Counts are *static*: a ``lax.scan`` body appears once however many times it runs,
and XLA's cost analysis counts a loop body once too (as of jax 0.10). For a program split over
devices (``shard_map``, ``pmap``, sharded ``jit``) the figures are per device.
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from typing import Any

import jax
import jax.extend.core

__all__ = ["StepReport", "compare", "inspect_step"]

# Opcodes that launch no work of their own: bookkeeping, or control flow whose
# bodies are counted instead.
_NOT_KERNELS = frozenset({
    "parameter", "constant", "get-tuple-element", "tuple", "bitcast", "after-all",
    "add-dependency", "opt-barrier", "partition-id", "replica-id", "domain",
    "while", "conditional", "call",
})
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all",
                "collective-permute", "collective-broadcast")
# Control flow whose called computations run as sequences of kernels (a fusion's
# or a reduction's called computation runs inside one kernel instead).
_CONTROL_FLOW_ATTRS = re.compile(
    r"\b(?:body|condition|true_computation|false_computation|to_apply)=%?([\w.\-]+)"
    r"|\bbranch_computations=\{([^}]*)\}"
)
_INSTRUCTION = re.compile(r"^\s+(?:ROOT\s+)?%?[\w.\-]+\s*=\s*(.*)$")
_METADATA = re.compile(r",\s*(?:metadata|backend_config|frontend_attributes)=(\{.*?\}(?=,\s*\w+=|$)|\S+)")


@dataclasses.dataclass(frozen=True)
class StepReport:
    """What one jitted function compiles to. Built by :func:`inspect_step`.

    Attributes:
      name: the function's name.
      platform: backend it was compiled for (``"cpu"``, ``"gpu"``, ``"tpu"``).
      jaxpr: the traced program (a ``jax.extend.core.ClosedJaxpr``).
      stablehlo_text: the lowered program handed to XLA (StableHLO).
      hlo_text: the optimized HLO module XLA runs.
      flops: floating-point operations XLA's cost analysis counts (None when the
        backend offers no cost analysis). A static estimate: GPU cost models have
        missed the FLOPs of library calls such as cuBLAS matmuls (jax#22249), so
        check it against a hand count before relying on it there.
      transcendentals: exp/log/tanh/... operations counted separately.
      bytes_accessed: bytes read and written by the operations XLA runs.
      op_counts: opcode -> number of launched operations of that kind.
      trace_time_s: seconds to trace and lower.
      compile_time_s: seconds XLA took to compile (about 0 when JAX's in-memory
        cache already held this function for these shapes: call
        ``jax.clear_caches()`` first for a cold figure).
      argument_bytes, output_bytes, temp_bytes: the executable's memory
        footprint (None when unavailable).
      cost: XLA's raw cost-analysis dictionary.
    """

    name: str
    platform: str
    jaxpr: Any
    stablehlo_text: str
    hlo_text: str
    flops: float | None
    transcendentals: float | None
    bytes_accessed: float | None
    op_counts: Mapping[str, int]
    trace_time_s: float
    compile_time_s: float
    argument_bytes: int | None
    output_bytes: int | None
    temp_bytes: int | None
    cost: Mapping[str, float] = dataclasses.field(repr=False)

    @property
    def num_kernels(self) -> int:
        """Operations XLA launches (fusions, library calls, copies, collectives)."""
        return sum(n for op, n in self.op_counts.items() if op not in _NOT_KERNELS)

    @property
    def num_fusions(self) -> int:
        """Fused kernels: several elementwise/reduction operations in one pass."""
        return self.op_counts.get("fusion", 0)

    @property
    def num_collectives(self) -> int:
        """Cross-device communication operations (all-reduce, all-gather, ...)."""
        return sum(n for op, n in self.op_counts.items()
                   if op.removesuffix("-start") in _COLLECTIVES)

    @property
    def primitive_counts(self) -> dict[str, int]:
        """Primitive name -> jaxpr equations using it, nested jaxprs (jit, scan) included."""
        counts: Counter[str] = Counter()
        _count_primitives(self.jaxpr.jaxpr, counts)
        return dict(counts)

    @property
    def num_jaxpr_eqns(self) -> int:
        """Equations in the jaxpr, those of nested jaxprs (jit, scan, cond) included."""
        return sum(self.primitive_counts.values())

    @property
    def arithmetic_intensity(self) -> float | None:
        """FLOPs per byte accessed: low values mean the step is bandwidth-bound."""
        if not self.flops or not self.bytes_accessed:
            return None
        return self.flops / self.bytes_accessed

    def entry_hlo(self, *, strip_metadata: bool = True) -> str:
        """The optimized HLO's entry computation: the sequence of kernels XLA runs.

        Args:
          strip_metadata: drop ``metadata=``/``backend_config=`` attributes, which
            are long and mostly source locations.
        """
        computations = _split_computations(self.hlo_text)
        entry = next(body for (name, is_entry), body in computations.items() if is_entry)
        lines = [_METADATA.sub("", line) if strip_metadata else line for line in entry]
        return "\n".join(lines)

    def summary(self) -> str:
        """A multi-line, human-readable summary."""
        top = sorted(self.op_counts.items(), key=lambda kv: (-kv[1], kv[0]))
        ops = ", ".join(f"{op} x{n}" for op, n in top if op not in _NOT_KERNELS)
        rows = [
            f"StepReport for {self.name!r} on {self.platform}",
            f"  jaxpr equations   {self.num_jaxpr_eqns}",
            f"  FLOPs             {_si(self.flops)}",
            f"  transcendentals   {_si(self.transcendentals)}",
            f"  bytes accessed    {_si(self.bytes_accessed, 'B')}",
            f"  FLOPs / byte      {_fmt(self.arithmetic_intensity)}",
            f"  kernels           {self.num_kernels} ({self.num_fusions} fusions, "
            f"{self.num_collectives} collectives)",
            f"  launched ops      {ops or '-'}",
            f"  memory            arguments {_si(self.argument_bytes, 'B')}, outputs "
            f"{_si(self.output_bytes, 'B')}, temporaries {_si(self.temp_bytes, 'B')}",
            f"  trace+lower       {self.trace_time_s * 1e3:.1f} ms",
            f"  compile           {self.compile_time_s * 1e3:.1f} ms",
        ]
        return "\n".join(rows)

    def __repr__(self) -> str:
        return (
            f"StepReport({self.name!r}, platform={self.platform!r}, "
            f"flops={_si(self.flops)}, bytes_accessed={_si(self.bytes_accessed, 'B')}, "
            f"kernels={self.num_kernels}, fusions={self.num_fusions}, "
            f"compile_time_s={self.compile_time_s:.3f})"
        )


def inspect_step(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> StepReport:
    """Traces, lowers and compiles ``fn(*args, **kwargs)`` and reports what XLA runs.

    Nothing is executed. ``fn`` may be a plain function (it is wrapped in
    ``jax.jit``) or an already-jitted one, whose ``static_argnums``,
    ``donate_argnums`` and shardings are then respected; arguments may be arrays
    or ``jax.ShapeDtypeStruct`` placeholders.

    Args:
      fn: the step to inspect.
      *args, **kwargs: its arguments.

    Returns:
      A :class:`StepReport`.

    Raises:
      TypeError: if ``fn`` is not callable.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jopt.inspect import inspect_step
      >>> a = jax.ShapeDtypeStruct((64, 32), jnp.float32)
      >>> b = jax.ShapeDtypeStruct((32, 16), jnp.float32)
      >>> report = inspect_step(jnp.matmul, a, b)
      >>> report.flops  # 2 * 64 * 32 * 16
      65536.0
    """
    if not callable(fn):
        raise TypeError(
            f"inspect_step needs a function to inspect, got {type(fn).__name__}; "
            "pass the step itself, e.g. inspect_step(train_step, params, batch)."
        )
    jitted = fn if hasattr(fn, "trace") else jax.jit(fn)
    start = time.perf_counter()
    traced = jitted.trace(*args, **kwargs)
    lowered = traced.lower()
    stablehlo_text = lowered.as_text()
    traced_at = time.perf_counter()
    compiled = lowered.compile()
    compiled_at = time.perf_counter()

    hlo_text = compiled.as_text()
    cost = _cost_dict(compiled.cost_analysis())
    memory = compiled.memory_analysis()
    return StepReport(
        name=getattr(traced, "fun_name", None) or getattr(fn, "__name__", repr(fn)),
        platform=_platform(compiled),
        jaxpr=traced.jaxpr,
        stablehlo_text=stablehlo_text,
        hlo_text=hlo_text,
        # XLA leaves out the keys whose count is zero.
        flops=cost.get("flops", 0.0) if cost else None,
        transcendentals=cost.get("transcendentals", 0.0) if cost else None,
        bytes_accessed=cost.get("bytes accessed", 0.0) if cost else None,
        op_counts=dict(_launched_op_counts(hlo_text)),
        trace_time_s=traced_at - start,
        compile_time_s=compiled_at - traced_at,
        argument_bytes=getattr(memory, "argument_size_in_bytes", None),
        output_bytes=getattr(memory, "output_size_in_bytes", None),
        temp_bytes=getattr(memory, "temp_size_in_bytes", None),
        cost=cost,
    )


def compare(reports: Mapping[str, StepReport]) -> str:
    """A text table of several reports side by side (one column per report).

    Example:
      >>> import jax.numpy as jnp
      >>> from jopt.inspect import compare, inspect_step
      >>> x = jnp.ones(8)
      >>> print(compare({"sin": inspect_step(jnp.sin, x),
      ...                "cos": inspect_step(jnp.cos, x)}))  # doctest: +ELLIPSIS
      metric ...
    """
    if not reports:
        raise ValueError("compare needs at least one report: compare({'name': report}).")
    metrics = [
        ("jaxpr equations", lambda r: str(r.num_jaxpr_eqns)),
        ("FLOPs", lambda r: _si(r.flops)),
        ("bytes accessed", lambda r: _si(r.bytes_accessed, "B")),
        ("kernels", lambda r: str(r.num_kernels)),
        ("fusions", lambda r: str(r.num_fusions)),
        ("collectives", lambda r: str(r.num_collectives)),
        ("temporaries", lambda r: _si(r.temp_bytes, "B")),
        ("compile (ms)", lambda r: f"{r.compile_time_s * 1e3:.1f}"),
    ]
    header = ["metric", *reports]
    rows = [header] + [[label, *(fmt(r) for r in reports.values())] for label, fmt in metrics]
    widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
    lines = ["  ".join(cell.ljust(w) if i == 0 else cell.rjust(w)
                       for i, (cell, w) in enumerate(zip(row, widths))).rstrip()
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


# --- helpers -------------------------------------------------------------------------

def _cost_dict(cost: Any) -> dict[str, float]:
    # jax returns a dict (0.4.30+), a list with one dict per device program (older
    # releases), or None where the backend has no cost model.
    if cost is None:
        return {}
    if isinstance(cost, Mapping):
        return {str(k): float(v) for k, v in cost.items()}
    total: Counter[str] = Counter()
    for part in cost:
        total.update({str(k): float(v) for k, v in (part or {}).items()})
    return dict(total)


def _platform(compiled: Any) -> str:
    try:
        devices = compiled.input_shardings[0][0].device_set  # a sharding per argument
        return next(iter(devices)).platform
    except (IndexError, AttributeError, TypeError, StopIteration):
        return jax.default_backend()


def _split_computations(hlo_text: str) -> dict[tuple[str, bool], list[str]]:
    """Maps (computation name, is entry) to its lines, header and braces included."""
    computations: dict[tuple[str, bool], list[str]] = {}
    current: list[str] | None = None
    for line in hlo_text.splitlines():
        if current is None:
            match = re.match(r"^(ENTRY\s+)?%?([\w.\-]+)\s.*\{\s*$", line)
            if match and not line.startswith("HloModule"):
                current = [line]
                computations[(match.group(2), bool(match.group(1)))] = current
        else:
            current.append(line)
            if line.startswith("}"):
                current = None
    return computations


def _opcode(rhs: str) -> str | None:
    """The opcode of an instruction's right-hand side ``<shape> <opcode>(...)``."""
    i = 0
    if rhs.startswith("("):  # a tuple shape: skip its balanced parentheses
        depth = 0
        for i, char in enumerate(rhs):
            depth += (char == "(") - (char == ")")
            if depth == 0:
                break
        i += 1
    else:
        i = rhs.find(" ")
        if i < 0:
            return None
    match = re.match(r"\s*([a-z][\w\-]*)\(", rhs[i:])
    return match.group(1) if match else None


def _launched_op_counts(hlo_text: str) -> Counter[str]:
    """Opcode counts over the entry computation and the control flow it calls."""
    computations = _split_computations(hlo_text)
    by_name = {name: body for (name, _), body in computations.items()}
    todo = [name for name, is_entry in computations if is_entry]
    seen: set[str] = set()
    counts: Counter[str] = Counter()
    while todo:
        name = todo.pop()
        if name in seen or name not in by_name:
            continue
        seen.add(name)
        for line in by_name[name][1:]:
            match = _INSTRUCTION.match(line)
            if not match:
                continue
            op = _opcode(match.group(1))
            if op is None:
                continue
            counts[op] += 1
            if op in ("while", "conditional", "call"):
                for single, several in _CONTROL_FLOW_ATTRS.findall(line):
                    todo.extend([single] if single else
                                [c.strip().lstrip("%") for c in several.split(",")])
    return counts


def _count_primitives(jaxpr: Any, counts: Counter[str]) -> None:
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] += 1
        for sub in jax.extend.core.jaxprs_in_params(eqn.params):
            _count_primitives(sub, counts)


def _si(value: float | None, unit: str = "") -> str:
    if value is None:
        return "n/a"
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= factor:
            return f"{value / factor:.3g} {prefix}{unit}"
    return f"{value:.4g} {unit}".rstrip()


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3g}"
