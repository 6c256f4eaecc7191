"""Float64 NumPy HOMER prefill: the oracle for homer_ref's torch HOMER, written from HOMER_SPEC.md only.

Implements HOMER_SPEC.md sections
- B: chunking (B.1 leaf count and sizes, B.2 leaf layout, B.3 local positions with the suffix at P+e+j,
  B.4 reduction mask);
- C: C.1 layer schedule, C.2 reduction at the last layer of a node's block, after attention, before the MLP;
- D: D.1 significance score, D.2 calibration bias, D.3 protected affixes, D.4 child targets with the
  short-right rule on the RAW leaf length;
- E: merging with averaged affixes and reused positions; F: propagative refinement;
- L (worked example) and M (pseudo-code), with the normative decisions of section N:
- N.1 faithful by default; surviving slots keep their sequence order.
- N.2.1 the traversal is a plain depth-first recursion here (the oracle has no memory goals; the order of
  execution, recorded in ``nodes``, is the DFS post-order all the same).
- N.2.2 GQA: query head h scores against KV head h // (Hq / Hkv); the max runs over all query heads.
- N.2.3 deterministic ties: remove by (score ascending, slot index ascending); the score is float32 (the
  float64 head-max logit cast to float32, minus float32(bias) in float32 arithmetic).
- N.2.4 reduction modes "calibrated" (bias [L, width], width >= M), "uncalibrated" (zero bias), "random" (seeded
  splitmix64 uniforms, see ``random_score``).
- N.2.6 ValueError, naming the constraint and a fix, for: S = 0, M <= P+S, T < P+S, W >= L, too few layers
  for the tree, an empty or negative last leaf, a bad bias table, ids outside the vocabulary.
  C = 0 is not an error: one leaf, the plain forward of prefix + suffix.

Symbol legend (shared with the torch code and the tests):
    B n D Hq Hkv Dh  batch (always 1: one prompt per call), tokens (of the node being processed), hidden,
                     query heads, KV heads, head dim
    L W M T          layers, warm-up layers, max chunk length (with affixes), target cache length
    P C S            prefix / context / suffix lengths
    E = M - P - S    most context tokens one chunk can hold
    N, H             number of leaves (a power of two), tree height (N = 2**H)
    e                context tokens per leaf, ceil(C / N)
    K                slots in the final cache
    R                default child target P + E//2 + S (D.4)

Each node is a plain dict of arrays (a "chunk"): h [n, D], pos [n] int64, is_context [n] bool (False = prefix or
suffix, never pruned), keys/values: {layer: [Hkv, n, Dh]} for every layer run so far on this node or its
descendants.
"""

import math

import numpy as np

from reference import llama_np

REDUCTIONS = ("calibrated", "uncalibrated", "random")
_MASK64 = (1 << 64) - 1


# ----------------------------------------------------------------------------------------------------------
# Random reduction mode (N.2.4): a counter-based uniform so that any implementation can reproduce it exactly.
# ----------------------------------------------------------------------------------------------------------


def splitmix64(x: int) -> int:
    """One SplitMix64 step on the state ``x`` (64-bit unsigned arithmetic on Python ints)."""
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    z = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def random_score(seed: int, level: int, index: int, slot: int) -> float:
    """u(seed, level, index, slot) in [0, 1): the score of a slot under reduction="random"."""
    key = splitmix64(splitmix64(splitmix64(seed & _MASK64) ^ level) ^ index)
    return (splitmix64(key ^ slot) >> 11) * 2.0**-53


# ----------------------------------------------------------------------------------------------------------
# Plan: every derived quantity of B.1 and C.1 in one visible place, with the N.2.6 validation.
# ----------------------------------------------------------------------------------------------------------


def _leaf_layout(C: int, E: int) -> tuple[int, int, int, int]:
    """B.1: (N0, H, N, e) for C context tokens and E context tokens per chunk."""
    N0 = max(1, math.ceil(C / E))
    H = (N0 - 1).bit_length()  # = ceil(log2(N0)), exactly; N0 = 1 -> 0
    N = 2**H  # the leaf count is rounded UP to a power of two: a perfect binary tree
    return N0, H, N, math.ceil(C / N)


def _layout_ok(C: int, E: int, Lm: int) -> bool:
    """Would E context tokens per chunk give a tree that fits Lm layers with a non-empty last leaf?"""
    _, H, N, e = _leaf_layout(C, E)
    return H + 1 <= Lm and (N == 1 or C - (N - 1) * e > 0)


