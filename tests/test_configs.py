"""Tests of configs/: every config loads, is locked and type-safe, and trains."""

import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jopt import data, train
from jopt.cli import load_config

CONFIG_DIR = pathlib.Path(__file__).parents[1] / "configs"
CONFIGS = sorted(p.name for p in CONFIG_DIR.glob("*.py") if p.name != "__init__.py")


def test_the_expected_configs_exist():
    expected = {"default.py", "fashion_mnist_mlp.py", "fashion_mnist_mlp_tuned.py", "sgd.py",
                "momentum.py", "adagrad.py", "rmsprop.py", "adamw.py", "cnn.py"}
    assert expected <= set(CONFIGS)


def test_default_is_the_reference_recipe():
    config = load_config(CONFIG_DIR / "default.py")
    assert config.dataset == "mnist"
    assert (config.model.name, tuple(config.model.hidden_sizes)) == ("mlp", (64, 64))
    assert (config.optimizer.name, config.optimizer.learning_rate) == ("adam", 1e-3)
    assert (config.batch_size, config.num_epochs) == (128, 5)
    assert config.flat_params is True and config.compute_dtype == "float32"
    assert config.parallel == "none" and config.checkpoint_keep == 3


@pytest.mark.parametrize("name", CONFIGS)
def test_config_is_valid_locked_and_type_safe(name):
    config = load_config(CONFIG_DIR / name)
    train.validate_config(config)
    with pytest.raises(AttributeError, match="learning_rat"):
        config.optimizer.learning_rat = 0.1  # a typo cannot add a key
    with pytest.raises(TypeError, match="batch_size"):
        config.batch_size = "128"
    with pytest.raises(TypeError, match="flat_params"):
        config.flat_params = "yes"


def test_variants_override_only_a_few_fields():
    default = load_config(CONFIG_DIR / "default.py").to_dict()
    expected = {
        "fashion_mnist_mlp.py": {"dataset"},
        "sgd.py": {"dataset", "optimizer"},
        "adamw.py": {"dataset", "optimizer"},
        "cnn.py": {"dataset", "model"},
    }
    for name, keys in expected.items():
        variant = load_config(CONFIG_DIR / name).to_dict()
        assert {k for k in default if default[k] != variant[k]} == keys, name
    adamw = load_config(CONFIG_DIR / "adamw.py").optimizer
    assert adamw.schedule.name == "warmup_cosine" and adamw.clip_global_norm == 1.0
    tuned = load_config(CONFIG_DIR / "fashion_mnist_mlp_tuned.py")
    assert tuned.dataset == "fashion_mnist" and tuned.num_epochs <= 20
    assert (tuned.model.name, tuple(tuned.model.hidden_sizes)) == ("mlp", (64, 64))


@pytest.fixture(scope="module")
def batch():
    dataset = data.load("fashion_mnist", download=False)
    return jnp.asarray(dataset.train_images[:64]), jnp.asarray(dataset.train_labels[:64])


@pytest.mark.parametrize("name", [n for n in CONFIGS if n not in ("cnn.py",)])
def test_each_optimizer_config_lowers_the_loss(name, batch):
    # Same model for all MLP configs; only the optimizer differs, so one jitted step
    # per config on one batch, 5 steps, is enough to see it descend.
    config = load_config(CONFIG_DIR / name)
    model = train.create_model(config)
    tx = train.create_optimizer(config, steps_per_epoch=5)
    state = train.init_train_state(config, model, tx, (28, 28))
    loss_fn = train.make_loss_fn(train.make_apply_fn(model))
    step = jax.jit(train.make_train_step(loss_fn, tx))
    losses = []
    for _ in range(6):
        state, (loss, _) = step(state, *batch)
        losses.append(float(loss))
    assert np.isfinite(losses).all() and losses[-1] < losses[0], (name, losses)


def test_cnn_config_builds_the_cnn():
    config = load_config(CONFIG_DIR / "cnn.py")
    model = train.create_model(config)
    assert type(model).__name__ == "CNN"
    assert (tuple(model.conv_features), tuple(model.hidden_sizes)) == ((32, 64), (256,))
    # Shapes only (eval_shape): a CNN forward pass on CPU is not worth the test time.
    params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28)))
    assert params["params"]["head"]["hidden_0"]["kernel"].shape == (7 * 7 * 64, 256)
    logits = jax.eval_shape(model.apply, params, jnp.zeros((2, 28, 28)))
    assert logits.shape == (2, 10)
