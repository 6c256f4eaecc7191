"""HOMER's plan (homer_ref/homer/plan.py) against the numbers HOMER_SPEC.md writes down, and the N.2.6 errors.

Every expected value here is a literal copied from the spec (the section is cited next to it) or follows from
a formula of the spec computed in the test itself; none is read back from homer_ref.
- Section L worked example and its four checked variants (C = 14, C = 40, L = 9, T = 6).
- C.1 Llama-2-7B / 13B layer schedules, D.4 leaf removals and final cache length of the Llama-2 setting,
  N.2.6 reach of stories260K's depth limit.
- N.2.6 invalid configurations: each raises a ValueError naming the violated constraint (the same list runs
  through the trace CLI in test_trace_cli.py); C = 0 is not an error.
- GQA (N.2.2) runs, and `str(plan)` lists every node.

Symbols: L W M T (layers, warm-up, max chunk length with affixes, target), P C S (prefix, context, suffix),
E = M-P-S, N0, H, N leaves, e context tokens per leaf, lpc layers per level, lo leftover layers,
R = P + E//2 + S. Model dims: V D Hq Hkv Dh.
"""

import re

import pytest
import torch
from helpers import tiny_llama
from hypothesis import example, given, settings
from hypothesis import strategies as st

from homer_ref.homer import homer_prefill
from homer_ref.homer.plan import HomerConfig, default_warmup_layers, plan


def node_table(p) -> list[tuple]:
    """(level, index, layers, input length, target) of every node, in depth-first execution order."""
    return [(n.level, n.index, n.layers, p.input_len(n), n.target) for n in p.post_order()]


# ----------------------------------------------------------------------------------------------- section L


def test_worked_example_section_L():
    # HOMER_SPEC.md L: L = 8, W = 2, M = T = 8, P = S = 1, C = 24.
    p = plan(8, HomerConfig(max_chunk_len=8, target_len=8, warmup_layers=2), P=1, C=24, S=1)
    # "E = 8 - 2 = 6; N0 = ceil(24/6) = 4; H = 2; N = 4; e = ceil(24/4) = 6; lpc = 2; lo = 0; default_len = 5"
    assert (p.E, p.N0, p.H, p.N, p.e, p.lpc, p.lo, p.R) == (6, 4, 2, 4, 6, 2, 0, 5)
    assert p.leaf_context == (6, 6, 6, 6)
    leaf, h1, root = (0, 4), (4, 6), (6, 8)  # "leaves: layers 0,1,2,3 · height1: layers 4,5 · root h2: layers 6,7"
    # "Order of execution: A -> B -> merge -> AB -> C -> D -> merge -> CD -> merge -> root"; tokens in -> target
    assert node_table(p) == [
        (0, 0, leaf, 8, 5),  # A: 8 -> 5
        (0, 1, leaf, 8, 5),  # B
        (1, 0, h1, 8, 5),  # AB: 5 + 5 -> 8 -> 5
        (0, 2, leaf, 8, 5),  # C
        (0, 3, leaf, 8, 5),  # D
        (1, 1, h1, 8, 5),  # CD
        (2, 0, root, 8, 8),  # root: T* = min(8, 26) = 8, nothing pruned
    ]
    assert p.final_len == 8  # "Final cache: 8 slots in every one of the 8 layers"


def test_variant_short_last_leaf_C14():
    # HOMER_SPEC.md L variant C = 14 (and D.4 [run]): "leaf 3 has positions [0,1,2,5], targets 6 and 4,
    # nothing pruned in that pair". E = 6, N0 = 3 -> N = 4, e = ceil(14/4) = 4, the last leaf holds 14 - 12 = 2.
    p = plan(8, HomerConfig(8, 8, 2), P=1, C=14, S=1)
    assert (p.N, p.e, p.leaf_context) == (4, 4, (4, 4, 4, 2))
    leaf2, leaf3 = p.nodes[(0, 2)], p.nodes[(0, 3)]
    assert (leaf2.target, leaf3.target) == (6, 4)
    assert (p.input_len(leaf2), p.input_len(leaf3)) == (6, 4)  # both already at their target: nothing pruned
    assert p.input_len(p.nodes[(1, 1)]) == 8  # "the merged chunk had 8 tokens"
    assert p.final_len == 8


