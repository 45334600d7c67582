"""The Fashion-MNIST reference MLP with ZeRO-1: Adam state sharded over the devices.

Parameters are packed into flat buffers padded to a multiple of ``256 x devices``;
each device keeps the Adam moments of its 1/N slice only (0.126x the replicated
state on 8 devices), gradients are reduce-scattered, each device updates its slice
and the slices are all-gathered. The optimizer must be elementwise (no global-norm
clipping)::

    jopt train --config configs/fashion_mnist_zero1.py --workdir runs/fmnist_zero1
"""

from pathlib import Path

from jopt.cli import load_config


def get_config():
    config = load_config(Path(__file__).with_name("fashion_mnist_mlp.py"))
    config.parallel = "zero1"
    return config
