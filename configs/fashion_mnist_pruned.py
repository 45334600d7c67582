"""The Fashion-MNIST MLP pruned to 90% sparsity by gradual magnitude pruning.

Zhu & Gupta's polynomial schedule (``s_t = s_f (1 - (1 - p)^3)``) takes the
sparsity from 0 at the end of epoch 1 to 90% at the end of epoch 4, recomputing
the masks every 50 steps, with one magnitude threshold over all kernels
(``granularity="global"``); the last epoch fine-tunes the sparse network. Biases
stay dense. Each epoch's ``metrics.jsonl`` record carries ``sparsity``,
``dense_bytes`` and ``sparse_bytes`` (the stripped model, see
``jopt.pruning.strip``)::

    jopt train --config configs/fashion_mnist_pruned.py --workdir runs/fmnist_pruned
    jopt train --config configs/fashion_mnist_pruned.py --workdir runs/fmnist_pruned_layer \\
        --config.pruning.granularity=per_layer
"""

from pathlib import Path

from jopt.cli import load_config


def get_config():
    config = load_config(Path(__file__).with_name("default.py"))
    config.dataset = "fashion_mnist"
    config.pruning.schedule = "polynomial"
    config.pruning.final_sparsity = 0.9
    config.pruning.granularity = "global"
    return config
