"""The Fashion-MNIST reference MLP, data-parallel over every device with ``jax.pmap``.

Each global batch of 128 is split over the devices (axis ``"batch"``), gradients are
averaged with ``lax.pmean``, and parameters and Adam state stay replicated, passed
unstacked (``in_axes=None`` / ``out_axes=None``). The batch size must be a multiple
of the device count. Same results as one device, up to float summation order::

    jopt train --config configs/fashion_mnist_pmap.py --workdir runs/fmnist_pmap

On a CPU-only machine, simulate 8 devices with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

from pathlib import Path

from jopt.cli import load_config


def get_config():
    config = load_config(Path(__file__).with_name("fashion_mnist_mlp.py"))
    config.parallel = "pmap"
    return config
