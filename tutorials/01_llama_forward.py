# %% [markdown]
# # 01 · The Llama forward pass, layer by layer
#
# HOMER never changes a Llama's weights: it only decides *which tokens* go through *which layers*. So before
# HOMER, we need the forward pass itself, opened up. This tutorial runs `homer_ref/llama.py` one step at a time
# on a real (tiny) pretrained model and checks every step against an independent float64 NumPy implementation
# (`reference/llama_np.py`, "the oracle").
#
# You will see:
# 1. the model's configuration and how a sentence becomes token ids;
# 2. RoPE, the rotary position encoding, and why a query–key product only depends on the *distance* between
#    positions (HOMER relies on this when it reuses position ids);
# 3. one decoder layer split into its two halves, `attend` and `feed_forward` — HOMER prunes tokens between them;
# 4. all layers, the final logits, and the KV cache that generation (and HOMER's output) is made of;
# 5. the oracle check, layer by layer.
#
# Shapes use one legend everywhere in homer_ref: `B` batch, `T` tokens, `D` hidden size, `Hq` query heads,
# `Hkv` key/value heads, `Dh` head dimension, `V` vocabulary, `L` layers.
#
# The subject is **stories260K** (Karpathy's llama2.c TinyStories model: 5 layers, 260K parameters, trained
# with a 512-token context), read from `../shared/data/stories260K/`. Without that folder the tutorial builds a
# tiny random model of the same shape and says so: everything still runs, the text is just nonsense.
#
# Run it with `python tutorials/01_llama_forward.py`, or open it as a notebook (VS Code, or Jupyter with
# jupytext) and run the cells in order.

# %%
import copy
import json
import shutil
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()  # in Jupyter: tutorials/
ROOT = HERE.parent  # the project root: homer_ref/ and reference/ live here
sys.path.insert(0, str(ROOT))
STORIES = ROOT / "homer_ref" / "data" / "stories260K"

import homer_ref
from homer_ref.llama import Llama, LlamaConfig, apply_rope, rope_cos_sin
from homer_ref.loading import checkpoint_names
from reference import llama_np


class ByteTokenizer:
    """Stand-in for the sentencepiece tokenizer when stories260K is absent: one token per byte (ids 3..258)."""

    bos_id = 1

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return [self.bos_id] * bos + [3 + b for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if 3 <= int(i) < 259).decode("utf-8", errors="replace")


def load_subject() -> tuple[Llama, object, bool]:
    """(model, tokenizer, is_real): stories260K when ../shared has it, else a seeded random model of its shape."""
    if (STORIES / "stories260K.bin").is_file() and (STORIES / "tok512.model").is_file():
        model = homer_ref.load_model(STORIES / "stories260K.bin", dtype=torch.float32)
        return model, homer_ref.load_tokenizer(STORIES / "tok512.model"), True
    print(f"note: {STORIES} not found, so this tutorial uses a tiny RANDOM model (seed 0): the text is nonsense")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=5, num_attention_heads=8,
        num_key_value_heads=4, head_dim=8, max_position_embeddings=512, tie_word_embeddings=True,
    )  # fmt: skip
    return Llama(cfg).eval().requires_grad_(False), ByteTokenizer(), False


def piece(token_id: int) -> str:
    """One token as text; sentencepiece writes a leading space as '▁'."""
    return tok.piece(token_id) if IS_REAL else repr(tok.decode([token_id]))


model, tok, IS_REAL = load_subject()
cfg = model.cfg
torch.set_num_threads(1)  # the model is tiny: on a shared CPU, extra threads cost more than they save
print("model:", "stories260K" if IS_REAL else "tiny random stand-in")

# %% [markdown]
# ## 1. The configuration
#
# `LlamaConfig` is a small frozen dataclass with Hugging Face's field names. stories260K uses grouped-query
# attention (GQA): 8 query heads share 4 key/value heads, two query heads per KV head.

