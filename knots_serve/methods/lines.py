"""LiNeS (Wang et al., ICLR 2025, "Post-training layer scaling"): the merged update of transformer block
ℓ = 1..L scaled by λ(ℓ) = a + β·(ℓ − 1)/(L − 1), tensors outside the blocks by a, so the shallow layers,
which hold what every task shares, change least. For merging, the authors set a so that the shallow
layers carry the mean task update: a = (1/T)·‖Σ_t ΔW_t‖ / ‖ΔW_merged‖ (1/T for task arithmetic), and
tune β. They measure both norms in ℓ1 over the flattened model; here they are Frobenius norms over all
modules, which the factored spaces give exactly and cheaply (an ℓ1 norm needs every dense ΔW).
"""

from __future__ import annotations

import re

BLOCK = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)\.")


def block_of(module: str) -> int | None:
    """The 0-based transformer block a module belongs to (`model.layers.3.self_attn.q_proj` -> 3), or None."""
    m = BLOCK.search(module)
    return int(m.group(1)) if m else None


def lines_scales(modules, beta: float, base: float) -> dict[str, float]:
    """λ per module; L is the number of blocks the modules span (the deepest block seen, plus one)."""
    blocks = {m: block_of(m) for m in modules}
    depth = max((b for b in blocks.values() if b is not None), default=0)
    return {m: base + (beta * b / depth if b is not None and depth else 0.0) for m, b in blocks.items()}


def lines_base(sum_norm2: float, merged_norm2: float, tasks: int) -> float:
    """a = (1/T)·‖Σ_t ΔW_t‖ / ‖ΔW_merged‖ (0 for a zero merge: nothing to scale)."""
    return (sum_norm2**0.5) / (tasks * merged_norm2**0.5) if merged_norm2 > 0 else 0.0
