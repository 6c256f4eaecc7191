"""Chunking: how the long input becomes the leaves of HOMER's tree (HOMER_SPEC.md B.2-B.4).

Leaf i holds `[prefix | context[i*e : (i+1)*e] | suffix]` (B.2): every leaf gets its own copy of the prefix
(e.g. the instruction) and of the suffix (e.g. the question), so every chunk sees both.

Positions are local and reused (B.3): every leaf's context starts at position P, whatever its place in the
document, and with more than one leaf suffix token j sits at P + e + j in *every* leaf — so a short last leaf
has a gap between its context and its suffix, and all leaves agree on the suffix positions (which is what lets
merging average them). With a single leaf the positions are simply 0 .. P+C+S-1.

The reduction mask (B.4) marks the context tokens: only they can ever be pruned.

No deviation from the official code here.
"""

from dataclasses import dataclass, field

import torch

from homer_ref.plan import Plan


def leaf_span(plan: Plan, i: int) -> tuple[int, int]:
    """The slice [start, stop) of the context that leaf i holds."""
    return i * plan.e, i * plan.e + plan.leaf_context[i]


def leaf_positions(plan: Plan, i: int) -> list[int]:
    """Position ids of leaf i: [0..P-1 | P..P+c_i-1 | P+e..P+e+S-1] (plain 0..n-1 when N = 1)."""
    P, S, c = plan.P, plan.S, plan.leaf_context[i]
    if plan.N == 1:
        return list(range(P + c + S))
    return list(range(P + c)) + list(range(P + plan.e, P + plan.e + S))


def make_leaf(
    plan: Plan, i: int, prefix_ids: list[int], context_ids: list[int], suffix_ids: list[int], device="cpu"
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Leaf i as (token ids [n], positions [n], is_context [n] bool), n = P + c_i + S."""
    start, stop = leaf_span(plan, i)
    ids = list(prefix_ids) + list(context_ids[start:stop]) + list(suffix_ids)
    is_context = [False] * plan.P + [True] * (stop - start) + [False] * plan.S
    return (
        torch.tensor(ids, dtype=torch.long, device=device),
        torch.tensor(leaf_positions(plan, i), dtype=torch.long, device=device),
        torch.tensor(is_context, dtype=torch.bool, device=device),
    )


@dataclass
class Chunk:
    """One tree node's state while it climbs: n token slots, with the cache of every layer run so far."""

    h: torch.Tensor  # [n, D] hidden states after the last layer run (the residual stream)
    positions: torch.Tensor  # [n] position ids (local, reused, possibly repeated after merges)
    is_context: torch.Tensor  # [n] bool: True for context slots, the only ones that can be pruned
    keys: list[torch.Tensor] = field(default_factory=list)  # one per layer run: [Hkv, n, Dh] after RoPE
    values: list[torch.Tensor] = field(default_factory=list)  # one per layer run: [Hkv, n, Dh]

    def __len__(self) -> int:
        return self.positions.shape[0]

    def kv_token_layers(self) -> int:
        """Live KV size in token-layers: slots times layers held."""
        return len(self) * len(self.keys)

    def kv_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)
