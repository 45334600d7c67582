"""The ``jopt`` command line: ``jopt train`` and ``jopt eval`` over :mod:`jopt.train`.

A thin layer, as in the Flax examples: it loads a config file, applies
``--config.<key>=<value>`` overrides, and calls :func:`jopt.train.train_and_evaluate`
or :func:`jopt.train.evaluate_checkpoint`. Run ``jopt --help`` or ``jopt train
--help`` for the usage. Errors the user can fix (a bad config key or value, a
checkpoint of another run in the workdir, missing, corrupt or mislabelled data, a
damaged checkpoint or ``metrics.jsonl``) are printed as one message with exit status
2, without a traceback.

Config files are Python files with a ``get_config()`` function returning an
``ml_collections.ConfigDict`` (see ``configs/``). They are loaded by path with
:func:`load_config`, which is also how a variant config starts from the default
one wherever it is run from::

    from pathlib import Path
    from jopt.cli import load_config

    def get_config():
        config = load_config(Path(__file__).with_name("default.py"))
        config.dataset = "fashion_mnist"
        return config
"""

from __future__ import annotations

import argparse
import ast
import importlib.util
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import ml_collections

__all__ = ["ConfigFileError", "ConfigOverrideError", "apply_overrides", "load_config", "main"]

_DESCRIPTION = """\
jopt: train and evaluate Flax models with jopt optimizers.

commands:
  train     train a model from a config file; resumes if WORKDIR holds checkpoints
  eval      evaluate the last checkpoint in WORKDIR on the test set
  quantize  post-training quantization of WORKDIR's last checkpoint (integer inference)

examples:
  jopt train --config configs/default.py --workdir runs/mnist
  jopt train --config configs/fashion_mnist_mlp.py --workdir runs/fmnist \\
      --config.optimizer.learning_rate=3e-4 --config.num_epochs=10
  jopt eval --workdir runs/fmnist
  jopt train --config configs/fashion_mnist_shard_map.py --workdir runs/mh \\
      --coordinator 10.0.0.1:9876 --num-processes 2 --process-id 0   # on each host
  jopt quantize --workdir runs/fmnist --mode int8
"""

_TRAIN_EPILOG = """\
config overrides:
  Any config key can be set on the command line:
    --config.num_epochs=10
    --config.optimizer.name=adamw --config.optimizer.weight_decay=1e-4
    --config.optimizer.schedule.name=warmup_cosine
    --config.model.hidden_sizes=128,128
    --config.optimizer.state_storage=int8 --config.compute_dtype=bfloat16
  (--config.KEY VALUE works too.) Values are parsed as the key's type (int,
  float, bool: true/false, str, tuple). None (or null) unsets an optional key
  (one that is None by default), e.g. --config.optimizer.state_storage=None.
  An unknown key or a value of the wrong type is an error that names the key.

outputs in WORKDIR:
  metrics.jsonl   one JSON record per epoch (losses, accuracies, epoch time)
  curves.png      loss and accuracy per epoch
  config.json     the config of the run
  checkpoints/    the last config.checkpoint_keep epochs (orbax); running the
                  same command again resumes from the last one
"""


class ConfigFileError(ValueError):
    """A config file has no ``get_config()``, or it returns no ``ConfigDict``."""


class ConfigOverrideError(ValueError):
    """A ``--config.<key>=<value>`` override names no key, or has a bad value."""


def load_config(path: str | os.PathLike, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads ``get_config()`` from a Python file and applies command-line overrides.

    Args:
      path: the config file.
      overrides: strings ``"--config.a.b=value"`` (or ``"a.b=value"``).

    Returns:
      The locked config.

    Raises:
      FileNotFoundError: no such file.
      ConfigFileError: the file has no ``get_config()``, or it returns no ConfigDict.
      ConfigOverrideError: an override names no key or has a value of the wrong type.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} does not exist; see the configs/ directory.")
    module_name = f"_jopt_config_{path.stem}_{abs(hash(path.resolve()))}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "get_config", None)):
        raise ConfigFileError(
            f"Config file {path} must define get_config() returning a ConfigDict.")
    config = module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigFileError(
            f"{path}: get_config() returned {type(config).__name__}, not a ConfigDict.")
    config.lock()
    apply_overrides(config, overrides)
    return config