def test_variant_eight_leaves_C40():
    # HOMER_SPEC.md L variant C = 40: "8 leaves: lpc = 1, lo = 2, leaves run layers 0-4 and the levels use
    # layers 5, 6, 7".
    p = plan(8, HomerConfig(8, 8, 2), P=1, C=40, S=1)
    assert (p.N, p.H, p.lpc, p.lo) == (8, 3, 1, 2)
    assert {lvl: p.nodes[(lvl, 0)].layers for lvl in range(4)} == {0: (0, 5), 1: (5, 6), 2: (6, 7), 3: (7, 8)}
    assert len(p.post_order()) == 15 and p.final_len == 8


def test_variant_leftover_layer_L9():
    # HOMER_SPEC.md C.1 [run] / L variant: L = 9, W = 2, H = 2: "lpc = 2, lo = 1, leaves run layers 0-4,
    # h1 nodes 5-6, root 7-8".
    p = plan(9, HomerConfig(8, 8, 2), P=1, C=24, S=1)
    assert (p.lpc, p.lo) == (2, 1)
    assert [p.nodes[(lvl, 0)].layers for lvl in range(3)] == [(0, 5), (5, 7), (7, 9)]


def test_variant_small_target_T6():
    # HOMER_SPEC.md C.2 [run] / L variant T = 6: "the root prunes 2 at layer 7 and every layer ends with 6".
    p = plan(8, HomerConfig(8, 6, 2), P=1, C=24, S=1)
    assert (p.root.layers, p.input_len(p.root), p.root.target, p.final_len) == ((6, 8), 8, 6, 6)


# ----------------------------------------------------------------------------------------------- Llama-2 numbers


# HOMER_SPEC.md C.1 [computed], written as (first, last) layer ranges, last exclusive: "Llama-2-7B (L = 32,
# W = 12): H=1: leaves 0-21, root 22-31 · H=2: leaves 0-19, 20-25, 26-31 · H=3: leaves 0-16, then blocks of 5 ·
# H=4: leaves 0-15, then blocks of 4 · H=5: leaves 0-16, then blocks of 3 · H=6: leaves 0-19, then blocks of 2.
# Llama-2-13B (L = 40): H=2: leaves 0-21, 22-30, 31-39 · H=3: leaves 0-18, then 7-layer blocks ·
# H=5: leaves 0-19, then 4-layer blocks."
LLAMA2_SCHEDULES = [
    (32, 1, [(0, 22), (22, 32)]),
    (32, 2, [(0, 20), (20, 26), (26, 32)]),
    (32, 3, [(0, 17), (17, 22), (22, 27), (27, 32)]),
    (32, 4, [(0, 16), (16, 20), (20, 24), (24, 28), (28, 32)]),
    (32, 5, [(0, 17), (17, 20), (20, 23), (23, 26), (26, 29), (29, 32)]),
    (32, 6, [(0, 20), (20, 22), (22, 24), (24, 26), (26, 28), (28, 30), (30, 32)]),
    (40, 2, [(0, 22), (22, 31), (31, 40)]),
    (40, 3, [(0, 19), (19, 26), (26, 33), (33, 40)]),
    (40, 5, [(0, 20), (20, 24), (24, 28), (28, 32), (32, 36), (36, 40)]),
]


@pytest.mark.parametrize("L, H, schedule", LLAMA2_SCHEDULES)
def test_llama2_layer_schedules(L, H, schedule):
    E = 2048 - 200  # M = 2048, P = S = 100
    C = E * 2 ** (H - 1) + 1  # one token more than 2^(H-1) chunks hold: N0 = 2^(H-1) + 1 -> height H
    p = plan(L, HomerConfig(2048, 2048, 12), P=100, C=C, S=100)
    assert p.H == H
    assert [p.nodes[(lvl, 0)].layers for lvl in range(H + 1)] == schedule


@pytest.mark.parametrize("L, H, schedule", [s for s in LLAMA2_SCHEDULES if s[0] == 32])
def test_the_default_warmup_is_the_official_scripts(L, H, schedule):
    """Without warmup_layers, Llama-2-7B gets the scripts' W = 12 (HOMER_SPEC.md A), hence the schedules above."""
    C = (2048 - 200) * 2 ** (H - 1) + 1
    p = plan(L, HomerConfig(2048), P=100, C=C, S=100)
    assert p.W == 12 and [p.nodes[(lvl, 0)].layers for lvl in range(H + 1)] == schedule


