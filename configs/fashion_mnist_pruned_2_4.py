"""The Fashion-MNIST MLP with 2:4 structured sparsity (NVIDIA's sparse tensor cores).

After one dense epoch every group of 4 consecutive input weights of each kernel
keeps its 2 largest (one-shot magnitude pruning, 50% sparsity); the remaining
epochs train with the masks fixed::

    jopt train --config configs/fashion_mnist_pruned_2_4.py --workdir runs/fmnist_2_4
"""

from pathlib import Path

from jopt.cli import load_config


def get_config():
    config = load_config(Path(__file__).with_name("default.py"))
    config.dataset = "fashion_mnist"
    config.pruning.schedule = "one_shot"
    config.pruning.structure = "2:4"
    config.pruning.final_sparsity = 0.5
    return config