# %%
for name, symbol in [
    ("num_hidden_layers", "L"), ("hidden_size", "D"), ("num_attention_heads", "Hq"),
    ("num_key_value_heads", "Hkv"), ("head_dim", "Dh"), ("intermediate_size", "F (MLP width)"),
    ("vocab_size", "V"), ("max_position_embeddings", "trained context"), ("rope_theta", "RoPE base"),
    ("tie_word_embeddings", "output head = embedding"),
]:  # fmt: skip
    print(f"  {symbol:24s} {name:26s} {getattr(cfg, name)}")
print(f"  parameters: {sum(p.numel() for p in model.parameters()):,}")

# %% [markdown]
# ## 2. Text to token ids
#
# The tokenizer turns text into ids; id 1 is BOS, the "beginning of sequence" token every prompt starts with.

# %%
prompt = "Once upon a time, there was a little girl named Lily. She loved to play with her"
ids = tok.encode(prompt)
T = len(ids)
print(f"{T} tokens:")
print(" ".join(f"{i}:{piece(i)}" for i in ids))
x = torch.tensor([ids])  # [B=1, T]
positions = torch.arange(T)  # [T] position ids 0..T-1 (HOMER will pass other ones)

# %% [markdown]
# ## 3. RoPE: positions as rotations
#
# Llama has no position embedding table. Instead, each query and key vector is split into `Dh/2` pairs and
# every pair is rotated by an angle `position × frequency`. homer_ref uses Hugging Face's *half-split* layout:
# dimension `i` is paired with `i + Dh/2`, which is why `cos` repeats itself after `Dh/2` columns.

# %%
cos, sin = rope_cos_sin(cfg, positions, torch.float32)  # each [T, Dh]
Dh = cfg.head_dim
print("cos:", tuple(cos.shape), " first rows (position 0, 1, 2):")
print(cos[:3].numpy().round(3))

# %% [markdown]
# Rotations compose: rotating `q` by angle `a` and `k` by angle `b` changes their dot product only through
# `a − b`. So `q·k` depends on the *distance* between the two positions, not on where they are. Here the same
# vectors are placed at several (query position, key position) pairs with the same distance 3:

# %%
g = torch.Generator().manual_seed(0)
q_vec, k_vec = torch.randn(Dh, generator=g, dtype=torch.float64), torch.randn(Dh, generator=g, dtype=torch.float64)


def rotated_dot(m: int, n: int) -> float:
    """<RoPE(q, position m), RoPE(k, position n)>."""
    c, s = rope_cos_sin(cfg, torch.tensor([m, n]), torch.float64)  # [2, Dh]
    q_rot = apply_rope(q_vec[None, None, None], c[0], s[0])  # apply_rope wants [B, H, T, Dh]
    k_rot = apply_rope(k_vec[None, None, None], c[1], s[1])
    return float((q_rot * k_rot).sum())


pairs = [(3, 0), (10, 7), (100, 97), (400, 397)]
dots = [rotated_dot(m, n) for m, n in pairs]
for (m, n), d in zip(pairs, dots):
    print(f"  query at {m:3d}, key at {n:3d} (distance {m - n}):  q·k = {d:+.12f}")
print(f"  distance 5 instead:             q·k = {rotated_dot(8, 3):+.12f}")

# %% [markdown]
# ## 4. One decoder layer, in two halves
#
# A Llama decoder layer is `h = h + attention(norm(h))`, then `h = h + mlp(norm(h))`. homer_ref exposes the two
# halves separately, because HOMER removes tokens *between* them (after attention, before the MLP):
#
# - `model.attend(layer, h, positions)` returns the new `h`, the layer's keys `k` (already rotated by RoPE) and
#   values `v` — together the layer's **KV cache** — and `last_logits`: the pre-softmax attention logits of the
#   **last** query against every key. HOMER's token reduction ranks tokens by these (tutorial 03).
# - `model.feed_forward(layer, h)` runs the MLP half.

