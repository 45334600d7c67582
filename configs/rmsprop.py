"""RMSprop on the Fashion-MNIST MLP: learning rate 1e-3, decay 0.9.

Add ``--config.optimizer.centered=true`` for centered RMSprop, or
``--config.optimizer.momentum=0.9`` for RMSprop with momentum.

    jopt train --config configs/rmsprop.py --workdir runs/rmsprop
"""

from pathlib import Path

from jopt.cli import load_config


def get_config():
    config = load_config(Path(__file__).with_name("default.py"))
    config.dataset = "fashion_mnist"
    config.optimizer.name = "rmsprop"
    config.optimizer.learning_rate = 1e-3
    config.optimizer.decay = 0.9
    return config
