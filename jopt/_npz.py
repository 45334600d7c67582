"""``.npz`` files with a JSON header, and pytrees as (key path, leaf) records.

Shared by :func:`jopt.pruning.save_sparse` and :func:`jopt.quantization.save_quantized`:
both write a pytree of arrays plus a JSON description into one uncompressed
``.npz`` and rebuild the tree when reading it back.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import numpy as np

META = "__jopt_meta__"


def key_name(key: Any) -> str | int:
    """A key-path entry (dict key, attribute, sequence index) as a JSON-able name."""
    for attribute in ("key", "name", "idx"):
        if hasattr(key, attribute):
            value = getattr(key, attribute)
            return value if isinstance(value, (str, int)) else str(value)
    return str(key)


def write_npz(path: str | os.PathLike[str], arrays: dict[str, np.ndarray], meta: Any) -> None:
    """Writes arrays (ml_dtypes such as bfloat16 as same-size unsigned ints) + a JSON header."""
    stored = {}
    for name, array in arrays.items():
        array = np.asarray(array)
        if array.dtype.kind == "V":  # bfloat16 & co. have no portable .npy form
            array = array.view(np.dtype(f"uint{8 * array.dtype.itemsize}"))
        stored[name] = array
    stored[META] = np.array(json.dumps(meta))
    with open(path, "wb") as file:  # a file object: np.savez would append ".npz"
        np.savez(file, **stored)


def read_npz(path: str | os.PathLike[str]) -> tuple[dict[str, np.ndarray], Any]:
    """The arrays and JSON header of a :func:`write_npz` file (ValueError if not one)."""
    with np.load(path, allow_pickle=False) as data:
        if META not in data.files:
            raise ValueError(f"{os.fspath(path)!r} was not written by jopt (no {META} entry).")
        arrays = {name: data[name] for name in data.files if name != META}
        return arrays, json.loads(str(data[META]))


def leaf_records(tree: Any, is_leaf) -> list[tuple[list, Any]]:
    """``(key path as names, leaf)`` for each leaf of ``tree``."""
    flat = jax.tree_util.tree_flatten_with_path(tree, is_leaf=is_leaf)[0]
    return [([key_name(k) for k in path], leaf) for path, leaf in flat]


def rebuild(paths: list[list], leaves: list, like: Any, is_leaf) -> Any:
    """Leaves back into ``like``'s structure, or into nested dicts keyed by the paths."""
    if like is not None:
        treedef = jax.tree.structure(like, is_leaf=is_leaf)
        if treedef.num_leaves != len(leaves):
            raise ValueError(
                f"The file holds {len(leaves)} arrays but `like` has {treedef.num_leaves} leaves."
            )
        return treedef.unflatten(leaves)
    root: dict = {}
    for path, leaf in zip(paths, leaves):
        if not path:
            return leaf
        node = root
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = leaf
    return root
