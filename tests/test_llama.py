"""The torch Llama (homer_ref/llama.py) against independent references, lowest level up.

- RoPE: cos/sin and inverse frequencies vs HF's rotary embedding for every rope type; the identities RoPE must
  satisfy (norms scale by the attention factor only; q·k depends only on the position difference).
- One decoder layer at a time (`attend`, `feed_forward`, the last-query logits HOMER prunes by) vs the oracle.
- The whole model vs the float64 NumPy oracle over random tiny configs (hypothesis), in float64 and float32.
- The whole model vs HF `LlamaForCausalLM` for MHA/GQA/MQA, tied/untied, every rope scaling, positions beyond the
  trained context, loaded through the production loader.
- Self-consistency: the KV-cache path equals the one-call forward; appending tokens never changes earlier logits.

Dimension legend: B n D V Hq Hkv Dh (batch, tokens, hidden, vocabulary, query heads, KV heads, head dim).
"""

import json
import tempfile
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import assert_close, hf_config, hf_logits, make_hf_llama, our_logits, randomize_
from hypothesis import given, settings
from hypothesis import strategies as st

from homer_ref import decoding, load_model
from homer_ref.llama import LlamaConfig, RopeScaling, apply_rope, rope_cos_sin, rope_frequencies
from homer_ref.loading import parse_config
from reference import llama_np

# Rope settings small enough that tiny contexts (8..64 positions) reach every regime of each scaling.
ROPES = {
    "default": {"rope_type": "default"},
    "linear": {"rope_type": "linear", "factor": 2.5},
    "dynamic": {"rope_type": "dynamic", "factor": 3.0},  # grows the base once positions pass max_position_embeddings
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    "yarn-explicit": {
        "rope_type": "yarn",
        "factor": 8.0,
        "original_max_position_embeddings": 16,
        "beta_fast": 16.0,
        "beta_slow": 2.0,
        "attention_factor": 1.3,
        "truncate": False,
    },
    "llama3": {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8,
    },
}
HYPOTHESIS = {"deadline": None, "derandomize": True, "database": None}  # reproducible in CI, no .hypothesis/


def rope_params(name: str, theta: float) -> dict:
    return {**ROPES[name], "rope_theta": theta}


def ours_from_hf_config(cfg) -> LlamaConfig:
    """Our config exactly as the production loader reads it: from the JSON that save_pretrained writes."""
    return parse_config(json.loads(cfg.to_json_string()))


def positions_strategy(n: int, max_position: int = 48):
    """None (0..n-1), arbitrary order with gaps, or heavily repeated position ids, as HOMER produces."""
    return st.one_of(
        st.none(),
        st.lists(st.integers(0, max_position), min_size=n, max_size=n),
        st.lists(st.integers(0, 3), min_size=n, max_size=n),
    )


def rope_config(head_dim: int, theta: float, scaling: RopeScaling) -> LlamaConfig:
    """A config that only RoPE reads (one head of `head_dim`); trained context 64 positions."""
    return LlamaConfig(
        vocab_size=1, hidden_size=head_dim, intermediate_size=1, num_hidden_layers=1, num_attention_heads=1,
        num_key_value_heads=1, head_dim=head_dim, rope_theta=theta, rope_scaling=scaling, max_position_embeddings=64,
    )  # fmt: skip


def scaling_of(rope: str, **overrides) -> RopeScaling:
    fields = {k: v for k, v in ROPES[rope].items() if k != "rope_type"}
    return RopeScaling(rope_type=ROPES[rope]["rope_type"], **{**fields, **overrides})


# ----------------------------------------------------------------------------------------------- RoPE vs HF


