"""``.npz`` files with a JSON header, and pytrees as (key path, leaf) records.

Shared by :func:`jopt.pruning.save_sparse` and :func:`jopt.quantization.save_quantized`:
both write a pytree of arrays plus a JSON description into one uncompressed
``.npz`` and rebuild the tree when reading it back.
"""

from __future__ import annotations

import json
import os
import zipfile
import zlib
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


DEFAULT_REMEDY = ("Re-create it with the jopt function that wrote it "
                  "(`jopt quantize` / jopt.quantization.save_quantized, or "
                  "jopt.pruning.save_sparse).")

_KINDS = {
    "sparse": "a jopt.pruning.save_sparse file (read it with jopt.pruning.load_sparse)",
    "quantized": ("a jopt.quantization.save_quantized file (read it with "
                  "jopt.quantization.load_quantized)"),
}


class InvalidFileError(ValueError):
    """A file that is not a readable jopt ``.npz`` file: corrupt, truncated or another kind."""


def bad_file(path: str | os.PathLike[str], problem: str,
             remedy: str | None = None) -> InvalidFileError:
    """The error for a bad file: names the file, what is wrong and what to do."""
    return InvalidFileError(f"{os.fspath(path)!r} is not a valid jopt file: {problem}. "
                            f"{remedy or DEFAULT_REMEDY}")


def file_kind(meta: list[dict]) -> str | None:
    """``"sparse"`` or ``"quantized"``: which writer produced these records (None: unknown)."""
    if any("format" in record for record in meta):
        return "sparse"
    if any("mode" in record for record in meta) or (
            meta and all(set(record) == {"path", "dtype"} for record in meta)):
        return "quantized"
    return None


def describe_kind(kind: str) -> str:
    return _KINDS[kind]


class _Strict(dict):
    """A dict read from a file: a missing key is an :class:`InvalidFileError`, not a KeyError."""

    def __init__(self, items, path, meta, remedy, what):
        super().__init__(items)
        self._path, self._meta, self._remedy, self._what = path, meta, remedy, what

    def __missing__(self, name):
        problem = f"{self._what} has no {name!r}"
        kind = file_kind(self._meta)
        if kind is not None:
            problem += f" (the file looks like {describe_kind(kind)})"
        raise bad_file(self._path, problem, self._remedy)


_UNREADABLE = (zipfile.BadZipFile, EOFError, ValueError, zlib.error, NotImplementedError)


def read_npz(path: str | os.PathLike[str], *, remedy: str | None = None
             ) -> tuple[dict[str, np.ndarray], list[dict]]:
    """The arrays and JSON header of a :func:`write_npz` file.

    The arrays and each leaf record come as dicts whose missing keys raise
    :class:`InvalidFileError`.

    Raises:
      InvalidFileError: (a ValueError) the file is empty, truncated, corrupt, not an
        ``.npz`` or not written by :func:`write_npz`; the message names the file,
        the problem and ``remedy`` (default: re-create it).
      OSError: the file cannot be opened (FileNotFoundError, PermissionError, ...).
    """
    def fail(problem):
        return bad_file(path, problem, remedy)

    # np.load's own messages for non-.npz input (EOFError, or advice to pass
    # allow_pickle=True for arbitrary bytes) are misleading, so none is passed on.
    # The file is opened here so that it is closed whatever np.load raises.
    with open(path, "rb") as file:
        try:
            data = np.load(file, allow_pickle=False)
        except (*_UNREADABLE, OSError):
            empty = os.fstat(file.fileno()).st_size == 0
            raise fail("the file is empty" if empty else
                       "it is not an .npz (zip) archive, or it is truncated") from None
        if not isinstance(data, np.lib.npyio.NpzFile):
            raise fail("it holds a single .npy array, not an .npz archive")
        with data:
            if META not in data.files:
                raise fail(f"it has no {META} entry, so it was not written by jopt")
            arrays = {}
            for name in data.files:
                try:
                    arrays[name] = data[name]
                except (*_UNREADABLE, OSError):
                    raise fail(f"its entry {name!r} is unreadable (corrupt or truncated)"
                               ) from None
    header = arrays.pop(META)
    try:
        if header.ndim != 0 or header.dtype.kind != "U":
            raise ValueError
        meta = json.loads(str(header))
    except ValueError:
        raise fail(f"its {META} header is not valid JSON text") from None
    if not (isinstance(meta, list) and all(
            isinstance(r, dict) and isinstance(r.get("path"), list) for r in meta)):
        raise fail(f"its {META} header is not a list of leaf records")
    records = [_Strict(r, path, meta, remedy, f"leaf record {i}") for i, r in enumerate(meta)]
    return _Strict(arrays, path, meta, remedy, "the archive"), records


def load_leaves(path: str | os.PathLike[str], arrays: dict, meta: list[dict],
                load_leaf, remedy: str | None = None) -> list:
    """``load_leaf(arrays, i, record)`` for each leaf record of a :func:`read_npz` file.

    A ``ValueError`` of ``load_leaf`` (the leaf's data do not fit its record) becomes
    an :class:`InvalidFileError` naming the file, the leaf and ``remedy``.
    """
    leaves = []
    for i, record in enumerate(meta):
        try:
            leaves.append(load_leaf(arrays, i, record))
        except InvalidFileError:
            raise
        except ValueError as e:
            name = "/".join(map(str, record["path"])) or "<root>"
            raise bad_file(path, f"leaf {i} ({name}): {e}", remedy) from None
    return leaves


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