# (L, tree height H, W): round(12 L / 32), lowered only where H + 1 levels would not fit in L - W layers.
DEFAULT_WARMUP = [
    (32, 6, 12),
    (32, 19, 12),
    (32, 20, 11),
    (30, 1, 11),
    (30, 18, 11),
    (30, 19, 10),
    (40, 3, 15),
    (8, 4, 3),
    (8, 5, 2),
    (5, 0, 2),
    (5, 2, 2),
    (5, 3, 1),
    (5, 4, 0),
    (6, 2, 2),
    (2, 0, 1),
    (1, 0, 0),
]


@pytest.mark.parametrize("L, H, W", DEFAULT_WARMUP)
def test_default_warmup_rule(L, H, W):
    E = 8
    C = E * 2**H  # N0 = 2^H full chunks: a tree of height H
    assert default_warmup_layers(L, E + 2, 1, C, 1) == W
    if H <= 6:  # small enough to plan: the plan uses the rule, and an explicit W is kept
        p = plan(L, HomerConfig(E + 2), P=1, C=C, S=1)
        assert (p.H, p.W, p.lpc >= 1) == (H, W, True)
        assert plan(L, HomerConfig(E + 2, warmup_layers=0), P=1, C=C, S=1).W == 0


# HOMER_SPEC.md D.4 [computed] (P = S = 100, M = T = 2048): "the leaves remove 50, 75, 88, 94, 97 of their
# 974-1021 context tokens at total lengths 4k, 8k, 16k, 32k, 64k", with "final cache 2048 at every length >= 4k";
# B.1 / G.3: at 65,336 context tokens N = 64 and e = 1021.
@pytest.mark.parametrize(
    "total, N, e, removed_per_leaf",
    [(4096, 4, 974, 50), (8192, 8, 999, 75), (16384, 16, 1012, 88), (32768, 32, 1018, 94), (65536, 64, 1021, 97)],
)
def test_llama2_perplexity_setting(total, N, e, removed_per_leaf):
    p = plan(32, HomerConfig(2048, 2048, 12), P=100, C=total - 200, S=100)
    assert (p.N, p.e) == (N, e)
    first_leaf = p.nodes[(0, 0)]
    assert p.input_len(first_leaf) - first_leaf.target == removed_per_leaf
    assert p.final_len == 2048


def test_depth_limit_of_stories260K():
    # HOMER_SPEC.md N.2.6: "a model reaches at most 2^(L-W-1)*E context tokens (stories260K, 5 layers, W = 0:
    # 16*E - about 3.5k tokens at M = 256)". With P = S = 16: E = 224, so 16*E = 3584 fits and 3585 does not.
    config = HomerConfig(256, 256, 0)
    assert plan(5, config, P=16, C=3584, S=16).H == 4
    with pytest.raises(ValueError) as info:
        plan(5, config, P=16, C=3585, S=16)
    assert "3584" in str(info.value), f"the message must state the reachable context: {info.value}"


def test_no_context_is_one_leaf():
    # HOMER_SPEC.md N.2.6: "C = 0 (no context) is not an error: it is the plain forward of prefix+suffix".
    p = plan(4, HomerConfig(8, 8, 1), P=2, C=0, S=3)
    assert (p.N, p.H, p.final_len, p.root.layers) == (1, 0, 5, (0, 4))


# ----------------------------------------------------------------------------------------------- N.2.6 errors

