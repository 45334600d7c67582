"""The reference recipe on Fashion-MNIST: MLP 784-64-64-10, Adam 1e-3, batch 128, 5 epochs.

Only the data set differs from ``default.py``::

    jopt train --config configs/fashion_mnist_mlp.py --workdir runs/fashion_mnist_mlp
"""

from pathlib import Path

from jopt.cli import load_config


def get_config():
    config = load_config(Path(__file__).with_name("default.py"))
    config.dataset = "fashion_mnist"
    return config
