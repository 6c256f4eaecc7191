# %% [markdown]
# # 04 · Token reduction: which tokens a node keeps, and why
#
# At the last layer of its block, after that layer's attention and before its MLP (HOMER_SPEC.md C.2), a node
# drops its least significant context tokens down to its target (tutorial 03). Significant to whom? To the
# **last token of the chunk** — the last suffix token, the end of the question — which "knows" what is asked.
# Every context token i gets (D.1)
#
# ```
# sig(i) = max over heads h of  q_last^h · k_i^h / sqrt(Dh)   −   bias[layer][pos(last) − pos(i)]
# ```
#
# the pre-softmax attention logit (RoPE applied to both), maxed over heads so that a token any one head finds
# important stays, minus a **calibration bias** for its distance (D.2). Prefix and suffix get +∞: never pruned
# (D.3). The lowest scores go, ties broken by the earlier slot (N.2.3); the survivors keep their order.
#
# On the shipped model, whose passkey hides in node 0.9 of our prompt (level 0, index 9: the tenth leaf), a right
# choice is visible: the digits and the words "pass key" must survive.

# %%
from dataclasses import replace

import torch
from common import demo_config, demo_prompt, passkey_model

from homer_ref.homer import Run, homer_generate, homer_prefill, leaf_chunk, plan, reduction, run_node
from homer_ref.homer.calibration import calibrate
from homer_ref.llama import apply_rope, rope_cos_sin
from homer_ref.tasks import passkey

model, tok, bias = passkey_model()
prompt = demo_prompt(tok)
config = demo_config()
P, C, S = len(prompt.prefix), len(prompt.context), len(prompt.suffix)
p = plan(model.cfg.num_hidden_layers, config, P, C, S)
i = prompt.digit_slots[0] // p.e  # the leaf holding the passkey
needle = range(prompt.digit_slots[0] - 5, prompt.digit_slots[-1] + 2)  # "The pass key is 5 6 9 9 3 . ... 3 ."
node = p.nodes[(0, i)]
layer = node.layers[1] - 1  # where it prunes
run = Run(model, p, prompt.prefix, prompt.context, prompt.suffix, bias=bias)  # what every node of the run shares
leaf = leaf_chunk(run, i)  # its input: embedded tokens, positions, the reduction mask, each slot's prompt index
positions, is_context, sources = leaf.positions, leaf.is_context, leaf.sources
n, k = len(leaf), len(leaf) - node.target
print(f"{node.name}: {n} slots, layers {node.layers[0]}-{layer}, target {node.target}: removes {k} at layer {layer}")

# %% [markdown]
# ## 1. The score, from the weights
#
# `run_node` is one node's step, as the library runs it: its block of layers, then the reduction at the last
# one. Run the leaf's layers *below* its reduction layer with it (the same node, its block cut short before the
# reduction layer, its target its whole input: nothing pruned); then take the reduction layer's attention by
# hand. `attend` returns the last query's logits against every key; to see nothing is hidden in them, recompute
# them from the layer's weights: the last token's query, rotated by RoPE, against every rotated key (this model
# has as many key/value heads as query heads; for GQA models query head h reads KV head h // (Hq/Hkv), N.2.2).

# %%
below, _ = run_node(run, replace(node, layers=(node.layers[0], layer), target=n), leaf_chunk(run, i))
h = below.h[None]  # [1, n, D]: the input of the reduction layer
_, keys, _, last_logits = model.attend(layer, h, positions, last_query=True)  # keys [1, Hkv, n, Dh]; [1, Hq, n]
block, Dh = model.layers[layer].self_attn, model.cfg.head_dim
x = model.layers[layer].input_layernorm(h)  # [1, n, D]
q = block.q_proj(x).view(1, n, -1, Dh).transpose(1, 2)  # [1, Hq, n, Dh]
q_last = apply_rope(q, *rope_cos_sin(model.cfg, positions, q.dtype))[0, :, -1]  # [Hq, Dh]
by_hand = (keys[0] @ q_last[:, :, None])[..., 0] / Dh**0.5  # [Hq, n] (Hq = Hkv here)
print(f"max |by hand - attend's last_logits| = {float((by_hand - last_logits[0]).abs().max()):.1e}")
scores = reduction.significance(last_logits[0], positions, is_context, bias[layer])  # [n], +inf on affixes
top = scores.masked_fill(~is_context, -float("inf")).argsort(descending=True)[:14].tolist()
print(
    "most significant context tokens:", "".join(f"[{t}]" for t in tok.token_texts(prompt.ids[s] for s in sources[top]))
)