# (name, L, HomerConfig kwargs, P, C, S, words the message must contain). The layer-count and last-leaf cases
# are also checked for the fix their message proposes (below).
CONFIG_ERRORS = [
    ("suffix empty (S = 0)", 4, dict(max_chunk_len=8), 1, 6, 0, ["suffix", "S = 0"]),
    ("M <= P + S", 4, dict(max_chunk_len=2), 1, 6, 1, ["max_chunk_len", "prefix"]),
    ("T < P + S", 4, dict(max_chunk_len=8, target_len=2), 2, 6, 1, ["target_len"]),
    ("W >= L", 4, dict(max_chunk_len=8, warmup_layers=4), 1, 6, 1, ["warmup_layers"]),
    # E = 6, C = 24 -> H = 2 needs 3 layer blocks but L - W = 2: reach 2^(L-W-1)*E = 12 context tokens.
    ("too few layers (lpc = 0)", 2, dict(max_chunk_len=8), 1, 24, 1, ["12", "max_chunk_len"]),
    # HOMER_SPEC.md B.5: M = 4, P = S = 1, C = 5 -> N = 4, e = 2, the last leaf would cover [6, 5).
    ("negative last leaf", 4, dict(max_chunk_len=4), 1, 5, 1, ["last", "leaf"]),
    # B.5: C = 6 = qN + r with q + r = N - 1: the last leaf is exactly empty.
    ("empty last leaf", 4, dict(max_chunk_len=4), 1, 6, 1, ["last", "leaf"]),
]


@pytest.mark.parametrize("name, L, kwargs, P, C, S, words", CONFIG_ERRORS, ids=[c[0] for c in CONFIG_ERRORS])
def test_invalid_configuration(name, L, kwargs, P, C, S, words):
    with pytest.raises(ValueError) as info:
        plan(L, HomerConfig(**kwargs), P, C, S)
    message = str(info.value)
    for word in words:
        assert word in message, f"{name}: the message should name the constraint ({word!r}): {message}"
    # The same configuration through the prefill (what a user calls) raises the same error.
    model = tiny_llama(L=L)
    with pytest.raises(ValueError, match=re.escape(message)):
        homer_prefill(model, [1] * P, [2] * C, [3] * S, HomerConfig(**kwargs, reduction="uncalibrated"))


def test_too_few_layers_message_proposes_a_fix_that_works():
    with pytest.raises(ValueError) as info:
        plan(2, HomerConfig(8), P=1, C=24, S=1)
    fixes = [int(m) for m in re.findall(r"max_chunk_len\s*>=?\s*(\d+)", str(info.value))]
    assert fixes, f"no max_chunk_len fix in: {info.value}"
    assert plan(2, HomerConfig(fixes[0]), P=1, C=24, S=1).H <= 1  # two layer blocks suffice


def test_last_leaf_message_proposes_a_fix_that_works():
    with pytest.raises(ValueError) as info:
        plan(4, HomerConfig(4), P=1, C=5, S=1)
    fixes = [int(m) for m in re.findall(r"max_chunk_len\s*=\s*(\d+)", str(info.value))]
    for m in fixes:  # a suggested value, if any, must be valid
        assert min(plan(4, HomerConfig(m), P=1, C=5, S=1).leaf_context) > 0


FIX_PATTERNS = {  # what a message may propose -> the HomerConfig field it sets
    r"max_chunk_len\s*>=\s*(\d+)": "max_chunk_len",
    r"max_chunk_len\s*=\s*(\d+)": "max_chunk_len",
    r"warmup_layers\s*<=\s*(\d+)": "warmup_layers",
}


@given(
    L=st.integers(1, 6),
    W_frac=st.floats(0, 0.99),
    P=st.integers(0, 2),
    S=st.integers(1, 2),
    E=st.integers(1, 10),
    C=st.integers(0, 120),
)
@settings(max_examples=200, deadline=None)
# Found by this test: the layer-count message proposed a max_chunk_len whose last leaf is empty, and fewer
# warm-up layers where the last leaf (unchanged by W) was the other problem.
@example(L=3, W_frac=0.0, P=0, S=1, E=1, C=5)
@example(L=3, W_frac=0.34, P=0, S=1, E=1, C=3)
def test_every_proposed_fix_is_valid(L, W_frac, P, S, E, C):
    """N.2.6 "Say the limit and the settings that would fit": every value a message proposes must work."""
    W, M = int(W_frac * L), P + S + E
    try:
        plan(L, HomerConfig(M, M, W), P, C, S)
        return
    except ValueError as e:
        message = str(e)
    for pattern, field in FIX_PATTERNS.items():
        for value in re.findall(pattern, message):
            fixed = {"max_chunk_len": M, "warmup_layers": W, field: int(value)}
            fixed["target_len"] = fixed["max_chunk_len"]
            plan(L, HomerConfig(**fixed), P, C, S)  # must not raise: {message}


