"""The Fashion-MNIST MLP trained with int4 weights (quantization-aware training).

Every dense kernel is fake-quantized to 4-bit codes with one absmax scale per
output channel in the forward pass, with straight-through gradients to the
float32 master weights. ``metrics.jsonl`` reports ``float32_bytes`` and
``quantized_bytes`` (codes packed two per byte). Export and evaluate with integer
arithmetic afterwards::

    jopt train --config configs/fashion_mnist_qat_int4.py --workdir runs/fmnist_int4
    jopt quantize --workdir runs/fmnist_int4     # int4 codes, int8 x int8 -> int32 matmuls

``--config.quantization.weights=binary`` (or ``ternary``, ``int8``) trains the other modes.
"""

from pathlib import Path

from jopt.cli import load_config


def get_config():
    config = load_config(Path(__file__).with_name("default.py"))
    config.dataset = "fashion_mnist"
    config.quantization.weights = "int4"
    return config
