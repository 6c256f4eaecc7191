"""Self-checks of the NumPy oracle (reference/) against independent sources, never against itself alone.

- Llama forward (reference/llama_np.py) vs HF ``transformers.LlamaForCausalLM`` built in-test from a tiny
  random config (float64, no download): MHA, GQA and MQA, tied and untied, RoPE none/linear/dynamic/yarn/
  llama3, arbitrary positions; the safetensors reader vs the ``safetensors`` package; a sharded checkpoint.
- HOMER prefill (reference/homer_np.py) vs the hand-worked example of HOMER_SPEC.md section L and its
  variants, the trivial case N.3 (equal to the plain forward, bit for bit), the published SplitMix64
  reference outputs, hand-computed selection rules (N.2.3), and each ValueError of N.2.6.

Symbol legend: B n D Hq Hkv Dh (batch, tokens, hidden, query heads, KV heads, head dim); L W M T (layers,
warm-up, max chunk length, target length); P C S E N H e (prefix, context, suffix, E = M-P-S, leaves,
tree height, context tokens per leaf).
"""

import json
import math
import os

import numpy as np
import pytest

from reference import homer_np, llama_np

# Tolerances, in one place. HF computes RoPE angles in float32 even in a float64 model, so the comparison
# with HF cannot reach 1e-9: with float64 everywhere else the observed max |diff| is 1e-6 to 6e-6 for logits
# of size ~6 (and a wrong RoPE scaling moves them by O(1)).
HF_LOGIT_ATOL = 5e-5
HF_KV_ATOL = 5e-5
HF_SCORE_ATOL = 5e-5  # float32 significance scores, derived from HF's q/k vs the oracle's


def report(a: np.ndarray, b: np.ndarray) -> str:
    d = np.abs(np.asarray(a, dtype=np.float64) - np.asarray(b, dtype=np.float64))
    where = np.unravel_index(d.argmax(), d.shape)
    return f"max |diff| {d.max():.3e}, mean {d.mean():.3e}, largest at {where}"


# ----------------------------------------------------------------------------------------------------------
# A tiny random Llama in HF naming, built with NumPy only (used by the HOMER tests)
# ----------------------------------------------------------------------------------------------------------


def tiny_model(L=8, D=16, Hq=4, Hkv=2, V=32, F=24, seed=0, tie=True):
    """(config dict, weights dict [HF names]) of a random Llama with O(1) logits (varied pruning)."""
    rng = np.random.default_rng(seed)
    dh = D // Hq
    config = {
        "vocab_size": V,
        "hidden_size": D,
        "intermediate_size": F,
        "num_hidden_layers": L,
        "num_attention_heads": Hq,
        "num_key_value_heads": Hkv,
        "rms_norm_eps": 1e-6,
        "max_position_embeddings": 64,
        "rope_theta": 10000.0,
        "tie_word_embeddings": tie,
        "hidden_act": "silu",
    }
    w = {
        "model.embed_tokens.weight": rng.normal(size=(V, D)),
        "model.norm.weight": 1 + 0.1 * rng.normal(size=D),
    }
    if not tie:
        w["lm_head.weight"] = rng.normal(size=(V, D)) / math.sqrt(D)
    shapes = {
        "self_attn.q_proj": (Hq * dh, D),
        "self_attn.k_proj": (Hkv * dh, D),
        "self_attn.v_proj": (Hkv * dh, D),
        "self_attn.o_proj": (D, Hq * dh),
        "mlp.gate_proj": (F, D),
        "mlp.up_proj": (F, D),
        "mlp.down_proj": (D, F),
    }
    for layer in range(L):
        pre = f"model.layers.{layer}."
        for name, shape in shapes.items():
            w[pre + name + ".weight"] = rng.normal(size=shape) / math.sqrt(shape[1])
        w[pre + "input_layernorm.weight"] = 1 + 0.1 * rng.normal(size=D)
        w[pre + "post_attention_layernorm.weight"] = 1 + 0.1 * rng.normal(size=D)
    return config, w


