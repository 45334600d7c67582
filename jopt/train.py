"""Training loop: trains a Flax model with a jopt optimizer from an ml_collections config.

``train_and_evaluate(config, workdir)`` is the whole job (the Flax examples' shape);
the pieces it is made of are small public functions so that other loops
(data-parallel, pruning, notebooks) can reuse or replace one of them:

==========================  ===============================================================
``create_model``            the Flax Linen model named by ``config.model``
``create_optimizer``        the jopt optimizer named by ``config.optimizer`` (+ schedule, clip)
``make_apply_fn``           ``(params, uint8 images) -> float32 logits``: normalises on device,
                            unpacks flat params, runs in ``config.compute_dtype``
``make_loss_fn``            mean softmax cross-entropy (optax's) and the logits
``make_train_step``         one optimizer step on one batch
``build_epoch_fn``          the jitted ``lax.scan`` of train steps over an epoch (or chunk)
``build_eval_fn``           the jitted, batched test-set evaluation
``compiler_options_for``    the XLA options both are compiled with (the CNN's, on CPU)
``shuffle_batches``         the epoch's batch indices, a permutation keyed by seed and epoch
==========================  ===============================================================

How an epoch runs. The uint8 images and int32 labels are put on the device once.
Each epoch, ``shuffle_batches`` draws a permutation from a key derived from
``(seed, epoch)`` (so any epoch can be replayed alone, which is what makes
resuming exact) and keeps ``num_train // batch_size`` full batches: the last
partial batch is dropped. One jitted ``lax.scan`` then runs the steps, gathering
each batch from the device-resident data and scaling it to floats inside the step;
the training state is donated, so parameters and optimizer state are updated in
place and Python does no per-step work. With ``config.flat_params`` (the default)
the loss is differentiated with respect to :class:`jopt.flat.FlatParams`, so the
gradient arrives as one buffer and the optimizer update is one fused kernel.
``config.compute_dtype = "bfloat16"`` runs forward and backward passes in bfloat16
while the parameters (and so the optimizer) stay float32.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import logging
import math
import os
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from jopt import checkpoints
from jopt import data as data_lib
from jopt import distributed, optimizers, parallel, pruning, quantization, schedules, storage
from jopt.flat import FlatParams
from jopt.models import CNN, MLP, conv_compiler_options

__all__ = [
    "COMPUTE_DTYPES",
    "MODELS",
    "OPTIMIZERS",
    "SCHEDULES",
    "Checkpoint",
    "ConfigError",
    "EvalData",
    "TrainResult",
    "TrainState",
    "WorkdirError",
    "build_epoch_fn",
    "build_eval_fn",
    "compiler_options_for",
    "create_model",
    "create_optimizer",
    "create_pruning",
    "create_schedule",
    "epoch_key",
    "evaluate_checkpoint",
    "init_train_state",
    "load_checkpoint",
    "make_apply_fn",
    "make_loss_fn",
    "make_train_step",
    "plot_curves",
    "prepare_eval_data",
    "quantize_checkpoint",
    "read_metrics",
    "shuffle_batches",
    "train_and_evaluate",
    "validate_config",
    "write_metrics",
]

OPTIMIZERS: dict[str, Callable[..., optax.GradientTransformation]] = {
    "sgd": optimizers.sgd,
    "momentum": optimizers.momentum,
    "nesterov": optimizers.nesterov,
    "adagrad": optimizers.adagrad,
    "rmsprop": optimizers.rmsprop,
    "adam": optimizers.adam,
    "adamw": optimizers.adamw,
    "nadam": optimizers.nadam,
    "nadamw": optimizers.nadamw,
}
"""Optimizers ``config.optimizer.name`` may name."""

MODELS = ("mlp", "cnn")
SCHEDULES = ("constant", "cosine", "warmup_cosine", "exponential")
COMPUTE_DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
PARALLEL_MODES = ("none", "pmap", "shard_map", "zero1")  # see jopt.parallel
PRUNING_SCHEDULES = ("none", "one_shot", "constant", "polynomial")

_logger = logging.getLogger(__name__)

# Keys of config.optimizer that are not optimizer keyword arguments.
_OPTIMIZER_META_KEYS = ("name", "learning_rate", "schedule", "clip_global_norm", "state_storage")

Params = Any
ApplyFn = Callable[[Params, jax.Array], jax.Array]
LossFn = Callable[[Params, jax.Array, jax.Array], tuple[jax.Array, jax.Array]]


class ConfigError(ValueError):
    """A config value is invalid; the message names the key (``config.a.b``) and the fix."""


class WorkdirError(ValueError):
    """A file in the workdir is damaged; the message names it and the fix."""


class TrainState(NamedTuple):
    """What one train step updates (a pytree: it is the ``lax.scan`` carry).

    Attributes:
      params: the parameters (float32 master copy), a pytree or a ``FlatParams``.
      opt_state: the optimizer state.
      step: number of steps taken, int32 scalar.
    """

    params: Params
    opt_state: optax.OptState
    step: jax.Array


@dataclasses.dataclass(frozen=True)
class TrainResult:
    """What ``train_and_evaluate`` returns.

    Attributes:
      params: the final parameters as the model's pytree (``model.apply(params, x)``).
      metrics: the last epoch's record (same keys as a ``metrics.jsonl`` line).
      history: every epoch's record, from epoch 1 (resumed epochs included).
      state: the final ``TrainState`` (flat params, optimizer state, step).
    """

    params: Params
    metrics: dict[str, float]
    history: list[dict[str, float]]
    state: TrainState


# --------------------------------------------------------------------------- config


def validate_config(config: ml_collections.ConfigDict) -> None:
    """Checks a config before any work is done.

    Raises:
      ConfigError: naming the offending key, its value and the valid choices.
    """
    _check_choice("config.dataset", config.dataset, sorted(data_lib.DATASETS))
    _check_choice("config.model.name", config.model.name, MODELS)
    _check_choice("config.compute_dtype", config.compute_dtype, sorted(COMPUTE_DTYPES))
    _check_choice("config.parallel", config.parallel, PARALLEL_MODES)
    _check_data_parallel(config)
    for key in ("num_epochs", "batch_size", "eval_batch_size", "checkpoint_keep"):
        minimum = 0 if key == "num_epochs" else 1
        if config[key] < minimum:
            raise ConfigError(f"config.{key} must be >= {minimum}, got {config[key]}.")
    if not 0 <= config.seed < 2**32:
        # JAX keys take 32 bits (without jax_enable_x64): seed 2**32 would be seed 0.
        raise ConfigError(f"config.seed must be in [0, 2**32), got {config.seed}.")
    if config.scan_unroll < 0:
        raise ConfigError(
            f"config.scan_unroll must be >= 0 (0: automatic, 4 on GPU/TPU and 1 on "
            f"CPU), got {config.scan_unroll}."
        )
    if config.steps_per_chunk < 0:
        raise ConfigError(
            f"config.steps_per_chunk must be >= 0 (0: a whole epoch per scan), "
            f"got {config.steps_per_chunk}."
        )
    for key in ("train_subset", "test_subset"):
        if config[key] is not None and config[key] < 1:
            raise ConfigError(f"config.{key} must be None (all) or >= 1, got {config[key]}.")
    _check_layer_sizes(config)
    # steps_per_epoch=1 stands for the real count, known once the data is loaded: the
    # checks that depend on it (schedule and pruning epochs) are made in epochs.
    create_optimizer(config, steps_per_epoch=1)  # checks every optimizer and pruning key
    _check_quantization(config)


def _check_data_parallel(config: ml_collections.ConfigDict) -> None:
    compression = config.gradient_compression
    if compression is not None:
        _check_choice("config.gradient_compression", compression, ["int8"])
        if config.parallel == "none":
            raise ConfigError(
                f"config.gradient_compression={compression!r} compresses the gradient exchange "
                "between devices; set config.parallel to 'pmap', 'shard_map' or 'zero1', "
                "or leave it None.")
    # ZeRO-1 updates each device's slice of the parameters on its own: the optimizer
    # must be elementwise (jopt.parallel checks it too, but only once training starts).
    if config.parallel == "zero1" and config.optimizer.clip_global_norm is not None:
        raise ConfigError(
            "config.parallel='zero1' cannot clip by the global norm (config.optimizer."
            f"clip_global_norm={config.optimizer.clip_global_norm}): each device updates its "
            "own slice of the parameters. Use config.parallel='shard_map' or set "
            "config.optimizer.clip_global_norm=None.")
    pruning_schedule = config.get("pruning", {}).get("schedule", "none")
    if config.parallel == "zero1" and pruning_schedule != "none":
        raise ConfigError(
            f"config.parallel='zero1' cannot prune (config.pruning.schedule="
            f"{pruning_schedule!r}): pruning thresholds need every weight of a layer, and "
            "each device updates its own slice. Use config.parallel='shard_map'.")


def _check_layer_sizes(config: ml_collections.ConfigDict) -> None:
    keys = ("hidden_sizes", "conv_features") if config.model.name == "cnn" else ("hidden_sizes",)
    for key in keys:
        sizes = config.model.get(key)
        if not isinstance(sizes, (tuple, list)) or not all(
                isinstance(size, (int, np.integer)) and not isinstance(size, bool) and size >= 1
                for size in sizes):
            raise ConfigError(
                f"config.model.{key} must be positive integers (layer widths), got "
                f"{tuple(sizes) if isinstance(sizes, (tuple, list)) else sizes!r}; "
                f"e.g. --config.model.{key}=128,64.")


def _check_choice(key: str, value: Any, choices: Sequence[str]) -> None:
    if value not in choices:
        raise ConfigError(f"{key}={value!r} is not supported; choose one of {list(choices)}.")


# --------------------------------------------------------------------------- model


def create_model(config: ml_collections.ConfigDict, num_classes: int = 10) -> nn.Module:
    """The Flax Linen model ``config.model`` describes, computing in ``config.compute_dtype``."""
    _check_choice("config.model.name", config.model.name, MODELS)
    _check_choice("config.compute_dtype", config.compute_dtype, sorted(COMPUTE_DTYPES))
    # float32 leaves dtype=None: Flax then computes in the parameters' dtype.
    dtype = None if config.compute_dtype == "float32" else COMPUTE_DTYPES[config.compute_dtype]
    _check_layer_sizes(config)
    hidden = tuple(int(size) for size in config.model.hidden_sizes)
    options = _check_quantization(config)
    # Inputs are standardised with the training set's pixel statistics (see MLP).
    _check_choice("config.dataset", config.dataset, sorted(data_lib.DATASETS))
    spec = data_lib.DATASETS[config.dataset]
    options.update(input_mean=spec.pixel_mean, input_std=spec.pixel_std)
    if config.model.name == "mlp":
        return MLP(hidden_sizes=hidden, num_classes=num_classes, dtype=dtype, **options)
    features = tuple(int(f) for f in config.model.conv_features)
    return CNN(conv_features=features, hidden_sizes=hidden, num_classes=num_classes, dtype=dtype,
               **options)


def _check_quantization(config: ml_collections.ConfigDict) -> dict[str, str | None]:
    """The model's QAT options from ``config.quantization`` (absent in older configs)."""
    settings = config.get("quantization")
    if settings is None:
        return {}
    if settings.weights is not None:
        try:
            quantization.resolve_mode(settings.weights)
        except ValueError as e:
            raise ConfigError(f"config.quantization.weights: {e}") from None
    _check_choice("config.quantization.activations", settings.activations, (None, "int8"))
    return {"quantize_weights": settings.weights, "quantize_activations": settings.activations}


