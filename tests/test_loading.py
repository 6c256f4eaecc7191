"""Checkpoint and tokenizer loading (homer_ref/loading/) against independent sources.

- HF checkpoints as transformers 5 writes them: sharded (index + several files), bf16 weights, tied embeddings
  (no lm_head in the file), and hand-written configs in the older `rope_scaling` + `rope_theta` spelling.
- llama2.c's stories260K.bin vs an independent conversion (written from the data's README) run through the
  NumPy oracle: the interleaved -> half-split q/k permutation, GQA and tied head.
- The tokenizer's documented facts; every malformed input is a `CheckpointError` (a ValueError) naming the tensor,
  field or file at fault.
"""

import json
import os
import subprocess
import sys

import pytest
import torch
from helpers import (
    BAD_INPUTS,
    ROOT,
    assert_close,
    build_bad_inputs,
    hf_logits,
    hf_to_gguf_rows,
    llama2c_to_hf_dir,
    make_hf_llama,
    our_logits,
    write_tiny_gguf,
)
from safetensors import safe_open

from homer_ref import CheckpointError, load_model, load_tokenizer
from homer_ref.loading import parse_config
from reference import llama_np

TOKENS = [5, 17, 3, 3, 60, 0, 42, 8, 8, 8, 23, 59, 1, 2, 31, 44]
POSITIONS = [0, 1, 2, 3, 40, 41, 41, 42, 60, 61, 62, 10, 11, 70, 71, 99]  # past the original contexts used
GQA = dict(num_attention_heads=6, num_key_value_heads=2, head_dim=10, hidden_size=24, num_hidden_layers=3)


def test_sharded_checkpoint(tiny_hf_model):
    """A checkpoint split over several safetensors files with an index loads to HF's logits."""
    model_dir, hf = tiny_hf_model(max_shard_size="8KB", **GQA)
    shards = sorted(p.name for p in model_dir.glob("model-*.safetensors"))
    assert (model_dir / "model.safetensors.index.json").is_file() and len(shards) > 2, f"not sharded: {shards}"
    assert not (model_dir / "model.safetensors").exists()
    ours = load_model(model_dir)
    assert_close(our_logits(ours, TOKENS, POSITIONS), hf_logits(hf, TOKENS, POSITIONS), "hf_float32", "sharded")


@pytest.mark.parametrize("tie", [False, True])
def test_bf16_checkpoint_loaded_in_float32_equals_hf_upcast(tiny_hf_model, tie):
    """bf16 weights loaded with dtype=float32 are exactly HF's bf16 weights upcast, and give HF's logits."""
    model_dir, hf = tiny_hf_model(save_dtype=torch.bfloat16, tie_word_embeddings=tie, **GQA)
    # HF's model with its weights rounded to bf16 and upcast. A fresh model gets them through load_state_dict, since
    # `hf.to(bfloat16).to(float32)` would also round HF's RoPE inv_freq buffer to bf16 (moving logits by ~1e-2).
    upcast = type(hf)(hf.config).eval()
    upcast.load_state_dict({k: v.to(torch.bfloat16).to(torch.float32) for k, v in hf.state_dict().items()})
    ours = load_model(model_dir, dtype=torch.float32)
    assert ours.embed_tokens.weight.dtype == torch.float32
    for name, p in upcast.named_parameters():  # exact: bf16 -> float32 is lossless
        ours_name = name.removeprefix("model.")
        assert torch.equal(ours.get_parameter(ours_name), p), f"{name} differs from HF's bf16 weight upcast"
    assert not torch.equal(upcast.model.embed_tokens.weight, hf.model.embed_tokens.weight), "bf16 rounded nothing"
    assert_close(our_logits(ours, TOKENS, POSITIONS), hf_logits(upcast, TOKENS, POSITIONS), "hf_bf16_weights", "bf16")