def plan(config: dict, P: int, C: int, S: int, M: int, T: int, W: int) -> dict:
    """E, N, H, e, the leaf context lengths and the layer schedule; ValueError for the N.2.6 cases.

    M = max_chunk_len, T = target_len, W = warmup_layers.
    """
    L = config["num_hidden_layers"]
    if S == 0:
        raise ValueError(
            "suffix_ids is empty (S = 0): HOMER scores tokens with the last suffix token's query, "
            "so S >= 1 is required; move at least the final token of the prompt into the suffix"
        )
    if M <= P + S:
        raise ValueError(
            f"max_chunk_len M = {M} must exceed prefix + suffix = {P} + {S} = {P + S} (each chunk holds both "
            f"affixes plus E = M - P - S >= 1 context tokens); raise max_chunk_len or shorten the affixes"
        )
    if T < P + S:
        raise ValueError(
            f"target_len T = {T} is below prefix + suffix = {P + S}: the affixes are never pruned, "
            f"so the final cache holds at least P + S slots; raise target_len to >= {P + S}"
        )
    if not 0 <= W < L:
        raise ValueError(
            f"warmup_layers W = {W} must satisfy 0 <= W < L = {L} (at least one layer must remain "
            f"for merging); use warmup_layers <= {L - 1}"
        )
    E = M - P - S
    N0, H, N, e = _leaf_layout(C, E)
    Lm = L - W  # merging layers
    if H + 1 > Lm:
        need_m = P + S + math.ceil(C / 2 ** (Lm - 1))  # smallest M whose tree fits in Lm layer blocks
        fixes = [f"max_chunk_len >= {need_m}"] + ([f"warmup_layers <= {L - H - 1}"] if L - H - 1 >= 0 else [])
        raise ValueError(
            f"too few layers for the tree: context C = {C} with E = M - P - S = {E} needs H = {H} "
            f"merge levels, i.e. H + 1 = {H + 1} layer blocks, but only L - W = {L} - {W} = {Lm} "
            f"layers follow the warm-up; with these settings the model reaches at most "
            f"2**(L-W-1) * E = {2 ** (Lm - 1) * E} context tokens. Settings that fit: {' or '.join(fixes)}"
        )
    last_len = C - (N - 1) * e
    if N > 1 and last_len <= 0:
        nearby = [m for m in range(M - 8, M + 9) if m > P + S and _layout_ok(C, m - P - S, Lm)]
        nearest = min(nearby, key=lambda m: (abs(m - M), m), default=None)
        raise ValueError(
            f"the last leaf would hold {last_len} context tokens (C = {C}, N = {N} leaves of "
            f"e = ceil(C/N) = {e}): C - (N-1)*e must be > 0; "
            + (f"use max_chunk_len = {nearest}, or " if nearest is not None else "change max_chunk_len, or ")
            + "add or remove a few context tokens"
        )
    lpc = Lm // (H + 1)  # layers per tree level
    lo = Lm - lpc * (H + 1)  # leftover layers, given to the leaves (C.1)
    leaf_ctx = [min((i + 1) * e, C) - i * e for i in range(N)]  # c_i
    return {
        "L": L,
        "W": W,
        "M": M,
        "T": T,
        "P": P,
        "C": C,
        "S": S,
        "E": E,
        "N0": N0,
        "H": H,
        "N": N,
        "e": e,
        "lpc": lpc,
        "lo": lo,
        "leaf_ctx": leaf_ctx,
        "R": P + E // 2 + S,  # default child target (D.4)
        "root_target": min(T, P + C + S),
        "layers": [(0, W + lo + lpc)] + [(W + lo + lpc * h, W + lo + lpc * (h + 1)) for h in range(1, H + 1)],
    }


# ----------------------------------------------------------------------------------------------------------
# Scoring and selection (D.1, D.3, N.2.2, N.2.3)
# ----------------------------------------------------------------------------------------------------------


def significance(last_logits, pos, is_context, layer, bias, reduction, seed, level, index) -> np.ndarray:
    """float32 scores [n]; the lowest ones are removed. Affix slots get +inf (D.3)."""
    n = pos.shape[0]
    if reduction == "random":
        scores = np.array([random_score(seed, level, index, j) for j in range(n)], dtype=np.float32)
    else:
        scores = last_logits.max(axis=0).astype(np.float32)  # [n]  max over query heads, pre-softmax
        if reduction == "calibrated":
            rel = pos[-1] - pos  # distance in POSITION space from the last (query) token, >= 0
            scores = scores - bias[layer][rel]  # float32 - float32
    scores[~is_context] = np.float32(np.inf)
    return scores