# --------------------------------------------------------------------------- optimizer


def create_schedule(config: ml_collections.ConfigDict, steps_per_epoch: int):
    """The learning-rate schedule ``config.optimizer.schedule`` describes.

    ``learning_rate`` is the constant value, or the peak of a (warmup-)cosine
    schedule, or the initial value of an exponential decay. Epoch counts are
    turned into steps with ``steps_per_epoch``.

    Returns:
      A float or an optax schedule (``step -> learning rate``).
    """
    opt = config.optimizer
    schedule = opt.schedule
    _check_choice("config.optimizer.schedule.name", schedule.name, SCHEDULES)
    lr = opt.learning_rate
    # None (or a negative value: gradient ascent) would train without a word.
    if not (isinstance(lr, (int, float)) and not isinstance(lr, bool) and 0 <= lr < math.inf):
        raise ConfigError(
            f"config.optimizer.learning_rate must be a number >= 0 (the peak value when a "
            f"schedule is used), got {lr!r}.")
    total_steps = max(1, config.num_epochs * steps_per_epoch)
    if schedule.name == "constant":
        return lr
    if schedule.name in ("cosine", "warmup_cosine"):
        warmup = 0.0 if schedule.name == "cosine" else schedule.warmup_epochs
        # Judged in epochs, not in rounded steps: validate_config and load_checkpoint
        # build the optimizer with steps_per_epoch=1, where 0.6 epochs round to 1.
        if not (isinstance(warmup, (int, float)) and not isinstance(warmup, bool)
                and (warmup == 0 or 0 < warmup < config.num_epochs)):
            raise ConfigError(
                f"config.optimizer.schedule.warmup_epochs={warmup} must be >= 0 and "
                f"shorter than config.num_epochs={config.num_epochs}."
            )
        # At least one step after the warmup, however few steps an epoch has.
        warmup_steps = min(int(round(warmup * steps_per_epoch)), total_steps - 1)
        return schedules.warmup_cosine_decay_schedule(
            init_value=schedule.init_value if warmup_steps else lr,
            peak_value=lr,
            warmup_steps=warmup_steps,
            decay_steps=total_steps,
            end_value=schedule.end_value,
        )
    if schedule.decay_epochs <= 0:
        raise ConfigError(
            f"config.optimizer.schedule.decay_epochs must be > 0, got {schedule.decay_epochs}."
        )
    if not 0 < schedule.decay_rate:
        raise ConfigError(
            f"config.optimizer.schedule.decay_rate must be > 0, got {schedule.decay_rate}."
        )
    return schedules.exponential_decay(
        lr,
        transition_steps=max(1, int(round(schedule.decay_epochs * steps_per_epoch))),
        decay_rate=schedule.decay_rate,
        staircase=schedule.staircase,
    )


