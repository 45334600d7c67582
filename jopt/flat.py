"""Flat parameter buffers: a pytree packed into one contiguous 1-D buffer per dtype.

A model with hundreds of parameter arrays costs optax one small kernel per array
per step, and XLA compile time grows with the number of arrays. Packing the
parameters into :class:`FlatParams` (one buffer per dtype) makes every
transformation - jopt's or optax's - run one fused kernel per buffer: a
``FlatParams`` is itself a pytree whose leaves are the buffers, so ``tx.init`` and
``tx.update`` need no special support. Inside ``jit`` :meth:`FlatParams.unpack` is
free slicing, so a loss written for the original tree differentiates with respect
to the buffers directly::

    flat = FlatParams.pack(params)
    grads = jax.grad(lambda f: loss(f.unpack(), batch))(flat)   # a FlatParams
    updates, state = tx.update(grads, state, flat)
    flat = jopt.apply_updates(flat, updates)

The layout (tree structure, each leaf's buffer, offset and shape) is static pytree
metadata: two ``FlatParams`` combine (``apply_updates``, ``tree.map``) only if
their layouts are equal, and JAX's error then shows both layouts' short
:func:`repr`. Buffers can be padded to a multiple of ``n`` (``pad_multiple``) so
that they split evenly over ``n`` devices; the padding stays zero under every
elementwise optimizer, since its gradient is zero.

Per-leaf options (``optax.masked``, ``add_decayed_weights(mask=...)``) see one
leaf per *buffer* on a ``FlatParams``, so a mask such as "decay weights, not
biases" needs per-element masks: :meth:`FlatParams.pack_like` turns a tree of
per-leaf booleans into one, and :func:`masked` is ``optax.masked`` that accepts
both (a mask function always receives the original tree).

Not every optax transformation gives the same result on a ``FlatParams`` as on
the tree. Exact: elementwise ones (``sgd``, momentum, ``adam``/``adamw``,
``rmsprop``, ``lion``, ``add_decayed_weights``, ``clip``, jopt's optimizers) and
global-norm ones (``clip_by_global_norm``; the zero padding adds nothing to the
norm). Different: those computing per-leaf norms or shape-dependent statistics,
which see each whole buffer as one 1-D leaf - ``optax.lamb``, ``optax.lars``,
``scale_by_trust_ratio``, ``clip_by_block_rms``, ``adafactor`` (factored second
moments, per-leaf RMS scaling) and other matrix-shaped methods; run those on the
unpacked tree.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jopt import storage as storage_lib

__all__ = ["FlatLayout", "FlatParams", "FlatShard", "masked"]


@dataclasses.dataclass(frozen=True)
class _LeafSlot:
    dtype: str
    offset: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class FlatShard:
    """Marks a layout as one device's equal slice of ``layout``'s buffers (ZeRO-1).

    Device ``i`` of mesh axis ``axis_name`` (``i = lax.axis_index(axis_name)``) holds
    values ``[i * n, (i + 1) * n)`` of each buffer, ``n = size / num_shards``. Such a
    shard cannot be unpacked, but :meth:`FlatParams.pack_like` and :func:`masked`
    build the whole buffers' per-element data and take this device's slice.

    Attributes:
      layout: the layout of the whole buffers.
      axis_name: the mesh axis the buffers are split over.
      num_shards: the size of that axis.
    """

    layout: "FlatLayout"
    axis_name: Any
    num_shards: int


@dataclasses.dataclass(frozen=True, eq=False, repr=False)
class FlatLayout:
    """Static description of how a pytree is packed (hashable: part of the treedef).

    Attributes:
      treedef: structure of the original pytree.
      slots: per leaf, its buffer's dtype name, offset and shape.
      dtypes: buffer dtype names, in buffer order.
      sizes: each buffer's length, padding included.
      shard: for one device's slice of sharded buffers, which (see :class:`FlatShard`;
        ``slots`` is then empty); None otherwise.
    """

    treedef: Any
    slots: tuple[_LeafSlot, ...]
    dtypes: tuple[str, ...]
    sizes: tuple[int, ...]
    shard: FlatShard | None = None
    # JAX hashes and compares the layout on every jit call (it is pytree metadata);
    # with a thousand slots that costs ~0.2 ms unless the hash is computed once.
    _hash: int = dataclasses.field(init=False, repr=False)

    def __post_init__(self):
        object.__setattr__(self, "_hash", hash(self._key()))

    def _key(self) -> tuple:
        return (self.treedef, self.slots, self.dtypes, self.sizes, self.shard)

    def __hash__(self) -> int:
        return self._hash

    def __eq__(self, other: object) -> bool:
        if self is other:
            return True
        if not isinstance(other, FlatLayout) or self._hash != other._hash:
            return False
        return self._key() == other._key()

    @property
    def num_params(self) -> int:
        """Parameters in the original tree (padding excluded)."""
        return sum(slot.size for slot in self.slots)

    @functools.cached_property
    def paths(self) -> tuple[str, ...]:
        """Each leaf's key path in the original tree, as ``jax.tree_util.keystr``."""
        placeholder = self.treedef.unflatten(list(self.slots))
        return tuple(jax.tree_util.keystr(path) for path, _ in
                     jax.tree_util.tree_flatten_with_path(placeholder)[0])

    def difference(self, other: "FlatLayout") -> str | None:
        """A sentence naming the first difference from ``other`` (None if equal)."""
        if self == other:
            return None
        if self.treedef != other.treedef:
            mine, theirs = set(self.paths), set(other.paths)
            only = sorted(mine - theirs)[:1] or sorted(theirs - mine)[:1]
            where = f"; e.g. leaf {only[0]} is in one only" if only else ""
            return (f"the trees differ in structure ({self.treedef.num_leaves} vs "
                    f"{other.treedef.num_leaves} leaves{where})")
        for path, a, b in zip(self.paths, self.slots, other.slots):
            if a != b:
                return (f"leaf {path} is {a.dtype}{list(a.shape)} at offset {a.offset} vs "
                        f"{b.dtype}{list(b.shape)} at offset {b.offset}")
        if self.shard != other.shard:
            return "one is a device's shard of the buffers, the other is not (or another one)"
        return (f"the buffers differ: {self._buffers_str()} vs {other._buffers_str()} "
                "(different pad_multiple?)")

    def _buffers_str(self) -> str:
        return " + ".join(f"{d}[{n}]" for d, n in zip(self.dtypes, self.sizes)) or "no buffers"

    def __repr__(self) -> str:
        # Short (JAX prints it in tree-mismatch errors) but distinct: the digest
        # separates layouts whose truncated structure strings agree.
        structure = str(self.treedef)
        if len(structure) > 80:
            structure = structure[:77] + "..."
        digest = hashlib.sha1(repr(self._key()).encode()).hexdigest()[:8]
        shard = (f"; 1/{self.shard.num_shards} shard over {self.shard.axis_name!r}"
                 if self.shard is not None else "")
        return (f"FlatLayout({self._buffers_str()}; {len(self.slots)} leaves; "
                f"{structure}{shard}; id {digest})")


