# %% [markdown]
# # 02 · The Llama forward pass, layer by layer
#
# HOMER never changes a Llama's weights: it decides *which tokens* go through *which layers*, at *which
# positions*. So before HOMER, the forward pass itself, opened up. The subject is **stories260K**, llama2.c's
# tiny Llama pretrained on children's stories (5 layers, 8 query heads sharing 4 key/value heads, a 512-token
# trained context), vendored in `homer_ref/data/stories260K`. You will see:
#
# 1. RoPE, and why a query–key product depends only on the *distance* between positions — which is what lets
#    HOMER reuse position ids;
# 2. a decoder layer in two halves, `attend` and `feed_forward` — HOMER prunes tokens between them;
# 3. the KV cache — HOMER's output is one;
# 4. the whole pass checked against llama2.c's golden text and an independent float64 NumPy oracle.
#
# Shapes: `T` tokens, `D` hidden size, `Hq`/`Hkv` query/key-value heads, `Dh` head dimension, `V` vocabulary.

# %%
import copy
import tempfile

import numpy as np
import torch
from common import numpy_oracle, stories_model

from homer_ref.data import STORIES260K
from homer_ref.llama import apply_rope, rope_cos_sin
from homer_ref.loading import save_hf

model, tok = stories_model()
cfg = model.cfg
print(f"L={cfg.num_hidden_layers} D={cfg.hidden_size} Hq={cfg.num_attention_heads} Hkv={cfg.num_key_value_heads} "
      f"Dh={cfg.head_dim} V={cfg.vocab_size}, trained context {cfg.max_position_embeddings}")  # fmt: skip
ids = tok.encode("Once upon a time, there was a little girl named Lily. She loved to play with her")
x, positions = torch.tensor([ids]), torch.arange(len(ids))  # [1, n], [n]: position ids 0..n-1
print(f"{len(ids)} tokens:", "|".join(tok.token_texts(ids)))

# %% [markdown]
# ## 1. RoPE: positions as rotations
#
# Llama has no table of position embeddings. Each query and key vector is cut into Dh/2 pairs of coordinates
# (homer_ref pairs dimension i with i + Dh/2, Hugging Face's layout) and pair j is rotated by the angle
# `position × θ_j`. Rotations compose, so rotating q by angle a and k by angle b changes q·k only through a − b:
# the product depends on the **distance** between the two positions, not on where they are.

# %%
g = torch.Generator().manual_seed(0)
q_vec, k_vec = torch.randn(2, cfg.head_dim, generator=g, dtype=torch.float64)


def rotated_dot(query_position: int, key_position: int) -> float:
    """<q rotated to query_position, k rotated to key_position>."""
    cos, sin = rope_cos_sin(cfg, torch.tensor([query_position, key_position]), torch.float64)  # [2, Dh]
    return float(apply_rope(q_vec, cos[0], sin[0]) @ apply_rope(k_vec, cos[1], sin[1]))


dots = {(m, m - 3): rotated_dot(m, m - 3) for m in (3, 10, 100, 400)}
for (m, n), d in dots.items():
    print(f"  query at {m:3d}, key at {n:3d} (distance 3): q·k = {d:+.12f}")
print(f"  distance 5 instead:              q·k = {rotated_dot(8, 3):+.12f}")

# %% [markdown]
# HOMER gives every chunk the positions 0, 1, 2, … again (tutorial 03): a chunk read at positions 0..247 sees
# exactly the attention scores it would see at 1000..1247, and the model meets no position it was not trained on.
#
# ## 2. One decoder layer, in two halves
#
# A decoder layer is `h = h + attention(norm(h))`, then `h = h + mlp(norm(h))`. homer_ref exposes the halves:
# `model.attend(layer, h, positions)` returns the new h, the layer's keys (rotated) and values — the layer's
# **KV cache** — and, when asked (`last_query=True`), `last_logits`, the pre-softmax scores of the **last** query
# against every key, which is what HOMER ranks tokens by (tutorial 04). `model.feed_forward(layer, h)` is the
# MLP half.

# %%
h = model.embed_tokens(x)  # [1, T, D]
steps, keys, last_logits = {"embedding": h}, [], []
for layer in range(cfg.num_hidden_layers):
    h, k, v, ll = model.attend(layer, h, positions, last_query=True)  # k, v [1, Hkv, n, Dh]; ll [1, Hq, n]
    steps[f"layer {layer} attention"] = h
    h = model.feed_forward(layer, h)
    steps[f"layer {layer} MLP"] = h
    keys.append(k)
    last_logits.append(ll)
logits = model.logits(h)  # final RMSNorm + output head: [1, T, V]
print(f"per layer: k, v {tuple(k.shape)} [1, Hkv, n, Dh]; last_logits {tuple(ll.shape)} [1, Hq, n]")
top = torch.topk(torch.softmax(logits[0, -1], -1), 3)
print("next token:", ", ".join(f"{tok.piece(i)!r} {p:.0%}" for p, i in zip(top.values, top.indices)))