def create_optimizer(
    config: ml_collections.ConfigDict, steps_per_epoch: int
) -> optax.GradientTransformation:
    """The jopt optimizer ``config.optimizer`` describes.

    ``name`` picks one of :data:`OPTIMIZERS`; its hyper-parameters are the keys of
    ``config.optimizer`` that are set (not None) and are keyword arguments of that
    optimizer; ``state_storage`` is passed through; ``clip_global_norm`` prepends
    ``clip_by_global_norm``; ``schedule`` makes the learning rate a schedule.

    Raises:
      ConfigError: unknown optimizer, a hyper-parameter the optimizer does not take,
        or a value out of range (the message names the ``config.optimizer`` key).
    """
    opt = config.optimizer
    _check_choice("config.optimizer.name", opt.name, sorted(OPTIMIZERS))
    factory = OPTIMIZERS[opt.name]
    accepted = inspect.signature(factory).parameters
    kwargs = {}
    for key, value in opt.items():
        if key in _OPTIMIZER_META_KEYS or value is None:
            continue
        if key not in accepted:
            takes = [p for p in accepted if p not in ("learning_rate", "mask", "mu_dtype",
                                                       "accumulator_dtype", "state_storage")]
            raise ConfigError(
                f"config.optimizer.{key}={value!r} is not a hyper-parameter of "
                f"{opt.name!r} (it takes {takes}); unset it or pick another optimizer."
            )
        kwargs[key] = value
    if opt.state_storage is not None:
        try:
            storage.resolve_storage(opt.state_storage)
        except ValueError as e:
            raise ConfigError(f"config.optimizer.state_storage: {e}") from None
        kwargs["state_storage"] = opt.state_storage
    learning_rate = create_schedule(config, steps_per_epoch)
    try:
        tx = factory(learning_rate, **kwargs)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"config.optimizer ({opt.name}): {e}") from None
    if opt.clip_global_norm is not None:
        if not opt.clip_global_norm > 0:
            raise ConfigError(
                f"config.optimizer.clip_global_norm must be > 0 (or None: no clipping), "
                f"got {opt.clip_global_norm}."
            )
        tx = optax.chain(optax.clip_by_global_norm(opt.clip_global_norm), tx)
    return create_pruning(config, tx, steps_per_epoch)


def create_pruning(config: ml_collections.ConfigDict, tx: optax.GradientTransformation,
                   steps_per_epoch: int) -> optax.GradientTransformation:
    """``tx`` wrapped in :func:`jopt.pruning.prune` as ``config.pruning`` describes.

    ``schedule="none"`` (or a config without ``pruning``) returns ``tx`` unchanged.
    ``begin_epoch``/``end_epoch`` become steps with ``steps_per_epoch``.

    Raises:
      ConfigError: an invalid ``config.pruning`` value (the message names the key).
    """
    settings = config.get("pruning")
    if settings is None or settings.schedule == "none":
        return tx
    _check_choice("config.pruning.schedule", settings.schedule, PRUNING_SCHEDULES)
    if settings.begin_epoch < 0 or (
            settings.schedule != "one_shot" and settings.end_epoch <= settings.begin_epoch):
        raise ConfigError(
            f"config.pruning.end_epoch={settings.end_epoch} must be greater than "
            f"config.pruning.begin_epoch={settings.begin_epoch} (and begin_epoch >= 0)."
        )
    begin = int(round(settings.begin_epoch * steps_per_epoch))
    end = max(begin + 1, int(round(settings.end_epoch * steps_per_epoch)))
    try:
        if settings.schedule == "one_shot":
            schedule = pruning.one_shot(settings.final_sparsity, step=begin)
        elif settings.schedule == "constant":
            schedule = pruning.constant_sparsity(settings.final_sparsity, begin_step=begin,
                                                 end_step=end, frequency=settings.frequency)
        else:
            schedule = pruning.polynomial_decay(settings.initial_sparsity,
                                                settings.final_sparsity, begin, end,
                                                frequency=settings.frequency)
        return pruning.prune(tx, schedule, granularity=settings.granularity,
                             structure=settings.structure)
    except ValueError as e:
        raise ConfigError(f"config.pruning: {e}") from None


