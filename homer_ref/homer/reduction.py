"""Token reduction: which tokens a chunk drops before it is merged (HOMER_SPEC.md D.1-D.3, N.2.2-N.2.4).

At the last layer of a node's block, after attention, every token i gets a significance

    sig(i) = max over query heads h of  <q_last^h, k_i^h> / sqrt(Dh)   -  bias[layer][pos(last) - pos(i)]

with q_last the query of the chunk's last token (the last suffix token), both after RoPE, *pre-softmax*.
The bias (calibration, `calibration.py`) removes the part of the logit explained by distance alone, since
tokens near the end look important just for being near. Prefix and suffix get +inf: they are never pruned.
The k tokens with the lowest significance are removed; the survivors keep their sequence order.

Deviations from the official code:
- N.2.2 GQA works: query head h is scored against the key of its KV group h // (Hq/Hkv) (the official code
  crashes on GQA). For MHA this is the official score.
- N.2.3 Deterministic ties: tokens are removed in order of (score, sequence index) — among equal scores the
  earlier token goes first. The significance is float32 whatever the model dtype.
- N.2.4 Three modes, as in the paper's ablation: `calibrated` (bias table), `uncalibrated` (no bias), `random`
  (a seeded score, reproducible in any language: see `random_significance`).
"""

import torch

_MASK64 = (1 << 64) - 1


def significance(
    last_logits: torch.Tensor,  # [Hq, n] scaled pre-softmax logits of the last query (RoPE applied)
    positions: torch.Tensor,  # [n] position ids of the chunk's slots
    is_context: torch.Tensor,  # [n] bool: False for prefix/suffix slots
    bias_row: torch.Tensor | None,  # [width] bias[layer] by position distance, or None (uncalibrated)
) -> torch.Tensor:
    """sig [n] float32: max over heads, minus the distance bias, +inf on the affixes."""
    scores = last_logits.amax(dim=0).to(torch.float32)  # the max is taken in the logits' own precision
    if bias_row is not None:
        distance = positions[-1] - positions  # [n] in position-id space, >= 0 (the suffix holds the largest ids)
        scores = scores - bias_row.to(torch.float32)[distance]
    return scores.masked_fill(~is_context, float("inf"))


def splitmix64(x: int) -> int:
    """One step of the splitmix64 generator on unsigned 64-bit integers (easy to reproduce in any language)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def random_significance(seed: int, level: int, index: int, is_context: torch.Tensor) -> torch.Tensor:
    """The `random` mode's scores [n] float32: slot j of node (level, index) gets a uniform number in [0, 1).

    key = splitmix64(splitmix64(splitmix64(seed) ^ level) ^ index); u_j = (splitmix64(key ^ j) >> 11) * 2^-53.
    """
    key = splitmix64(splitmix64(splitmix64(seed & _MASK64) ^ level) ^ index)
    u = [(splitmix64(key ^ j) >> 11) * 2.0**-53 for j in range(is_context.shape[0])]
    scores = torch.tensor(u, dtype=torch.float64).to(torch.float32).to(is_context.device)
    return scores.masked_fill(~is_context, float("inf"))


def select(scores: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(kept, removed): ascending slot indices, removing the k lowest scores, ties broken by the lower index."""
    if torch.isnan(scores).any():
        raise ValueError("significance scores contain NaN: the model's weights or the bias table hold NaN/Inf")
    order = torch.sort(scores, stable=True).indices  # stable: equal scores keep index order (N.2.3)
    return order[k:].sort().values, order[:k].sort().values
