"""Checkpoints: a training run's state saved every epoch with orbax, checked when restored.

A checkpoint is one orbax step directory ``workdir/checkpoints/<epoch>`` with two
items: ``state`` (the train state pytree: parameters, optimizer state, step) and
``meta`` (JSON: the epoch, the full config, the run's *identity* and the structure
of the state); a data-parallel run with gradient compression adds ``residuals``
(its per-device error feedback, so that it resumes exactly). Orbax writes a step
into a temporary directory and renames it when complete, so a run killed at any
moment leaves only whole checkpoints behind.

Restoring first compares the checkpoint's identity - the model, the optimizer and
its state storage, flat or tree parameters, the data set, quantization-aware
training - and the state's
structure with what the current config would build, and raises
:class:`CheckpointMismatchError` naming both sides instead of failing deep inside
orbax (or silently loading parameters into the wrong model). Other keys (learning
rate, number of epochs, ...) may change between runs: that is how a run is extended.
A checkpoint that orbax cannot read (damaged on disk) raises
:class:`CheckpointReadError` naming its step directory: deleting that directory
resumes from the checkpoint before it.

Example:
  >>> import jax.numpy as jnp, ml_collections, tempfile
  >>> from jopt import checkpoints
  >>> config = ml_collections.ConfigDict({"model": {"name": "mlp"}, "dataset": "mnist",
  ...     "flat_params": True, "optimizer": {"name": "adam", "state_storage": None}})
  >>> state = {"w": jnp.ones(3)}
  >>> workdir = tempfile.mkdtemp()
  >>> with checkpoints.manager(workdir, keep=2) as mngr:
  ...     checkpoints.save(mngr, 1, state, config)
  ...     restored, meta = checkpoints.restore_latest(mngr, state, config)
  >>> meta["epoch"], restored["w"].tolist()
  (1, [1.0, 1.0, 1.0])
"""

from __future__ import annotations

import gc
import sys
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

__all__ = [
    "CheckpointMismatchError",
    "CheckpointReadError",
    "describe_state",
    "manager",
    "read_meta",
    "restore_latest",
    "run_identity",
    "save",
]

CHECKPOINT_DIR = "checkpoints"


class CheckpointMismatchError(ValueError):
    """A checkpoint belongs to another model, optimizer or state layout than the config."""


class CheckpointReadError(ValueError):
    """A checkpoint cannot be read (damaged on disk); the message names it and the fix."""


# What a meta record always holds (see save); one without them is damaged.
_META_KEYS = ("epoch", "identity", "state_structure", "config")


def _restore(mngr: ocp.CheckpointManager, step: int, **items: Any) -> Any:
    """``mngr.restore`` of ``items`` from ``step``; a failure is a CheckpointReadError."""
    # Before the restore, not after it fails: an abandoned read can report as soon
    # as orbax closes its loop, before the error below is built.
    _drop_abandoned_read_reports()
    try:
        return mngr.restore(step, args=ocp.args.Composite(**items))
    # What damaged files raise through orbax and tensorstore: OSError (missing files),
    # ValueError (tensorstore's decoding errors, JSONDecodeError), KeyError (orbax's
    # metadata lookups), EOFError. Anything else (MemoryError, a bug) propagates as is.
    except (OSError, ValueError, KeyError, EOFError) as e:
        root = e  # The innermost error says what is wrong (tensorstore wraps it twice).
        while (inner := root.__cause__ or root.__context__) is not None and str(inner):
            root = inner
        error = _unreadable(mngr, step, f"{type(root).__name__}: {root}")
        del e, root, inner  # Not chained: the traceback holds orbax's abandoned reads.
    time.sleep(0.2)  # the abandoned reads finish (their reports are dropped) ...
    gc.collect()  # ... and are collected
    raise error