# Older configs (transformers 4): `rope_scaling` with `type` or `rope_type`, and a top-level `rope_theta`.
# name: (what config.json gets as "rope_scaling", with OMIT for no key; the same settings in v5 spelling)
OMIT = "omit"
OLD_SPELLINGS = {
    "theta only": (OMIT, {"rope_type": "default"}),
    "rope_scaling null": (None, {"rope_type": "default"}),
    "linear with 'type'": ({"type": "linear", "factor": 2.0}, {"rope_type": "linear", "factor": 2.0}),
    "llama3": (
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
        {
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    ),
    "yarn with 'type'": (
        {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
        {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16},
    ),
    "dynamic with 'type'": ({"type": "dynamic", "factor": 2.0}, {"rope_type": "dynamic", "factor": 2.0}),
}


@pytest.mark.parametrize("name", sorted(OLD_SPELLINGS))
def test_old_rope_scaling_spelling(tiny_hf_model, name):
    """A hand-written v4-style config.json gives the logits of the HF v5 model with the same rope settings."""
    old, v5 = OLD_SPELLINGS[name]
    theta = 500.0
    model_dir, hf = tiny_hf_model(max_position_embeddings=32, rope_parameters={**v5, "rope_theta": theta}, **GQA)
    config = json.loads((model_dir / "config.json").read_text())
    del config["rope_parameters"]
    config["rope_theta"] = theta
    if old != OMIT:
        config["rope_scaling"] = old
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    ours = load_model(model_dir)
    expected = hf_logits(hf, TOKENS, POSITIONS)
    assert_close(our_logits(ours, TOKENS, POSITIONS), expected, "hf_float32", f"old spelling '{name}'")


# Both spellings in one config.json (a v4 file edited by hand, or a v5 export of a v4 file): transformers takes a
# non-empty rope_scaling whole and ignores rope_parameters; the base comes from the chosen dict, else the top level.
BOTH_SPELLINGS = {
    "rope_scaling wins": dict(rope_parameters={"rope_type": "default", "rope_theta": 500.0},
                              rope_scaling={"type": "linear", "factor": 2.0}, rope_theta=300.0),
    "rope_scaling wins, its own theta": dict(
        rope_parameters={"rope_type": "linear", "factor": 4.0, "rope_theta": 700.0},
        rope_scaling={"type": "dynamic", "factor": 2.0, "rope_theta": 200.0}),
    "null rope_scaling": dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 500.0},
                              rope_scaling=None, rope_theta=300.0),
    "empty rope_scaling": dict(rope_parameters={"rope_type": "linear", "factor": 2.0}, rope_scaling={},
                               rope_theta=300.0),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BOTH_SPELLINGS))
def test_both_spellings_in_one_config_follow_transformers(tiny_hf_model, name):
    """homer_ref's loader and the NumPy oracle read such a config as transformers' from_pretrained does."""
    import transformers

    model_dir, _ = tiny_hf_model(max_position_embeddings=16, **GQA)
    config = json.loads((model_dir / "config.json").read_text())
    config.pop("rope_theta", None)
    config.update(BOTH_SPELLINGS[name])
    (model_dir / "config.json").write_text(json.dumps(config, indent=2))
    hf = transformers.LlamaForCausalLM.from_pretrained(model_dir, attn_implementation="eager").eval()
    positions = list(range(24))  # past max_position_embeddings, so that dynamic scaling acts too
    tokens = [t % 61 for t in range(5, 5 + 3 * len(positions), 3)]
    expected = hf_logits(hf, tokens, positions)
    assert_close(our_logits(load_model(model_dir), tokens, positions), expected, "hf_float32", name)
    np_config, weights = llama_np.load_hf(str(model_dir))
    oracle = llama_np.forward(np_config, weights, tokens, positions)
    assert_close(oracle, expected, "hf_float32", f"{name} (oracle)")


def test_both_config_spellings_parse_to_the_same_config():
    base = dict(vocab_size=32, hidden_size=16, intermediate_size=24, num_hidden_layers=2, num_attention_heads=4)
    scaling = {"factor": 4.0, "original_max_position_embeddings": 64, "beta_fast": 16.0}
    v4 = parse_config({**base, "rope_theta": 5e5, "rope_scaling": {"type": "yarn", **scaling}})
    v5 = parse_config({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 5e5, **scaling}})
    assert v4 == v5
    assert (v5.rope_theta, v5.rope_scaling.rope_type, v5.rope_scaling.factor) == (5e5, "yarn", 4.0)
    assert (v5.num_key_value_heads, v5.head_dim) == (4, 4)  # defaults: MHA, D / Hq