def _flatten_with_keys(flat: "FlatParams"):
    return (tuple((jax.tree_util.DictKey(d), flat.buffers[d]) for d in flat.layout.dtypes),
            flat.layout)


def _flatten(flat: "FlatParams"):
    return tuple(flat.buffers[d] for d in flat.layout.dtypes), flat.layout


def _unflatten(layout: FlatLayout, children) -> "FlatParams":
    return FlatParams(dict(zip(layout.dtypes, children)), layout)


class FlatParams:
    """A pytree packed into one 1-D buffer per dtype (see the module docstring).

    Attributes:
      buffers: dict from dtype name (``"float32"``, ``"bfloat16"``, ...) to buffer.
        In a :meth:`pack_like` result the key names the buffer group, while the
        values keep their own dtype (e.g. ``bool`` masks).
      layout: the static :class:`FlatLayout`.

    Example:
      >>> import jax, jax.numpy as jnp
      >>> from jopt.flat import FlatParams
      >>> params = {"w": jnp.ones((2, 3)), "b": jnp.zeros(3), "s": jnp.ones(2, jnp.bfloat16)}
      >>> flat = FlatParams.pack(params, pad_multiple=4)
      >>> flat
      FlatParams(float32[12] + bfloat16[4]; 3 leaves, 11 params)
      >>> flat.unpack()["w"].shape
      (2, 3)
      >>> grads = jax.grad(lambda f: jnp.sum(f.unpack()["w"] ** 2))(flat)
      >>> grads.unpack()["w"]
      Array([[2., 2., 2.],
             [2., 2., 2.]], dtype=float32)
    """

    __slots__ = ("buffers", "layout")

    def __init__(self, buffers: dict[str, Any], layout: FlatLayout):
        self.buffers = buffers
        self.layout = layout

    @classmethod
    def pack(cls, tree: Any, *, pad_multiple: int = 1) -> "FlatParams":
        """Packs ``tree``'s array leaves into one buffer per dtype.

        Buffers follow the order in which their dtype first appears among the
        leaves; ``None`` leaves stay in the structure and take no space; scalars
        take one value.

        Args:
          tree: a pytree of arrays (or Python numbers).
          pad_multiple: pad each buffer with zeros to a multiple of this (e.g.
            ``num_devices * 256`` for int8 state sharded over devices).

        Raises:
          ValueError: if ``pad_multiple`` < 1.
          TypeError: if a leaf is not an array or number.
        """
        if int(pad_multiple) != pad_multiple or pad_multiple < 1:
            raise ValueError(
                f"pad_multiple must be an integer >= 1, got {pad_multiple!r}; use 1 for "
                "no padding, or the number of devices the buffers are split over.")
        paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        leaves = []
        for path, leaf in paths_leaves:
            try:
                leaves.append(jnp.asarray(leaf))
            except TypeError:
                raise TypeError(
                    f"FlatParams.pack: leaf {jax.tree_util.keystr(path)} is a "
                    f"{type(leaf).__name__}, not an array; only arrays and numbers can "
                    "be packed (keep static values out of the params tree)."
                ) from None
        slots, dtypes, sizes = _plan(leaves, int(pad_multiple))
        layout = FlatLayout(treedef, slots, dtypes, sizes)
        return cls(_concatenate(leaves, layout, None, 0), layout)

    @classmethod
    def pack_like(
        cls,
        tree: Any,
        like: "FlatParams | FlatLayout",
        *,
        dtype: Any = None,
        padding_value: Any = 0,
    ) -> "FlatParams":
        """Packs a tree with ``like``'s structure into buffers aligned with its layout.

        Use it for per-parameter data that must line up element by element with
        flat params: masks (a tree of per-leaf booleans becomes per-element
        boolean buffers), gradients computed on the tree, preconditioners.

        Args:
          tree: the structure of ``like``'s original tree; each leaf an array of
            its parameter's shape, or a scalar (e.g. ``True``) broadcast to it.
          like: a ``FlatParams`` or its layout.
          dtype: the buffers' dtype; default: promoted from the leaves of each
            buffer group (``bool`` for masks).
          padding_value: value of the padding.

        Returns:
          A ``FlatParams`` with ``like``'s layout.

        Raises:
          ValueError: if the structure or a leaf's shape does not match.

        Example:
          >>> import jax, jax.numpy as jnp
          >>> from jopt.flat import FlatParams
          >>> flat = FlatParams.pack({"w": jnp.ones((2, 2)), "b": jnp.ones(2)})
          >>> decay = jax.tree.map(lambda x: x.ndim > 1, flat.unpack())
          >>> FlatParams.pack_like(decay, flat).buffers["float32"]
          Array([False, False,  True,  True,  True,  True], dtype=bool)
        """
        layout = like.layout if isinstance(like, FlatParams) else like
        if layout.shard is not None:  # this device's slice of the whole buffers
            whole = cls.pack_like(tree, layout.shard.layout, dtype=dtype,
                                  padding_value=padding_value)
            return take_shard(whole, layout)
        paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
        if treedef != layout.treedef:
            raise ValueError(
                f"FlatParams.pack_like: the tree's structure {treedef} differs from the "
                f"packed tree's {layout.treedef}. Pass a tree with the params' structure "
                "(optax-style mask prefixes: see jopt.flat.masked).")
        leaves = []
        for (path, leaf), slot in zip(paths_leaves, layout.slots):
            if np.ndim(leaf) and tuple(np.shape(leaf)) != slot.shape:
                raise ValueError(
                    f"FlatParams.pack_like: leaf {jax.tree_util.keystr(path)} has shape "
                    f"{tuple(np.shape(leaf))} but its parameter has shape {slot.shape}; "
                    "pass an array of that shape or a scalar.")
            leaves.append(leaf)
        return cls(_concatenate(leaves, layout, dtype, padding_value), layout)

    def unpack(self) -> Any:
        """The original pytree: slices of the buffers (free inside ``jit``).

        Buffers with leading batch dimensions (e.g. the output of ``jax.vmap``)
        give leaves with the same leading dimensions. Encoded buffers (an
        optimizer state's ``QuantizedArray``) are decoded first, so
        ``state.mu.unpack()`` shows a flat optimizer's state per parameter.

        Raises:
          ValueError: if a buffer's length does not match the layout, or this is one
            device's shard of sharded buffers.
        """
        if self.layout.shard is not None:
            raise ValueError(
                f"FlatParams.unpack: this is one device's 1/{self.layout.shard.num_shards} "
                f"slice of buffers sharded over {self.layout.shard.axis_name!r} (ZeRO-1); "
                "it holds no whole arrays. Unpack the whole FlatParams instead.")
        buffers = {}
        for name, size in zip(self.layout.dtypes, self.layout.sizes):
            buffer = self.buffers[name]
            if storage_lib.is_encoded(buffer):
                buffer = buffer.decode()
            length = buffer.shape[-1] if buffer.ndim else None
            if length != size:
                raise ValueError(
                    f"FlatParams.unpack: buffer {name!r} has shape {tuple(buffer.shape)} "
                    f"but the layout expects {size} values on its last axis; the buffers "
                    "were not built for this layout (combine FlatParams only with "
                    "FlatParams.pack_like or tree maps over the same layout).")
            buffers[name] = buffer
        pieces = {}
        for name, size in zip(self.layout.dtypes, self.layout.sizes):
            pieces[name] = iter(_split(buffers[name], self._group(name), size))
        leaves = []
        for slot in self.layout.slots:
            piece = next(pieces[slot.dtype])
            leaves.append(piece.reshape(piece.shape[:-1] + slot.shape))
        return self.layout.treedef.unflatten(leaves)

    def _group(self, name: str) -> list:
        return [slot for slot in self.layout.slots if slot.dtype == name]

    def map(self, fn: Callable[[Any], Any]) -> "FlatParams":
        """Applies ``fn`` to every buffer, keeping the layout."""
        return FlatParams({d: fn(b) for d, b in self.buffers.items()}, self.layout)

    @property
    def num_params(self) -> int:
        """Parameters in the original tree (padding excluded)."""
        return self.layout.num_params

    def __repr__(self) -> str:
        return (f"FlatParams({self.layout._buffers_str()}; {len(self.layout.slots)} leaves, "
                f"{self.layout.num_params} params)")