def _drop_abandoned_read_reports() -> None:
    """Silences what orbax leaves behind when one array of a restore fails.

    Orbax closes its event loop with the other arrays' reads still pending: their
    TensorStore callbacks then fail ("Event loop is closed"), and their coroutines,
    once garbage collected, raise from an ``except BaseException`` - each printing
    "Exception ignored in: ..." and pages of TensorStore spec after our message, at
    whatever moment the reads finish (as early as orbax's loop closes, later still
    on a loaded machine). So from the first restore on, the process's
    ``sys.unraisablehook`` drops exactly those reports (a RuntimeError "Event loop
    is closed", or an orbax coroutine's) and passes every other one on. It was
    installed only after a failed restore; a report that came sooner (once, on a
    loaded CI machine) got through.
    """
    if not getattr(sys.unraisablehook, "_jopt_drops_abandoned_reads", False):
        previous = sys.unraisablehook

        def quiet(report: Any) -> None:
            code = getattr(report.object, "cr_code", None)
            from_orbax = code is not None and "orbax" in code.co_filename
            closed_loop = (isinstance(report.exc_value, RuntimeError)
                           and str(report.exc_value) == "Event loop is closed")
            if not (from_orbax or closed_loop):
                previous(report)

        quiet._jopt_drops_abandoned_reads = True  # type: ignore[attr-defined]
        sys.unraisablehook = quiet


def _unreadable(mngr: ocp.CheckpointManager, step: int, reason: str) -> CheckpointReadError:
    where = f"{mngr.directory}/{step}"
    reason = (reason.strip().splitlines() or [""])[0]
    reason = reason if len(reason) <= 300 else reason[:300] + "..."
    earlier = [s for s in mngr.all_steps() if s < step]
    if earlier:
        fix = (f"If it is damaged (a disk error, a copy cut short), delete {where} to resume "
               f"from the previous checkpoint, {mngr.directory}/{max(earlier)}, or use a "
               f"fresh --workdir.")
    else:
        fix = (f"If it is damaged (a disk error, a copy cut short) - it is the only "
               f"checkpoint - delete {where} to train from the start, or use a fresh "
               f"--workdir.")
    return CheckpointReadError(f"The checkpoint {where} cannot be read ({reason}). {fix}")


def manager(workdir: str | Path, keep: int | None = None, *,
            create: bool = True) -> ocp.CheckpointManager:
    """An orbax ``CheckpointManager`` on ``workdir/checkpoints`` keeping the last ``keep``.

    Saving is synchronous: the state is small, and a save that returned is on disk.
    Use it as a context manager (or call ``close()``).

    Args:
      workdir: the run's directory.
      keep: checkpoints kept when saving (None: all).
      create: create ``workdir/checkpoints`` if it does not exist.
    """
    options = ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=create, enable_async_checkpointing=False
    )
    return ocp.CheckpointManager(Path(workdir).absolute() / CHECKPOINT_DIR, options=options)


def run_identity(config: ml_collections.ConfigDict) -> dict[str, Any]:
    """The config values a checkpoint is only valid for (see the module docstring)."""
    model = config.model.to_dict()
    return {
        "model": {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(model.items())},
        "optimizer": config.optimizer.name,
        "state_storage": config.optimizer.state_storage,
        "flat_params": config.flat_params,
        "dataset": config.dataset,
        "quantization": _qat_identity(config),
    }


def _qat_identity(config: ml_collections.ConfigDict) -> dict[str, Any] | None:
    # A QAT model has the float model's parameter names and shapes, so only the
    # config tells them apart; None when training is not quantization-aware.
    settings = config.get("quantization")
    if settings is None or (settings.weights is None and settings.activations is None):
        return None
    return {"weights": settings.weights, "activations": settings.activations}