# %% [markdown]
# `model(x)` is exactly this loop. And the cache is what makes generation cheap: feeding only the last token,
# with the keys and values of the others, gives the same logits as the full pass — its query attends to the
# cached keys. HOMER's result is such a cache, only much shorter than the prompt it stands for.

# %%
_, cache = model.forward_cached(x[:, :-1])  # per layer (k, v) of the first T-1 tokens
step_logits, _ = model.forward_cached(x[:, -1:], cache=cache)  # the last token alone, at position T-1
step_diff = float((step_logits[0, -1] - logits[0, -1]).abs().max())
print(f"model(x) == the loop: {torch.equal(model(x), logits)}; last token with the cache: max |Δ| {step_diff:.1e}")

# %% [markdown]
# ## 3. Checked twice
#
# llama2.c's own test expects a given greedy text from BOS (`expected_greedy_200.txt`); the first 100 tokens keep
# this quick. It also shows the llama2.c checkpoint was converted right: its RoPE layout differs from Hugging
# Face's, and `homer_ref/loading/llama2c.py` permutes q and k in one documented place.

# %%
generated, (step, cache) = [tok.bos_id], model.forward_cached(torch.tensor([[tok.bos_id]]))
for _ in range(100):
    generated.append(int(step[0, -1].argmax()))  # greedy
    step, cache = model.forward_cached(torch.tensor([generated[-1:]]), cache=cache)
text = tok.decode(generated[1:])
expected = (STORIES260K / "expected_greedy_200.txt").read_text()
print(text[:160], "...\nllama2.c's text starts with it:", expected.startswith(text))

# %% [markdown]
# `reference/llama_np.py` is the same math written independently in float64 NumPy, reading Hugging Face
# directories. We write the model as one (`save_hf`) and run the oracle's layer halves beside ours.

# %%
llama_np = numpy_oracle()
with tempfile.TemporaryDirectory() as hf_dir:
    save_hf(model, hf_dir)
    np_config, np_weights = llama_np.load_hf(hf_dir)  # float64 arrays under HF names


def gap(ours: torch.Tensor, theirs: np.ndarray) -> float:
    return float(np.abs(ours.double().numpy() - theirs).max())


h_np = llama_np.embed(np_config, np_weights, np.array(ids))  # [n, D]
diffs = {"embedding": gap(steps["embedding"][0], h_np)}
print("max |float32 torch - float64 oracle|, by layer:")
print(" " * 9 + "".join(f"{name:>12s}" for name in ("attention", "keys", "last_logits", "MLP")))
for layer in range(cfg.num_hidden_layers):
    h_np, k_np, _, ll_np = llama_np.attention_layer(np_config, np_weights, layer, h_np, positions.numpy())
    row = {"attention": gap(steps[f"layer {layer} attention"][0], h_np), "keys": gap(keys[layer][0], k_np)}
    row["last_logits"] = gap(last_logits[layer][0], ll_np)
    h_np = llama_np.mlp_layer(np_config, np_weights, layer, h_np)
    row["MLP"] = gap(steps[f"layer {layer} MLP"][0], h_np)
    diffs |= {f"layer {layer} {name}": d for name, d in row.items()}
    print(f"  layer {layer}" + "".join(f"{d:12.1e}" for d in row.values()))
oracle_logits = llama_np.final_logits(np_config, np_weights, h_np)  # [n, V]
diffs["logits"] = gap(logits[0], oracle_logits)
print(f"  logits {diffs['logits']:12.1e}")
diff64 = gap(copy.deepcopy(model).double()(x)[0], oracle_logits)
print(f"the same model in float64: logits differ by {diff64:.1e} (float32 rounding, not a disagreement)")

# %% [markdown]
# ## Checks

# %%
assert max(dots.values()) - min(dots.values()) < 1e-12, "q·k depends only on the distance"
assert abs(rotated_dot(8, 3) - dots[(3, 0)]) > 1e-3, "... and does change with it"
assert torch.equal(model(x), logits) and step_diff < 1e-5
assert len(text) > 200 and expected.startswith(text), "stories260K reproduces llama2.c's greedy text"
assert max(diffs.values()) <= 1e-4 and diff64 <= 1e-9, "every step agrees with the float64 oracle"
print("all checks passed")

# %% [markdown]
# ## Try this
#
# 1. Feed the prompt at positions 300..300+T−1 (`model(x, positions=torch.arange(300, 300 + len(ids)))`).
#    Predict the next-token distribution before you print it: RoPE only sees distances.
# 2. Then at 3000..: past the trained 512. Still the same? (Exactly the same in exact arithmetic; why, given
#    tutorial 07's plain model fails past its context? Hint: what differs between this prompt and a long one?)
# 3. Compare `last_logits[layer][0].amax(0)` at layer 0 and layer 4: which tokens does the last query score
#    highest? Tutorial 04 turns exactly this into HOMER's pruning.
