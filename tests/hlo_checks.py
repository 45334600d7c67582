"""Reading XLA:CPU's compiled HLO text in tests."""

import re


def convolutions_in_ynn_fusions(hlo: str) -> int:
    """Convolutions that XLA:CPU placed inside YNNPACK fusions of a compiled program
    (``jax.jit(f).lower(...).compile().as_text()``)."""
    called = set(re.findall(r'calls=(%[\w.\-]+)[^\n]*"__ynn_fusion"', hlo))
    return sum(block.count(" convolution(") for block in hlo.split("\n\n")
               if block.strip().split(" ", 1)[0] in called)