# %%
h = model.embed_tokens(x)  # [1, T, D]
print("embedding h:", tuple(h.shape))
h_attn, k0, v0, last_logits0 = model.attend(0, h, positions)
print("after attention, layer 0:")
print(f"  h           {tuple(h_attn.shape)}   [B, T, D]")
print(f"  k (RoPE'd)  {tuple(k0.shape)}   [B, Hkv, T, Dh]")
print(f"  v           {tuple(v0.shape)}   [B, Hkv, T, Dh]")
print(f"  last_logits {tuple(last_logits0.shape)}     [B, Hq, T]: what the last token '{piece(ids[-1])}' attends to")
h_mlp = model.feed_forward(0, h_attn)
print("after the MLP: h", tuple(h_mlp.shape))

# %% [markdown]
# ## 5. All layers, then the output head
#
# The whole forward pass is this loop. We keep every intermediate to compare with the oracle below. The output
# head (final RMSNorm, then a linear map to the vocabulary) turns the last hidden state into next-token scores.

# %%
steps = {"embedding": h}  # name -> hidden states [1, T, D]
keys, values, last_logits = [], [], []
for layer in range(cfg.num_hidden_layers):
    h, k, v, ll = model.attend(layer, h, positions)
    steps[f"layer {layer} attention"] = h
    h = model.feed_forward(layer, h)
    steps[f"layer {layer} MLP"] = h
    keys.append(k)
    values.append(v)
    last_logits.append(ll)
    print(f"  layer {layer}: rms(h) = {h.pow(2).mean().sqrt():7.3f}   cache k, v {tuple(k.shape)}")
logits = model.logits(h)  # [1, T, V]
top = torch.topk(torch.softmax(logits[0, -1], -1), 5)
print(f"after {prompt!r} the model expects:")
for p, i in zip(top.values, top.indices):
    print(f"  {p:6.1%}  {piece(i)}")

# %% [markdown]
# `model(x)` is exactly this loop (`forward_cached` calls `attend` and `feed_forward` for each layer):

# %%
logits_direct = model(x)
print("max |model(x) - layer-by-layer| =", float((logits_direct - logits).abs().max()))

# %% [markdown]
# ## 6. The KV cache
#
# `forward_cached` also returns the cache: per layer the keys and values of every token seen. Feeding the last
# token alone, with the cache of the others, gives the same logits as the full pass: its query attends to the
# cached keys. Generation works this way — and HOMER's result is exactly such a cache, only much shorter than
# the prompt it summarises.

# %%
_, cache = model.forward_cached(x[:, :-1])  # all but the last token
print("cache of the first T-1 tokens: layer 0 k", tuple(cache[0][0].shape))
logits_step, cache = model.forward_cached(x[:, -1:], cache=cache)  # positions default to T-1
step_diff = float((logits_step[0, -1] - logits[0, -1]).abs().max())
print(f"last token fed alone with the cache: max |Δ logits| = {step_diff:.2e}")

# %% [markdown]
# With stories260K we can also check the model end to end against llama2.c: greedy decoding from BOS alone must
# reproduce the text llama2.c's own test suite expects (`expected_greedy_200.txt`, 200 tokens; the first 100
# keep this tutorial quick). This also shows the llama2.c checkpoint was converted correctly: its RoPE layout
# differs from Hugging Face's, and `loading.py` permutes the q/k weights in one documented place.

# %%
if IS_REAL:
    generated = [tok.bos_id]
    step_logits, cache = model.forward_cached(torch.tensor([generated]))  # cache of BOS alone
    for _ in range(100):
        generated.append(int(step_logits[0, -1].argmax()))  # greedy: the most likely next token
        step_logits, cache = model.forward_cached(torch.tensor([generated[-1:]]), cache=cache)
    text = tok.decode(generated[1:])
    expected = (STORIES / "expected_greedy_200.txt").read_text()
    print(text)
    print("a prefix of llama2.c's expected text:", expected.startswith(text))
else:
    print("(skipped: the golden text belongs to stories260K)")

# %% [markdown]
# ## 7. The oracle check
#
# `reference/llama_np.py` is the same math written independently in float64 NumPy, reading Hugging Face model
# directories. We save our weights as one (`config.json` + `model.safetensors`, named by
# `homer_ref.loading.checkpoint_names`, the one place that maps our names to HF's) and run the oracle's
# building blocks (`embed`, `attention_layer`, `mlp_layer`, `final_logits`) next to ours.