def compression_metrics(config: ml_collections.ConfigDict, state: TrainState) -> dict[str, float]:
    """Sparsity and model bytes for a pruned or QAT run (empty otherwise).

    Pruning: ``sparsity`` (over the kernels), ``dense_bytes`` and ``sparse_bytes``
    (the stripped model, :func:`jopt.pruning.strip`). QAT: ``float32_bytes`` and
    ``quantized_bytes`` (:func:`jopt.quantization.size_report`).
    """
    pruned = config.get("pruning") is not None and config.pruning.schedule != "none"
    mode = config.quantization.weights if config.get("quantization") is not None else None
    if not (pruned or mode):
        return {}
    params = state.params.unpack() if isinstance(state.params, FlatParams) else state.params
    params = jax.device_get(params)
    record = {}
    if pruned:
        report = pruning.size_report(params, pruning.masks_from_state(state.opt_state))
        record.update(sparsity=report["sparsity"], dense_bytes=report["dense_bytes"],
                      sparse_bytes=report["sparse_bytes"])
    if mode:
        report = quantization.size_report(params, quantization.quantize_params(params, mode))
        record.update(float32_bytes=report["float32_bytes"],
                      quantized_bytes=report["quantized_bytes"])
    return record


# --------------------------------------------------------------------------- step


def make_apply_fn(model: nn.Module, compute_dtype: Any = jnp.float32) -> ApplyFn:
    """``apply(params, images) -> logits``: the model on raw uint8 images.

    Images are scaled to ``[0, 1]`` in ``compute_dtype`` on the device; flat params
    are unpacked (free slicing under ``jit``; the gradient flows back into the
    buffers as one concatenation, see :meth:`jopt.flat.FlatParams.unpack`); logits come back in float32 so the loss is
    computed in full precision whatever the compute dtype.
    """

    def apply(params, images):
        if isinstance(params, FlatParams):
            params = params.unpack()
        x = images.astype(compute_dtype) * (1.0 / 255.0)
        return model.apply(params, x).astype(jnp.float32)

    return apply


def make_loss_fn(apply_fn: ApplyFn) -> LossFn:
    """``loss(params, images, labels) -> (mean cross-entropy, logits)``.

    The loss is optax's ``softmax_cross_entropy_with_integer_labels`` averaged over
    the batch.
    """

    def loss_fn(params, images, labels):
        logits = apply_fn(params, images)
        loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
        return loss, logits

    return loss_fn


def make_train_step(loss_fn: LossFn, tx: optax.GradientTransformation):
    """``step(state, images, labels) -> (state, (loss, num_correct))``: one update.

    The gradient has the structure of ``state.params``: a ``FlatParams`` in flat
    mode, so ``tx.update`` runs one fused kernel per buffer.
    """

    def train_step(state: TrainState, images, labels):
        (loss, logits), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            state.params, images, labels
        )
        updates, opt_state = tx.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        correct = jnp.sum(jnp.argmax(logits, axis=-1) == labels)
        return TrainState(params, opt_state, state.step + 1), (loss, correct)

    return train_step


def epoch_key(seed: int, epoch: int) -> jax.Array:
    """The key that shuffles epoch ``epoch`` (1-based) of a run with seed ``seed``."""
    return jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 1), epoch)


def shuffle_batches(key: jax.Array, num_examples: int, batch_size: int) -> np.ndarray:
    """Batch indices ``int32[num_examples // batch_size, batch_size]`` of a random permutation.

    The permutation is a function of ``key`` only (see :func:`epoch_key`), so an
    epoch can be replayed alone - which is what makes resuming exact. It is drawn
    on the host, by NumPy's Fisher-Yates shuffle seeded with the key's bits: about
    1 ms for 60k examples, where a permutation on an XLA CPU device is a key-value
    sort costing 15 ms, a tenth of an MNIST epoch. The indices (240 KB) travel to
    the device with the epoch's first step. The last ``num_examples % batch_size``
    examples of the permutation (a different set each epoch) are dropped, so every
    step sees a full batch.
    """
    steps = num_examples // batch_size
    generator = np.random.default_rng(np.asarray(jax.random.key_data(key)))
    permutation = generator.permutation(num_examples)
    return permutation[: steps * batch_size].reshape(steps, batch_size).astype(np.int32)


def scan_unroll(config: ml_collections.ConfigDict) -> int:
    """Train steps per iteration of the epoch's ``lax.scan`` (``config.scan_unroll``).

    0 picks by platform: on a GPU a small model's step is a handful of short
    kernels and the loop's own round trip is a visible part of it (the MLP's
    epoch on an H100: 21.5 ms at 1, 19.1 ms at 4); on CPU unrolling measured no
    gain and only lengthens compilation.
    """
    if config.scan_unroll:
        return int(config.scan_unroll)
    return 1 if jax.default_backend() == "cpu" else 4


