"""The public surface: optax-compatible signatures and runnable docstring examples."""

from __future__ import annotations

import doctest
import importlib
import inspect

import optax
import pytest

import jopt

SHARED_NAMES = sorted(
    name for name in jopt.__all__
    if hasattr(optax, name) and callable(getattr(jopt, name))
    and getattr(jopt, name) is not getattr(optax, name)
    and not inspect.isclass(getattr(jopt, name))
)


def test_some_names_are_shared_with_optax():
    assert {"sgd", "adam", "adamw", "adagrad", "rmsprop", "scale_by_adam"} <= set(SHARED_NAMES)


@pytest.mark.parametrize("name", SHARED_NAMES)
def test_signature_extends_optax(name):
    """`import jopt as optax` keeps working: optax's parameters come first, same
    names, same order, same defaults; jopt's extras are keyword-only."""
    ours = inspect.signature(getattr(jopt, name)).parameters
    theirs = inspect.signature(getattr(optax, name)).parameters
    positional = [p for p in ours.values() if p.kind != p.KEYWORD_ONLY]
    their_positional = [p for p in theirs.values() if p.kind != p.KEYWORD_ONLY]
    assert [p.name for p in positional] == [p.name for p in their_positional]
    for parameter in theirs.values():
        assert parameter.name in ours, f"{name} lacks optax's argument {parameter.name}"
        assert ours[parameter.name].default == parameter.default, parameter.name
    extras = set(ours) - set(theirs)
    assert all(ours[p].kind == inspect.Parameter.KEYWORD_ONLY for p in extras)


def test_jopt_schedules_has_every_public_name_of_optax_schedules():
    # `import jopt as optax` reaches optax.schedules.* through jopt.schedules.
    missing = sorted(name for name in dir(optax.schedules)
                     if not name.startswith("_") and not hasattr(jopt.schedules, name))
    assert missing == []


CORE_MODULES = [
    "jopt.lift", "jopt.transforms", "jopt.optimizers", "jopt.schedules", "jopt.storage",
    "jopt.flat",
]


@pytest.mark.parametrize("module_name", CORE_MODULES)
def test_docstring_examples_run(module_name):
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE | doctest.ELLIPSIS)
    assert result.failed == 0
