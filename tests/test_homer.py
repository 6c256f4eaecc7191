"""HOMER prefill (homer_ref/homer/prefill.py and the modules it ties together) against independent expectations.

Where the expected values come from (never from the code under test):
- N.3: with one chunk and no pruning, HOMER *is* the plain forward (`Llama.forward_cached`, a different code
  path: one call over the whole prompt) — bit-identical in float64.
- The float64 NumPy oracle (`reference/homer_np.py`, written from HOMER_SPEC.md only) on random tiny HF models,
  MHA, GQA and MQA, all three reduction modes: same positions and same kept/removed slots at every node,
  K/V/logits within TOL["oracle_float64"].
- HOMER_SPEC.md section L (the worked example and its variants): literals copied from the spec.
- Invariants of the spec (F, D.3, D.4, N.2.1, N.2.3, G.2) recomputed in the test with plain Python.
- Continuation (N.2.5): the oracle's compact cache extended by a NumPy decoder written here (~30 lines).

Symbols: L W M T (layers, warm-up, max chunk length with affixes, target), P C S (prefix, context, suffix),
E = M-P-S, N leaves, H tree height, e context tokens per leaf, R = P + E//2 + S, K final cache slots.
Model dims: V D Hq Hkv Dh.
"""

import math

import numpy as np
import pytest
import torch
from helpers import assert_close, assert_same_as_oracle, make_hf_llama, tiny_llama
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from homer_ref import load_model
from homer_ref.homer import continuation_logits, homer_generate, homer_prefill
from homer_ref.homer.plan import REDUCTIONS, HomerConfig
from homer_ref.homer.traversal import g2_bound
from reference import homer_np, llama_np

FAST = dict(deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])


def random_ids(rng: np.random.Generator, V: int, n: int) -> list[int]:
    return rng.integers(0, V, n).tolist()


# ----------------------------------------------------------------------------------------------- N.3


@st.composite
def trivial_cases(draw):
    """A random tiny model and a configuration where the context fits one chunk (C <= E) and T >= P+C+S."""
    Hq, Hkv = draw(st.sampled_from([(2, 1), (2, 2), (4, 1), (4, 2), (4, 4)]))
    L = draw(st.integers(1, 4))
    P, S, E = draw(st.integers(0, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 8))
    C = draw(st.integers(0, E))  # C = 0 included: the plain forward of prefix + suffix (N.2.6)
    return dict(
        L=L,
        V=draw(st.integers(32, 64)),
        Hq=Hq,
        Hkv=Hkv,
        Dh=draw(st.sampled_from([2, 4, 6])),
        D=draw(st.sampled_from([8, 16, 24])),
        P=P,
        C=C,
        S=S,
        M=P + S + E,
        T=draw(st.integers(P + C + S, P + S + E + 3)),
        W=draw(st.integers(0, L - 1)),
        reduction=draw(st.sampled_from(REDUCTIONS)),
        seed=draw(st.integers(0, 2**16)),
    )


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@given(case=trivial_cases())
@settings(max_examples=20, **FAST)
@example(case=dict(L=2, V=32, Hq=4, Hkv=2, Dh=4, D=16, P=2, C=0, S=1, M=6, T=3, W=1, reduction="calibrated", seed=1))
def test_single_chunk_is_the_plain_forward(dtype, case):
    """HOMER_SPEC.md N.3: cache K/V, positions and logits equal the plain forward of prefix+context+suffix."""
    c = case
    model = tiny_llama(L=c["L"], V=c["V"], D=c["D"], Hq=c["Hq"], Hkv=c["Hkv"], Dh=c["Dh"], seed=c["seed"], dtype=dtype)
    ids = random_ids(np.random.default_rng(c["seed"]), c["V"], c["P"] + c["C"] + c["S"])
    P, C = c["P"], c["C"]
    bias = torch.randn(c["L"], c["M"] + 1, generator=torch.Generator().manual_seed(c["seed"]))
    bias = bias if c["reduction"] == "calibrated" else None
    config = HomerConfig(c["M"], c["T"], c["W"], c["reduction"], seed=c["seed"])
    result = homer_prefill(model, ids[:P], ids[P : P + C], ids[P + C :], config, bias=bias, all_logits=True)
    logits, cache = model.forward_cached(torch.tensor([ids]))
    n = len(ids)
    assert result.positions.tolist() == list(range(n))
    assert result.last_position == n - 1
    assert [len(t.removed) for t in result.nodes] == [0]  # one leaf, nothing pruned
    same = torch.equal if dtype == torch.float64 else lambda a, b: torch.allclose(a, b, atol=1e-5, rtol=1e-5)
    assert same(result.logits, logits[0]), f"logits differ by {(result.logits - logits[0]).abs().max():.3e}"
    assert len(result.keys) == len(result.values) == c["L"]
    for layer, (k, v) in enumerate(cache):
        assert same(result.keys[layer], k[0]), f"keys of layer {layer} differ"
        assert same(result.values[layer], v[0]), f"values of layer {layer} differ"