jax.tree_util.register_pytree_with_keys(FlatParams, _flatten_with_keys, _unflatten, _flatten)


def _split(buffer: Any, slots: list, size: int) -> list:
    """The slots' pieces of ``buffer`` (last axis), in order.

    One ``lax.split`` rather than a slice per leaf: its transpose is a single
    concatenate, so the gradient of a loss of ``unpack()`` is assembled in one pass.
    (The transposes of N slices are N zero-padded full buffers summed together,
    O(N x size): 16 ms a step for 100 leaves of 1000 values on a CPU core.)
    """
    axis = buffer.ndim - 1
    offset = 0
    for slot in slots:
        if slot.offset != offset:  # not laid out by pack(): slice each leaf
            return [jax.lax.slice_in_dim(buffer, s.offset, s.offset + s.size, axis=axis)
                    for s in slots]
        offset += slot.size
    sizes = [slot.size for slot in slots] + ([size - offset] if size > offset else [])
    if len(sizes) == 1:
        return [buffer]
    if buffer.ndim == 1:
        # Split a [1, size] view. The transpose (the gradient) is then a rank-2
        # concatenate, which XLA:CPU materialises in one copy loop; the rank-1
        # one it fuses into the optimizer's update, emitted there as a search
        # over the pieces for every element: SGD's update on the 55k-parameter
        # MLP took 0.2-2.8 ms a step instead of 15 us (Adam escaped only because
        # its gradient has two consumers).
        pieces = jax.lax.split(buffer[None], sizes, axis=1)[: len(slots)]
        return [piece[0] for piece in pieces]
    return jax.lax.split(buffer, sizes, axis=axis)[: len(slots)]