# %% [markdown]
# ## 2. Calibration: subtracting what distance alone explains
#
# Tokens near the end of a chunk get large logits from the last query whatever they say (RoPE's decay with
# distance). `bias[layer][d]` is the average head-max logit at distance d over ordinary text of the task —
# here filler without a passkey. The shipped table is exactly that: `calibrate` on 32 windows of 256 tokens
# (the official code ships tables but no code to make them; homer_ref's is N.2.4). Recompute it: bit for bit on
# a CPU like the one that made it, within float32 rounding on others (2.4e-7 under ATen's scalar kernels).

# %%
recomputed = calibrate(model, passkey.filler_windows(tok, seed=1, count=32, length=256))  # [L, 256]
drift = float((recomputed - bias).abs().max())
print(f"recomputed table {tuple(recomputed.shape)}: max |Δ| against the shipped one {drift:.1e}")
buckets = [(0, 1), (1, 4), (4, 16), (16, 64), (64, 256)]
print("bias by distance  " + "".join(f"{f'd {a}-{b - 1}':>9s}" for a, b in buckets))
for row in range(model.cfg.num_hidden_layers):
    print(f"  layer {row}        " + "".join(f"{float(bias[row, a:b].mean()):+9.2f}" for a, b in buckets))
raw = last_logits[0].amax(0)  # the uncalibrated score [n]
calibrated_minus_raw = (scores - raw)[is_context]  # = -bias at each token's distance
is_digit = torch.isin(sources - P, torch.tensor(prompt.digit_slots))
lead = float(scores[is_digit].min() - scores[is_context & ~is_digit].max())
low, high = float(calibrated_minus_raw.min()), float(calibrated_minus_raw.max())
print(f"at layer {layer} the bias shifts this leaf's scores by {low:+.2f} .. {high:+.2f}; the lowest-scoring digit")
print(f"still beats every other context token by {lead:.2f}")

# %% [markdown]
# On this model the bias is mild — near tokens get a little more, the far ones a little less — because its
# training already taught the last token to look at the digits (its model card). On Llama-2 the recency pull
# is strong, and calibration is the paper's best criterion.
#
# ## 3. Three ways to choose
#
# The paper's ablation compares **calibrated**, **uncalibrated** (no bias) and **random** pruning. Run the whole
# tree in each mode and follow the needle through it: every node's trace records which prompt token each of its
# input slots holds (`input_sources`; `plan.part` names it) and which slots it removed. At node 0.9 a mere 9 of
# 138 slots go; at its parent node 1.4, 118 of 247 — there the choice matters.

# %%
parts = prompt.prefix, prompt.context, prompt.suffix
modes = ("calibrated", "uncalibrated", "random")
caches = {mode: homer_prefill(model, *parts, demo_config(reduction=mode), bias=bias) for mode in modes}


def needle_after(trace) -> str:
    """The needle's tokens as this node leaves them: removed ones as '·'."""
    kept = {int(trace.input_sources[j]) - P for j in trace.kept.tolist()}  # context indices of the kept slots
    texts = tok.token_texts([prompt.context[c] for c in needle])
    return "".join(text if c in kept else "·" * len(text) for c, text in zip(needle, texts))