def build_epoch_fn(config: ml_collections.ConfigDict, loss_fn: LossFn,
                   tx: optax.GradientTransformation):
    """The jitted function that runs a chunk of an epoch (or all of it) as one scan.

    Returns:
      ``epoch_fn(state, images, labels, batch_indices) -> (state, metrics)``:
      runs one train step per row of ``batch_indices`` (``int32[steps, batch]``),
      gathering each batch from the device-resident ``images`` (uint8) and
      ``labels``. ``state`` is donated. ``metrics`` holds ``loss_sum`` (sum of the
      per-step mean losses) and ``num_correct`` over the chunk.
    """
    _check_choice("config.parallel", config.parallel, PARALLEL_MODES)
    if config.parallel != "none":  # the same contract over all devices (of all processes)
        try:
            return parallel.LoopEpochs(loss_fn, tx, strategy=config.parallel,
                                       batch_size=config.batch_size,
                                       compression=config.gradient_compression,
                                       compiler_options=compiler_options_for(config))
        except ValueError as e:
            raise ConfigError(f"config.batch_size={config.batch_size}: {e}") from None
    train_step = make_train_step(loss_fn, tx)
    unroll = scan_unroll(config)

    def epoch_fn(state, images, labels, batch_indices):
        def body(carry, indices):
            state, loss_sum, correct = carry
            state, (loss, num_correct) = train_step(state, images[indices], labels[indices])
            return (state, loss_sum + loss, correct + num_correct), None

        zero = jnp.zeros((), jnp.float32)
        (state, loss_sum, correct), _ = jax.lax.scan(
            body, (state, zero, jnp.zeros((), jnp.int32)), batch_indices, unroll=unroll
        )
        return state, {"loss_sum": loss_sum, "num_correct": correct}

    return jax.jit(epoch_fn, donate_argnums=0, compiler_options=compiler_options_for(config))


# --------------------------------------------------------------------------- eval


class EvalData(NamedTuple):
    """A test set cut into equal batches on the device; padding has weight 0."""

    images: jax.Array  # [num_batches, batch, ...], uint8
    labels: jax.Array  # [num_batches, batch], int32
    weights: jax.Array  # [num_batches, batch], float32: 1 for real examples, 0 for padding


def prepare_eval_data(images: np.ndarray, labels: np.ndarray, batch_size: int) -> EvalData:
    """Pads the test set to a multiple of ``batch_size`` and puts it on the device."""
    num = len(images)
    batch_size = max(1, min(batch_size, num))
    num_batches = -(-num // batch_size)
    padding = num_batches * batch_size - num
    weights = np.concatenate([np.ones(num, np.float32), np.zeros(padding, np.float32)])
    images = np.concatenate([images, np.zeros((padding, *images.shape[1:]), images.dtype)])
    labels = np.concatenate([labels, np.zeros(padding, labels.dtype)])

    def batched(x):
        return jax.device_put(x.reshape(num_batches, batch_size, *x.shape[1:]))

    return EvalData(batched(images), batched(labels), batched(weights))


def compiler_options_for(config: ml_collections.ConfigDict) -> dict[str, str] | None:
    """The XLA options jopt compiles ``config``'s training and evaluation with:
    :func:`jopt.models.conv_compiler_options` for the CNN (on CPU: XLA's own
    convolution kernels, 2x faster per step than YNNPACK's); none for the MLP."""
    if config.model.name == "cnn":
        return conv_compiler_options() or None
    return None


def build_eval_fn(apply_fn: ApplyFn, compiler_options: dict[str, str] | None = None):
    """The jitted evaluation ``eval_fn(params, eval_data) -> {"loss", "accuracy"}``,
    compiled with ``compiler_options`` (see :func:`compiler_options_for`)."""

    def eval_fn(params, eval_data: EvalData):
        def body(totals, batch):
            images, labels, weights = batch
            logits = apply_fn(params, images)
            losses = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
            correct = (jnp.argmax(logits, axis=-1) == labels).astype(jnp.float32)
            return (totals[0] + jnp.sum(losses * weights), totals[1] + jnp.sum(correct * weights)), None

        zero = jnp.zeros((), jnp.float32)
        (loss_sum, correct), _ = jax.lax.scan(body, (zero, zero), tuple(eval_data))
        count = jnp.sum(eval_data.weights)
        return {"loss": loss_sum / count, "accuracy": correct / count}

    return jax.jit(eval_fn, compiler_options=compiler_options)


# --------------------------------------------------------------------------- loop


def init_train_state(config: ml_collections.ConfigDict, model: nn.Module,
                     tx: optax.GradientTransformation, image_shape: Sequence[int]) -> TrainState:
    """Initial parameters (from ``config.seed``), packed when ``config.flat_params``.

    One jitted program: run eagerly, Flax's ``init`` compiles every operation of
    every initializer on its own (the MLP: 3.2 s on 2 cores, against 1.7 s jitted,
    with bit-identical parameters).
    """
    def init():
        init_key = jax.random.fold_in(jax.random.key(config.seed), 0)
        params = model.init(init_key, jnp.zeros((1, *image_shape), jnp.float32))
        if config.flat_params:
            params = FlatParams.pack(params)
        return TrainState(params, tx.init(params), jnp.zeros((), jnp.int32))

    return jax.jit(init)()


def _load_dataset(config: ml_collections.ConfigDict) -> data_lib.Dataset:
    dataset = data_lib.load(config.dataset, data_dir=config.data_dir)
    return _subset(config, dataset)


def _subset(config, dataset: data_lib.Dataset) -> data_lib.Dataset:
    for key, split in (("train_subset", dataset.train_images), ("test_subset", dataset.test_images)):
        if config[key] is not None and config[key] > len(split):
            raise ConfigError(f"config.{key}={config[key]} but {dataset.name} has only "
                              f"{len(split)} examples in that split.")
    dataset = data_lib.subset(dataset, train=config.train_subset, test=config.test_subset)
    if len(dataset.train_images) < config.batch_size:
        raise ConfigError(
            f"config.batch_size={config.batch_size} is larger than the training set "
            f"({len(dataset.train_images)} examples): lower it or raise config.train_subset."
        )
    return dataset


def _chunks(steps: int, steps_per_chunk: int) -> list[slice]:
    size = steps if steps_per_chunk in (0, None) else min(steps_per_chunk, steps)
    return [slice(start, min(start + size, steps)) for start in range(0, steps, size)]


def _format_record(record: dict[str, float], num_epochs: int) -> str:
    return (
        f"epoch {record['epoch']:>{len(str(num_epochs))}}/{num_epochs}  "
        f"train_loss {record['train_loss']:.4f}  train_acc {100 * record['train_accuracy']:.2f}%  "
        f"test_loss {record['test_loss']:.4f}  test_acc {100 * record['test_accuracy']:.2f}%  "
        f"time {record['epoch_time_s']:.2f}s"
    )


def write_metrics(path: Path, history: Sequence[dict[str, float]]) -> None:
    """Writes ``history`` as JSON lines, atomically (used when a run resumes)."""
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(json.dumps(record) + "\n" for record in history))
    os.replace(tmp, path)