# ----------------------------------------------------------------------------------------------- vs the oracle

POOL = {  # name -> make_hf_llama kwargs; several layer counts so that W > 0 and leftover layers both occur
    "mha": dict(num_hidden_layers=6, num_attention_heads=4, num_key_value_heads=4, seed=1),
    "gqa": dict(num_hidden_layers=7, num_attention_heads=4, num_key_value_heads=2, seed=2),
    "mqa": dict(num_hidden_layers=9, num_attention_heads=4, num_key_value_heads=1, tie_word_embeddings=True, seed=3),
}
ROPE = {"rope_type": "default", "rope_theta": 100.0}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """name -> (torch float64 model, oracle config, oracle weights, model directory), built once per module."""
    models = {}
    for name, kwargs in POOL.items():
        out = tmp_path_factory.mktemp(name)
        make_hf_llama(out, vocab_size=48, rope_parameters=ROPE, **kwargs)
        config, weights = llama_np.load_hf(str(out))
        models[name] = (load_model(out, dtype=torch.float64), config, weights, out)
    return models


@st.composite
def tree_cases(draw):
    """A valid configuration with 2-8 leaves on a model of the pool, any reduction mode."""
    name = draw(st.sampled_from(sorted(POOL)))
    L = POOL[name]["num_hidden_layers"]
    P, S, E = draw(st.integers(0, 3)), draw(st.integers(1, 2)), draw(st.integers(2, 7))
    H = draw(st.integers(1, 3))
    C = draw(st.integers(E * 2 ** (H - 1) + 1, E * 2**H))  # ceil(C/E) in (2^(H-1), 2^H]: height exactly H
    N, e = 2**H, math.ceil(C / 2**H)
    assume(C - (N - 1) * e > 0)  # the last leaf must hold context (N.2.6)
    M = P + S + E
    return dict(
        name=name,
        P=P,
        C=C,
        S=S,
        M=M,
        T=draw(st.integers(P + S, M + 2)),  # below, at and above M
        W=draw(st.integers(0, L - H - 1)),  # L - W >= H + 1 layer blocks
        reduction=draw(st.sampled_from(REDUCTIONS)),
        extra_bias=draw(st.integers(0, 3)),  # R = M + extra_bias >= M
        seed=draw(st.integers(0, 2**16)),
    )


def run_both(pool, c, traversal="depth_first"):
    """(torch HomerCache, oracle dict) for a case of `tree_cases`."""
    model, config, weights, _ = pool[c["name"]]
    rng = np.random.default_rng(c["seed"])
    P, C, S = c["P"], c["C"], c["S"]
    ids = random_ids(rng, 48, P + C + S)
    L = config["num_hidden_layers"]
    bias = rng.normal(scale=0.5, size=(L, c["M"] + c["extra_bias"])).astype(np.float32)
    use_bias = c["reduction"] == "calibrated"
    ours = homer_prefill(
        model,
        ids[:P],
        ids[P : P + C],
        ids[P + C :],
        HomerConfig(c["M"], c["T"], c["W"], c["reduction"], c["seed"]),
        bias=torch.from_numpy(bias) if use_bias else None,
        traversal=traversal,
        all_logits=True,
    )
    ref = homer_np.homer_prefill(
        config,
        weights,
        ids[:P],
        ids[P : P + C],
        ids[P + C :],
        c["M"],
        c["T"],
        c["W"],
        bias=bias if use_bias else None,
        reduction=c["reduction"],
        seed=c["seed"],
    )
    return ours, ref