def apply_overrides(config: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Sets ``--config.a.b=value`` overrides in place, type-checked against the config.

    Raises:
      ConfigOverrideError: naming the key (and the keys that exist there) or the type.
    """
    for override in overrides:
        text = override.removeprefix("--").removeprefix("config.")
        key, sep, raw = text.partition("=")
        if not sep or not key:
            raise ConfigOverrideError(
                f"Cannot read the override {override!r}; write it as --config.KEY=VALUE."
            )
        *parents, leaf = key.split(".")
        node = config
        for depth, part in enumerate(parents):
            child = node.get(part) if isinstance(node, ml_collections.ConfigDict) else None
            if not isinstance(child, ml_collections.ConfigDict):
                _unknown_key("config." + ".".join(parents[: depth + 1]), node)
            node = child
        if leaf not in node:
            _unknown_key(f"config.{key}", node)
        value = _parse_value(f"config.{key}", raw, node.get_type(leaf), _optional(node, leaf))
        try:
            node[leaf] = value
        except (TypeError, ValueError) as e:
            raise ConfigOverrideError(
                f"config.{key}={raw!r} has the wrong type: {e}") from None


def _unknown_key(key: str, node: ml_collections.ConfigDict) -> None:
    raise ConfigOverrideError(
        f"Unknown config key {key}; the keys there are: {', '.join(sorted(node.keys()))}."
    )


def _optional(node: ml_collections.ConfigDict, leaf: str) -> bool:
    """Whether ``node.leaf`` may be None: declared ``placeholder(type)``, or None now."""
    # A placeholder is a FieldReference, and stays one when a config sets it (say
    # quantization.weights = "int4"); plain values (seed = 0) are not references.
    field = dict(node.items(preserve_field_references=True))[leaf]
    return isinstance(field, ml_collections.FieldReference) or node[leaf] is None


def _parse_value(key: str, raw: str, kind: type, optional: bool = False) -> Any:
    if raw.strip().lower() in ("none", "null"):
        if optional:
            return None
        if kind is not str:  # A str key takes "none" literally (e.g. parallel=none).
            raise ConfigOverrideError(
                f"{key} cannot be None: it is not optional (only keys declared with "
                f"placeholder(...) in the config, None by default, can be unset); give a "
                f"value of type {kind.__name__}.")
    if kind is str:
        return raw
    if kind is bool:
        lowered = raw.strip().lower()
        if lowered in ("true", "1", "yes"):
            return True
        if lowered in ("false", "0", "no"):
            return False
        raise ConfigOverrideError(f"{key} is a bool; write true or false, not {raw!r}.")
    try:
        value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        raise ConfigOverrideError(
            f"{key} must be of type {kind.__name__}; {raw!r} is not.") from None
    if kind is tuple and not isinstance(value, (tuple, list)):
        value = (value,)
    if kind is tuple:
        value = tuple(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise ConfigOverrideError(
            f"{key} must be of type {kind.__name__}; got {raw!r} ({type(value).__name__}).")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="jopt", description=_DESCRIPTION, allow_abbrev=False,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    train = commands.add_parser(
        "train", help="train a model from a config file (resumes from WORKDIR's checkpoints)",
        description="Train a model from a config file, evaluating on the test set after\n"
                    "every epoch. Running it again on the same WORKDIR resumes from its last\n"
                    "checkpoint.",
        epilog=_TRAIN_EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
        allow_abbrev=False,
        usage="jopt train --config FILE --workdir DIR [--config.KEY=VALUE ...]\n"
              "                  [--coordinator HOST:PORT --num-processes N --process-id I]")
    train.add_argument("--config", required=True, metavar="FILE",
                       help="Python file with get_config(), e.g. configs/default.py")
    train.add_argument("--workdir", required=True, metavar="DIR",
                       help="output directory (metrics, curves, checkpoints)")
    hosts = train.add_argument_group(
        "multi-host (jax.distributed)",
        "Run the same command in every process, each with its own --process-id.\n"
        "Also read from config.distributed.* and from JOPT_COORDINATOR,\n"
        "JOPT_NUM_PROCESSES, JOPT_PROCESS_ID; flags win.")
    hosts.add_argument("--coordinator", metavar="HOST:PORT",
                       help="address where process 0 listens, reachable from every process")
    hosts.add_argument("--num-processes", type=int, metavar="N",
                       help="number of processes taking part")
    hosts.add_argument("--process-id", type=int, metavar="I", help="this process, 0 .. N-1")
    evaluate = commands.add_parser(
        "eval", help="evaluate the last checkpoint in WORKDIR on the test set",
        description="Evaluate the last checkpoint in WORKDIR on the test set, with the "
                    "config saved there, and print the test loss and accuracy.",
        allow_abbrev=False)
    evaluate.add_argument("--workdir", required=True, metavar="DIR",
                          help="directory of a `jopt train` run")
    quantize = commands.add_parser(
        "quantize", help="post-training quantization of WORKDIR's last checkpoint",
        description="Quantize the dense kernels of WORKDIR's last checkpoint per output "
                    "channel, evaluate the test set with integer inference (int8 x int8 -> "
                    "int32 matmuls), write WORKDIR/quantized_MODE.npz and append the "
                    "accuracy and sizes to WORKDIR/metrics.jsonl.",
        allow_abbrev=False)
    quantize.add_argument("--workdir", required=True, metavar="DIR",
                          help="directory of a `jopt train` run")
    quantize.add_argument("--mode", choices=("int8", "int4", "ternary", "binary"), default=None,
                          help="weight codes (default: the run's QAT mode, else int8)")
    return parser


def _split_overrides(args: Sequence[str]) -> tuple[list[str], list[str]]:
    """``--config.KEY=VALUE`` and ``--config.KEY VALUE`` overrides, and the rest."""
    overrides, unknown = [], []
    args = list(args)
    while args:
        arg = args.pop(0)
        if not arg.startswith("--config."):
            unknown.append(arg)
        elif "=" in arg or not args or args[0].startswith("--"):
            overrides.append(arg)
        else:
            overrides.append(f"{arg}={args.pop(0)}")
    return overrides, unknown


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``jopt`` command; returns the exit status."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    args, rest = parser.parse_known_args(argv)
    overrides, unknown = _split_overrides(rest)
    if unknown or (overrides and args.command != "train"):
        parser.error(f"unrecognized arguments: {' '.join(unknown or overrides)}")

    # Imported here, not at the top: they import jax, and --help should be instant.
    from jopt import checkpoints, data, distributed, train

    # Damaged files (a corrupt checkpoint, data file or metrics.jsonl) are user errors
    # too: the message names the file and what to do about it.
    user_errors = (ConfigFileError, ConfigOverrideError, train.ConfigError, checkpoints.CheckpointMismatchError,
                   checkpoints.CheckpointReadError, train.WorkdirError,
                   data.DatasetNotFoundError, data.DatasetFileError, FileNotFoundError,
                   distributed.DistributedConfigError)
    try:
        if args.command == "train":
            config = load_config(args.config, overrides)
            hosts = config.distributed
            distributed.initialize(  # before anything touches the devices
                args.coordinator or hosts.coordinator,
                hosts.num_processes if args.num_processes is None else args.num_processes,
                hosts.process_id if args.process_id is None else args.process_id)
            train.train_and_evaluate(config, args.workdir)
        elif args.command == "quantize":
            record = train.quantize_checkpoint(args.workdir, mode=args.mode)
            print(f"{record['mode']}: test_accuracy {100 * record['test_accuracy']:.2f}% "
                  f"(the model as trained: {100 * record['float_test_accuracy']:.2f}%), "
                  f"{record['float32_bytes']:,} -> {record['quantized_bytes']:,} bytes "
                  f"({record['compression']:.2f}x); wrote {record['file_bytes']:,} bytes to "
                  f"{args.workdir}/quantized_{record['mode']}.npz")
        else:
            metrics = train.evaluate_checkpoint(args.workdir)
            print(f"test_loss {metrics['test_loss']:.4f}  "
                  f"test_accuracy {100 * metrics['test_accuracy']:.2f}%  "
                  f"(epoch {metrics['epoch']}, {args.workdir})")
    except user_errors as e:
        print(f"jopt {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