def select(scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """(kept, removed), both sorted: remove the k slots with the lowest (score, slot index)."""
    n = scores.shape[0]
    order = np.lexsort((np.arange(n), scores))  # primary key: score; ties: earlier slot first
    removed = np.sort(order[:k]).astype(np.int64)
    kept = np.setdiff1d(np.arange(n, dtype=np.int64), removed)
    return kept, removed


# ----------------------------------------------------------------------------------------------------------
# Node execution (C.2, F) and merging (E)
# ----------------------------------------------------------------------------------------------------------


def run_node(config, weights, chunk, layers, target, level, index, bias, reduction, seed, nodes) -> dict:
    """Run layers [first, last) on a chunk; at the LAST one, prune to ``target`` between attention and MLP."""
    first, last = layers
    in_pos = chunk["pos"].copy()
    n_in = in_pos.shape[0]
    scores, kept, removed = None, np.arange(n_in, dtype=np.int64), np.zeros(0, dtype=np.int64)
    for layer in range(first, last):
        h, k, v, last_logits = llama_np.attention_layer(config, weights, layer, chunk["h"], chunk["pos"])
        chunk["h"] = h  # [n, D]
        chunk["keys"][layer], chunk["values"][layer] = k, v  # [Hkv, n, Dh]: this layer's K/V for all n tokens
        n_reduce = chunk["pos"].shape[0] - target
        if layer == last - 1 and n_reduce > 0:
            pos, is_context = chunk["pos"], chunk["is_context"]
            scores = significance(last_logits, pos, is_context, layer, bias, reduction, seed, level, index)
            kept, removed = select(scores, n_reduce)
            assert is_context[removed].all()  # the N.2.6 checks guarantee enough context slots
            # Propagative refinement (F): the same slots go from the hidden states, positions, mask and
            # the K/V of EVERY layer this chunk holds, so each slot is kept in all layers or in none.
            chunk["h"], chunk["pos"], chunk["is_context"] = chunk["h"][kept], pos[kept], is_context[kept]
            for lay in chunk["keys"]:
                chunk["keys"][lay] = chunk["keys"][lay][:, kept]
                chunk["values"][lay] = chunk["values"][lay][:, kept]
        chunk["h"] = llama_np.mlp_layer(config, weights, layer, chunk["h"])  # MLP on kept tokens only
    nodes.append(
        {
            "level": level,
            "index": index,
            "layers": (first, last),
            "target": int(target),
            "input_positions": in_pos,
            "scores": scores,
            "kept": kept,
            "removed": removed,
            # the node's state at its end (the trace's checkpoints): output hidden states [kept, D], and the
            # K/V [Hkv, kept, Dh] of each layer it ran
            "hidden": chunk["h"],
            "keys": {lay: chunk["keys"][lay] for lay in range(first, last)},
            "values": {lay: chunk["values"][lay] for lay in range(first, last)},
        }
    )
    return chunk


def merge(left: dict, right: dict, P: int, S: int) -> dict:
    """[avg(prefix) | left context | right context | avg(suffix)], for h and every layer's K and V.

    Positions are [prefix_L | ctx_L | ctx_R | suffix_R] (the suffix positions agree anyway, B.3). The affixes
    are averaged rather than kept twice: every chunk carries the same prefix and suffix ids, and the suffix,
    having attended to a different context in each child, becomes the average over both (E.1, E.5).
    """

    def join(a: np.ndarray, b: np.ndarray, axis: int) -> np.ndarray:
        na, nb = a.shape[axis], b.shape[axis]

        def pick(x: np.ndarray, lo: int, hi: int) -> np.ndarray:
            return np.take(x, np.arange(lo, hi), axis=axis)

        return np.concatenate(
            [
                (pick(a, 0, P) + pick(b, 0, P)) / 2,
                pick(a, P, na - S),
                pick(b, P, nb - S),
                (pick(a, na - S, na) + pick(b, nb - S, nb)) / 2,
            ],
            axis=axis,
        )

    def concat(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.concatenate([a[: a.shape[0] - S], b[P:]])  # left prefix + ctx, right ctx + suffix

    assert left["keys"].keys() == right["keys"].keys()  # both children ran the same layers
    return {
        "h": join(left["h"], right["h"], axis=0),  # [n, D]
        "pos": concat(left["pos"], right["pos"]),  # [n]  reused, never re-indexed (E.3)
        "is_context": concat(left["is_context"], right["is_context"]),  # [n]
        "keys": {lay: join(left["keys"][lay], right["keys"][lay], axis=1) for lay in left["keys"]},
        "values": {lay: join(left["values"][lay], right["values"][lay], axis=1) for lay in left["values"]},
    }


# ----------------------------------------------------------------------------------------------------------
# HOMER prefill
# ----------------------------------------------------------------------------------------------------------


def _leaf(config, weights, prefix_ids, context_ids, suffix_ids, pl: dict, i: int) -> dict:
    """Leaf i: ids [prefix | context slice | suffix], local positions (B.3), reduction mask (B.4)."""
    P, S, N, e, C = pl["P"], pl["S"], pl["N"], pl["e"], pl["C"]
    ctx = context_ids[i * e : min((i + 1) * e, C)]
    c_i = len(ctx)
    ids = list(prefix_ids) + list(ctx) + list(suffix_ids)
    if N == 1:
        pos = np.arange(P + c_i + S, dtype=np.int64)
    else:  # suffix token j at P + e + j in EVERY leaf (a gap after a short last leaf)
        pos = np.concatenate([np.arange(P + c_i), P + e + np.arange(S)]).astype(np.int64)
    is_context = np.array([False] * P + [True] * c_i + [False] * S, dtype=bool)
    return {"h": llama_np.embed(config, weights, ids), "pos": pos, "is_context": is_context, "keys": {}, "values": {}}


def homer_prefill(
    config,
    weights,
    prefix_ids,
    context_ids,
    suffix_ids,
    max_chunk_len,
    target_len,
    warmup_layers,
    bias=None,
    reduction="calibrated",
    seed=0,
) -> dict:
    """HOMER prefill of [prefix | context | suffix] into a compact cache of K slots per layer.

    Returns {"positions": int64 [K], "keys"/"values": L arrays [Hkv, K, Dh] (keys after RoPE),
    "logits": [K, V], "last_position": int, "nodes": per-node records in DFS post-order execution order}.
    ``bias`` is used by "calibrated" only and ignored by the other modes.
    """
    prefix_ids, context_ids, suffix_ids = list(prefix_ids), list(context_ids), list(suffix_ids)
    P, C, S = len(prefix_ids), len(context_ids), len(suffix_ids)
    pl = plan(config, P, C, S, max_chunk_len, target_len, warmup_layers)
    L, M, vocab = pl["L"], pl["M"], config["vocab_size"]
    bad = [t for t in prefix_ids + context_ids + suffix_ids if not 0 <= int(t) < vocab]
    if bad:
        raise ValueError(f"token ids must lie in [0, vocab_size = {vocab}); got {bad[:5]}; check tokenizer")
    if reduction not in REDUCTIONS:
        raise ValueError(f"unknown reduction {reduction!r}; choose one of {REDUCTIONS}")
    if reduction == "calibrated":
        if bias is None:
            raise ValueError(
                'reduction="calibrated" needs a bias table [L, width] with width >= M; pass bias= or choose '
                'reduction="uncalibrated" or "random"'
            )
        bias = np.asarray(bias, dtype=np.float32)
        if bias.ndim != 2 or bias.shape[0] != L or bias.shape[1] < M:
            raise ValueError(
                f"bias table has shape {tuple(bias.shape)}; it must be [L, width] = [{L}, >= {M}] (one row "
                f"per layer, one entry per distance 0..M-1); recalibrate with this model and max_chunk_len"
            )

    nodes: list[dict] = []
    R = pl["R"]

    def solve(a: int, b: int, height: int, target: int) -> dict:
        """Process the subtree over leaves [a, b) of the given height; DFS post-order."""
        index = a >> height  # 0-based position within its level
        if height == 0:
            leaf = _leaf(config, weights, prefix_ids, context_ids, suffix_ids, pl, a)
            layers = pl["layers"][0]
            return run_node(config, weights, leaf, layers, target, 0, index, bias, reduction, seed, nodes)
        mid = (a + b) // 2
        r0 = P + pl["leaf_ctx"][mid] + S  # RAW length of the right subtree's first leaf (D.4)
        if r0 < R:  # short-right rule: the right keeps everything, the left may fill the rest of M
            left_target, right_target = M - (r0 - P - S), r0
        else:
            left_target = right_target = R
        left = solve(a, mid, height - 1, left_target)
        right = solve(mid, b, height - 1, right_target)
        merged = merge(left, right, P, S)
        layers = pl["layers"][height]
        return run_node(config, weights, merged, layers, target, height, index, bias, reduction, seed, nodes)

    root = solve(0, pl["N"], pl["H"], pl["root_target"])
    assert sorted(root["keys"]) == list(range(L))
    return {
        "positions": root["pos"].astype(np.int64),
        "keys": [root["keys"][lay] for lay in range(L)],
        "values": [root["values"][lay] for lay in range(L)],
        "logits": llama_np.final_logits(config, weights, root["h"]),
        "last_position": int(root["pos"][-1]),
        "nodes": nodes,
    }
