# %% [markdown]
# # 03 · Token reduction: which tokens a chunk keeps
#
# Before two sibling chunks are merged, each drops some of its context tokens, so that the merged chunk again
# fits in M tokens. Which ones? HOMER keeps the tokens that **the last token of the chunk attends to most** —
# the last token is the last suffix token, e.g. the end of the question, so it "knows" what matters.
#
# At the last layer of a node's block (tutorial 04), after attention and before the MLP, every token i gets a
# **significance** (HOMER_SPEC.md D.1):
#
# ```
# sig(i) = max over query heads h of  q_last^h · k_i^h / sqrt(Dh)   −   bias[layer][pos(last) − pos(i)]
# ```
#
# - `q_last · k_i / sqrt(Dh)` is the attention *logit* (before the softmax), with RoPE applied to both;
# - the max over heads keeps a token that any one head finds important;
# - the **calibration bias** subtracts what a token gets just for being at that distance: tokens close to the
#   end look important to the last query whatever they say, and would otherwise crowd out everything else;
# - prefix and suffix tokens get +∞: they are never pruned.
#
# The k tokens with the lowest significance are removed; the others keep their order. The paper compares three
# ways to choose (its ablation): **calibrated** (the default), **uncalibrated** (no bias), and **random**.
# We run the first leaf of a story by hand, look at the scores, the bias and the survivors, then check that
# `homer_prefill` makes exactly the same decision.

# %%
import math
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()  # in Jupyter: tutorials/
ROOT = HERE.parent  # the project root: homer_ref/ lives here
sys.path.insert(0, str(ROOT))
STORIES = ROOT / "homer_ref" / "data" / "stories260K"

import homer_ref
from homer_ref.homer import homer_prefill, reduction
from homer_ref.homer.calibration import calibrate, windows_from_ids
from homer_ref.homer.chunking import make_leaf
from homer_ref.homer.plan import HomerConfig, plan
from homer_ref.llama import Llama, LlamaConfig, apply_rope, rope_cos_sin


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
    print(f"note: {STORIES} not found, so this tutorial uses a tiny RANDOM model (seed 0): the choices are arbitrary")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=5, num_attention_heads=8,
        num_key_value_heads=4, head_dim=8, max_position_embeddings=512, tie_word_embeddings=True,
    )  # fmt: skip
    return Llama(cfg).eval().requires_grad_(False), ByteTokenizer(), False


def piece(token_id: int) -> str:
    """One token as text, a leading space shown as a space."""
    return tok.piece(token_id).replace("▁", " ") if IS_REAL else tok.decode([token_id])


model, tok, IS_REAL = load_subject()
cfg = model.cfg
torch.set_grad_enabled(False)
torch.set_num_threads(1)  # the model is tiny: on a shared CPU, extra threads cost more than they save

STORY = (
    "Once upon a time, there was a little girl named Lily. She had a small red ball. "
    "Every day she played with the ball in the park near her house. "
    "One day, Lily met a big brown dog. The dog was friendly and wanted to play too. "
    "Lily threw the ball and the dog ran fast to get it. They played all day and had lots of fun. "
    "When the sun went down, Lily said goodbye to the dog and went home. "
    "Her mom made her a warm bowl of soup. Lily told her mom about the dog. "
    'Her mom smiled and said, "You made a new friend today." Lily was very happy. '
    "The next day, Tom came to the park with his kite. The kite was blue and yellow. "
    "Tom and Lily ran with the kite, and it flew high in the sky. "
    "The dog barked and jumped, but the wind was too strong and the kite got stuck in a tree. "
    "Tom was sad. Lily had an idea. She asked a tall man to help. The man got the kite down. "
    "Tom said thank you, and they all played together until it was time to go home."
)
# Calibration wants ordinary text of the same kind, but not the input itself.
CALIBRATION_TEXT = (
    "Sam was a small boy who liked to build things. One morning he found a big box in the garden. "
    "He wanted to make a boat out of it. He asked his sister Mia to help him. Mia said yes and got some tape. "
    "They cut the box and made a long boat with a tall sail. Sam painted the boat green and Mia painted a sun on "
    "the sail. When the boat was ready, they put it next to the pond. It did not float, but they did not mind. "
    "They sat in the boat and played pirates all afternoon. Mom brought them apples and milk. "
    "At night Sam was tired but happy. He told Mia that tomorrow they would build a plane. "
    "Mia laughed and said the plane would need very big wings. Sam smiled and fell asleep."
)
prefix_ids = [tok.bos_id]
context_ids = tok.encode(STORY, bos=False)[:400]
suffix_ids = tok.encode(" The dog was", bos=False)
config = HomerConfig(max_chunk_len=64)  # reduction="calibrated" is the default
p = plan(cfg.num_hidden_layers, config, len(prefix_ids), len(context_ids), len(suffix_ids))
print(p)

