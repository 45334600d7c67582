"""SGD with heavy-ball momentum 0.9 on the Fashion-MNIST MLP, learning rate 0.02.

Set ``--config.optimizer.name=nesterov`` for Nesterov's method, or
``--config.optimizer.dampening=0.9`` for the EMA form of momentum.

    jopt train --config configs/momentum.py --workdir runs/momentum
"""

from pathlib import Path

from jopt.cli import load_config


def get_config():
    config = load_config(Path(__file__).with_name("default.py"))
    config.dataset = "fashion_mnist"
    config.optimizer.name = "momentum"
    config.optimizer.learning_rate = 0.02
    config.optimizer.momentum = 0.9
    return config