@pytest.mark.parametrize("rope", sorted(ROPES))
@pytest.mark.parametrize("head_dim", [6, 16])
def test_rope_matches_hf_rotary_embedding(rope, head_dim):
    """inv_freq, attention factor and cos/sin [n, Dh] vs HF's LlamaRotaryEmbedding at positions far past the
    original context (dynamic: one call, so HF and we both grow the base for max(position) + 1)."""
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    hf_cfg = hf_config(
        num_attention_heads=2,
        num_key_value_heads=1,
        hidden_size=8,
        head_dim=head_dim,
        max_position_embeddings=32,
        rope_parameters=rope_params(rope, 500.0),
    )
    cfg = ours_from_hf_config(hf_cfg)
    positions = torch.tensor([0, 1, 2, 7, 31, 32, 33, 100, 100, 255, 3])
    hf_rope = LlamaRotaryEmbedding(hf_cfg)
    hf_cos, hf_sin = hf_rope(torch.zeros(1, dtype=torch.float32), positions[None])  # [1, n, Dh]
    # after the call, HF's buffers hold what it used (dynamic: recomputed for max(position) + 1)
    inv_freq, scale = rope_frequencies(cfg, int(positions.max()) + 1)
    assert_close(inv_freq, hf_rope.inv_freq, "rope_inv_freq_hf", f"{rope} inv_freq")
    assert_close(scale, hf_rope.attention_scaling, "rope_inv_freq_hf", f"{rope} attention factor")
    cos, sin = rope_cos_sin(cfg, positions, torch.float64)
    assert_close(cos, hf_cos[0], "rope_cos_sin_hf", f"{rope} cos")
    assert_close(sin, hf_sin[0], "rope_cos_sin_hf", f"{rope} sin")