@given(case=tree_cases())
@settings(max_examples=30, **FAST)
# HOMER_SPEC.md L variant C = 14: the short-right rule (targets 6 and 4), on the GQA model, calibrated.
@example(case=dict(name="gqa", P=1, C=14, S=1, M=8, T=8, W=2, reduction="calibrated", extra_bias=0, seed=0))
# P = 0, T < M, W > 0 with leftover layers (L = 9, W = 2, H = 2: lo = 1), 4 leaves, MQA.
@example(case=dict(name="mqa", P=0, C=20, S=2, M=8, T=5, W=2, reduction="calibrated", extra_bias=2, seed=5))
# 8 leaves, MHA, uncalibrated and random modes.
@example(case=dict(name="mha", P=2, C=22, S=1, M=6, T=6, W=0, reduction="uncalibrated", extra_bias=0, seed=7))
@example(case=dict(name="mha", P=1, C=30, S=2, M=7, T=7, W=1, reduction="random", extra_bias=0, seed=9))
def test_matches_numpy_oracle(pool, case):
    ours, ref = run_both(pool, case)
    assert_same_as_oracle(ours, ref, str(case))


def test_oracle_cases_prune_something(pool):
    """The comparison above means something only if nodes really prune and their choices depend on the model."""
    case = dict(name="gqa", P=1, C=24, S=1, M=8, T=8, W=2, reduction="uncalibrated", extra_bias=0, seed=0)
    ours, _ = run_both(pool, case)
    kept_sets = {tuple(t.kept.tolist()) for t in ours.nodes if t.level == 0}
    assert sum(len(t.removed) for t in ours.nodes) == 18  # section L: 12 at the leaves, 6 at height 1
    assert len(kept_sets) > 1, "every leaf kept the same slots: the scores do not depend on the tokens"


# ----------------------------------------------------------------------------------------------- section L

LEAF, H1, ROOT = (0, 4), (4, 6), (6, 8)  # HOMER_SPEC.md L: leaves layers 0-3, height 1: 4-5, root: 6-7


def section_l(C=24, L=8, T=8, seed=0, q_zero=False):
    """HOMER on the section L configuration (W = 2, M = 8, P = S = 1) of a random L-layer model, calibrated."""
    model = tiny_llama(L=L, V=32, seed=seed)
    if q_zero:  # every significance logit is exactly 0: all context scores tie
        with torch.no_grad():
            for blk in model.layers:
                blk.self_attn.q_proj.weight.zero_()
    rng = np.random.default_rng(seed)
    ids = random_ids(rng, 32, C + 2)
    bias = torch.zeros(L, 8) if q_zero else torch.from_numpy(rng.normal(scale=0.3, size=(L, 8)).astype(np.float32))
    result = homer_prefill(model, ids[:1], ids[1:-1], ids[-1:], HomerConfig(8, T, 2), bias=bias, all_logits=True)
    return model, result


def table(result) -> list[tuple]:
    """(level, index, layers, tokens in, tokens out) per node, in execution order."""
    return [(t.level, t.index, tuple(t.layers), len(t.input_positions), len(t.kept)) for t in result.nodes]


def outputs(t) -> list[int]:
    return t.input_positions[t.kept].tolist()


def test_worked_example_section_L():
    model, result = section_l()
    # HOMER_SPEC.md L, the table "step | node | layers run | tokens in -> out"
    assert table(result) == [
        (0, 0, LEAF, 8, 5),  # 1 leaf A: 8 -> 5, 3 context tokens at layer 3
        (0, 1, LEAF, 8, 5),  # 2 leaf B
        (1, 0, H1, 8, 5),  # 3-4 merge A+B: 5 + 5 -> 8; node AB 8 -> 5 at layer 5
        (0, 2, LEAF, 8, 5),  # 5 leaf C
        (0, 3, LEAF, 8, 5),  # 6 leaf D
        (1, 1, H1, 8, 5),  # 7-8 merge C+D, node CD
        (2, 0, ROOT, 8, 8),  # 9-10 merge AB+CD, root 8 -> 8: nothing pruned
    ]
    # "Leaves (each 8 tokens; positions [0 | 1 2 3 4 5 6 | 7])"
    for t in result.nodes:
        if t.level == 0:
            assert t.input_positions.tolist() == [0, 1, 2, 3, 4, 5, 6, 7]
    # E.3: merged positions are [prefix_L | ctx_L | ctx_R | suffix_R], reused without re-indexing
    a, b, ab, c, d, cd, root = result.nodes
    assert ab.input_positions.tolist() == outputs(a)[:-1] + outputs(b)[1:]
    assert cd.input_positions.tolist() == outputs(c)[:-1] + outputs(d)[1:]
    assert root.input_positions.tolist() == outputs(ab)[:-1] + outputs(cd)[1:] == result.positions.tolist()
    # "Final cache: 8 slots in every one of the 8 layers. last_position_id = 7. The logits have shape [1, 8, vocab]"
    assert [k.shape[1] for k in result.keys] == [8] * 8 and [v.shape[1] for v in result.values] == [8] * 8
    assert result.last_position == 7
    assert tuple(result.logits.shape) == (8, 32)
    # "Totals: 12 context tokens are removed at layer 3, then 6 at layer 5"
    assert sum(len(t.removed) for t in result.nodes if t.layers == LEAF) == 12
    assert sum(len(t.removed) for t in result.nodes if t.layers == H1) == 6


