"""Flat parameter buffers: a pytree packed into one contiguous 1-D buffer per dtype.

A model with hundreds of parameter arrays costs optax one small kernel per array
per step, and XLA compile time grows with the number of arrays. Packing the
parameters into :class:`FlatParams` (one buffer per dtype) makes every
transformation - jopt's or optax's - run one fused kernel per buffer: a
`FlatParams` is itself a pytree whose leaves are the buffers, so ``tx.init`` and
``tx.update`` need no special support. Inside ``jit`` :meth:`FlatParams.unpack` is
free slicing, so a loss written for the original tree differentiates with respect
to the buffers directly::

    flat = FlatParams.pack(params)
    grads = jax.grad(lambda f: loss(f.unpack(), batch))(flat)   # a FlatParams
    updates, state = tx.update(grads, state, flat)
    flat = jopt.apply_updates(flat, updates)

Buffers can be padded to a multiple of ``n`` (``pad_multiple``) so that they
split evenly over ``n`` devices (sharded optimizer state); the padding stays zero
under every elementwise optimizer, since its gradient is zero.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

__all__ = ["FlatLayout", "FlatParams"]


@dataclasses.dataclass(frozen=True)
class _LeafSlot:
    dtype: str
    offset: int
    shape: tuple[int, ...]

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


@dataclasses.dataclass(frozen=True)
class FlatLayout:
    """Static description of how a pytree is packed (hashable: part of the treedef).

    Attributes:
      treedef: structure of the original pytree.
      slots: per leaf, its buffer's dtype name, offset and shape.
      dtypes: buffer dtype names, in buffer order.
      sizes: each buffer's length, padding included.
    """

    treedef: Any
    slots: tuple[_LeafSlot, ...]
    dtypes: tuple[str, ...]
    sizes: tuple[int, ...]

    @property
    def num_params(self) -> int:
        """Parameters in the original tree (padding excluded)."""
        return sum(slot.size for slot in self.slots)


@jax.tree_util.register_pytree_node_class
class FlatParams:
    """A pytree packed into one 1-D buffer per dtype.

    Attributes:
      buffers: dict from dtype name (``"float32"``, ``"bfloat16"``, ...) to buffer.
      layout: the static :class:`FlatLayout`.
    """

    __slots__ = ("buffers", "layout")

    def __init__(self, buffers: dict[str, Any], layout: FlatLayout):
        self.buffers = buffers
        self.layout = layout

    # --- pytree protocol: the buffers are the leaves, the layout is static ---
    def tree_flatten(self):
        return tuple(self.buffers[d] for d in self.layout.dtypes), self.layout

    @classmethod
    def tree_unflatten(cls, layout, children):
        return cls(dict(zip(layout.dtypes, children)), layout)

    @classmethod
    def pack(cls, tree: Any, *, pad_multiple: int = 1) -> "FlatParams":
        """Packs ``tree``'s array leaves into one buffer per dtype.

        Args:
          tree: a pytree of arrays (``None`` leaves are kept in the structure).
          pad_multiple: pad each buffer with zeros to a multiple of this.

        Raises:
          ValueError: if ``pad_multiple`` < 1.
        """
        if pad_multiple < 1:
            raise ValueError(f"pad_multiple must be >= 1, got {pad_multiple}.")
        leaves, treedef = jax.tree.flatten(tree)
        leaves = [jnp.asarray(leaf) for leaf in leaves]
        dtypes: list[str] = []
        for leaf in leaves:
            name = jnp.dtype(leaf.dtype).name
            if name not in dtypes:
                dtypes.append(name)
        offsets = dict.fromkeys(dtypes, 0)
        slots = []
        for leaf in leaves:
            name = jnp.dtype(leaf.dtype).name
            slots.append(_LeafSlot(name, offsets[name], tuple(leaf.shape)))
            offsets[name] += leaf.size
        sizes = tuple(-(-offsets[d] // pad_multiple) * pad_multiple for d in dtypes)
        buffers = {}
        for name, size in zip(dtypes, sizes):
            parts = [leaf.reshape(-1) for leaf, slot in zip(leaves, slots) if slot.dtype == name]
            padding = size - offsets[name]
            if padding:
                parts.append(jnp.zeros([padding], name))
            buffers[name] = jnp.concatenate(parts)
        layout = FlatLayout(treedef, tuple(slots), tuple(dtypes), sizes)
        return cls(buffers, layout)

    def unpack(self) -> Any:
        """The original pytree (slices of the buffers; free inside ``jit``)."""
        leaves = [
            jax.lax.slice_in_dim(self.buffers[s.dtype], s.offset, s.offset + s.size)
            .reshape(s.shape)
            for s in self.layout.slots
        ]
        return self.layout.treedef.unflatten(leaves)

    def map(self, fn) -> "FlatParams":
        """Applies ``fn`` to every buffer, keeping the layout."""
        return FlatParams({d: fn(b) for d, b in self.buffers.items()}, self.layout)

    @property
    def num_params(self) -> int:
        return self.layout.num_params

    def __repr__(self) -> str:
        parts = ", ".join(f"{d}[{n}]" for d, n in zip(self.layout.dtypes, self.layout.sizes))
        return f"FlatParams({parts}; {len(self.layout.slots)} leaves)"
