"""Chunking: how the long input becomes the leaves of HOMER's tree (HOMER_SPEC.md B.2-B.4).

Leaf i holds `[prefix | context[i*e : (i+1)*e] | suffix]` (B.2): every leaf gets its own copy of the prefix
(e.g. the instruction) and of the suffix (e.g. the question), so every chunk sees both.

Positions are local and reused (B.3): every leaf's context starts at position P, whatever its place in the
document, and with more than one leaf suffix token j sits at P + e + j in *every* leaf — so a short last leaf
has a gap between its context and its suffix, and all leaves agree on the suffix positions (which is what lets
merging average them). With a single leaf the positions are simply 0 .. P+C+S-1.

The reduction mask (B.4) marks the context tokens: only they can ever be pruned. Every slot also carries its
*source*, the index of its token in the prompt prefix + context + suffix, so that any node's slots (and the
final cache's) can be traced back to the text (`Plan.part`, `HomerCache.slot_sources`).

No deviation from the official code here.
"""

from dataclasses import dataclass, field
from typing import NamedTuple

import torch

from homer_ref.homer.plan import Plan


def leaf_span(plan: Plan, i: int) -> tuple[int, int]:
    """The slice [start, stop) of the context that leaf i holds."""
    return i * plan.e, i * plan.e + plan.leaf_context[i]


def leaf_positions(plan: Plan, i: int) -> list[int]:
    """Position ids of leaf i: [0..P-1 | P..P+c_i-1 | P+e..P+e+S-1] (plain 0..n-1 when N = 1)."""
    P, S, c = plan.P, plan.S, plan.leaf_context[i]
    if plan.N == 1:
        return list(range(P + c + S))
    return list(range(P + c)) + list(range(P + plan.e, P + plan.e + S))


class Leaf(NamedTuple):
    """The inputs of one leaf, n = P + c_i + S slots."""

    ids: torch.Tensor  # [n] token ids: [prefix | context slice | suffix]
    positions: torch.Tensor  # [n] position ids (B.3)
    is_context: torch.Tensor  # [n] bool, the reduction mask (B.4)
    sources: torch.Tensor  # [n] index of each token in the prompt prefix + context + suffix


def make_leaf(
    plan: Plan, i: int, prefix_ids: list[int], context_ids: list[int], suffix_ids: list[int], device="cpu"
) -> Leaf:
    """Leaf i's token ids, positions, reduction mask and sources."""
    start, stop = leaf_span(plan, i)
    P, C, S = plan.P, plan.C, plan.S
    ids = list(prefix_ids) + list(context_ids[start:stop]) + list(suffix_ids)
    is_context = [False] * P + [True] * (stop - start) + [False] * S
    sources = list(range(P)) + list(range(P + start, P + stop)) + list(range(P + C, P + C + S))
    return Leaf(
        *(
            torch.tensor(x, dtype=dtype, device=device)
            for x, dtype in (
                (ids, torch.long),
                (leaf_positions(plan, i), torch.long),
                (is_context, torch.bool),
                (sources, torch.long),
            )
        )
    )


@dataclass
class Chunk:
    """One tree node's state while it climbs: n token slots, with the cache of every layer run so far."""

    h: torch.Tensor  # [n, D] hidden states after the last layer run (the residual stream)
    positions: torch.Tensor  # [n] position ids (local, reused, possibly repeated after merges)
    is_context: torch.Tensor  # [n] bool: True for context slots, the only ones that can be pruned
    sources: torch.Tensor  # [n] index of each slot's token in prefix + context + suffix (`Plan.part` names it)
    keys: list[torch.Tensor] = field(default_factory=list)  # one per layer run: [Hkv, n, Dh] after RoPE
    values: list[torch.Tensor] = field(default_factory=list)  # one per layer run: [Hkv, n, Dh]

    def __len__(self) -> int:
        return self.positions.shape[0]

    def kv_token_layers(self) -> int:
        """Live KV size in token-layers: slots times layers held."""
        return len(self) * len(self.keys)

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