def read_metrics(path: Path) -> list[dict[str, float]]:
    """The records of a ``metrics.jsonl`` (empty if there is none).

    A last line that is not a JSON record is what a run killed while appending one
    leaves behind: it is dropped with a warning. That loses nothing, since the
    checkpoints, not this file, say where a run resumes, and resuming rewrites the
    file from the records the checkpoint covers (the cut epoch is trained again).

    Raises:
      WorkdirError: a line before the last is not a JSON record (the message names
        the file, the line and the fix).
    """
    if not path.exists():
        return []
    # errors="replace": stray bytes make that line invalid JSON, reported below.
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    numbered = [(number, line) for number, line in enumerate(lines, 1) if line.strip()]
    records = []
    for index, (number, line) in enumerate(numbered):
        try:
            record = json.loads(line)
            if not isinstance(record, dict) or "epoch" not in record:
                raise ValueError("not a record with an epoch")
        except ValueError as e:
            if index == len(numbered) - 1:
                _logger.warning(
                    "Ignoring the last line of %s, cut short (%s): a run stopped while "
                    "writing it. The checkpoint says where training resumes.", path, e)
                break
            raise WorkdirError(
                f"{path} is damaged: line {number} is not a metrics record ({e}). Delete "
                f"that line, or the file (it only holds the per-epoch history; the "
                f"checkpoints say where training resumes), and run again.") from None
        records.append(record)
    return records


# curves.png is redrawn at most this often during a run (and after its last epoch):
# drawing it takes 0.5-0.8 s, longer than an MLP epoch on a CPU.
CURVES_EVERY_S = 30.0


def plot_curves(history: Sequence[dict[str, float]], path: Path) -> None:
    """Saves loss and accuracy per epoch (train and test) as a PNG."""
    from matplotlib.figure import Figure  # No pyplot: no global state, no GUI backend.
    from matplotlib.ticker import MaxNLocator

    epochs = [r["epoch"] for r in history]
    figure = Figure(figsize=(10, 4), layout="constrained")
    loss_ax, acc_ax = figure.subplots(1, 2)
    for split, style in (("train", "o-"), ("test", "s--")):
        loss_ax.plot(epochs, [r[f"{split}_loss"] for r in history], style, label=split)
        acc_ax.plot(epochs, [100 * r[f"{split}_accuracy"] for r in history], style, label=split)
    loss_ax.set(xlabel="epoch", ylabel="cross-entropy", title="loss")
    acc_ax.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (loss_ax, acc_ax):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))  # epochs, not 1.5
        ax.grid(alpha=0.3)
        ax.legend()
    figure.savefig(path, dpi=100)


class _Curves:
    """Draws ``history`` into ``path`` after the last epoch and at most every
    :data:`CURVES_EVERY_S` seconds before it (``history`` is the run's list of
    records, appended to as it trains)."""

    def __init__(self, path: Path, history: list[dict[str, float]]):
        self.path, self.history = path, history
        self.drawn, self.drawn_at = len(history), time.monotonic()

    def update(self, *, final: bool) -> None:
        due = final or time.monotonic() - self.drawn_at >= CURVES_EVERY_S
        if due and len(self.history) > self.drawn:
            plot_curves(self.history, self.path)
            self.drawn, self.drawn_at = len(self.history), time.monotonic()


def _resume(checkpoint_manager, state: TrainState, config, metrics_path: Path):
    """``(state, last finished epoch, history)`` from ``workdir``'s latest checkpoint."""
    # Multi-process runs checkpoint arrays replicated over all processes (orbax
    # refuses process-local ones there); a single process is left as it is.
    restored = checkpoints.restore_latest(
        checkpoint_manager, distributed.to_global_arrays(state), config)
    start_epoch = 0
    if restored is not None:
        state, meta = distributed.to_local_arrays(restored[0], state), restored[1]
        start_epoch = meta["epoch"]
        tqdm.write(f"Resuming from {checkpoint_manager.directory}/{start_epoch}",
                   file=sys.stdout)
    records = [r for r in read_metrics(metrics_path) if r["epoch"] <= start_epoch]
    if distributed.is_primary_process():  # one process writes a multi-process run's logs
        write_metrics(metrics_path, records)
    history = [r for r in records if "event" not in r]  # `jopt quantize` adds events
    return state, start_epoch, history


