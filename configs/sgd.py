"""Plain minibatch SGD (no momentum) on the Fashion-MNIST MLP, learning rate 0.1.

    jopt train --config configs/sgd.py --workdir runs/sgd
"""

from pathlib import Path

from jopt.cli import load_config


def get_config():
    config = load_config(Path(__file__).with_name("default.py"))
    config.dataset = "fashion_mnist"
    config.optimizer.name = "sgd"
    config.optimizer.learning_rate = 0.1
    return config