# ----------------------------------------------------------------------------------------------------------
# (a) Llama forward vs HF transformers
# ----------------------------------------------------------------------------------------------------------

HF_CASES = {
    "mha-untied-plain": dict(kv=4, tie=False, rope=None),
    "gqa-tied-plain": dict(kv=2, tie=True, rope=None),
    "mqa-untied-linear": dict(kv=1, tie=False, rope={"rope_type": "linear", "factor": 2.0}),
    "gqa-tied-dynamic": dict(kv=2, tie=True, rope={"rope_type": "dynamic", "factor": 2.0}),
    "gqa-untied-yarn": dict(
        kv=2,
        tie=False,
        max_pos=256,  # = factor * original, as HF expects
        rope={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64},
    ),
    "mha-tied-llama3": dict(
        kv=4,
        tie=True,
        max_pos=128,
        rope={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
}


def build_hf(tmp_path, kv, tie, rope, max_pos=8, shard=False):
    """A random float64 HF Llama saved as safetensors; returns (torch model, saved directory)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        vocab_size=48,
        hidden_size=32,
        intermediate_size=40,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv,
        max_position_embeddings=max_pos,
        rope_theta=500.0,  # small base: Dh = 8 has 4 frequencies, spread widely over a few positions
        rope_scaling=rope,
        tie_word_embeddings=tie,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(cfg).to(torch.float64).eval()
    with torch.no_grad():  # O(1) logits instead of HF's 0.02-scale init, so differences are visible
        for name, p in model.named_parameters():
            p.normal_(mean=1.0 if "norm" in name else 0.0, std=0.1 if "norm" in name else 0.3)
    out_dir = str(tmp_path / "hf")
    kwargs = {"max_shard_size": "20KB"} if shard else {}
    model.save_pretrained(out_dir, safe_serialization=True, **kwargs)
    return model, out_dir


def hf_run(model, tokens, positions):
    torch = pytest.importorskip("torch")
    ids = torch.tensor([tokens])
    pos = torch.tensor([positions])
    with torch.no_grad():
        out = model(input_ids=ids, position_ids=pos, use_cache=True)
    cache = out["cache"] if "cache" in out else out.past_key_values  # renamed in transformers 5
    kv = []
    for layer in range(model.config.num_hidden_layers):
        if hasattr(cache, "layers"):
            k, v = cache.layers[layer].keys, cache.layers[layer].values
        else:
            k, v = cache[layer]
        kv.append((k[0].numpy(), v[0].numpy()))  # [Hkv, n, Dh]
    return out.logits[0].numpy(), kv


@pytest.mark.parametrize("case", list(HF_CASES))
def test_forward_matches_hf(tmp_path, case):
    spec = HF_CASES[case]
    model, out_dir = build_hf(tmp_path, spec["kv"], spec["tie"], spec["rope"], spec.get("max_pos", 8))
    config, weights = llama_np.load_hf(out_dir)
    assert ("lm_head.weight" in weights) != spec["tie"]  # a tied checkpoint omits lm_head
    rng = np.random.default_rng(1)
    tokens = [int(t) for t in rng.integers(0, 48, 12)]
    # T = 12 > max_position_embeddings = 8, so dynamic NTK really rescales; the second set has repeats, a
    # non-monotonic order and a position beyond T (causality stays by sequence index).
    for positions in (list(range(12)), [0, 1, 2, 5, 3, 3, 9, 4, 4, 15, 2, 11]):
        ref_logits, ref_kv = hf_run(model, tokens, positions)
        logits, keys, values = llama_np.forward_cache(config, weights, tokens, positions)
        assert logits.shape == (12, 48) and logits.dtype == np.float64
        assert np.abs(logits - ref_logits).max() <= HF_LOGIT_ATOL, report(logits, ref_logits)
        assert np.array_equal(llama_np.forward(config, weights, tokens, positions), logits)
        for layer, (k_ref, v_ref) in enumerate(ref_kv):
            k, v = keys[layer], values[layer]
            assert np.abs(k - k_ref).max() <= HF_KV_ATOL, f"keys, layer {layer}: " + report(k, k_ref)
            assert np.abs(v - v_ref).max() <= HF_KV_ATOL, f"values, layer {layer}: " + report(v, v_ref)


def test_rope_attention_scaling_yarn():
    """YaRN's mscale multiplies cos and sin: 0.1 ln(s) + 1 by default, or the given attention_factor."""
    cfg = {"hidden_size": 32, "num_attention_heads": 2, "max_position_embeddings": 64, "rope_theta": 1e4}
    cfg["rope_scaling"] = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
    assert llama_np.rope_inv_freq(cfg, 1)[1] == pytest.approx(0.1 * math.log(4.0) + 1)
    cfg["rope_scaling"]["attention_factor"] = 1.5
    assert llama_np.rope_inv_freq(cfg, 1)[1] == 1.5
    plain, _ = llama_np.rope_inv_freq({**cfg, "rope_scaling": None}, 1)
    np.testing.assert_allclose(plain, 1e4 ** (-np.arange(0, 16, 2) / 16))


def test_sharded_checkpoint(tmp_path):
    model, out_dir = build_hf(tmp_path, 2, False, None, shard=True)
    assert os.path.exists(os.path.join(out_dir, "model.safetensors.index.json"))
    config, weights = llama_np.load_hf(out_dir)
    assert config["num_key_value_heads"] == 2
    ref_logits, _ = hf_run(model, [3, 1, 4, 1, 5], list(range(5)))
    logits = llama_np.forward(config, weights, [3, 1, 4, 1, 5])
    assert np.abs(logits - ref_logits).max() <= HF_LOGIT_ATOL, report(logits, ref_logits)


def test_read_safetensors_dtypes(tmp_path):
    torch = pytest.importorskip("torch")
    st = pytest.importorskip("safetensors.torch")
    g = torch.Generator().manual_seed(0)
    tensors = {
        "f64": torch.randn(3, 4, generator=g, dtype=torch.float64),
        "f32": torch.randn(5, generator=g),
        "f16": torch.randn(2, 3, generator=g).half(),
        "bf16": torch.randn(4, 2, generator=g).bfloat16(),
        "i64": torch.tensor([[-(2**40), 7]]),
        "i32": torch.tensor([-3, 2**30], dtype=torch.int32),
        "scalar": torch.tensor(2.5),
    }
    path = str(tmp_path / "t.safetensors")
    st.save_file(tensors, path, metadata={"format": "pt"})
    got = llama_np.read_safetensors(path)
    assert set(got) == set(tensors)
    for name, t in tensors.items():
        want = t.double().numpy() if t.is_floating_point() else t.long().numpy()
        assert got[name].dtype == (np.float64 if t.is_floating_point() else np.int64), name
        assert got[name].shape == tuple(t.shape) and np.array_equal(got[name], want), name


# ----------------------------------------------------------------------------------------------------------
# (b) HOMER: the worked example of HOMER_SPEC.md section L and its variants
# ----------------------------------------------------------------------------------------------------------

V = 32


def run_homer(C=24, L=8, W=2, M=8, T=8, P=1, S=1, seed=0, reduction="calibrated", bias=None, model_seed=0):
    config, weights = tiny_model(L=L, V=V, seed=model_seed)
    rng = np.random.default_rng(seed)
    prefix, context, suffix = (list(map(int, rng.integers(0, V, n))) for n in (P, C, S))
    if reduction == "calibrated" and bias is None:
        bias = rng.normal(size=(L, M)) * 0.5
    out = homer_np.homer_prefill(
        config, weights, prefix, context, suffix, M, T, W, bias=bias, reduction=reduction, seed=seed
    )
    return out, (config, weights, prefix, context, suffix)


def node_table(out):
    """(level, index, layers, target, tokens in, tokens out) per node, in execution order."""
    return [
        (n["level"], n["index"], n["layers"], n["target"], len(n["input_positions"]), len(n["kept"]))
        for n in out["nodes"]
    ]


def check_node_records(out):
    for n in out["nodes"]:
        n_in = len(n["input_positions"])
        assert n["input_positions"].dtype == np.int64
        assert np.array_equal(np.union1d(n["kept"], n["removed"]), np.arange(n_in))
        assert np.all(np.diff(n["kept"]) > 0) and np.all(np.diff(n["removed"]) > 0)
        assert len(n["kept"]) == min(n_in, n["target"])
        if len(n["removed"]) == 0:
            assert n["scores"] is None
        else:
            s = n["scores"]
            assert s.dtype == np.float32 and s.shape == (n_in,)
            # the removed slots are the lowest scores (ties: earlier slot first), never an affix (+inf)
            assert np.all(np.isfinite(s[n["removed"]]))
            assert s[n["removed"]].max() <= s[n["kept"]].min()


def check_cache(out, K, L, V=V):
    assert out["positions"].dtype == np.int64 and out["positions"].shape == (K,)
    assert len(out["keys"]) == len(out["values"]) == L
    for k, v in zip(out["keys"], out["values"]):
        assert k.shape == v.shape == (2, K, 4) and k.dtype == np.float64
    assert out["logits"].shape == (K, V)
    assert out["last_position"] == int(out["positions"][-1])


def test_worked_example_section_L():
    out, _ = run_homer()
    leaf, h1, root = (0, 4), (4, 6), (6, 8)
    assert node_table(out) == [
        (0, 0, leaf, 5, 8, 5),  # A
        (0, 1, leaf, 5, 8, 5),  # B
        (1, 0, h1, 5, 8, 5),  # AB
        (0, 2, leaf, 5, 8, 5),  # C
        (0, 3, leaf, 5, 8, 5),  # D
        (1, 1, h1, 5, 8, 5),  # CD
        (2, 0, root, 8, 8, 8),  # root: nothing pruned
    ]
    check_node_records(out)
    check_cache(out, K=8, L=8)
    assert out["last_position"] == 7
    nodes = out["nodes"]
    for leaf_node in nodes[0], nodes[1], nodes[3], nodes[4]:
        assert list(leaf_node["input_positions"]) == list(range(8))  # [0 | 1..6 | 7]
    # merges: positions [prefix_L | ctx_L | ctx_R | suffix_R], reused without re-indexing
    for merged, (a, b) in ((nodes[2], (nodes[0], nodes[1])), (nodes[5], (nodes[3], nodes[4]))):
        pa, pb = a["input_positions"][a["kept"]], b["input_positions"][b["kept"]]
        assert list(merged["input_positions"]) == [0, *pa[1:-1], *pb[1:-1], 7]
    ab, cd = nodes[2], nodes[5]
    want_root = [0, *ab["input_positions"][ab["kept"]][1:-1], *cd["input_positions"][cd["kept"]][1:-1], 7]
    assert list(nodes[6]["input_positions"]) == want_root == list(out["positions"])


def test_worked_example_cache_slots_come_from_the_leaves():
    """Propagative refinement: a kept context slot's K/V in layers 0-3 are its leaf's plain-forward K/V."""
    out, (config, weights, prefix, context, suffix) = run_homer()
    nodes = out["nodes"]
    # Follow every final slot back to (leaf, index in that leaf), through the kept/removed records.
    leaves = {0: nodes[0], 1: nodes[1], 2: nodes[3], 3: nodes[4]}
    ab_in = [("p",)] + [(0, i) for i in leaves[0]["kept"][1:-1]] + [(1, i) for i in leaves[1]["kept"][1:-1]]
    cd_in = [("p",)] + [(2, i) for i in leaves[2]["kept"][1:-1]] + [(3, i) for i in leaves[3]["kept"][1:-1]]
    ab_out = [(ab_in + [("s",)])[i] for i in nodes[2]["kept"]]
    cd_out = [(cd_in + [("s",)])[i] for i in nodes[5]["kept"]]
    root_in = ab_out[:-1] + cd_out[1:]
    assert len(root_in) == 8 and root_in[0] == ("p",) and root_in[-1] == ("s",)
    plain = {
        i: llama_np.forward_cache(config, weights, prefix + context[6 * i : 6 * i + 6] + suffix, range(8))
        for i in range(4)
    }
    for slot, origin in enumerate(root_in):
        for layer in range(4):  # the leaves' own layers
            if origin == ("p",):  # the averaged prefix equals each leaf's prefix (causal attention)
                want_k = plain[0][1][layer][:, 0]
            elif origin == ("s",):
                continue  # the suffix is an average over contexts
            else:
                leaf_i, idx = origin
                want_k = plain[leaf_i][1][layer][:, idx]
                np.testing.assert_array_equal(out["values"][layer][:, slot], plain[leaf_i][2][layer][:, idx])
            np.testing.assert_array_equal(out["keys"][layer][:, slot], want_k)
    # The suffix slot holds ((A + B)/2 + (C + D)/2)/2 of the leaves' suffix K/V in the leaves' layers.
    for layer in range(4):
        for j, cache in ((1, out["keys"]), (2, out["values"])):
            sfx = [plain[i][j][layer][:, -1] for i in range(4)]
            want = ((sfx[0] + sfx[1]) / 2 + (sfx[2] + sfx[3]) / 2) / 2
            np.testing.assert_allclose(cache[layer][:, -1], want, rtol=0, atol=1e-14)


def test_variant_short_last_leaf_C14():
    out, _ = run_homer(C=14)  # E = 6, N = 4, e = 4, last leaf 2 context tokens
    leaf, h1, root = (0, 4), (4, 6), (6, 8)
    assert node_table(out) == [
        (0, 0, leaf, 5, 6, 5),
        (0, 1, leaf, 5, 6, 5),
        (1, 0, h1, 5, 8, 5),
        (0, 2, leaf, 6, 6, 6),  # short-right rule: left target M - (r0 - P - S) = 8 - 2 = 6
        (0, 3, leaf, 4, 4, 4),  # right target r0 = 4 (the raw last leaf): nothing pruned
        (1, 1, h1, 5, 8, 5),
        (2, 0, root, 8, 8, 8),
    ]
    assert list(out["nodes"][4]["input_positions"]) == [0, 1, 2, 5]  # suffix at P + e = 5: a gap
    assert out["nodes"][3]["scores"] is None and out["nodes"][4]["scores"] is None
    check_node_records(out)
    check_cache(out, K=8, L=8)
    assert out["last_position"] == 5


def test_variant_eight_leaves_C40():
    out, _ = run_homer(C=40)  # N = 8, e = 5, lpc = 1, lo = 2
    table = node_table(out)
    assert [t[:2] for t in table] == [
        (0, 0), (0, 1), (1, 0), (0, 2), (0, 3), (1, 1), (2, 0),
        (0, 4), (0, 5), (1, 2), (0, 6), (0, 7), (1, 3), (2, 1), (3, 0),
    ]  # fmt: skip
    layers_by_level = {lvl: {t[2] for t in table if t[0] == lvl} for lvl in range(4)}
    assert layers_by_level == {0: {(0, 5)}, 1: {(5, 6)}, 2: {(6, 7)}, 3: {(7, 8)}}
    assert all(t[4:] == (7, 5) for t in table if t[0] == 0)
    assert all(t[4:] == (8, 5) for t in table if t[0] in (1, 2))
    assert table[-1][3:] == (8, 8, 8)
    check_node_records(out)
    check_cache(out, K=8, L=8)
    assert out["last_position"] == 6  # P + e + S - 1


def test_variant_leftover_layer_L9():
    out, _ = run_homer(L=9)  # Lm = 7, H = 2: lpc = 2, lo = 1 -> leaves 0-4, h1 5-6, root 7-8
    assert {(t[0], t[2]) for t in node_table(out)} == {(0, (0, 5)), (1, (5, 7)), (2, (7, 9))}
    check_node_records(out)
    check_cache(out, K=8, L=9)


def test_variant_small_target_T6():
    out, _ = run_homer(T=6)
    root = out["nodes"][-1]
    assert (root["layers"], root["target"], len(root["input_positions"]), len(root["removed"])) == (
        (6, 8),
        6,
        8,
        2,
    )
    assert [t[3] for t in node_table(out)[:-1]] == [5] * 6  # children targets do not depend on T
    check_node_records(out)
    check_cache(out, K=6, L=8)
    assert out["last_position"] == 7
    assert list(out["positions"]) == list(root["input_positions"][root["kept"]])


# ----------------------------------------------------------------------------------------------------------
# Scoring and selection rules (D.1, D.2, N.2.3, N.2.4)
# ----------------------------------------------------------------------------------------------------------


def test_select_ties_remove_the_earlier_slot():
    inf = np.float32(np.inf)
    scores = np.array([inf, 0.5, 0.0, 0.0, -1.0, 0.0, inf], dtype=np.float32)
    kept, removed = homer_np.select(scores, 3)
    assert list(removed) == [2, 3, 4] and list(kept) == [0, 1, 5, 6]
    kept, removed = homer_np.select(scores, 0)
    assert list(removed) == [] and list(kept) == list(range(7))


def test_bias_is_indexed_by_position_distance():
    """A bias that falls steeply with distance removes the slots nearest the end IN POSITION SPACE."""
    L, M = 8, 8
    bias = np.tile(1e4 * (M - np.arange(M, dtype=np.float64)), (L, 1))  # bias[l][d] = 1e4 (M - d)
    out, _ = run_homer(bias=bias)
    nodes = out["nodes"]
    for leaf in nodes[0], nodes[1], nodes[3], nodes[4]:
        assert list(leaf["removed"]) == [4, 5, 6]  # positions 4, 5, 6: distances 3, 2, 1
    # AB's input positions are [0, 1,2,3, 1,2,3, 7]: both slots at position 3 (sequence distances 4 and 1)
    # go first
    ab = nodes[2]
    assert list(ab["input_positions"]) == [0, 1, 2, 3, 1, 2, 3, 7]
    assert {3, 6} <= set(ab["removed"].tolist()) and set(ab["removed"].tolist()) <= {2, 3, 5, 6}


def test_leaf_scores_match_hf_last_query_logits():
    """D.1 + N.2.2 from HF's own pieces: max over query heads of q_last . k / sqrt(Dh), RoPE applied, each
    query head against its KV group, minus float32(bias[layer][pos_last - pos]); affixes +inf."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.llama import modeling_llama as hf

    bias = np.random.default_rng(0).normal(size=(8, 8))
    out, (config, weights, prefix, context, suffix) = run_homer(bias=bias)
    cfg = transformers.LlamaConfig(
        vocab_size=V,
        hidden_size=16,
        intermediate_size=24,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        rope_theta=10000.0,
        rms_norm_eps=1e-6,
        tie_word_embeddings=True,
        attn_implementation="eager",
    )
    model = transformers.LlamaForCausalLM(cfg).to(torch.float64).eval()
    state = {k: torch.from_numpy(v) for k, v in weights.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and set(missing) <= {"lm_head.weight"}
    layer = 3  # the leaves' reduction layer
    captured = {}
    attn = model.model.layers[layer].self_attn
    hooks = [
        attn.q_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("q", o)),
        attn.k_proj.register_forward_hook(lambda m, i, o: captured.__setitem__("k", o)),
    ]
    for leaf_i, node in zip(range(4), [out["nodes"][j] for j in (0, 1, 3, 4)]):
        ids = prefix + context[6 * leaf_i : 6 * leaf_i + 6] + suffix
        pos = torch.arange(8)[None]
        with torch.no_grad():
            model(input_ids=torch.tensor([ids]), position_ids=pos)
            q = captured["q"].view(1, 8, 4, 4).transpose(1, 2)  # [B, Hq, n, Dh]
            k = captured["k"].view(1, 8, 2, 4).transpose(1, 2)  # [B, Hkv, n, Dh]
            cos, sin = model.model.rotary_emb(q, pos)
            q, k = hf.apply_rotary_pos_emb(q, k, cos, sin)
            k = hf.repeat_kv(k, 2)  # query head h uses KV head h // 2
            logits = (q[0, :, -1:] @ k[0].transpose(1, 2))[:, 0] / math.sqrt(4)  # [Hq, n]
        want = logits.max(dim=0).values.numpy().astype(np.float32)
        want = want - bias[layer][7 - np.arange(8)].astype(np.float32)
        want[[0, 7]] = np.inf
        got = node["scores"]
        assert np.array_equal(np.isinf(got), np.isinf(want))
        assert np.abs(got[1:7] - want[1:7]).max() <= HF_SCORE_ATOL, report(got[1:7], want[1:7])
    for h in hooks:
        h.remove()


def test_uncalibrated_equals_zero_bias():
    zero = np.zeros((8, 8))
    a, _ = run_homer(reduction="uncalibrated", bias=zero + 123.0)  # the bias is ignored by this mode
    b, _ = run_homer(reduction="calibrated", bias=zero)
    for na, nb in zip(a["nodes"], b["nodes"]):
        assert np.array_equal(na["kept"], nb["kept"])
        assert (na["scores"] is None and nb["scores"] is None) or np.array_equal(na["scores"], nb["scores"])
    assert np.array_equal(a["logits"], b["logits"])


def test_splitmix64_reference_outputs():
    # Published first outputs of SplitMix64 (Vigna's splitmix64.c) for seeds 0 and 1234567.
    assert homer_np.splitmix64(0) == 0xE220A8397B1DCDAF
    assert homer_np.splitmix64(0x9E3779B97F4A7C15) == 0x6E789E6AA1B965F4
    assert homer_np.splitmix64(1234567) == 6457827717110365317
    assert homer_np.splitmix64(1234567 + 0x9E3779B97F4A7C15) == 3203168211198807973


def test_random_reduction_scores():
    out, _ = run_homer(reduction="random", seed=7)
    again, _ = run_homer(reduction="random", seed=7)
    for n, m in zip(out["nodes"], again["nodes"]):
        assert np.array_equal(n["kept"], m["kept"])
    sm = homer_np.splitmix64
    for n in out["nodes"]:
        if n["scores"] is None:
            continue
        key = sm(sm(sm(7) ^ n["level"]) ^ n["index"])
        want = np.array([(sm(key ^ j) >> 11) * 2.0**-53 for j in range(len(n["scores"]))], dtype=np.float32)
        want[0] = want[-1] = np.inf  # P = S = 1: affixes
        assert np.array_equal(n["scores"], want)
    check_node_records(out)


# ----------------------------------------------------------------------------------------------------------
# (c) N.3: one chunk and no reduction is exactly the plain forward
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("P", "C", "S", "M", "T", "W", "reduction"),
    [
        (2, 5, 2, 12, 12, 1, "calibrated"),  # C < E
        (1, 6, 1, 8, 8, 2, "uncalibrated"),  # C = E exactly
        (0, 4, 3, 10, 50, 0, "random"),  # P = 0, T > P+C+S
        (2, 0, 2, 6, 6, 3, "calibrated"),  # C = 0: the plain forward of prefix + suffix
    ],
)
def test_single_chunk_equals_plain_forward(P, C, S, M, T, W, reduction):
    L = 4
    config, weights = tiny_model(L=L, V=V, seed=3, tie=False)
    rng = np.random.default_rng(5)
    prefix, context, suffix = (list(map(int, rng.integers(0, V, n))) for n in (P, C, S))
    bias = rng.normal(size=(L, M))
    out = homer_np.homer_prefill(config, weights, prefix, context, suffix, M, T, W, bias, reduction)
    logits, keys, values = llama_np.forward_cache(config, weights, prefix + context + suffix)
    K = P + C + S
    assert node_table(out) == [(0, 0, (0, L), K, K, K)]
    assert out["nodes"][0]["scores"] is None
    assert np.array_equal(out["positions"], np.arange(K)) and out["last_position"] == K - 1
    assert np.array_equal(out["logits"], logits)  # bit-identical in float64
    for layer in range(L):
        assert np.array_equal(out["keys"][layer], keys[layer])
        assert np.array_equal(out["values"][layer], values[layer])


# ----------------------------------------------------------------------------------------------------------
# (d) N.2.6: clear errors
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (dict(S=0), r"S = 0"),
        (dict(M=2), r"max_chunk_len M = 2 must exceed prefix \+ suffix"),
        (dict(P=3, S=3, M=12, T=5), r"target_len T = 5 is below prefix \+ suffix = 6"),
        (dict(W=8), r"warmup_layers W = 8 must satisfy 0 <= W < L = 8"),
        (
            dict(L=4, W=2),  # H = 2 needs 3 blocks, 2 remain; 2**(L-W-1) * E = 12 tokens
            r"too few layers.*\* E = 12 context tokens.*max_chunk_len >= 14 or warmup_layers <= 1",
        ),
        (dict(M=4, C=5, W=0), r"last leaf would hold -1 context tokens"),  # E = 2, N = 4, e = 2
        (dict(M=4, C=6, W=0), r"last leaf would hold 0 context tokens.*max_chunk_len ="),
    ],
)
def test_value_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        run_homer(reduction="uncalibrated", **kwargs)


@pytest.mark.parametrize("shape", [(8, 7), (7, 8), (8,), (8, 8, 1)])
def test_bad_bias_shape(shape):
    with pytest.raises(ValueError, match=r"bias table has shape"):
        run_homer(bias=np.zeros(shape))


def test_missing_bias_and_unknown_mode():
    config, weights = tiny_model()
    with pytest.raises(ValueError, match=r"needs a bias table"):
        homer_np.homer_prefill(config, weights, [1], [2] * 10, [3], 8, 8, 2)
    with pytest.raises(ValueError, match=r"unknown reduction"):
        homer_np.homer_prefill(config, weights, [1], [2] * 10, [3], 8, 8, 2, reduction="topk")


@pytest.mark.parametrize("bad", [-1, V])
def test_token_ids_outside_vocab(bad):
    config, weights = tiny_model(V=V)
    with pytest.raises(ValueError, match=r"token ids must lie in \[0, vocab_size = 32\)"):
        homer_np.homer_prefill(config, weights, [1], [2, bad, 3], [4], 8, 8, 2, reduction="uncalibrated")


def test_config_json_roundtrip(tmp_path):
    """load_hf keeps config.json as a plain dict and the HF weight names (no transformers needed)."""
    config, weights = tiny_model(L=2, tie=True)
    st = pytest.importorskip("safetensors.numpy")
    st.save_file({k: v.astype(np.float32) for k, v in weights.items()}, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(config))
    cfg, w = llama_np.load_hf(str(tmp_path))
    assert cfg == config and set(w) == set(weights) and "lm_head.weight" not in w
    np.testing.assert_array_equal(w["model.norm.weight"], weights["model.norm.weight"].astype(np.float32))