def _run_chunks(epoch_fn, state, images, labels, batch_indices, chunks, epoch):
    """Runs an epoch's chunks; returns the state, the summed loss and the correct count."""
    loss_sum, num_correct = 0.0, 0
    progress = tqdm(chunks, desc=f"epoch {epoch}", unit="chunk", leave=False,
                    file=sys.stderr, disable=None if len(chunks) > 1 else True)
    for chunk in progress:
        state, metrics = epoch_fn(state, images, labels, batch_indices[chunk])
        loss_sum += metrics["loss_sum"]
        num_correct += metrics["num_correct"]
    loss_sum, num_correct = jax.device_get((loss_sum, num_correct))
    return state, float(loss_sum), int(num_correct)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike,
                       *, dataset: data_lib.Dataset | None = None) -> TrainResult:
    """Trains ``config``'s model, evaluating on the test set after every epoch.

    Writes into ``workdir``: ``metrics.jsonl`` (one JSON record per epoch:
    ``epoch``, ``step``, ``train_loss``, ``train_accuracy``, ``test_loss``,
    ``test_accuracy``, ``epoch_time_s``, ``eval_time_s``), ``curves.png`` (drawn
    after the last epoch, when the run stops early, and every
    :data:`CURVES_EVERY_S` seconds in between), ``config.json`` and
    ``checkpoints/`` (orbax, one per epoch, the last
    ``config.checkpoint_keep`` kept). If ``workdir`` already holds a checkpoint of
    the same model and optimizer, training resumes after its epoch, and ends
    exactly where an uninterrupted run would have: shuffling depends only on the
    seed and the epoch. ``epoch_time_s`` is the wall time of the epoch's training
    part; the first epoch of a process includes compilation.

    Args:
      config: a config like ``configs/default.py``'s.
      workdir: output directory (created if needed).
      dataset: use this data set instead of loading ``config.dataset`` (the
        ``train_subset``/``test_subset`` keys still apply).

    Returns:
      A :class:`TrainResult`.

    Raises:
      ConfigError: an invalid config value (raised before any training).
      jopt.checkpoints.CheckpointMismatchError: ``workdir`` holds a checkpoint of
        another model, optimizer or state storage.
      jopt.checkpoints.CheckpointReadError: its latest checkpoint is damaged.
      WorkdirError: ``workdir/metrics.jsonl`` is damaged before its last line.
      jopt.data.DatasetNotFoundError: the data set is not available.
      jopt.data.DatasetFileError: a data file is corrupt or another data set's.

    Example::

        from jopt import train
        from jopt.cli import load_config

        config = load_config("configs/fashion_mnist_mlp.py",
                             ["--config.num_epochs=1", "--config.train_subset=6000"])
        result = train.train_and_evaluate(config, "runs/quick")
        result.metrics["test_accuracy"]     # ~0.7 after one epoch on 6k examples
        result.params                       # the model's pytree: model.apply(result.params, x)
    """
    validate_config(config)
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    dataset = _load_dataset(config) if dataset is None else _subset(config, dataset)

    num_train = len(dataset.train_images)
    steps_per_epoch = num_train // config.batch_size
    model = create_model(config, dataset.num_classes)
    tx = create_optimizer(config, steps_per_epoch)
    apply_fn = make_apply_fn(model, COMPUTE_DTYPES[config.compute_dtype])
    epoch_fn = build_epoch_fn(config, make_loss_fn(apply_fn), tx)
    eval_fn = build_eval_fn(apply_fn, compiler_options_for(config))
    state = init_train_state(config, model, tx, dataset.train_images.shape[1:])

    train_images = jax.device_put(dataset.train_images)
    train_labels = jax.device_put(dataset.train_labels)
    eval_data = prepare_eval_data(dataset.test_images, dataset.test_labels,
                                  config.eval_batch_size)
    chunks = _chunks(steps_per_epoch, config.steps_per_chunk)
    metrics_path = workdir / "metrics.jsonl"

    with checkpoints.manager(workdir, config.checkpoint_keep) as checkpoint_manager:
        state, start_epoch, history = _resume(checkpoint_manager, state, config, metrics_path)
        data_parallel = isinstance(epoch_fn, parallel.LoopEpochs)
        if start_epoch and data_parallel:
            epoch_fn.restore_residuals(
                checkpoints.restore_residuals(checkpoint_manager, start_epoch))
        finished = start_epoch > 0 and start_epoch >= config.num_epochs
        if finished:
            # Nothing to train; config.json keeps describing the run that is there.
            tqdm.write(f"{workdir} already holds {start_epoch} epochs "
                       f"(config.num_epochs={config.num_epochs}): nothing to train. Raise "
                       f"config.num_epochs to continue it, or use a fresh --workdir.",
                       file=sys.stderr)
        elif distributed.is_primary_process():
            (workdir / "config.json").write_text(config.to_json(indent=2) + "\n")
        epochs = tqdm(range(start_epoch + 1, config.num_epochs + 1), desc="train",
                      unit="epoch", initial=start_epoch, total=config.num_epochs,
                      file=sys.stderr, disable=None)
        curves = _Curves(workdir / "curves.png", history)
        try:
            for epoch in epochs:
                start = time.perf_counter()
                batch_indices = shuffle_batches(
                    epoch_key(config.seed, epoch), num_train, config.batch_size)
                state, loss_sum, num_correct = _run_chunks(
                    epoch_fn, state, train_images, train_labels, batch_indices, chunks, epoch)
                epoch_time = time.perf_counter() - start

                start = time.perf_counter()
                test = jax.device_get(eval_fn(state.params, eval_data))
                record = {
                    "epoch": epoch,
                    "step": int(state.step),
                    "train_loss": loss_sum / steps_per_epoch,
                    "train_accuracy": num_correct / (steps_per_epoch * config.batch_size),
                    "test_loss": float(test["loss"]),
                    "test_accuracy": float(test["accuracy"]),
                    "epoch_time_s": epoch_time,
                    "eval_time_s": time.perf_counter() - start,
                    **compression_metrics(config, state),
                }
                history.append(record)
                # Metrics before the checkpoint: a run killed in between redoes the
                # epoch, and _resume drops the record the checkpoint does not cover.
                if distributed.is_primary_process():
                    _append_record(metrics_path, record)
                    curves.update(final=False)
                residuals = epoch_fn.residuals() if data_parallel else None
                checkpoints.save(checkpoint_manager, epoch, distributed.to_global_arrays(state),
                                 config, residuals=residuals,
                                 image_shape=list(dataset.train_images.shape[1:]),
                                 num_classes=dataset.num_classes)
                epochs.write(_format_record(record, config.num_epochs), file=sys.stdout)
        finally:  # after the last epoch, or what an interrupted run (Ctrl-C, an error) trained
            if distributed.is_primary_process():
                curves.update(final=True)

    params = state.params.unpack() if isinstance(state.params, FlatParams) else state.params
    return TrainResult(params, history[-1] if history else {}, history, state)


class Checkpoint(NamedTuple):
    """A restored checkpoint: what :func:`load_checkpoint` returns."""

    config: ml_collections.ConfigDict  # the config it was saved with
    model: nn.Module
    state: TrainState
    meta: dict[str, Any]  # epoch, identity, ... (see jopt.checkpoints)


