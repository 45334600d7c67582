"""Default config: the reference MLP 784-64(relu)-64(relu)-10 on MNIST, Adam 1e-3,
batch 128, 5 epochs (the Keras tutorial's recipe).

Every other config in this directory starts from this one and overrides a few
fields. The config is locked: assigning a key that does not exist, or a value of
the wrong type, raises an error naming the key. Optional values are
``placeholder``s (``None`` until set, but typed).

Run it with::

    jopt train --config configs/default.py --workdir runs/mnist
    jopt train --config configs/default.py --workdir runs/mnist_lr3e-4 \\
        --config.optimizer.learning_rate=3e-4
"""

import ml_collections
from ml_collections.config_dict import placeholder


def get_config() -> ml_collections.ConfigDict:
    """The reference recipe; see the module docstring."""
    config = ml_collections.ConfigDict()

    # Data. `train_subset`/`test_subset` keep the first N examples (quick runs).
    config.dataset = "mnist"  # "mnist" | "fashion_mnist"
    config.data_dir = placeholder(str)  # None: $JOPT_DATA_DIR, ~/.cache/jopt, /usr/share/datasets
    config.train_subset = placeholder(int)
    config.test_subset = placeholder(int)

    config.seed = 0
    config.num_epochs = 5
    config.batch_size = 128  # the last partial batch of each epoch is dropped
    config.eval_batch_size = 1000

    config.model = ml_collections.ConfigDict()
    config.model.name = "mlp"  # "mlp" | "cnn"
    config.model.hidden_sizes = (64, 64)  # MLP layers (the CNN's dense head for "cnn")
    config.model.conv_features = (32, 64)  # "cnn" only

    config.optimizer = ml_collections.ConfigDict()
    config.optimizer.name = "adam"  # any of jopt.train.OPTIMIZERS
    config.optimizer.learning_rate = 1e-3  # the peak value when a schedule is used
    # Hyper-parameters: None keeps the optimizer's own default. Setting one that the
    # chosen optimizer does not take is an error.
    config.optimizer.b1 = placeholder(float)  # adam, adamw, nadam, nadamw
    config.optimizer.b2 = placeholder(float)  # adam, adamw, nadam, nadamw
    config.optimizer.eps = placeholder(float)  # adam*, adagrad, rmsprop
    config.optimizer.weight_decay = placeholder(float)  # adamw, nadamw
    config.optimizer.amsgrad = placeholder(bool)  # adam, adamw
    config.optimizer.momentum = placeholder(float)  # sgd, momentum, nesterov, rmsprop
    config.optimizer.nesterov = placeholder(bool)  # sgd, rmsprop, adam, adamw
    config.optimizer.dampening = placeholder(float)  # sgd, momentum
    config.optimizer.decay = placeholder(float)  # rmsprop
    config.optimizer.centered = placeholder(bool)  # rmsprop
    config.optimizer.initial_accumulator_value = placeholder(float)  # adagrad
    config.optimizer.clip_global_norm = placeholder(float)  # None: no clipping
    config.optimizer.state_storage = placeholder(str)  # None | "float32" | "bfloat16" | "int8"

    config.optimizer.schedule = ml_collections.ConfigDict()
    # "constant" | "cosine" | "warmup_cosine" | "exponential"
    config.optimizer.schedule.name = "constant"
    config.optimizer.schedule.warmup_epochs = 0.0  # warmup_cosine
    config.optimizer.schedule.init_value = 0.0  # warmup_cosine: learning rate at step 0
    config.optimizer.schedule.end_value = 0.0  # cosine, warmup_cosine: final learning rate
    config.optimizer.schedule.decay_rate = 0.5  # exponential: factor per `decay_epochs`
    config.optimizer.schedule.decay_epochs = 1.0  # exponential
    config.optimizer.schedule.staircase = False  # exponential: decay in steps

    # Performance.
    config.flat_params = True  # differentiate w.r.t. jopt.flat.FlatParams (fused updates)
    config.compute_dtype = "float32"  # "float32" | "bfloat16" (float32 master params)
    config.steps_per_chunk = 0  # steps per jitted scan; 0: the whole epoch in one scan
    # Train steps per iteration of that scan (lax.scan's `unroll`): fewer loop
    # round trips, same results. 0: automatic - 4 on GPU/TPU (an H100 epoch of the
    # MLP: 21.5 -> 19.1 ms), 1 on CPU (no gain measured there).
    config.scan_unroll = 0
    # Data parallelism (jopt.parallel): "none" | "pmap" | "shard_map" | "zero1"; the
    # batch size must be a multiple of the device count.
    config.parallel = "none"
    config.gradient_compression = placeholder(str)  # None | "int8" (data-parallel only)
    # Multi-host runs (jax.distributed); --coordinator/--num-processes/--process-id
    # override these, and JOPT_COORDINATOR/_NUM_PROCESSES/_PROCESS_ID fill them in.
    config.distributed = ml_collections.ConfigDict()
    config.distributed.coordinator = placeholder(str)  # "HOST:PORT" of process 0
    config.distributed.num_processes = placeholder(int)
    config.distributed.process_id = placeholder(int)

    config.checkpoint_keep = 3  # checkpoints kept in workdir/checkpoints

    # Compression (jopt.pruning, jopt.quantization): see fashion_mnist_pruned.py,
    # fashion_mnist_pruned_2_4.py, fashion_mnist_qat_int4.py. Off by default.
    config.pruning = ml_collections.ConfigDict()
    config.pruning.schedule = "none"  # "none" | "one_shot" | "constant" | "polynomial"
    config.pruning.initial_sparsity = 0.0  # polynomial: the sparsity at begin_epoch
    config.pruning.final_sparsity = 0.9  # fraction of kernel weights zeroed ("2:4": 0.5)
    config.pruning.begin_epoch = 1.0  # first mask update (one_shot: the only one)
    config.pruning.end_epoch = 4.0  # polynomial: final sparsity reached; constant: last update
    config.pruning.frequency = 50  # steps between mask updates
    config.pruning.granularity = "per_layer"  # "per_layer" | "global" (one threshold)
    config.pruning.structure = "unstructured"  # "unstructured" | "N:M", e.g. "2:4"

    # Quantization-aware training; `jopt quantize --workdir DIR` quantizes after training.
    config.quantization = ml_collections.ConfigDict()
    config.quantization.weights = placeholder(str)  # None | "int8" | "int4" | "ternary" | "binary"
    config.quantization.activations = placeholder(str)  # None | "int8" (one scale per example)

    config.lock()
    return config