def test_config_and_safetensors_paths_load_the_directory(tiny_hf_model):
    model_dir, hf = tiny_hf_model(**GQA)
    expected = hf_logits(hf, TOKENS)
    for path in (model_dir, model_dir / "config.json", model_dir / "model.safetensors"):
        assert_close(our_logits(load_model(path), TOKENS), expected, "hf_float32", f"load_model({path.name})")


def test_float64_load_of_a_tied_checkpoint(tiny_hf_model):
    """HF saves a tied model without lm_head.weight; the loader ties the head to the embedding, in float64."""
    model_dir, _ = tiny_hf_model(tie_word_embeddings=True, **GQA)
    assert "lm_head.weight" not in safe_open(str(model_dir / "model.safetensors"), "pt").keys()
    model = load_model(model_dir, dtype=torch.float64)
    assert torch.equal(model.lm_head.weight, model.embed_tokens.weight)
    assert {p.dtype for p in model.parameters()} == {torch.float64}
    assert model(torch.tensor([TOKENS])).dtype == torch.float64


# ----------------------------------------------------------------------------------------------- llama2.c


def test_stories260k_bin_matches_oracle_on_independent_conversion(stories_dir, tmp_path):
    """load_model(stories260K.bin) vs llama_np.forward on the same weights converted to HF by `llama2c_to_hf_dir`
    (written from the README's format notes, not from loading.py), and the two loads hold identical weights."""
    llama2c_to_hf_dir(stories_dir / "stories260K.bin", tmp_path)
    from_bin, from_dir = load_model(stories_dir / "stories260K.bin"), load_model(tmp_path)
    assert from_bin.cfg == from_dir.cfg
    cfg = from_bin.cfg
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads) == (64, 5, 8, 4)
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.tie_word_embeddings) == (512, 512, True)
    for name, p in from_dir.named_parameters():
        assert torch.equal(from_bin.get_parameter(name), p), f"{name}: .bin and converted directory differ"
    config, weights = llama_np.load_hf(str(tmp_path))
    tokens = [1, 403, 407, 261, 378, 395, 260, 363, 274, 435, 268, 300, 315, 421, 385, 302, 259, 281, 290, 2, 1, 17]
    positions = [0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 300, 301, 302, 303, 40, 41, 42, 600, 601]
    for pos in (None, positions):
        expected = llama_np.forward(config, weights, tokens, pos)
        assert_close(our_logits(from_bin, tokens, pos), expected, "stories_oracle_float32", f"stories, positions={pos}")


def test_tokenizer_facts(stories_dir):
    """The README's facts about tok512.model: 512 pieces, bos 1, eos 2, and text round-trips."""
    tok = load_tokenizer(stories_dir / "tok512.model")
    assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (512, 1, 2)
    text = "Once upon a time, there was a little girl named Lily."
    ids = tok.encode(text)
    assert ids[0] == 1 and 1 not in ids[1:] and tok.encode(text, bos=False) == ids[1:]
    assert tok.decode(ids) == text


def test_tokenizer_directory_without_tokenizer_model(tmp_path):
    with pytest.raises(CheckpointError, match="tokenizer.model"):
        load_tokenizer(tmp_path)


# ----------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_inputs(tmp_path_factory):
    from helpers import make_hf_llama

    root = tmp_path_factory.mktemp("bad")
    make_hf_llama(root / "good", **GQA)
    return build_bad_inputs(root, root / "good")


@pytest.mark.parametrize("name", [name for name in BAD_INPUTS if name != "tokenizer of another vocabulary"])
def test_bad_input_raises_an_error_naming_the_culprit(bad_inputs, name):
    """Each malformed input raises one ValueError (a CheckpointError for files) whose message names what is wrong."""
    case = bad_inputs[name]
    with pytest.raises(case.api_error) as info:
        case.api()
    assert issubclass(case.api_error, ValueError)
    message = str(info.value)
    assert "\n" not in message, f"multi-line message: {message!r}"
    for fragment in case.names:
        assert fragment in message, f"{name}: {fragment!r} not in {message!r}"


