"""AdamW with a warmup-cosine schedule and global-norm clipping on the Fashion-MNIST MLP.

Peak learning rate 2e-3 reached after one epoch of linear warmup, then cosine
decay to 0 at the last step; decoupled weight decay 1e-4; gradients clipped to
global norm 1.

    jopt train --config configs/adamw.py --workdir runs/adamw
"""

from pathlib import Path

from jopt.cli import load_config


def get_config():
    config = load_config(Path(__file__).with_name("default.py"))
    config.dataset = "fashion_mnist"
    config.optimizer.name = "adamw"
    config.optimizer.learning_rate = 2e-3
    config.optimizer.weight_decay = 1e-4
    config.optimizer.clip_global_norm = 1.0
    config.optimizer.schedule.name = "warmup_cosine"
    config.optimizer.schedule.warmup_epochs = 1.0
    return config