def load_checkpoint(workdir: str | os.PathLike) -> Checkpoint:
    """The config, model and train state of the last checkpoint in ``workdir``.

    Raises:
      FileNotFoundError: ``workdir`` holds no checkpoint.
      jopt.checkpoints.CheckpointReadError: the last checkpoint is damaged.
    """
    directory = Path(workdir) / checkpoints.CHECKPOINT_DIR
    missing = FileNotFoundError(f"No checkpoint in {directory}; train first with "
                                f"`jopt train --config ... --workdir {workdir}`.")
    if not directory.is_dir():
        raise missing
    with checkpoints.manager(workdir, create=False) as checkpoint_manager:
        meta = checkpoints.read_meta(checkpoint_manager)
        if meta is None:
            raise missing
        config = ml_collections.ConfigDict(meta["config"])
        model = create_model(config, meta["num_classes"])
        tx = create_optimizer(config, steps_per_epoch=1)
        image_shape = tuple(meta["image_shape"])
        like = jax.eval_shape(lambda: init_train_state(config, model, tx, image_shape))
        state, meta = checkpoints.restore_latest(checkpoint_manager, like, config)
    return Checkpoint(config, model, state, meta)


def evaluate_checkpoint(workdir: str | os.PathLike, *,
                        dataset: data_lib.Dataset | None = None) -> dict[str, float]:
    """Evaluates the last checkpoint in ``workdir`` on its config's test set.

    Returns:
      ``{"epoch", "test_loss", "test_accuracy", "num_test"}``.
    """
    config, model, state, meta = load_checkpoint(workdir)
    dataset = _load_dataset(config) if dataset is None else _subset(config, dataset)
    eval_data = prepare_eval_data(dataset.test_images, dataset.test_labels,
                                  config.eval_batch_size)
    apply_fn = make_apply_fn(model, COMPUTE_DTYPES[config.compute_dtype])
    result = jax.device_get(
        build_eval_fn(apply_fn, compiler_options_for(config))(state.params, eval_data))
    return {"epoch": meta["epoch"], "test_loss": float(result["loss"]),
            "test_accuracy": float(result["accuracy"]), "num_test": len(dataset.test_images)}


def quantize_checkpoint(workdir: str | os.PathLike, *, mode: str | None = None,
                        dataset: data_lib.Dataset | None = None) -> dict[str, Any]:
    """Post-training quantization of the last checkpoint in ``workdir`` (``jopt quantize``).

    Quantizes every dense kernel per output channel (:func:`jopt.quantization.quantize_params`),
    evaluates the test set with integer inference (int8 x int8 -> int32 matmuls,
    :func:`jopt.quantization.quantized_apply`) next to the float model, writes
    ``workdir/quantized_<mode>.npz`` (codes bit-packed) and appends the result to
    ``metrics.jsonl`` as a record with ``"event": "quantize"``.

    Args:
      workdir: directory of a ``jopt train`` run.
      mode: ``"int8"``, ``"int4"``, ``"ternary"`` or ``"binary"``; default: the
        run's ``config.quantization.weights`` (its QAT mode), else ``"int8"``.
      dataset: use this data set instead of loading the run's.

    Returns:
      The record: ``epoch``, ``event``, ``mode``, ``float_test_accuracy`` (the
      model as trained: float weights, or fake-quantized ones after QAT),
      ``test_accuracy``, ``test_loss``, ``float32_bytes``, ``quantized_bytes``,
      ``compression``, ``weight_compression``, ``file_bytes``.

    Raises:
      FileNotFoundError: ``workdir`` holds no checkpoint.
      ValueError: an unsupported ``mode``.
    """
    config, model, state, meta = load_checkpoint(workdir)
    trained_mode = config.quantization.weights if config.get("quantization") is not None else None
    mode = quantization.resolve_mode(mode or trained_mode or "int8")
    dataset = _load_dataset(config) if dataset is None else _subset(config, dataset)
    eval_data = prepare_eval_data(dataset.test_images, dataset.test_labels,
                                  config.eval_batch_size)
    params = state.params.unpack() if isinstance(state.params, FlatParams) else state.params
    options = compiler_options_for(config)
    float_result = build_eval_fn(make_apply_fn(model, COMPUTE_DTYPES[config.compute_dtype]),
                                 options)(params, eval_data)

    def integer_apply(qvariables, images):
        x = images.astype(jnp.float32) * (1.0 / 255.0)
        return quantization.quantized_apply(model, qvariables, x).astype(jnp.float32)

    qvariables = quantization.quantize_params(params, mode)
    result = jax.device_get(
        build_eval_fn(integer_apply, options)(qvariables, eval_data))
    sizes = quantization.size_report(params, qvariables)
    path = Path(workdir) / f"quantized_{mode}.npz"
    record = {
        "epoch": meta["epoch"],
        "event": "quantize",
        "mode": mode,
        "float_test_accuracy": float(float_result["accuracy"]),
        "test_accuracy": float(result["accuracy"]),
        "test_loss": float(result["loss"]),
        "float32_bytes": sizes["float32_bytes"],
        "quantized_bytes": sizes["quantized_bytes"],
        "compression": sizes["ratio"],
        "weight_compression": sizes["weight_ratio"],
        "file_bytes": quantization.save_quantized(path, qvariables),
    }
    _append_record(Path(workdir) / "metrics.jsonl", record)
    return record


def _append_record(path: Path, record: dict) -> None:
    """Appends one JSON line to ``metrics.jsonl``. A last line cut short by a crash
    (no newline: read_metrics drops it) is removed first: appending onto it, or
    after it, would leave a damaged line inside the file."""
    with path.open("a+b") as f:
        size = f.seek(0, os.SEEK_END)
        f.seek(max(0, size - 1))
        if size and f.read(1) != b"\n":  # a cut last line: only after a crash
            f.seek(max(0, size - 65536))
            tail = f.read()
            cut = tail.rfind(b"\n") + 1  # 0: the whole tail is the cut line
            _logger.warning("Dropping the last line of %s, cut short by a run that "
                            "stopped while writing it.", path)
            f.truncate(size - len(tail) + cut)
        f.write((json.dumps(record) + "\n").encode())
