# %% [markdown]
# # 05 · Merging and propagative refinement: from many chunks to one compact cache
#
# Two reduced siblings become one chunk (HOMER_SPEC.md E):
#
# ```
# [ avg(prefix_L, prefix_R) | context_L | context_R | avg(suffix_L, suffix_R) ]      avg(a, b) = (a + b) / 2
# ```
#
# for the hidden states and for the keys and values of every layer both have run; the merged chunk then runs
# the next block of layers. Positions are copied, never renumbered. And whenever a node prunes at its layer k,
# the same slots leave the cache of **every layer 0..k** it holds (**propagative refinement**, F): in the end
# each token is in every layer's cache or in none, so the result is an ordinary KV cache with the same slots in
# all L layers. This tutorial merges the passkey's leaf with its sibling, follows every token through the tree,
# and draws the whole run as one picture.

# %%
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import replace
from pathlib import Path

import torch
from common import demo_config, demo_prompt, passkey_model, runs

from homer_ref.homer import Run, homer_prefill, leaf_chunk, run_node
from homer_ref.homer.merging import merge
from homer_ref.picture import render_html

model, tok, bias = passkey_model()
prompt = demo_prompt(tok)
parts = prompt.prefix, prompt.context, prompt.suffix
cache = homer_prefill(model, *parts, demo_config(), bias=bias)
p, L = cache.plan, model.cfg.num_hidden_layers
P, S = p.P, p.S
i = prompt.digit_slots[0] // p.e  # the passkey's leaf, node 0.9; its sibling is node 0.8 (index i ^ 1)

# %% [markdown]
# ## 1. One merge, step by step
#
# `run_node` is one node's step, the function the library's traversal calls for every node: the node's block of
# layers (0–3 for a leaf here), and at its last layer, after attention and before the MLP, the pruning to its
# target — applied by `refinement.keep_slots` to the hidden states, the positions and the cache of *every*
# layer the chunk holds: refinement itself. Run nodes 0.8 and 0.9 with it, then merge them.


# %%
run = Run(model, p, *parts, bias=bias)  # what every node of this prefill shares: model, plan, prompt, bias
left, left_trace = run_node(run, p.nodes[(0, i ^ 1)], leaf_chunk(run, i ^ 1))
right, right_trace = run_node(run, p.nodes[(0, i)], leaf_chunk(run, i))
assert torch.equal(right_trace.kept, cache.node(0, i).kept), "the same decision as the whole run's"
n_left, n_right = len(left), len(right)
left_prefix, right_prefix = left.keys[2][:, :P].clone(), right.keys[2][:, :P].clone()
left_suffix, right_suffix = left.keys[2][:, -S:].clone(), right.keys[2][:, -S:].clone()
merged = merge(left, right, P, S)  # consumes both children: their per-layer lists are emptied (tutorial 06)
print(f"left {n_left} + right {n_right} slots -> merged {len(merged)} = {n_left} + {n_right} - P - S")
pos = merged.positions.tolist()
print(
    f"merged positions: {runs(pos[:P])} | {runs(pos[P : n_left - S])} | {runs(pos[n_left - S : -S])} | {runs(pos[-S:])}"
)
print(f"prefix copies, layer 2 keys: max |left - right| = {float((left_prefix - right_prefix).abs().max()):.1e}")
print(f"suffix copies, layer 2 keys: max |left - right| = {float((left_suffix - right_suffix).abs().max()):.2f}")

# %% [markdown]
# - **Positions are not renumbered**: both contexts came from leaves whose context starts at position P, so the
#   merged chunk reads ..., 126, 127, 1, 2, ... — overlapping, going backwards. Attention stays causal by *slot
#   order*: a right-context token sees every left one, even at a larger position id.
# - **The affixes are averaged**: the two prefix copies are identical (a prefix token, attending causally, sees
#   only the prefix), so averaging changes nothing; the suffix copies differ — each read its own context — and
#   their average is a suffix that has read both: the query that scores the merged chunk at its next reduction.
#
# ## 2. Every token, through the tree
#
# `cache.nodes` records, for every node, the prompt token each input slot holds (`input_sources`) and which
# slots it removed, at which layer. So for every context token we know the highest layer whose K/V it reached.
# Without refinement that staircase would stay in the cache; with it, only the survivors do, in every layer.

# %%
reached = {c: L - 1 for c in range(p.C)}  # context index -> highest layer computed for it
for t in cache.nodes:
    for j in t.removed.tolist():
        reached[int(t.input_sources[j]) - P] = t.layers[1] - 1