def _plan(leaves: list, pad_multiple: int):
    dtypes: list[str] = []
    offsets: dict[str, int] = {}
    slots = []
    for leaf in leaves:
        name = jnp.dtype(leaf.dtype).name
        if name not in offsets:
            dtypes.append(name)
            offsets[name] = 0
        slots.append(_LeafSlot(name, offsets[name], tuple(leaf.shape)))
        offsets[name] += int(np.prod(leaf.shape, dtype=np.int64))
    sizes = tuple(-(-offsets[d] // pad_multiple) * pad_multiple for d in dtypes)
    return tuple(slots), tuple(dtypes), sizes


def take_shard(whole: "FlatParams", layout: FlatLayout) -> "FlatParams":
    """This device's slice of ``whole``'s buffers, as a FlatParams of the shard
    ``layout`` (``layout.shard`` describes ``whole``); call it inside ``shard_map``."""
    shard = layout.shard
    index = jax.lax.axis_index(shard.axis_name)
    buffers = {}
    for name, size in zip(layout.dtypes, layout.sizes):
        buffer = whole.buffers[name]
        if buffer.shape[-1] != size * shard.num_shards:
            raise ValueError(
                f"FlatParams: buffer {name!r} has {buffer.shape[-1]} values, not "
                f"{shard.num_shards} shards of {size}.")
        buffers[name] = jax.lax.dynamic_slice_in_dim(buffer, index * size, size, axis=-1)
    return FlatParams(buffers, layout)


def _concatenate(leaves: list, layout: FlatLayout, dtype: Any, padding_value: Any) -> dict:
    """One buffer per dtype group of ``layout`` from ``leaves`` (scalars broadcast)."""
    buffers = {}
    for name, size in zip(layout.dtypes, layout.sizes):
        group = [(leaf, slot) for leaf, slot in zip(leaves, layout.slots) if slot.dtype == name]
        out_dtype = dtype or (jnp.result_type(*[leaf for leaf, _ in group]) if group else name)
        used = sum(slot.size for _, slot in group)
        if all(isinstance(leaf, (bool, int, float, np.ndarray, np.generic))
               for leaf, _ in group):
            # Host values (e.g. a mask of Python bools) stay a host constant.
            parts = [np.broadcast_to(np.asarray(leaf, out_dtype), slot.shape).reshape(-1)
                     for leaf, slot in group]
            parts.append(np.full([size - used], padding_value, out_dtype))
            buffers[name] = jnp.asarray(np.concatenate(parts))
            continue
        parts = [jnp.broadcast_to(jnp.asarray(leaf, out_dtype), slot.shape).reshape(-1)
                 for leaf, slot in group]
        if size > used:
            parts.append(jnp.full([size - used], padding_value, out_dtype))
        # As a [1, size] concatenation, for the reason given in _split.
        buffers[name] = (jnp.concatenate([part[None] for part in parts], axis=1)[0]
                         if len(parts) != 1 else parts[0])
    return buffers


# --------------------------------------------------------------------------------------
# Masks.
# --------------------------------------------------------------------------------------


def _is_host_bool(x: Any) -> bool:
    return isinstance(x, (bool, np.bool_)) or (isinstance(x, np.ndarray) and x.ndim == 0
                                               and x.dtype == bool)


def _broadcast_prefix(mask: Any, treedef: Any) -> list:
    """The leaves of an optax-style mask (a prefix of the params tree), one per param."""
    placeholder = treedef.unflatten([object()] * treedef.num_leaves)
    try:
        expanded = jax.tree.map(lambda m, sub: jax.tree.map(lambda _: m, sub), mask,
                                placeholder)
    except ValueError as e:
        raise ValueError(
            f"masked: the mask's structure {jax.tree.structure(mask)} is not a prefix of "
            f"the params' {treedef} ({e}).") from None
    return treedef.flatten_up_to(expanded)


def _elementwise_mask(mask: Any, tree: Any) -> Any:
    """Resolves ``mask`` for ``tree``: None for per-leaf Python booleans on a tree
    (optax's own masking applies), else a per-element mask shaped like ``tree``."""
    if isinstance(tree, FlatParams):
        shard = tree.layout.shard
        whole = tree.layout if shard is None else shard.layout
        if not callable(mask):
            mask_tree = mask
        elif shard is None:
            mask_tree = mask(tree.unpack())
        else:  # a device's shard has no whole arrays: the function sees their shapes
            mask_tree = mask(whole.treedef.unflatten(
                [jnp.zeros(slot.shape, slot.dtype) for slot in whole.slots]))
        if isinstance(mask_tree, FlatParams):
            if shard is not None and mask_tree.layout == tree.layout:
                return mask_tree
            difference = mask_tree.layout.difference(whole)
            if difference:
                raise ValueError(f"masked: the mask's layout differs from the params': "
                                 f"{difference}.")
            return mask_tree if shard is None else take_shard(mask_tree, tree.layout)
        leaves = _broadcast_prefix(mask_tree, whole.treedef)
        return FlatParams.pack_like(whole.treedef.unflatten(leaves), tree.layout,
                                    dtype=bool, padding_value=False)
    mask_tree = mask(tree) if callable(mask) else mask
    treedef = jax.tree.structure(tree)
    leaves = _broadcast_prefix(mask_tree, treedef)
    if all(_is_host_bool(m) for m in leaves):
        return None
    return treedef.unflatten(leaves)


def masked(
    inner: optax.GradientTransformation,
    mask: Any | Callable[[Any], Any],
) -> optax.GradientTransformationExtraArgs:
    """``optax.masked`` that also works on :class:`FlatParams` and per-element masks.

    .. math::
      u_i \\leftarrow \\begin{cases} \\mathrm{inner}(u)_i & m_i \\\\ u_i & \\text{otherwise}\\end{cases}

    On a tree with a mask of per-leaf Python booleans this *is* ``optax.masked``
    (state is kept only for the selected leaves). On a ``FlatParams`` - where a
    leaf is a whole buffer - or with array masks, ``inner`` runs on every element
    and each element takes the inner or the original update by its mask. That is
    exactly ``optax.masked`` for elementwise inner transformations (weight decay,
    Adam, momentum: their update of one element depends on that element only); a
    transformation that reduces over elements (``clip_by_global_norm``) would also
    see the masked-out ones.

    Args:
      inner: the transformation to apply where the mask is True.
      mask: a tree of booleans with the structure of the params (or an optax-style
        prefix of it), a ``FlatParams`` of per-element booleans, or a function
        returning either. On a ``FlatParams`` the function receives the original
        tree (``params.unpack()``), so one mask function serves both modes; on one
        device's shard of sharded buffers (ZeRO-1) it receives a tree of zeros shaped
        like the parameters, so it should select by structure, not by value.

    Returns:
      A :class:`optax.GradientTransformationExtraArgs`.

    Example:
      Weight decay on matrices only, with flat params:

      >>> import jax, jax.numpy as jnp, optax
      >>> from jopt.flat import FlatParams, masked
      >>> flat = FlatParams.pack({"w": jnp.ones((2, 2)), "b": jnp.ones(2)})
      >>> tx = masked(optax.add_decayed_weights(0.5), lambda p: jax.tree.map(lambda x: x.ndim > 1, p))
      >>> zeros = flat.map(jnp.zeros_like)
      >>> updates, _ = tx.update(zeros, tx.init(flat), flat)
      >>> updates.unpack()["w"], updates.unpack()["b"]
      (Array([[0.5, 0.5],
             [0.5, 0.5]], dtype=float32), Array([0., 0.], dtype=float32))
    """
    per_leaf = optax.masked(inner, mask)
    inner = optax.with_extra_args_support(inner)

    def init_fn(params):
        if isinstance(params, FlatParams) and params.layout.shard is not None:
            return inner.init(params)  # elementwise; the mask needs the device index
        if _elementwise_mask(mask, params) is None:
            return per_leaf.init(params)
        return inner.init(params)

    def update_fn(updates, state, params=None, **extra_args):
        element_mask = _elementwise_mask(mask, updates)
        if element_mask is None:
            return per_leaf.update(updates, state, params, **extra_args)
        new_updates, state = inner.update(updates, state, params, **extra_args)
        selected = jax.tree.map(lambda m, new, old: jnp.where(m, new, old),
                                element_mask, new_updates, updates)
        return selected, state

    return optax.GradientTransformationExtraArgs(init_fn, update_fn)