# %% [markdown]
# ## 1. Leaf 0 up to its reduction layer
#
# The plan says which layers leaf 0 runs and how long it must end up (its *target*). It prunes at the last layer
# of its block, between the attention half and the MLP half of that layer.

# %%
leaf = p.nodes[(0, 0)]
first, last = leaf.layers
reduction_layer = last - 1
ids, positions, is_context, _ = make_leaf(p, 0, prefix_ids, context_ids, suffix_ids)  # each [n]
n = len(ids)
k_remove = n - leaf.target
print(
    f"leaf 0: {n} tokens, layers {first}..{reduction_layer}, target {leaf.target}: remove {k_remove} at layer "
    f"{reduction_layer}"
)

h = model.embed_tokens(ids)[None]  # [1, n, D]
for layer in range(first, reduction_layer):
    h, _, _, _ = model.attend(layer, h, positions)
    h = model.feed_forward(layer, h)
h_in = h  # input of the reduction layer
_, keys, _, last_logits = model.attend(reduction_layer, h_in, positions)  # keys [1, Hkv, n, Dh]
last_logits = last_logits[0]  # [Hq, n]
print("last_logits (one row per query head):", tuple(last_logits.shape))

# %% [markdown]
# `attend` hands back these logits for free. To see there is nothing hidden in them, recompute them from the
# layer's weights: the query of the last token, rotated by RoPE, against every cached key. stories260K uses
# grouped-query attention (8 query heads, 4 KV heads), so query head h reads KV head h // 2 — the official code
# crashes here on GQA models; homer_ref scores each query head against its own group's keys (N.2.2).

