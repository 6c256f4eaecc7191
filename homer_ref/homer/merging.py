"""Hierarchical merging: two reduced sibling chunks become one (HOMER_SPEC.md E).

Both children have run exactly the same layers 0..k, so their caches cover the same layers. For the hidden
states and for the K and V of every layer the merged chunk is

    [ avg(prefix_L, prefix_R) | context_L | context_R | avg(suffix_L, suffix_R) ]      avg(a, b) = (a + b) / 2

and its positions are [prefix_L | context_L | context_R | suffix_R], with no re-indexing: both contexts came
from leaves whose positions start at P, so the merged positions overlap and are not monotonic (E.3). Attention
stays causal by sequence index, so a right-context token sees every left-context token.

Why the affixes are averaged, not concatenated: each child holds its own copy. The prefix copies are identical
(causal attention: a prefix token sees only the prefix), so averaging them changes nothing (E.5). The suffix
copies differ — each attended to a different context — and their average is the suffix of the merged chunk,
which has seen both contexts. The suffix positions agree between the children (B.3).

Pruning never moves slots, so the prefix is always the first P slots and the suffix the last S.

Deviation (N.2.1): `merge` consumes its children — it empties their per-layer lists as it goes — so no finished
child outlives its merge (the official code keeps every right child alive, G.3).
"""

import torch

from homer_ref.homer.chunking import Chunk


def _join(left: torch.Tensor, right: torch.Tensor, P: int, S: int, dim: int) -> torch.Tensor:
    """[avg prefix | left context | right context | avg suffix] along `dim` (the slot dimension)."""
    nl, nr = left.shape[dim], right.shape[dim]
    return torch.cat(
        [
            (left.narrow(dim, 0, P) + right.narrow(dim, 0, P)) / 2,
            left.narrow(dim, P, nl - P - S),
            right.narrow(dim, P, nr - P - S),
            (left.narrow(dim, nl - S, S) + right.narrow(dim, nr - S, S)) / 2,
        ],
        dim=dim,
    )


def _concat(left: torch.Tensor, right: torch.Tensor, P: int, S: int) -> torch.Tensor:
    """[left prefix | left context | right context | right suffix] for per-slot labels (positions, masks, sources)."""
    return torch.cat([left[: len(left) - S], right[P:]])


def merge(left: Chunk, right: Chunk, P: int, S: int) -> Chunk:
    """The merged chunk of two siblings that ran the same layers. Consumes both (their lists are emptied)."""
    assert len(left.keys) == len(right.keys), "siblings must have run the same layers"
    merged = Chunk(
        h=_join(left.h, right.h, P, S, dim=0),  # [n_L + n_R - P - S, D]
        positions=_concat(left.positions, right.positions, P, S),
        is_context=_concat(left.is_context, right.is_context, P, S),
        sources=_concat(left.sources, right.sources, P, S),  # affix copies share their sources
    )
    while left.keys:  # layer by layer, dropping each child layer once it is copied
        merged.keys.append(_join(left.keys.pop(0), right.keys.pop(0), P, S, dim=1))  # [Hkv, n, Dh]
        merged.values.append(_join(left.values.pop(0), right.values.pop(0), P, S, dim=1))
    return merged
