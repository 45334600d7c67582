"""The lifting layer: per-array update math -> a `GradientTransformation` over any pytree.

Each of jopt's stateful transformations is written once, as a function of *one*
gradient array and that array's state (its "moments"). :func:`lift` is the only
place that walks trees, checks that a gradient tree matches the state, keeps the
step count, and stores state through a codec from :mod:`jopt.storage`. Flat
parameter buffers (:mod:`jopt.flat`) are just a pytree with one leaf per dtype, so
the same math runs as one fused kernel per buffer with no extra code.

Example:
  A minimal sign-momentum transformation written as per-array math::

    >>> import jax.numpy as jnp
    >>> import jopt
    >>> from typing import NamedTuple
    >>> class SignMomentumState(NamedTuple):
    ...   velocity: object
    >>> def rule(grad, moments, count):
    ...   (velocity,) = moments
    ...   velocity = 0.9 * velocity + grad
    ...   return jnp.sign(velocity), (velocity,)
    >>> tx = jopt.lift.lift(rule, state_class=SignMomentumState,
    ...                     moments=[jopt.lift.Moment("velocity")])
    >>> params = {"w": jnp.array([1.0, -2.0])}
    >>> updates, state = tx.update(params, tx.init(params))
    >>> updates["w"]
    Array([ 1., -1.], dtype=float32)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from jopt import storage as storage_lib
from jopt.base import GradientTransformation

__all__ = ["Moment", "UpdateRule", "lift", "check_tree_match"]

# (grad, moments, count) -> (update, new_moments); all arrays are per-parameter
# arrays of at least float32; count is the 1-based step number (int32 scalar).
UpdateRule = Callable[[jax.Array, tuple, jax.Array], tuple[jax.Array, tuple]]


class Moment(NamedTuple):
    """Declares one per-parameter state array of an update rule.

    Attributes:
      name: the field of the state NamedTuple that holds this moment's tree.
      signed: whether the moment can be negative (decides the int8 code).
      initial_value: the value it starts from.
      dtype: a fixed storage dtype for this moment (optax's ``mu_dtype``,
        ``accumulator_dtype``), used when no ``state_storage`` is given.
    """

    name: str
    signed: bool = True
    initial_value: float = 0.0
    dtype: Any = None


def _is_stored_leaf(x: Any) -> bool:
    return x is None or storage_lib.is_encoded(x)


def _shape(x: Any) -> tuple[int, ...]:
    # An encoded state (int8 codes, stochastically rounded bf16) reports its array's shape.
    return tuple(x.shape) if storage_lib.is_encoded(x) else tuple(jnp.shape(x))


def _describe_difference(updates: Any, reference: Any) -> str:
    """Names the first path at which two trees differ in structure or shape."""
    flat_u = jax.tree_util.tree_flatten_with_path(updates)[0]
    flat_r = jax.tree_util.tree_flatten_with_path(reference, is_leaf=_is_stored_leaf)[0]
    flat_r = [(p, x) for p, x in flat_r if x is not None]
    for (path_u, leaf_u), (path_r, leaf_r) in zip(flat_u, flat_r):
        if path_u != path_r:
            return (
                f"the first difference is at {jax.tree_util.keystr(path_u)!r} in the "
                f"updates vs {jax.tree_util.keystr(path_r)!r} in the state"
            )
        if _shape(leaf_u) != _shape(leaf_r):
            return (
                f"the first difference is at {jax.tree_util.keystr(path_u)!r}: shape "
                f"{_shape(leaf_u)} in the updates vs {_shape(leaf_r)} in the state"
            )
    if len(flat_u) != len(flat_r):
        longer, which = (flat_u, "updates") if len(flat_u) > len(flat_r) else (flat_r, "state")
        path = longer[min(len(flat_u), len(flat_r))][0]
        return (
            f"{jax.tree_util.keystr(path)!r} is in the {which} only "
            f"({len(flat_u)} update leaves vs {len(flat_r)} state leaves)"
        )
    return (
        f"the containers differ: updates {jax.tree.structure(updates)} vs state "
        f"{jax.tree.structure(reference, is_leaf=_is_stored_leaf)}"
    )


def check_tree_match(updates: Any, reference: Any, transformation: str) -> list:
    """Flattens ``reference`` (a state tree) to the leaves matching ``updates``' leaves.

    Raises:
      TypeError: if the trees differ in structure or leaf shapes; the message names
        the first differing path and both structures.
    """
    treedef = jax.tree.structure(updates)
    try:
        stored = treedef.flatten_up_to(reference)
    except (ValueError, TypeError):
        stored = None
    if stored is not None:
        # A stored leaf must be an array (or its encoded form), not a container that
        # a leaf of ``updates`` happened to line up with (a lone 0-d gradient against
        # a dict of state has "shape ()" on both sides).
        if any(not (storage_lib.is_encoded(s) or s is None or hasattr(s, "shape"))
               or _shape(u) != _shape(s)
               for u, s in zip(jax.tree.leaves(updates), stored)):
            stored = None
    if stored is None:
        raise TypeError(
            f"{transformation}: the updates do not match the optimizer state; "
            f"{_describe_difference(updates, reference)}. The gradient tree must have "
            "the structure and shapes of the params passed to init(); re-run init() "
            "if the model changed."
        )
    return stored


def lift(
    rule: UpdateRule,
    *,
    state_class: type,
    moments: Sequence[Moment],
    state_storage: str | storage_lib.StateStorage | None = None,
    name: str | None = None,
) -> GradientTransformation:
    """Turns per-array update math into a transformation over any pytree.

    Args:
      rule: ``rule(grad, moments, count) -> (update, new_moments)`` on single
        arrays; ``moments`` is a tuple in the order of ``moments`` below, decoded
        to at least float32; ``count`` is the 1-based step number.
      state_class: a NamedTuple whose fields are the moment names, plus ``count``
        if the rule needs the step number.
      moments: the per-parameter state arrays, see :class:`Moment`.
      state_storage: how state is kept between steps (see :mod:`jopt.storage`).
      name: used in error messages; defaults to the state class's name.

    Returns:
      A :class:`optax.GradientTransformation`. Updates keep their gradient's
      dtype; state keeps the dtype chosen by the storage.
    """
    name = name or state_class.__name__
    fields = tuple(state_class._fields)
    with_count = "count" in fields
    expected = {m.name for m in moments} | ({"count"} if with_count else set())
    if set(fields) != expected:
        raise ValueError(
            f"{name}: state_class fields {fields} must be the moment names "
            f"{[m.name for m in moments]} (plus 'count')."
        )
    storage = storage_lib.resolve_storage(state_storage)
    codecs = tuple(
        storage_lib.DtypeStorage(m.dtype)
        if m.dtype is not None and state_storage is None
        else storage
        for m in moments
    )

    def encode(codec, value, like, moment, leaf, absmax=None):
        # Each moment of each leaf gets its own salt, hence its own rounding noise:
        # same-shaped leaves (a stack of equal layers) and a leaf's mu and nu would
        # otherwise round alike at every step. ``leaf`` is the leaf's key path in
        # the params tree ("['hidden_0']['kernel']"): under optax.masked and
        # multi_transform (MaskedNode in place of the other groups' leaves, or of
        # whole subtrees for a prefix mask) it still names the leaf, so one
        # optimizer per layer does not round every layer alike. with_state_storage
        # names state the same way, so wrapping optax.adam gives the bits of jopt.adam.
        return storage_lib._encode(codec, value, like=like, signed=moment.signed,
                                   salt=storage_lib._salt(f"{moment.name}{leaf}"),
                                   absmax=absmax)

    def init_fn(params):
        leaves, treedef = jax.tree.flatten(params)
        names = storage_lib._leaf_names(params)

        def init_leaf(param, moment, codec, leaf):
            param = jnp.asarray(param)
            value = jnp.full(param.shape, moment.initial_value,
                             storage_lib.compute_dtype(param.dtype))
            return encode(codec, value, param, moment, leaf)

        state = {
            m.name: treedef.unflatten([init_leaf(p, m, c, n) for p, n in zip(leaves, names)])
            for m, c in zip(moments, codecs)
        }
        if with_count:
            state["count"] = jnp.zeros([], jnp.int32)
        return state_class(**state)

    def update_fn(updates, state, params=None):
        del params
        stored = [check_tree_match(updates, getattr(state, m.name), name) for m in moments]
        grads, treedef = jax.tree.flatten(updates)
        names = storage_lib._leaf_names(updates)
        count = optax.safe_increment(state.count) if with_count else jnp.zeros([], jnp.int32)
        new_updates = []
        new_moments = [[] for _ in moments]

        def apply_rule(grad, previous):
            decoded = tuple(c.decode(s) for c, s in zip(codecs, previous))
            return rule(grad.astype(storage_lib.compute_dtype(grad.dtype)), decoded, count)

        two_pass = storage_lib._recompute_for_encode((grads, stored))
        for i, grad in enumerate(grads):
            previous = [column[i] for column in stored]
            grad = jnp.asarray(grad)
            update, values = apply_rule(grad, previous)
            absmax = (storage_lib._prepass(codecs, values) if two_pass
                      else [None] * len(values))
            if any(a is not None for a in absmax):
                # int8: the state again, now to be encoded with the block maxima of
                # the first evaluation (see storage._recompute_for_encode).
                update, values = apply_rule(*jax.lax.optimization_barrier((grad, previous)))
            new_updates.append(update.astype(grad.dtype))
            for column, moment, codec, value, old, amax in zip(
                new_moments, moments, codecs, values, previous, absmax
            ):
                column.append(encode(codec, value, old, moment, names[i], amax))
        new_state = {
            m.name: treedef.unflatten(column) for m, column in zip(moments, new_moments)
        }
        if with_count:
            new_state["count"] = count
        return treedef.unflatten(new_updates), state_class(**new_state)

    return GradientTransformation(init_fn, update_fn)