def describe_state(state: Any) -> list[str]:
    """One ``"path: dtype[shape]"`` line per leaf of a state (arrays or shape structs)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(state)
    return [f"{jax.tree_util.keystr(path)}: {leaf.dtype}{list(leaf.shape)}"
            for path, leaf in leaves]


def save(mngr: ocp.CheckpointManager, epoch: int, state: Any,
         config: ml_collections.ConfigDict, *, residuals: Any = None, **extra: Any) -> None:
    """Saves ``state`` as the checkpoint of ``epoch`` (old ones beyond ``keep`` are deleted).

    Args:
      mngr: from :func:`manager`.
      epoch: the checkpoint's step number.
      state: the pytree to save.
      config: the run's config, stored whole in the meta record.
      residuals: data-parallel gradient-compression residuals (host arrays, see
        :meth:`jopt.parallel.LoopEpochs.residuals`), saved as their own item.
      **extra: more JSON-serialisable meta entries.
    """
    meta = {
        **extra,
        "epoch": int(epoch),
        "identity": run_identity(config),
        "state_structure": describe_state(state),
        "config": config.to_dict(),
    }
    items = dict(state=ocp.args.StandardSave(state))
    if residuals:
        meta["residuals"] = True
        items["residuals"] = ocp.args.StandardSave(residuals)
    mngr.save(epoch, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **items))


def read_meta(mngr: ocp.CheckpointManager, epoch: int | None = None) -> dict[str, Any] | None:
    """The meta record of checkpoint ``epoch`` (default: the latest); None if there is none."""
    epoch = mngr.latest_step() if epoch is None else epoch
    if epoch is None:
        return None
    meta = _restore(mngr, epoch, meta=ocp.args.JsonRestore()).meta
    if not isinstance(meta, dict) or any(key not in meta for key in _META_KEYS):
        raise _unreadable(mngr, epoch, f"its meta record lacks some of {list(_META_KEYS)}")
    return meta


def restore_latest(mngr: ocp.CheckpointManager, like: Any,
                   config: ml_collections.ConfigDict) -> tuple[Any, dict[str, Any]] | None:
    """Restores the latest checkpoint into the structure of ``like``.

    Args:
      mngr: from :func:`manager`.
      like: a state (or its ``jax.ShapeDtypeStruct``s) with the structure, shapes
        and dtypes the config builds.
      config: the current run's config.

    Returns:
      ``(state, meta)``, or None when there is no checkpoint.

    Raises:
      CheckpointMismatchError: the checkpoint belongs to another model, optimizer,
        state storage, parameter layout or data set, or its state has another structure.
      CheckpointReadError: the checkpoint is damaged (the message names its directory).
    """
    meta = read_meta(mngr)
    if meta is None:
        return None
    where = f"{mngr.directory}/{meta['epoch']}"
    _check_identity(meta["identity"], run_identity(config), where)
    _check_structure(meta["state_structure"], describe_state(like), where)
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, like)
    restored = _restore(mngr, meta["epoch"], state=ocp.args.StandardRestore(abstract))
    return restored.state, meta


def restore_residuals(mngr: ocp.CheckpointManager, epoch: int) -> Any:
    """The compression residuals saved with checkpoint ``epoch`` (``{}`` if none were)."""
    meta = read_meta(mngr, epoch)
    if not meta or not meta.get("residuals"):
        return {}
    restored = _restore(mngr, epoch, residuals=ocp.args.StandardRestore())
    return jax.tree.map(np.asarray, restored.residuals)


_FIX = ("Use a fresh --workdir for this config, or set those keys back to the "
        "checkpoint's values to resume it.")


def _check_identity(saved: Mapping[str, Any], current: Mapping[str, Any], where: str) -> None:
    keys = {"model": "config.model", "optimizer": "config.optimizer.name",
            "state_storage": "config.optimizer.state_storage",
            "flat_params": "config.flat_params", "dataset": "config.dataset",
            "quantization": "config.quantization"}
    differences = [
        f"  {keys[k]}: checkpoint {saved.get(k)!r}, config {current[k]!r}"
        for k in keys if saved.get(k) != current[k]
    ]
    if differences:
        raise CheckpointMismatchError(
            f"The checkpoint {where} belongs to another run:\n" + "\n".join(differences)
            + f"\n(checkpoint: {_summary(saved)}; config: {_summary(current)}).\n" + _FIX
        )


def _summary(identity: Mapping[str, Any]) -> str:
    model = identity.get("model", {})
    return (f"model {model.get('name')} {model.get('hidden_sizes')}, optimizer "
            f"{identity.get('optimizer')} with state_storage={identity.get('state_storage')}")


def _check_structure(saved: list[str], current: list[str], where: str) -> None:
    if saved == current:
        return
    first = next((i for i, (a, b) in enumerate(zip(saved, current)) if a != b),
                 min(len(saved), len(current)))
    show = lambda lines: lines[first] if first < len(lines) else "(nothing)"  # noqa: E731
    raise CheckpointMismatchError(
        f"The checkpoint {where} holds a train state of another structure than this "
        f"config builds ({len(saved)} vs {len(current)} arrays; first difference: "
        f"checkpoint {show(saved)!r}, config {show(current)!r}). An optimizer "
        f"hyper-parameter that adds or removes state (momentum, amsgrad, centered, "
        f"clip_global_norm) or the model size probably changed. " + _FIX
    )
