"""The Fashion-MNIST reference MLP, data-parallel with ``jax.shard_map`` under ``jit``.

The same step as ``fashion_mnist_pmap.py`` on a ``Mesh`` over all devices (of all
processes): the path JAX recommends since ``pmap`` went into maintenance mode, and
the one to use across several hosts::

    jopt train --config configs/fashion_mnist_shard_map.py --workdir runs/fmnist_sm

    # two hosts (or two processes on one machine), each runs:
    jopt train --config configs/fashion_mnist_shard_map.py --workdir runs/fmnist_mh \\
        --coordinator HOST0:9876 --num-processes 2 --process-id {0|1}
"""

from pathlib import Path

from jopt.cli import load_config


def get_config():
    config = load_config(Path(__file__).with_name("fashion_mnist_mlp.py"))
    config.parallel = "shard_map"
    return config