kept_tokens = {m: set(c.node(1, i // 2).input_sources[c.node(1, i // 2).kept].tolist()) for m, c in caches.items()}
differ = len(kept_tokens["calibrated"] - kept_tokens["uncalibrated"])
print(f"node 1.{i // 2}: calibrated and uncalibrated keep different tokens in {differ} of 129 slots")
for mode, cache in caches.items():
    answer = tok.decode(homer_generate(model, cache, passkey.ANSWER_TOKENS))
    print(f"{mode:13s} node 0.{i}: {needle_after(cache.node(0, i))!r}\n{'':13s} node 1.{i // 2}: "
          f"{needle_after(cache.node(1, i // 2))!r}   answer {answer!r}")  # fmt: skip

# %% [markdown]
# ## 4. Ties: the earlier slot goes first
#
# `reduction.select(scores, k)` removes the k lowest scores. With equal scores the official code leaves the
# order to `torch.topk`; homer_ref removes by (score, slot index), so that every implementation removes the
# same slots (N.2.3). Scores here are float32 logits and rarely tie; a made-up row shows the rule:

# %%
kept, removed = reduction.select(torch.tensor([1.0, 0.0, 0.0, 2.0, 0.0, float("inf")]), 2)
print(f"scores [1, 0, 0, 2, 0, inf], remove 2: removed slots {removed.tolist()}, kept {kept.tolist()}")

# %% [markdown]
# ## Checks
#
# The library's node 0.9 made our decision; and at every node of every mode, the removed slots are exactly the
# k lowest by (score, index), recomputed here by plain Python sorting.

# %%
trace = caches["calibrated"].node(0, i)
assert torch.allclose(by_hand, last_logits[0], atol=1e-5), "the score is the last query against every key"
assert torch.equal(trace.scores, scores) and torch.equal(trace.removed, reduction.select(scores, k)[1])
assert torch.allclose(recomputed, bias, rtol=0, atol=1e-5), "the shipped table is calibrate() on the filler windows"
assert torch.equal(scores[is_context], (raw - bias[layer][positions[-1] - positions])[is_context])
assert bias[layer, :4].mean() > bias[layer, 64:].mean(), "near tokens score higher on average, whatever they say"
assert lead > 0, "the digits are the leaf's most significant context tokens"
for cache in caches.values():
    for t in cache.nodes:
        if t.scores is not None:
            lowest = sorted(range(len(t.scores)), key=lambda j: (float(t.scores[j]), j))[: len(t.removed)]
            assert sorted(lowest) == t.removed.tolist() and bool(t.scores[t.removed].isfinite().all())
essential = {
    c for c in needle if c in prompt.digit_slots or tok.token_texts([prompt.context[c]])[0] in (" pass", " key")
}
for mode, cache in caches.items():  # the digits and the words "pass key" survive every node, unless random
    survived = all(essential <= {int(s) - P for s in t.input_sources[t.kept]} for t in cache.nodes if t.level <= 1
                   and set(prompt.digit_slots) & {int(s) - P for s in t.input_sources})  # fmt: skip
    assert survived == (mode != "random"), mode
assert removed.tolist() == [1, 2] and kept.tolist() == [0, 3, 4, 5]
print("all checks passed")

# %% [markdown]
# ## Try this
#
# 1. Score node 0.9 with the *mean* over heads instead of the max (`last_logits[0].mean(0)`): do the digits still
#    rank first? (This is the mistake "mean_over_heads" of `tests/mutations.py`, which the fixtures catch:
#    `tests/test_mutations.py`.)
# 2. Calibrate on the prompt's own context (`homer_ref.homer.calibration.calibrate_on_context(model,
#    prompt.context, 248)`) and rerun: does the answer change? (The model card: calibration makes no measurable
#    difference on this toy; it matters for Llama-2.)
# 3. `demo_config(reduction="random", seed=s)` for a few seeds: how often is the answer right? Predict first
#    from how many of the needle's 21 tokens survive node 1.4.
# 4. `reduction.select(torch.zeros(6), 3)`: which three go?
