"""A small CNN on Fashion-MNIST: two 3x3 convolutions (32, 64 channels) with 2x2
average pooling, a 256-unit dense layer; Adam 1e-3, batch 128, 5 epochs.

The Flax MNIST example's network. On a 2-core CPU an epoch takes 17-19 s (the
MLP's 0.2 s) and 5 epochs reach 90.85% test accuracy (seed 0).

    jopt train --config configs/cnn.py --workdir runs/cnn
"""

from pathlib import Path

from jopt.cli import load_config


def get_config():
    config = load_config(Path(__file__).with_name("default.py"))
    config.dataset = "fashion_mnist"
    config.model.name = "cnn"
    config.model.conv_features = (32, 64)
    config.model.hidden_sizes = (256,)
    return config