survivors = [i for part, i in cache.slot_sources() if part == "context"]
print("layer  context tokens: █ kept in the final cache, ░ K/V computed, then dropped by refinement")
for layer in range(L - 1, -1, -1):
    computed = sum(r >= layer for r in reached.values())
    print(f"  {layer}    {'█' * round(len(survivors) / 40)}{'░' * round((computed - len(survivors)) / 40):52s} "
          f"{len(survivors)} of {computed}")  # fmt: skip
first_digit = P + prompt.digit_slots[0]
print(f"the first digit's K/V: slot {cache.sources.tolist().index(first_digit)} in each of the {L} layers")


# %% [markdown]
# ## 3. The picture
#
# `homer_ref.picture.render_html` draws a run as one self-contained page (`python -m homer_ref.explain`
# writes the same for any prompt): the tree, every node's tokens — removed ones struck out or collapsed,
# kept ones coloured by significance — and the final cache with its positions. The passkey's digits are marked.

# %%
page = render_html(cache, tok.token_texts(prompt.ids), "HOMER on the passkey prompt of tutorials 01-05",
                   [f"true passkey {prompt.passkey}"], marked={P + c for c in prompt.digit_slots})  # fmt: skip
out = Path(tempfile.gettempdir()) / "homer_passkey.html"
out.write_text(page, encoding="utf-8")
root = next(e for e in ET.fromstring(page).iter() if e.get("id") == f"node-{p.H}-0")  # the root's section
root_digits = "".join("".join(e.itertext()) for e in root.iter() if "m" in e.get("class", "").split())
print(f"wrote {out} ({len(page) // 1024} KiB): open it in a browser; marked in the root: {root_digits}")

# %% [markdown]
# ## Checks
#
# Refinement means gathering: a surviving context token's keys in the final cache, at every layer its leaf
# ran, are exactly the keys its leaf computed for it, recomputed here leaf by leaf; the suffix slot holds the
# mean of all 16 leaves' suffix keys (each merge averages two); the prefix is every leaf's prefix.

# %%
node = cache.node(1, i // 2)
assert merged.positions.tolist() == node.input_positions.tolist() and torch.equal(merged.sources, node.input_sources)
assert len(merged) == n_left + n_right - P - S and float((left_prefix - right_prefix).abs().max()) == 0.0
assert torch.equal(merged.keys[2][:, -S:], (left_suffix + right_suffix) / 2), "the suffix is the average"
assert all(k.shape[1] == len(cache.positions) == p.final_len for k in cache.keys + cache.values)
leaf_keys = []  # per leaf, per leaf layer: [Hkv, n, Dh], computed on its own with nothing pruned
for j in range(p.N):
    whole = replace(p.nodes[(0, j)], target=p.input_len(p.nodes[(0, j)]))  # the leaf, its target its whole input
    leaf_keys.append(run_node(run, whole, leaf_chunk(run, j))[0].keys)
for slot, (part, c) in enumerate(cache.slot_sources()):
    if part == "context":
        j = c // p.e  # its leaf, where it sat at slot P + c - j*e
        assert all(
            torch.equal(cache.keys[layer][:, slot], leaf_keys[j][layer][:, P + c - j * p.e]) for layer in range(4)
        )
for layer in range(*p.nodes[(0, 0)].layers):
    suffix_mean = torch.stack([keys[layer][:, -S:] for keys in leaf_keys]).mean(0)  # [Hkv, S, Dh]
    assert torch.allclose(cache.keys[layer][:, -S:], suffix_mean, atol=1e-5)
    assert torch.equal(cache.keys[layer][:, :P], leaf_keys[0][layer][:, :P])
assert root_digits == str(prompt.passkey) * 2, "both copies of the digits reach the root"
print("all checks passed")

# %% [markdown]
# ## Try this
#
# 1. Open the picture. Find the node where the word "is" of "The pass key is" was pruned (hover for its score).
# 2. Merge nodes 0.8 and 0.9 the wrong way round (`merge(right, left, P, S)`): which positions, and which slots of
#    `cache.node(1, 4)`, change? Predict before printing.
# 3. Skip refinement (in `homer_ref.homer.refinement.keep_slots`, prune only `chunk.h` and the last layer's K/V):
#    what shapes would the cache have, and why could no new token attend to it?
# 4. `python -m homer_ref.explain --seed 5 --reduction random --out random.html`: where do the digits go?
