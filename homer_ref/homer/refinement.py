"""Propagative refinement: a pruning decision made at layer k flows down to every lower layer (HOMER_SPEC.md F).

When a node prunes at its reduction layer k, the *same* keep-mask is applied to the hidden states, positions,
reduction mask, sources, and to the K/V of every layer 0..k the chunk holds. Lower-layer caches were already pruned by
earlier (lower) decisions, so every token slot ends up either kept in every layer or dropped from every layer:
the final cache holds the same K slots in each of the L layers, usable as an ordinary KV cache. Without it,
lower layers would keep more tokens than upper layers, and a new token would attend to inconsistent caches.

Like the official code this is done eagerly at every reduction (gathering once at the end by the top-level
indices gives the same result). No deviation from the official code.
"""

import torch

from homer_ref.homer.chunking import Chunk


def keep_slots(chunk: Chunk, keep: torch.Tensor) -> Chunk:
    """The chunk restricted to slot indices `keep` [K] (ascending), in every layer it holds."""
    return Chunk(
        h=chunk.h[keep],  # [K, D]
        positions=chunk.positions[keep],
        is_context=chunk.is_context[keep],
        sources=chunk.sources[keep],
        keys=[k[:, keep] for k in chunk.keys],  # each [Hkv, K, Dh]
        values=[v[:, keep] for v in chunk.values],
    )