# %%
hf_dir = Path(tempfile.mkdtemp(prefix="homer_tutorial_"))  # removed again once the oracle has read it
hf_config = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
    **{f: getattr(cfg, f) for f in (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_theta", "max_position_embeddings",
        "tie_word_embeddings",
    )},
}  # fmt: skip
(hf_dir / "config.json").write_text(json.dumps(hf_config, indent=2))
params = dict(model.named_parameters())
save_file({hf: params[ours].contiguous() for ours, hf in checkpoint_names(cfg).items()}, hf_dir / "model.safetensors")
np_config, np_weights = llama_np.load_hf(str(hf_dir))  # float64 arrays keyed by HF names
print(f"{hf_dir.name}/: {sorted(p.name for p in hf_dir.iterdir())}; {len(np_weights)} tensors, e.g.")
for name in sorted(np_weights)[:3]:
    print(f"  {name:40s} {np_weights[name].shape}")
shutil.rmtree(hf_dir)

# %%
ids_np = np.array(ids)
h_np = llama_np.embed(np_config, np_weights, ids_np)  # [T, D] float64
oracle = {"embedding": h_np}
oracle_keys, oracle_last_logits = [], []
for layer in range(cfg.num_hidden_layers):
    h_np, k_np, _, ll_np = llama_np.attention_layer(np_config, np_weights, layer, h_np, positions.numpy())
    oracle[f"layer {layer} attention"] = h_np
    h_np = llama_np.mlp_layer(np_config, np_weights, layer, h_np)
    oracle[f"layer {layer} MLP"] = h_np
    oracle_keys.append(k_np)
    oracle_last_logits.append(ll_np)
oracle_logits = llama_np.final_logits(np_config, np_weights, h_np)  # [T, V]


def max_diff(ours: torch.Tensor, theirs: np.ndarray) -> float:
    return float(np.abs(ours.detach().double().numpy() - theirs).max())


print("max |torch float32 - NumPy float64|:")
print(f"  {'step':20s} {'hidden h':>10s} {'keys':>10s} {'last_logits':>12s}")
diffs = {}
for name, ours in steps.items():
    diffs[name] = max_diff(ours[0], oracle[name])
    extra = ""
    if name.endswith("attention"):
        layer = int(name.split()[1])
        diffs[name + " keys"] = max_diff(keys[layer][0], oracle_keys[layer])
        diffs[name + " last_logits"] = max_diff(last_logits[layer][0], oracle_last_logits[layer])
        extra = f" {diffs[name + ' keys']:10.2e} {diffs[name + ' last_logits']:12.2e}"
    print(f"  {name:20s} {diffs[name]:10.2e}{extra}")
diffs["logits"] = max_diff(logits[0], oracle_logits)
print(f"  {'logits':20s} {diffs['logits']:10.2e}")

# %% [markdown]
# Those differences are float32 rounding, not a disagreement about the math: in float64 the torch model matches
# the oracle to ~1e-13.

# %%
model64 = copy.deepcopy(model).to(torch.float64)
diff64 = max_diff(model64(x)[0], oracle_logits)
print(f"float64 torch vs oracle, logits: max |Δ| = {diff64:.2e}")

# %% [markdown]
# ## Checks
#
# - RoPE: the query–key product depends only on the distance (same value for every pair above, not for distance 5).
# - `model(x)` is exactly the layer-by-layer loop; feeding a token with the cache equals the full pass.
# - stories260K reproduces llama2.c's greedy text.
# - Every step agrees with the independent float64 oracle within 1e-4 in float32, and 1e-9 in float64.

# %%
assert max(dots) - min(dots) < 1e-12 and abs(rotated_dot(8, 3) - dots[0]) > 1e-3
assert torch.equal(logits_direct, logits)
assert step_diff < 1e-5
if IS_REAL:
    assert len(text) > 200 and expected.startswith(text), "stories260K no longer reproduces llama2.c's greedy text"
assert max(diffs.values()) <= 1e-4, f"oracle disagreement: {max(diffs, key=diffs.get)} = {max(diffs.values()):.2e}"
assert diff64 <= 1e-9
print("all checks passed")