@pytest.mark.parametrize("rope", sorted(ROPES))
def test_rope_layout_matches_hf_apply_rotary_pos_emb(rope):
    """apply_rope pairs dimension i with i + Dh/2 (HF's rotate_half), checked against HF's own function."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cfg = rope_config(10, 100.0, scaling_of(rope))
    g = torch.Generator().manual_seed(0)
    q = torch.randn(1, 2, 5, 10, generator=g, dtype=torch.float64)  # [B, Hq, n, Dh]
    k = torch.randn(1, 1, 5, 10, generator=g, dtype=torch.float64)  # [B, Hkv, n, Dh]
    cos, sin = rope_cos_sin(cfg, torch.tensor([3, 0, 40, 40, 9]), torch.float64)
    hf_q, hf_k = apply_rotary_pos_emb(q, k, cos[None], sin[None])
    assert_close(apply_rope(q, cos, sin), hf_q, "rope_float64", "rotated q")
    assert_close(apply_rope(k, cos, sin), hf_k, "rope_float64", "rotated k")


# ----------------------------------------------------------------------------------------------- RoPE identities


@settings(max_examples=100, **HYPOTHESIS)
@given(
    rope=st.sampled_from(sorted(ROPES)),
    head_dim=st.sampled_from([2, 4, 6, 10, 16]),
    theta=st.sampled_from([100.0, 10000.0, 500000.0]),
    m=st.integers(0, 5000),
    n=st.integers(0, 5000),
    shift=st.integers(0, 5000),
    attention_factor=st.floats(0.5, 2.0),
    seed=st.integers(0, 2**31 - 1),
)
def test_rope_scales_norms_and_depends_only_on_position_difference(
    rope, head_dim, theta, m, n, shift, attention_factor, seed
):
    """|rope(x, p)| = a·|x| (a = YaRN's attention factor, else 1) and rope(q, m)·rope(k, n) is unchanged when both
    positions move by the same shift. Dynamic scaling depends on the call's largest position, so all four
    positions go through one call (one base): the identity is per call."""
    overrides = {"attention_factor": attention_factor} if ROPES[rope]["rope_type"] == "yarn" else {}
    expected_scale = attention_factor if overrides else 1.0
    cfg = rope_config(head_dim, theta, scaling_of(rope, **overrides))
    g = torch.Generator().manual_seed(seed)
    q, k = torch.randn(2, head_dim, generator=g, dtype=torch.float64)
    cos, sin = rope_cos_sin(cfg, torch.tensor([m, n, m + shift, n + shift]), torch.float64)  # [4, Dh]
    rq = apply_rope(q.expand(1, 1, 4, head_dim), cos, sin)[0, 0]  # [4, Dh]: q at m, n, m+shift, n+shift
    rk = apply_rope(k.expand(1, 1, 4, head_dim), cos, sin)[0, 0]
    assert_close(rq.norm(dim=-1), expected_scale * q.norm().expand(4), "rope_float64", "|rope(q, p)|")
    assert_close(rk.norm(dim=-1), expected_scale * k.norm().expand(4), "rope_float64", "|rope(k, p)|")
    assert_close(rq[2] @ rk[3], rq[0] @ rk[1], "rope_float64", f"q·k at ({m}+{shift}, {n}+{shift}) vs ({m}, {n})")


# ----------------------------------------------------------------------------------------------- vs the oracle


@st.composite
def tiny_cases(draw):
    """A random tiny HF config (1-3 layers, MHA/GQA/MQA, odd head dims, tied or not, any rope), tokens, positions."""
    Hkv, group = draw(st.integers(1, 3)), draw(st.sampled_from([1, 2, 3]))
    Hq = Hkv * group
    V = draw(st.integers(5, 40))
    rope = draw(st.sampled_from(sorted(ROPES)))
    config = dict(
        vocab_size=V,
        hidden_size=Hq * draw(st.integers(2, 5)),  # HF requires a multiple of Hq, even with an explicit head_dim
        intermediate_size=draw(st.integers(4, 40)),
        num_hidden_layers=draw(st.integers(1, 3)),
        num_attention_heads=Hq,
        num_key_value_heads=Hkv,
        head_dim=draw(st.sampled_from([4, 6, 8, 10] if rope == "dynamic" else [2, 4, 6, 8, 10])),  # NTK: Dh/(Dh-2)
        tie_word_embeddings=draw(st.booleans()),
        rope_parameters=rope_params(rope, draw(st.sampled_from([100.0, 10000.0]))),
        max_position_embeddings=16,
        rms_norm_eps=draw(st.sampled_from([1e-6, 1e-5, 0.1])),
    )
    n = draw(st.integers(1, 16))
    tokens = draw(st.lists(st.integers(0, V - 1), min_size=n, max_size=n))
    return config, tokens, draw(positions_strategy(n)), draw(st.integers(0, 2**16))


@settings(max_examples=60, **HYPOTHESIS)
@given(case=tiny_cases())
def test_forward_matches_numpy_oracle(case):
    """Logits [n, V] of load_model(dir) vs llama_np.forward on the same HF directory: float64 <= 1e-9,
    float32 <= 1e-4."""
    config, tokens, positions, seed = case
    with tempfile.TemporaryDirectory() as d:
        make_hf_llama(Path(d), seed=seed, **config)
        oracle_config, weights = llama_np.load_hf(d)
        expected = llama_np.forward(oracle_config, weights, tokens, positions)
        for dtype, tol in ((torch.float64, "oracle_float64"), (torch.float32, "oracle_float32")):
            model = load_model(d, dtype=dtype)
            what = f"{dtype} logits vs oracle for {config} tokens={tokens} positions={positions}"
            assert_close(our_logits(model, tokens, positions), expected, tol, what)


@pytest.mark.parametrize(
    ("rope", "Hq", "Hkv"), [("default", 4, 4), ("llama3", 6, 2), ("yarn", 4, 1), ("dynamic", 6, 3)]
)
def test_layer_halves_match_oracle(tmp_path, monkeypatch, rope, Hq, Hkv):
    """attend (h, k, v after RoPE, last-query logits) and feed_forward, one layer at a time, both from the oracle's
    input to that layer, in float64; the second half of the sequence goes through `attend` with the first half as
    its cache, so the cached path and its last-query logits over past + n keys are checked too; feed_forward also in
    slices (a long input's path), which must not change a value."""
    make_hf_llama(
        tmp_path,
        num_attention_heads=Hq,
        num_key_value_heads=Hkv,
        hidden_size=2 * Hq,
        head_dim=6,
        num_hidden_layers=3,
        rope_parameters=rope_params(rope, 100.0),
        max_position_embeddings=16,
    )
    model = load_model(tmp_path, dtype=torch.float64)
    config, weights = llama_np.load_hf(str(tmp_path))
    # Both calls reach the largest position, so that dynamic scaling uses one base for both (it grows the base
    # with the largest position of each call; keys cached earlier keep the rotation they got).
    tokens, positions = [3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5], [0, 1, 40, 30, 30, 31, 5, 6, 7, 40, 2]
    past = 5  # tokens in the cache when the rest is attended
    h = llama_np.embed(config, weights, tokens)  # [n, D]
    pos = torch.tensor(positions)
    for layer in range(config["num_hidden_layers"]):
        h_attn, k, v, last = llama_np.attention_layer(config, weights, layer, h, np.array(positions))
        with torch.no_grad():
            ours = model.attend(layer, torch.from_numpy(h)[None], pos, last_query=True)
            _, k_past, v_past, _ = model.attend(layer, torch.from_numpy(h[:past])[None], pos[:past])
            cached = model.attend(
                layer, torch.from_numpy(h[past:])[None], pos[past:], (k_past, v_past), last_query=True
            )
            ff = model.feed_forward(layer, torch.from_numpy(h_attn)[None])
            with monkeypatch.context() as patch:
                patch.setattr(decoding, "MLP_ROWS", 4)  # 11 tokens in slices of 4, 4 and 3
                ff_sliced = decoding.feed_forward_in_rows(model, layer, torch.from_numpy(h_attn)[None])
        for name, got, want in (("h", ours[0][0], h_attn), ("k", ours[1][0], k), ("v", ours[2][0], v)):
            assert_close(got, want, "layer_float64", f"layer {layer} attend {name}")
        assert_close(ours[3][0], last, "layer_float64", f"layer {layer} last-query logits [Hq, n]")
        assert_close(cached[0][0], h_attn[past:], "layer_float64", f"layer {layer} attend h with a cache")
        assert_close(cached[1][0], k, "layer_float64", f"layer {layer} cache keys after RoPE")
        assert_close(cached[3][0], last, "layer_float64", f"layer {layer} last-query logits with a cache")
        h = llama_np.mlp_layer(config, weights, layer, h_attn)
        assert_close(ff[0], h, "layer_float64", f"layer {layer} feed_forward")
        assert_close(ff_sliced[0], h, "layer_float64", f"layer {layer} feed_forward in slices")


# ----------------------------------------------------------------------------------------------- vs HF


def hf_case(Hq: int, Hkv: int, Dh: int, rope: str, theta: float, D: int = 24, tie: bool = False, **kw) -> dict:
    return dict(
        num_attention_heads=Hq,
        num_key_value_heads=Hkv,
        head_dim=Dh,
        hidden_size=D,
        tie_word_embeddings=tie,
        rope_parameters=rope_params(rope, theta),
        **kw,
    )


HF_CASES = {  # name: make_hf_llama settings
    "mha-default-untied": hf_case(4, 4, 6, "default", 1e4),
    "gqa-default-tied-theta500": hf_case(6, 2, 10, "default", 500.0, tie=True),
    "mqa-linear": hf_case(4, 1, 8, "linear", 1e4),
    "gqa-dynamic-tied": hf_case(6, 3, 6, "dynamic", 1e4, D=12, tie=True, max_position_embeddings=16),
    "gqa-llama3": hf_case(4, 2, 10, "llama3", 100.0),
    "gqa-yarn-tied": hf_case(4, 2, 8, "yarn", 1e4, tie=True),
    "mha-yarn-explicit": hf_case(2, 2, 16, "yarn-explicit", 1e4, D=16),
}
TOKENS = [5, 17, 3, 3, 60, 0, 42, 8, 8, 8, 23, 59, 1, 2, 31, 44, 12, 7, 50, 9]
# Past every original context above (8, 16): repeats, a jump back, and a jump forward.
FAR_POSITIONS = [0, 1, 2, 40, 41, 41, 42, 60, 61, 62, 10, 11, 70, 71, 72, 73, 73, 74, 75, 99]


@pytest.mark.parametrize("name", sorted(HF_CASES))
def test_forward_matches_hf_llama(tiny_hf_model, name):
    """max |Δlogit| <= 1e-4 in float32 vs HF LlamaForCausalLM, at positions 0..n-1 and at FAR_POSITIONS."""
    model_dir, hf = tiny_hf_model(**HF_CASES[name])
    ours = load_model(model_dir)
    for positions in (None, FAR_POSITIONS):
        expected = hf_logits(hf, TOKENS, positions)
        assert_close(our_logits(ours, TOKENS, positions), expected, "hf_float32", f"{name} positions={positions}")
    rope = HF_CASES[name].get("rope_parameters", {"rope_type": "default"})
    if rope["rope_type"] != "default":  # the test can see a wrong scaling: scaling moves these logits by O(1)
        plain = type(hf)(hf_config(**{**HF_CASES[name], "rope_parameters": rope_params("default", rope["rope_theta"])}))
        plain.load_state_dict(hf.state_dict())
        moved = np.abs(hf_logits(plain.eval(), TOKENS, FAR_POSITIONS) - expected).max()
        assert moved > 1e-2, f"{name}: rope scaling moves HF's logits by only {moved:.2e}; the case tests nothing"


# ----------------------------------------------------------------------------------------------- self-consistency


@pytest.fixture(scope="module")
def model64(tmp_path_factory):
    """A float64 GQA model with llama3 scaling (so far positions matter), via the production loader."""
    d = tmp_path_factory.mktemp("model64")
    make_hf_llama(
        d,
        num_attention_heads=6,
        num_key_value_heads=2,
        head_dim=6,
        hidden_size=12,
        num_hidden_layers=3,
        rope_parameters=rope_params("llama3", 100.0),
        seed=7,
    )
    return load_model(d, dtype=torch.float64)


@settings(max_examples=50, **HYPOTHESIS)
@given(data=st.data())
def test_kv_cache_decoding_equals_full_forward(model64, data):
    """Feeding the tokens in pieces through forward_cached, each piece attending to the cache of the earlier ones,
    gives the logits of one full call; the final cache holds every token in every layer."""
    n = data.draw(st.integers(2, 16), "n")
    tokens = data.draw(st.lists(st.integers(0, 60), min_size=n, max_size=n), "tokens")
    positions = data.draw(positions_strategy(n), "positions")
    cuts = sorted(set(data.draw(st.lists(st.integers(1, n - 1), max_size=n), "cuts")))
    full = model64(torch.tensor([tokens]), None if positions is None else torch.tensor(positions))
    cache, pieces = None, []
    for a, b in zip([0, *cuts], [*cuts, n]):
        piece_positions = None if positions is None else torch.tensor(positions[a:b])  # None: continue the cache
        logits, cache = model64.forward_cached(torch.tensor([tokens[a:b]]), piece_positions, cache)
        pieces.append(logits)
    assert_close(torch.cat(pieces, dim=1), full, "cache_float64", f"pieces cut at {cuts}, positions={positions}")
    cfg = model64.cfg
    assert len(cache) == cfg.num_hidden_layers
    assert all(k.shape == v.shape == (1, cfg.num_key_value_heads, n, cfg.head_dim) for k, v in cache)


def test_the_lean_loops_of_decoding_equal_the_reference_forward(model64, monkeypatch):
    """`decoding.prefill`, `step` and `all_logits` (the MLP in rows of MLP_ROWS tokens, each old cache entry let go
    as its layer is replaced) give the reference forward's logits and cache; `step` empties the cache it takes."""
    monkeypatch.setattr(decoding, "MLP_ROWS", 4)  # 9 prompt tokens in slices of 4, 4 and 1
    tokens = list(range(1, 13))
    full, full_cache = model64.forward_cached(torch.tensor([tokens]))
    last, cache = decoding.prefill(model64, torch.tensor([tokens[:9]]))
    assert_close(last, full[:, 8], "cache_float64", "prefill: the last prompt token's logits")
    given = cache
    last, cache = decoding.step(model64, torch.tensor([tokens[9:]]), torch.arange(9, 12), cache)
    assert all(entry is None for entry in given), "step consumed the cache it was given"
    assert_close(last, full[:, -1], "cache_float64", "step: the last token's logits")
    for (k, v), (k_full, v_full) in zip(cache, full_cache):
        assert_close(k, k_full, "cache_float64", "keys") and assert_close(v, v_full, "cache_float64", "values")
    assert_close(decoding.all_logits(model64, torch.tensor([tokens])), full, "cache_float64", "all_logits")


def test_token_by_token_decoding_equals_full_forward(model64):
    """The decoding pattern: a prompt, then one token per call at the next position."""
    tokens = [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    full = model64(torch.tensor([tokens]))
    logits, cache = model64.forward_cached(torch.tensor([tokens[:3]]))
    rows = [logits]
    for i in range(3, len(tokens)):
        logits, cache = model64.forward_cached(torch.tensor([[tokens[i]]]), torch.tensor([i]), cache)
        rows.append(logits)
    assert_close(torch.cat(rows, dim=1), full, "cache_float64", "token-by-token logits")


@settings(max_examples=50, **HYPOTHESIS)
@given(data=st.data())
def test_appending_tokens_never_changes_earlier_logits(model64, data):
    """Causality by sequence index: the logits of a prefix are those of the prefix alone, whatever follows."""
    total = data.draw(st.integers(2, 16), "total")
    tokens = data.draw(st.lists(st.integers(0, 60), min_size=total, max_size=total), "tokens")
    positions = data.draw(st.lists(st.integers(0, 48), min_size=total, max_size=total), "positions")
    n = data.draw(st.integers(1, total - 1), "prefix length")
    full = model64(torch.tensor([tokens]), torch.tensor(positions))
    prefix = model64(torch.tensor([tokens[:n]]), torch.tensor(positions[:n]))
    assert_close(full[:, :n], prefix, "cache_float64", f"first {n} of {total} logits, positions={positions}")


def test_batch_rows_equal_separate_runs(model64):
    """A batch [B, n] with per-row positions [B, n] gives each row's own logits (the per-batch RoPE path)."""
    tokens = torch.tensor([[1, 2, 3, 4, 5, 6], [9, 8, 7, 6, 5, 4]])
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [50, 50, 3, 9, 60, 61]])
    batched = model64(tokens, positions)
    for b in range(2):
        assert_close(batched[b], model64(tokens[b : b + 1], positions[b])[0], "cache_float64", f"batch row {b}")


def test_randomized_models_are_not_trivial():
    """Guard for every comparison above: random tiny models have O(1) logit spreads and RMSNorm gains != 1."""
    import transformers

    model = transformers.LlamaForCausalLM(hf_config())
    randomize_(model, 0)
    gains = model.model.layers[0].input_layernorm.weight
    assert (gains - 1).abs().min() > 0 and (gains - 1).abs().max() > 0.2
    spread = hf_logits(model.eval(), TOKENS).std(axis=-1).min()
    assert spread > 0.3, f"logits barely vary across the vocabulary (std {spread:.3f})"