# ----------------------------------------------------------------------------------------------- loading memory

# The peak resident set of loading a checkpoint, measured in a fresh process from just after `import torch`.
LOAD_PEAK = """
import resource, sys, torch
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
from homer_ref import load_model
model = load_model(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
weights = sum(p.numel() * p.element_size() for p in model.parameters())
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) * 1024 / weights)
"""
# A model built with random initialisation and then overwritten, or a file read whole beside its copy, peaks at
# 2x the weights or more (2.4x-2.9x measured before the loaders were made lazy); one tensor at a time beside the
# model, ~1.1-1.25x here. Fixed costs (homer_ref's and gguf's imports, ~15 MB) are ~0.1x of these ~130 MB models.
LOAD_PEAK_RATIO = 1.5
MID = dict(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
           num_key_value_heads=4, head_dim=64, max_position_embeddings=512)  # fmt: skip  # ~30M parameters


def write_llama2c(path, hf) -> None:
    """`hf` (a float32 transformers Llama with a tied head) as a llama2.c legacy .bin, written from its README's
    order: header, embedding, per-layer arrays (q/k in Meta's interleaved pairs), final norm, RoPE tables."""
    import struct

    import numpy as np

    cfg, sd = hf.config, {k: v.numpy() for k, v in hf.state_dict().items()}
    L, Hq, Hkv = cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads
    header = (cfg.hidden_size, cfg.intermediate_size, L, Hq, Hkv, cfg.vocab_size, cfg.max_position_embeddings)
    rows = {"self_attn.q_proj.weight": Hq, "self_attn.k_proj.weight": Hkv}
    order = ["input_layernorm.weight", "self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight",
             "self_attn.o_proj.weight", "post_attention_layernorm.weight", "mlp.gate_proj.weight",
             "mlp.down_proj.weight", "mlp.up_proj.weight"]  # fmt: skip
    with open(path, "wb") as f:
        f.write(struct.pack("<7i", *header))
        f.write(sd["model.embed_tokens.weight"].astype("<f4").tobytes())
        for name in order:
            for i in range(L):
                w = sd[f"model.layers.{i}.{name}"]
                f.write((hf_to_gguf_rows(w, rows[name]) if name in rows else w).astype("<f4").tobytes())
        f.write(sd["model.norm.weight"].astype("<f4").tobytes())
        f.write(np.zeros(2 * cfg.max_position_embeddings * cfg.head_dim // 2, dtype="<f4").tobytes())


@pytest.fixture(scope="module")
def mid_checkpoints(tmp_path_factory):
    """One random ~120 MB (float32) Llama in every format: HF (float32 and bf16), llama2.c .bin, Q8_0 GGUF."""
    pytest.importorskip("gguf")
    root = tmp_path_factory.mktemp("mid")
    hf = make_hf_llama(root / "hf", tie_word_embeddings=True, **MID)
    make_hf_llama(root / "hf_bf16", tie_word_embeddings=True, save_dtype=torch.bfloat16, **MID)
    write_llama2c(root / "model.bin", hf)
    write_tiny_gguf(root / "model.gguf", hf, "Q8_0")
    return {"hf": root / "hf", "hf_bf16": root / "hf_bf16", "llama2c": root / "model.bin", "gguf": root / "model.gguf"}


@pytest.mark.parametrize(
    "fmt, dtype",
    [
        ("hf", "float32"),
        ("hf_bf16", "float32"),
        ("llama2c", "float32"),
        ("gguf", "float32"),
        ("hf", "bfloat16"),
    ],  # fmt: skip
)
def test_loading_peaks_near_the_weights(mid_checkpoints, fmt, dtype):
    """Loading holds one copy of the model (built on the meta device, tensors assigned one at a time), not two."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", LOAD_PEAK, str(mid_checkpoints[fmt]), dtype], env=env,
                          capture_output=True, text=True, timeout=300, check=False)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    ratio = float(proc.stdout)
    assert ratio <= LOAD_PEAK_RATIO, f"{fmt} loaded as {dtype} peaked at {ratio:.2f}x its weights"
