"""AdaGrad on the Fashion-MNIST MLP, learning rate 0.05.

AdaGrad's step sizes shrink as squared gradients accumulate, so it wants a larger
initial learning rate than Adam.

    jopt train --config configs/adagrad.py --workdir runs/adagrad
"""

from pathlib import Path

from jopt.cli import load_config


def get_config():
    config = load_config(Path(__file__).with_name("default.py"))
    config.dataset = "fashion_mnist"
    config.optimizer.name = "adagrad"
    config.optimizer.learning_rate = 0.05
    return config