def bias_cases(L, M):
    nan = torch.zeros(L, M)
    nan[1, 3] = float("nan")
    return [
        ("bias with the wrong layer count", torch.zeros(L + 1, M), ["layers"]),
        ("bias shorter than M", torch.zeros(L, M - 1), ["bias", str(M)]),
        ("bias with NaN", nan, ["NaN"]),
    ]


@pytest.mark.parametrize("case", range(3))
def test_bad_bias_table(case):
    L, M = 4, 8
    name, bias, words = bias_cases(L, M)[case]
    with pytest.raises(ValueError) as info:
        homer_prefill(tiny_llama(L=L), [1], [2] * 12, [3], HomerConfig(M), bias=bias)
    for word in words:
        assert word in str(info.value), f"{name}: {info.value}"


@pytest.mark.parametrize("bad_id", [32, -1, 1000])
def test_ids_outside_the_vocabulary(bad_id):
    model = tiny_llama(L=4, V=32)
    for where in range(3):
        ids = [[1], [2] * 12, [3]]
        ids[where] = ids[where][:-1] + [bad_id]
        with pytest.raises(ValueError, match="vocabulary") as info:
            homer_prefill(model, *ids, HomerConfig(8, reduction="uncalibrated"))
        assert str(bad_id) in str(info.value)


def test_calibrated_without_bias():
    # HOMER_SPEC.md N.2.4: "Running without a bias table never crashes: the caller chooses a mode".
    with pytest.raises(ValueError, match="bias"):
        homer_prefill(tiny_llama(L=4), [1], [2] * 12, [3], HomerConfig(8, reduction="calibrated"))


# ----------------------------------------------------------------------------------------------- GQA, printing


@pytest.mark.parametrize("Hkv", [1, 2])
def test_gqa_model_runs(Hkv):
    # HOMER_SPEC.md N.2.2: GQA works (the official code crashes when Hkv is not in {1, Hq}); Hq = 4 here.
    model = tiny_llama(L=8, Hq=4, Hkv=Hkv, D=16)
    result = homer_prefill(model, [1], list(range(2, 26)), [3], HomerConfig(8, 8, 2, reduction="uncalibrated"))
    assert len(result.keys) == 8
    for k, v in zip(result.keys, result.values):
        assert k.shape == v.shape == (Hkv, 8, 4)
    assert sum(len(t.removed) for t in result.nodes) == 18  # section L: 12 context tokens at layer 3, 6 at layer 5


def test_str_lists_every_node():
    p = plan(8, HomerConfig(8, 8, 2), P=1, C=40, S=1)  # 8 leaves, 15 nodes
    text = str(p)
    rows = [tuple(int(x) for x in m) for m in re.findall(r"^\s*(\d+)\.(\d+)\s+\[", text, flags=re.M)]
    expected = [(lvl, i) for lvl in range(4) for i in range(8 >> lvl)]
    assert sorted(rows) == sorted(expected), text
    for word in ("L=8", "W=2", "M=8", "C=40", "N=8", "lpc=1", "lo=2"):
        assert word in text, text


def test_the_defaults_are_resolved_in_the_library_once():
    """M, T and W defaults live in the library (the commands print the resolved plan): T = M when not given, M =
    half the trained context for generation, the trained context less the answer's room for the passkey task,
    and perplexity's segments from M."""
    from homer_ref.homer.plan import generation_config
    from homer_ref.tasks import passkey
    from homer_ref.tasks.perplexity import Segments

    assert HomerConfig(512).target == 512 and HomerConfig(512, 300).target == 300
    assert generation_config(8192).max_chunk_len == 4096 and generation_config(8192, 1100).max_chunk_len == 1100
    assert passkey.homer_config(256).max_chunk_len == 256 - passkey.ANSWER_ROOM
    assert passkey.homer_config(256, rope_factor=2.0).max_chunk_len == 512 - passkey.ANSWER_ROOM
    assert Segments.for_model(512) == Segments(256, 256, 8) and Segments.for_model(512, 128, affix_len=0).affix_len == 0
    p = plan(30, generation_config(8192), 11, 20000, 10)
    assert (p.M, p.T, p.W) == (4096, 4096, 11) and p.config.reduction == "calibrated"
    assert str(p).startswith("HOMER plan: L=30 W=11 M=4096 T=4096 P=11 C=20000 S=10 (calibrated)")