# %%
blk = model.layers[reduction_layer]
Hq, Hkv, Dh = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
x = blk.input_layernorm(h_in)  # [1, n, D]
q = blk.self_attn.q_proj(x).view(1, n, Hq, Dh).transpose(1, 2)  # [1, Hq, n, Dh]
cos, sin = rope_cos_sin(cfg, positions, q.dtype)
q_last = apply_rope(q, cos, sin)[0, :, -1]  # [Hq, Dh]: the last token's query, rotated
by_hand = torch.stack([keys[0, hq // (Hq // Hkv)] @ q_last[hq] for hq in range(Hq)]) / math.sqrt(Dh)  # [Hq, n]
print(f"max |by hand - attend's last_logits| = {float((by_hand - last_logits).abs().max()):.1e}")

# %% [markdown]
# ## 2. Raw scores favour recent tokens
#
# The uncalibrated score of a token is the max over heads. Grouped by distance (position of the last token −
# position of the token; the suffix holds the nearest distances, so the context starts at distance S), the
# nearer context tokens score higher on average — for being near, not for what they say:

# %%
raw = last_logits.amax(dim=0)  # [n]
distance = positions[-1] - positions  # [n]
ctx_slots = is_context.nonzero().squeeze(1)  # the slots that may be pruned
edges = [int(d) for d in torch.linspace(int(distance[ctx_slots].min()), int(distance[ctx_slots].max()) + 1, 6)]
groups = [ctx_slots[(distance[ctx_slots] >= a) & (distance[ctx_slots] < b)] for a, b in zip(edges, edges[1:])]


def by_distance(score: torch.Tensor, name: str) -> float:
    """Print the mean score per distance group; return the correlation of score and distance over the context."""
    cells = "".join(f"{float(score[g].mean()):+10.2f}" for g in groups)
    corr = float(torch.corrcoef(torch.stack([distance[ctx_slots].float(), score[ctx_slots]]))[0, 1])
    print(f"  {name:14s}{cells}   {corr:+.2f}")
    return corr


print("  mean score    " + "".join(f"{f'd {a}-{b - 1}':>10s}" for a, b in zip(edges, edges[1:])) + "   correlation")
corr_raw = by_distance(raw, "uncalibrated")
print(
    "highest-scoring context tokens:",
    ", ".join(
        f"{piece(ids[j])!r} (d {int(distance[j])})" for j in ctx_slots[raw[ctx_slots].argsort(descending=True)[:6]]
    ),
)

# %% [markdown]
# ## 3. The calibration bias
#
# `calibrate(model, windows)` runs the model over ordinary text windows of M tokens and averages the same head-max
# logit by distance: `bias[layer][d]` is what a token at distance d gets *on average*, whatever it says
# (HOMER_SPEC.md D.2; the official code ships such tables but no code to make them). One row per layer, grouped
# by distance:

# %%
bias = calibrate(model, windows_from_ids(tok.encode(CALIBRATION_TEXT), config.max_chunk_len, samples=8))  # [L, M]
buckets = [(0, 1), (1, 2), (2, 4), (4, 8), (8, 16), (16, 32), (32, 64)]
print(" layer " + "".join(f"{f'd {a}' if b == a + 1 else f'd {a}-{b - 1}':>9s}" for a, b in buckets))
for layer in range(cfg.num_hidden_layers):
    print(f"  {layer:3d}  " + "".join(f"{float(bias[layer, a:b].mean()):+9.2f}" for a, b in buckets))

# %% [markdown]
# The same for the reduction layer, as a text plot: the nearest tokens get a large head start.

# %%
row = bias[reduction_layer]
lo_val, hi_val = float(row.min()), float(row.max())
for a, b in buckets:
    value = float(row[a:b].mean())
    bar = "█" * round(40 * (value - lo_val) / (hi_val - lo_val))
    print(f"  distance {a:3d}-{b - 1:<3d} {value:+6.2f} {bar}")

# %% [markdown]
# ## 4. Three ways to choose, side by side
#
# Subtracting the bias at each token's distance flattens the scores (compare with the table of section 2):

# %%
scores = {
    "calibrated": reduction.significance(last_logits, positions, is_context, bias[reduction_layer]),
    "uncalibrated": reduction.significance(last_logits, positions, is_context, None),
    "random": reduction.random_significance(config.seed, 0, 0, is_context),
}
print("  mean score    " + "".join(f"{f'd {a}-{b - 1}':>10s}" for a, b in zip(edges, edges[1:])) + "   correlation")
corr = {mode: by_distance(scores[mode], mode) for mode in scores}

# %% [markdown]
# Each mode removes the k tokens with the lowest scores (`reduction.select`; among equal scores the earlier token
# goes first). Below, the context of leaf 0 with the removed tokens blanked out by `_`, then how many were removed
# from each distance group:

# %%
removed = {mode: reduction.select(s, k_remove)[1] for mode, s in scores.items()}
for mode in scores:
    gone = set(removed[mode].tolist())
    text = "".join("_" * len(piece(t)) if j in gone else piece(t) for j, t in enumerate(ids.tolist()) if is_context[j])
    print(f"{mode}:\n  {text}\n")
print("  removed from " + "".join(f"{f'd {a}-{b - 1}':>10s}" for a, b in zip(edges, edges[1:])))
for mode, r in removed.items():
    print(f"  {mode:14s}" + "".join(f"{int(torch.isin(g, r).sum()):10d}" for g in groups))

# %% [markdown]
# Without calibration the nearest tokens are safe just for being near; with it, what a token says counts for
# more. (A 260K-parameter model is no reader, so do not expect the survivors to make a summary: what matters is
# the mechanism. The paper's ablation, passkey retrieval with Llama-2, finds the calibrated score the best of the
# three.) Note how few tokens a leaf drops: leaves are only a little over half full, and most of
# the compression happens higher up the tree (tutorial 04).

# %% [markdown]
# ## 5. The library makes the same decision
#
# `homer_prefill` runs the whole tree; its first node trace is leaf 0. Its scores and removed slots match the
# hand-made ones in every mode.

# %%
traces = {}
for mode in scores:
    cache = homer_prefill(
        model, prefix_ids, context_ids, suffix_ids, HomerConfig(config.max_chunk_len, reduction=mode), bias=bias
    )
    traces[mode] = cache.nodes[0]
    same = torch.equal(traces[mode].scores, scores[mode]) and torch.equal(traces[mode].removed, removed[mode])
    print(f"{mode:13s} leaf (level {traces[mode].level}, index {traces[mode].index}): same scores and removals: {same}")

# %% [markdown]
# ## Checks

# %%
# The logits attend returns are the last query against every key (GQA groups), computed from the weights.
assert torch.allclose(by_hand, last_logits, atol=1e-5)
# The bias is the recency effect of a trained model: near tokens score higher than far ones, in every layer.
if IS_REAL:
    assert all(bias[layer, :4].mean() > bias[layer, 32:].mean() + 1.0 for layer in range(cfg.num_hidden_layers))
for mode, s in scores.items():
    r = removed[mode]
    kept = torch.ones(n, dtype=torch.bool).index_fill(0, r, False)
    assert len(r) == k_remove and bool(is_context[r].all()), "only context tokens are removed"
    assert float(s[r].max()) <= float(s[kept].min()), "the removed tokens are those with the lowest scores"
    assert torch.equal(traces[mode].scores, s) and torch.equal(traces[mode].removed, r)
# Calibrated = uncalibrated minus the bias at each token's position distance (D.1), affixes at +inf.
expected = raw - bias[reduction_layer][distance]
assert torch.equal(scores["calibrated"][is_context], expected[is_context])
assert torch.isinf(scores["calibrated"][~is_context]).all()
# Raw scores fall with distance; calibration removes much of that dependence (random has none to speak of).
if IS_REAL:
    assert corr_raw == corr["uncalibrated"] < -0.3 and abs(corr["calibrated"]) < abs(corr["uncalibrated"]) / 2
# The random mode is reproducible from its seed and changes with it.
assert torch.equal(reduction.random_significance(0, 0, 0, is_context), scores["random"])
assert not torch.equal(
    reduction.select(reduction.random_significance(1, 0, 0, is_context), k_remove)[1], removed["random"]
)
print("all checks passed")