def test_variant_short_last_leaf_C14():
    _, result = section_l(C=14)
    nodes = {(t.level, t.index): t for t in result.nodes}
    # HOMER_SPEC.md L: "C = 14 (short last leaf: leaf 3 has positions [0,1,2,5], targets 6 and 4, nothing pruned
    # in that pair)"
    assert nodes[(0, 3)].input_positions.tolist() == [0, 1, 2, 5]
    assert (nodes[(0, 2)].target, nodes[(0, 3)].target) == (6, 4)
    assert len(nodes[(0, 2)].removed) == len(nodes[(0, 3)].removed) == 0
    assert len(nodes[(1, 1)].input_positions) == 8  # D.4 [run]: "the merged chunk had 8 tokens"
    assert [k.shape[1] for k in result.keys] == [8] * 8


def test_variant_eight_leaves_C40():
    _, result = section_l(C=40)
    # HOMER_SPEC.md L: "C = 40 (8 leaves: lpc = 1, lo = 2, leaves run layers 0-4 and the levels use layers 5, 6, 7)"
    layers = {t.level: tuple(t.layers) for t in result.nodes}
    assert layers == {0: (0, 5), 1: (5, 6), 2: (6, 7), 3: (7, 8)}
    assert sum(t.level == 0 for t in result.nodes) == 8
    assert result.last_position == 1 + 5 + 1 - 1  # P + e + S - 1 with e = 40/8 = 5 (B.3)


def test_variant_leftover_layer_L9():
    _, result = section_l(L=9)
    # HOMER_SPEC.md C.1 [run]: "L = 9, W = 2, H = 2: lpc = 2, lo = 1, leaves run layers 0-4, h1 nodes 5-6, root 7-8"
    assert {t.level: tuple(t.layers) for t in result.nodes} == {0: (0, 5), 1: (5, 7), 2: (7, 9)}
    assert [k.shape[1] for k in result.keys] == [8] * 9


def test_variant_small_target_T6():
    _, result = section_l(T=6)
    root = result.nodes[-1]
    # HOMER_SPEC.md C.2 [run]: "target_small: 8 -> 6 tokens at layer 7; every layer's cache ends with 6 entries"
    assert (root.layers[1] - 1, len(root.input_positions), len(root.removed)) == (7, 8, 2)
    assert [k.shape[1] for k in result.keys] == [6] * 8
    assert [v.shape[1] for v in result.values] == [6] * 8


def test_ties_remove_the_earliest_context_slots():
    """N.2.3: with all scores equal (q = 0 makes every logit 0; zero bias), the earlier context slots go first."""
    _, result = section_l(q_zero=True)
    for t in result.nodes:
        assert t.scores is None or torch.all(t.scores[1:-1] == 0)
        k = len(t.input_positions) - t.target
        if k > 0:
            assert t.removed.tolist() == list(range(1, 1 + k)), (t.level, t.index)  # P = 1: context starts at 1
    # leaves keep positions [0, 4, 5, 6, 7]; AB and CD get [0, 4,5,6, 4,5,6, 7] and keep [0, 4, 5, 6, 7]
    assert result.positions.tolist() == [0, 4, 5, 6, 4, 5, 6, 7]


# ----------------------------------------------------------------------------------------------- invariants


def spec_final_len(P, C, S, M, T) -> int:
    """HOMER_SPEC.md D.4 "Final cache length (every layer)", computed from the formula there."""
    E = M - P - S
    N = 2 ** math.ceil(math.log2(max(1, math.ceil(C / E))))
    if N == 1:
        return min(T, P + C + S)
    e = math.ceil(C / N)
    r_ctx = C - (N - 1) * e
    if N == 2 and P + r_ctx + S < P + E // 2 + S:
        return min(T, P + min(e, E - r_ctx) + r_ctx + S)
    return min(T, P + 2 * (E // 2) + S)


def post_order(H: int) -> list[tuple[int, int]]:
    def walk(level, index):
        below = [] if level == 0 else walk(level - 1, 2 * index) + walk(level - 1, 2 * index + 1)
        return below + [(level, index)]

    return walk(H, 0)


@st.composite
def invariant_cases(draw):
    L = draw(st.integers(3, 8))
    P, S, E = draw(st.integers(0, 3)), draw(st.integers(1, 3)), draw(st.integers(1, 8))
    H = draw(st.integers(0, min(3, L - 1)))
    C = draw(st.integers(0, E) if H == 0 else st.integers(E * 2 ** (H - 1) + 1, E * 2**H))
    N = 2**H
    assume(N == 1 or C - (N - 1) * math.ceil(C / N) > 0)
    M = P + S + E
    Hq, Hkv = draw(st.sampled_from([(2, 1), (4, 2), (4, 4)]))
    return dict(
        L=L,
        Hq=Hq,
        Hkv=Hkv,
        P=P,
        C=C,
        S=S,
        M=M,
        H=H,
        T=draw(st.integers(P + S, M + 2)),
        W=draw(st.integers(0, L - H - 1)),
        reduction=draw(st.sampled_from(REDUCTIONS)),
        seed=draw(st.integers(0, 2**16)),
    )


@given(case=invariant_cases())
@settings(max_examples=25, **FAST)
@example(case=dict(L=8, Hq=4, Hkv=2, P=1, C=14, S=1, M=8, H=2, T=8, W=2, reduction="calibrated", seed=0))
def test_invariants(case):
    c = case
    model = tiny_llama(L=c["L"], Hq=c["Hq"], Hkv=c["Hkv"], D=16, seed=c["seed"])
    rng = np.random.default_rng(c["seed"])
    P, C, S, M = c["P"], c["C"], c["S"], c["M"]
    ids = random_ids(rng, 32, P + C + S)
    bias = torch.from_numpy(rng.normal(scale=0.5, size=(c["L"], M)).astype(np.float32))
    config = HomerConfig(M, c["T"], c["W"], c["reduction"], c["seed"])
    args = (model, ids[:P], ids[P : P + C], ids[P + C :], config)
    df = homer_prefill(*args, bias=bias, traversal="depth_first", all_logits=True)
    lo = homer_prefill(*args, bias=bias, traversal="level_order", all_logits=True)
    p = df.plan

    # F / D.4: every layer holds the same K slots, K = plan.final_len = the spec's formula.
    K = spec_final_len(P, C, S, M, c["T"])
    assert p.final_len == K
    assert len(df.keys) == len(df.values) == c["L"]
    assert {tuple(k.shape) for k in df.keys + df.values} == {(c["Hkv"], K, 16 // c["Hq"])}
    assert df.positions.shape == (K,) and df.logits.shape == (K, 32)

    # D.3 / B.3: the affixes are never removed: prefix 0..P-1 in front, suffix at P+e+j (P+C+j for one leaf).
    N = 2 ** c["H"]
    e = math.ceil(C / N) if C else 0
    suffix = [P + (e if N > 1 else C) + j for j in range(S)]
    assert df.positions[:P].tolist() == list(range(P))
    assert df.positions[K - S :].tolist() == suffix
    assert df.last_position == suffix[-1]

    # Execution order is the depth-first post-order.
    assert [(t.level, t.index) for t in df.nodes] == post_order(c["H"])
    for t in df.nodes:
        n, node = len(t.input_positions), (t.level, t.index)
        k = max(0, n - t.target)
        assert sorted(t.kept.tolist() + t.removed.tolist()) == list(range(n)), node
        assert len(t.removed) == k, node
        assert all(P <= i < n - S for i in t.removed.tolist()), f"{node}: an affix slot was removed"
        if k > 0:  # N.2.3: exactly the k lowest by (score, index), recomputed with a plain sort
            scores = t.scores.tolist()
            want = sorted(sorted(range(n), key=lambda i: (scores[i], i))[:k])
            assert t.removed.tolist() == want, node
        else:
            assert t.scores is None, node

    # N.2.1: level order computes the same tree, bit for bit.
    assert [(t.level, t.index) for t in lo.nodes] == sorted(post_order(c["H"]))
    for name in ("positions", "logits"):
        assert torch.equal(getattr(df, name), getattr(lo, name)), name
    for layer in range(c["L"]):
        assert torch.equal(df.keys[layer], lo.keys[layer]) and torch.equal(df.values[layer], lo.values[layer])
    by_node = {(t.level, t.index): t for t in lo.nodes}
    for t in df.nodes:
        u = by_node[(t.level, t.index)]
        for name in ("input_positions", "kept", "removed"):
            assert torch.equal(getattr(t, name), getattr(u, name)), (t.level, t.index, name)
        assert (t.scores is None and u.scores is None) or torch.equal(t.scores, u.scores)

    # G.2: the depth-first traversal stays within the bound.
    assert df.peak_kv_token_layers <= g2_bound(p)


def test_memory_grows_logarithmically_depth_first_and_linearly_level_order():
    """G.2 / N.2.1 / N.4: 16x the context adds 4 tree levels; depth-first pays about one reduced chunk per level,
    level order keeps whole levels alive."""
    L, M, P, S = 10, 16, 2, 2
    R = P + (M - P - S) // 2 + S  # 10 tokens per reduced child
    model = tiny_llama(L=L, V=32, D=8, Hq=2, Hkv=1, dtype=torch.float32)
    peaks = {}
    for C in (24, 384):  # E = 12: 2 leaves (H = 1), then 32 leaves (H = 5)
        for traversal in ("depth_first", "level_order"):
            config = HomerConfig(M, M, 0, "uncalibrated")
            result = homer_prefill(model, [1, 2], [5 + i % 20 for i in range(C)], [3, 4], config, traversal=traversal)
            peaks[C, traversal] = (result.peak_kv_token_layers, result.plan.H)
    (small_df, h_small), (big_df, h_big) = peaks[24, "depth_first"], peaks[384, "depth_first"]
    assert (h_small, h_big) == (1, 5)
    assert big_df - small_df <= (h_big - h_small) * R * L, peaks
    assert peaks[384, "level_order"][0] >= 8 * peaks[24, "level_order"][0], peaks
    assert big_df < (P + 384 + S) * L / 4, peaks  # far below the plain cache


# ----------------------------------------------------------------------------------------------- continuation


def np_continue(config, weights, keys, values, first_position, tokens) -> np.ndarray:
    """Logits [n, V] of `tokens` fed after a compact cache (keys/values: L x [Hkv, K, Dh]) at positions
    first_position + t; each new token sees the whole cache and the new tokens up to itself. NumPy, float64."""
    Hq = config["num_attention_heads"]
    Hkv = config.get("num_key_value_heads") or Hq
    Dh, eps, n = llama_np.head_dim(config), config.get("rms_norm_eps", 1e-6), len(tokens)
    h = llama_np.embed(config, weights, tokens)  # [n, D]
    cos, sin = llama_np.rope_cos_sin(config, first_position + np.arange(n))
    for layer in range(config["num_hidden_layers"]):
        pre = f"model.layers.{layer}."
        x = llama_np.rmsnorm(h, weights[pre + "input_layernorm.weight"], eps)
        q, k, v = (
            (x @ weights[pre + f"self_attn.{name}_proj.weight"].T).reshape(n, heads, Dh).transpose(1, 0, 2)
            for name, heads in (("q", Hq), ("k", Hkv), ("v", Hkv))
        )  # [heads, n, Dh]
        q, k = llama_np.apply_rope(q, cos, sin), llama_np.apply_rope(k, cos, sin)
        k_all = np.concatenate([keys[layer], k], axis=1)  # [Hkv, K+n, Dh]
        v_all = np.concatenate([values[layer], v], axis=1)
        K = keys[layer].shape[1]
        visible = np.arange(K + n)[None, :] <= K + np.arange(n)[:, None]  # [n, K+n]
        out = np.empty((n, Hq, Dh))
        for head in range(Hq):
            g = head // (Hq // Hkv)
            a = np.where(visible, q[head] @ k_all[g].T / math.sqrt(Dh), -np.inf)
            a = np.exp(a - a.max(axis=-1, keepdims=True))
            out[:, head] = (a / a.sum(axis=-1, keepdims=True)) @ v_all[g]
        h = h + out.reshape(n, Hq * Dh) @ weights[pre + "self_attn.o_proj.weight"].T
        h = llama_np.mlp_layer(config, weights, layer, h)
    return llama_np.final_logits(config, weights, h)


def test_np_continue_is_the_plain_forward(pool):
    """Self-check of the NumPy decoder above: after a plain prompt cache it gives the plain forward's logits."""
    _, config, weights, _ = pool["gqa"]
    ids = random_ids(np.random.default_rng(0), 48, 12)
    _, keys, values = llama_np.forward_cache(config, weights, ids[:9])
    got = np_continue(config, weights, keys, values, 9, ids[9:])
    np.testing.assert_allclose(got, llama_np.forward(config, weights, ids)[9:], atol=1e-12)


def test_continuation_with_a_trivial_plan_is_the_plain_forward():
    """N.3 + N.2.5: one chunk, no pruning: the new tokens continue at P+C+S, P+C+S+1, ..."""
    model = tiny_llama(L=3, V=32)
    ids = random_ids(np.random.default_rng(1), 32, 14)
    cache = homer_prefill(model, ids[:2], ids[2:8], ids[8:10], HomerConfig(16, 16, 1, "uncalibrated"))
    got = continuation_logits(model, cache, ids[10:])
    want = model.forward_cached(torch.tensor([ids]))[0][0, 10:]
    assert_close(got, want, "cache_float64", "continuation logits")


@pytest.mark.parametrize("name", ["mha", "gqa"])
def test_continuation_after_a_tree_matches_numpy(pool, name):
    """N.2.5: new tokens sit at last_position + 1 + t and attend to the whole compact cache."""
    case = dict(name=name, P=1, C=24, S=1, M=8, T=8, W=1, reduction="calibrated", extra_bias=0, seed=4)
    ours, ref = run_both(pool, case)
    assert_same_as_oracle(ours, ref, name)
    model, config, weights, _ = pool[name]
    new = random_ids(np.random.default_rng(5), 48, 4)
    last = ref["last_position"]
    want = np_continue(config, weights, ref["keys"], ref["values"], last + 1, new)
    assert_close(continuation_logits(model, ours, new), want, "oracle_float64", "continuation logits")
    # The check can tell the +1 convention from the official generate's +0 (H.3): the model depends on positions.
    off_by_one = np_continue(config, weights, ref["keys"], ref["values"], last, new)
    assert np.abs(off_by_one - want).max() > 1e-3

    # homer_generate (greedy) = the argmax chain of the NumPy decoder, every token at last_position + 1 + t.
    generated = homer_generate(model, ours, 4)
    chain = [int(np.argmax(ref["logits"][-1]))]
    for _ in range(3):
        logits = np_continue(config, weights, ref["keys"], ref["values"], last + 1, chain)
        chain.append(int(np.argmax(logits[-1])))
    assert generated == chain


# ----------------------------------------------------------------------------------------------- no-pruning diagnostic


def test_no_pruning_diagnostic_keeps_every_token_and_runs_the_leaves_alone():
    """reduction="none" (eval's homer-no-pruning, not HOMER): the tree merges with nothing removed, so every layer
    of the final cache holds all P+C+S tokens, the context in input order; at a leaf's last layer its context
    slots hold exactly what a plain forward of prefix + that leaf's context alone computes (causal: the suffix
    comes after them), i.e. the lower layers stay chunk-local."""
    L, P, C, S, M = 4, 2, 20, 2, 10  # E = 6: 4 leaves of 5 context tokens, tree height 2
    model = tiny_llama(L=L, V=40, D=16, Hq=4, Hkv=2, seed=3)
    rng = np.random.default_rng(3)
    prefix, context, suffix = random_ids(rng, 40, P), random_ids(rng, 40, C), random_ids(rng, 40, S)
    cache = homer_prefill(model, prefix, context, suffix, HomerConfig(M, reduction="none"))
    assert all(k.shape[1] == P + C + S for k in cache.keys + cache.values)
    assert cache.plan.final_len == P + C + S  # the plan knows it: every node's target is its whole input
    assert all(t.removed.numel() == 0 for t in cache.nodes)
    leaves = [t for t in cache.nodes if t.level == 0]
    assert len(leaves) == 4
    for t in leaves:
        first, last = t.layers
        ctx = context[5 * t.index : 5 * t.index + 5]
        _, plain = model.forward_cached(torch.tensor([prefix + ctx]))  # positions 0 .. P+4
        slots = slice(P + 5 * t.index, P + 5 * t.index + 5)  # nothing removed: the leaf's slots in input order
        assert_close(cache.keys[last - 1][:, slots], plain[last - 1][0][0, :, P:], "oracle_float64")
        assert_close(cache.values[last - 1][:, slots], plain[last - 1][1][0, :, P:], "oracle_float64")
        assert cache.positions[slots].tolist() == list(range(P, P + 5))
    # With pruning the same tree ends at the target.
    pruned = homer_prefill(model, prefix, context, suffix, HomerConfig(M, reduction="uncalibrated"))
    assert pruned.keys[0].shape[1] == M


def test_the_steps_are_functions_a_reader_can_call():
    """HOMER_SPEC.md M as plain functions: the tree run by hand through leaf_chunk / run_node / merge, and through
    the two recursions, gives homer_prefill's records node for node (what tutorials 04 and 05 rely on)."""
    from homer_ref.homer import Run, depth_first, leaf_chunk, level_order, run_node
    from homer_ref.homer.merging import merge

    model = tiny_llama(L=8, V=32, seed=3)
    rng = np.random.default_rng(3)
    ids = random_ids(rng, 32, 26)
    parts, config = (ids[:1], ids[1:-1], ids[-1:]), HomerConfig(8, 8, 2, "uncalibrated")
    cache = homer_prefill(model, *parts, config)
    p = cache.plan
    by_hand = Run(model, p, *parts)
    left, _ = run_node(by_hand, p.nodes[(0, 0)], leaf_chunk(by_hand, 0))
    right, _ = run_node(by_hand, p.nodes[(0, 1)], leaf_chunk(by_hand, 1))
    node, trace = run_node(by_hand, p.nodes[(1, 0)], merge(left, right, p.P, p.S))
    assert torch.equal(trace.kept, cache.node(1, 0).kept) and trace.scores.grad_fn is None  # no autograd graph
    assert torch.equal(node.positions[: -p.S], cache.node(2, 0).input_positions[: len(node) - p.S])
    for walk in (lambda run: depth_first(run, p.H, 0), level_order):
        run = Run(model, p, *parts)
        root = walk(run)
        assert sorted((t.level, t.index) for t in run.traces) == sorted(p.nodes)
        for t in run.traces:
            assert torch.equal(t.kept, cache.node(t.level, t.index).kept), t.name
        assert torch.equal(root.positions, cache.positions) and torch.equal(root.keys[-1], cache.keys[-1])


def test_nodes_and_calibration_run_the_mlp_in_rows(monkeypatch):
    """A chunk or calibration window longer than MLP_ROWS runs its MLP in rows (what keeps a long chunk's F-wide
    activations small), with the same numbers as one whole pass."""
    from homer_ref import decoding
    from homer_ref.homer.calibration import calibrate

    model = tiny_llama(L=8, V=32, seed=4)
    ids = random_ids(np.random.default_rng(4), 32, 26)
    config = HomerConfig(8, 8, 2, "uncalibrated")
    whole = homer_prefill(model, ids[:1], ids[1:-1], ids[-1:], config, all_logits=True)
    table = calibrate(model, [ids[:20], ids[6:]])
    widths, real = [], model.feed_forward
    monkeypatch.setattr(model, "feed_forward", lambda layer, h: widths.append(h.shape[1]) or real(layer, h))
    monkeypatch.setattr(decoding, "MLP_ROWS", 3)
    rows = homer_prefill(model, ids[:1], ids[1:-1], ids[-1:], config, all_logits=True)
    assert widths and max(widths) == 3, "every MLP call saw at most MLP_ROWS tokens"
    assert all(torch.equal(a.kept, b.kept) for a, b in zip(rows.nodes, whole.nodes)), "the same decisions"
    for layer, (k, v) in enumerate(zip(rows.keys, rows.values)):
        assert_close(k, whole.keys[layer], "oracle_float64", f"keys.{layer} in rows")
        assert_close(v, whole.values[layer], "oracle_float64", f"values.{layer} in rows")
    assert_close(rows.logits, whole.logits, "oracle_float64", "logits in rows")
    widths.clear()
    assert_close(calibrate(model, [ids[:20], ids[6:]]), table, "oracle_float64", "calibration in rows")
    assert max(widths) == 3
