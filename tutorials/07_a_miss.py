# %% [markdown]
# # 07 · A miss, taken apart
#
# HOMER reads about 96% of the shipped model's 8x passkey prompts. This tutorial takes one it gets wrong and
# finds out why, with the tools of tutorials 03–05: the slot-to-source map, the scores at every node, and the
# leaves' boundaries.

# %%
import torch
from common import demo_config, demo_prompt, passkey_model

from homer_ref.decoding import generate_plain
from homer_ref.homer import continuation_logits, homer_generate, homer_prefill
from homer_ref.homer.chunking import leaf_span
from homer_ref.tasks import passkey

model, tok, bias = passkey_model()
prompt = demo_prompt(tok, seed=1)  # `python -m homer_ref.explain --seed 1 --out miss.html` draws it
parts = prompt.prefix, prompt.context, prompt.suffix
cache = homer_prefill(model, *parts, demo_config(), bias=bias)
p, P = cache.plan, len(prompt.prefix)
answer = tok.decode(homer_generate(model, cache, passkey.ANSWER_TOKENS))
print(f"true pass key {prompt.passkey}; HOMER answers {answer!r}")

# %% [markdown]
# ## 1. Did a node prune the answer?
#
# Every final slot names its prompt token (`cache.slot_sources()`), and every node's trace names the token in
# each input slot (`input_sources`) and scores it. Follow the digits up the tree: at every node that held them,
# where did they rank among its context tokens?

# %%
digits = {P + c for c in prompt.digit_slots}  # prompt indices (sources) of the 10 digit tokens
in_cache = [(k, int(cache.positions[k])) for k, s in enumerate(cache.sources.tolist()) if s in digits]
print(f"digits in the final cache (slot, position): {in_cache}")
for t in cache.nodes:
    held = [j for j, s in enumerate(t.input_sources.tolist()) if s in digits]
    if held and t.scores is not None:
        context = t.scores.isfinite()  # the affixes score +inf: rank among the context only
        order = t.scores.masked_fill(~context, -float("inf")).argsort(descending=True).tolist()
        ranks = sorted(order.index(j) for j in held)  # 0 = the most significant
        print(f"  node {t.level}.{t.index} (prunes at layer {t.layers[1] - 1}): digit ranks {ranks} of "
              f"{int(context.sum())} context tokens; kept {len(t.kept)}")  # fmt: skip

# %% [markdown]
# Every digit ranked in the top ten at every node, and all ten reached the cache: no node lost the answer.
# It was *misread*. Teacher-forcing the true answer after the compact cache shows which digit:

# %%
answer_ids = tok.encode(passkey.answer_text(prompt.passkey), bos=False)  # "▁", 5 digits, "▁."
logits = torch.cat([cache.logits[-1:], continuation_logits(model, cache, answer_ids[:-1])])  # row j predicts token j
for j, t in enumerate(answer_ids[:6]):
    probs = logits[j].softmax(-1)
    best = int(probs.argmax())
    print(f"  token {j}: true {tok.piece(t)!r} p={float(probs[t]):.2f}   model's first choice {tok.piece(best)!r} "
          f"p={float(probs[best]):.2f}")  # fmt: skip

# %% [markdown]
# ## 2. Where the needle was cut
#
# The needle is "The pass key is 18271 . Do not forget 18271 ." Which leaf held each of its tokens?

# %%
needle = range(prompt.digit_slots[0] - 5, prompt.digit_slots[-1] + 2)  # context indices of its 21 tokens
leaf_of = {c: c // p.e for c in needle}
for leaf in sorted(set(leaf_of.values())):
    words = [c for c in needle if leaf_of[c] == leaf]
    start, stop = leaf_span(p, leaf)
    print(
        f"  node 0.{leaf} (context {start}..{stop - 1}): {''.join(tok.token_texts(prompt.context[c] for c in words))!r}"
    )
slot_of = {s: k for k, s in enumerate(cache.sources.tolist())}  # prompt index -> final cache slot
texts = tok.token_texts(prompt.context)
print("in the final cache, token@position:", " ".join(
    f"{texts[c].strip() or '▁'}@{int(cache.positions[slot_of[P + c]])}" if P + c in slot_of else "·"
    for c in needle))  # fmt: skip
for t in cache.nodes:  # where the others went: the node that removed each, and its rank there
    for j in t.removed.tolist():
        c = int(t.input_sources[j]) - P
        if c in needle:
            order = t.scores.masked_fill(~t.scores.isfinite(), -float("inf")).argsort(descending=True).tolist()
            word, n_context = texts[c], int(t.scores.isfinite().sum())
            print(f"  {word!r:9} removed by node {t.level}.{t.index}: rank {order.index(j)} of {n_context} context "
                  f"tokens, {len(t.kept)} kept")  # fmt: skip
# reduction="none" is not HOMER but a diagnostic (`eval passkey --modes homer-no-pruning`): the same tree, every
# node's target its whole input, so nothing is pruned and only the merging is left.
no_pruning = homer_prefill(model, *parts, demo_config(reduction="none"))
no_pruning_answer = tok.decode(homer_generate(model, no_pruning, passkey.ANSWER_TOKENS))
print(f"merging without pruning anything ({len(no_pruning.positions)} slots) answers {no_pruning_answer!r}")


# %% [markdown]
# The boundary between nodes 0.1 and 0.2 (two leaves) runs through the needle. Node 0.1 saw "The pass key" with
# no digits after it: to its last query those are ordinary words, and the nodes above pruned them (`·`); of the
# needle only "is", the digits and the dots reached the cache, at node 0.2's positions 1–18. Did that pruning
# cause the miss?
# No: the same tree merging every token misreads too. The node that misread is node 0.2, which ran its four
# layers on the digits without ever seeing "The pass key" before them: its chunk alone — 138 tokens, well inside
# the trained context, read by plain inference — already gets the key wrong, while the same-sized window shifted
# to hold the whole needle reads it. Drop one filler sentence from the start of the haystack, so that the
# boundary moves, and HOMER reads it too:

# %%
start, stop = leaf_span(p, 2)
window = lambda a, b: prompt.prefix + prompt.context[a:b] + prompt.suffix
leaf_alone = tok.decode(generate_plain(model, window(start, stop), passkey.ANSWER_TOKENS))
shifted = tok.decode(generate_plain(model, window(start - 20, stop - 20), passkey.ANSWER_TOKENS))
moved = homer_prefill(model, prompt.prefix, prompt.context[11:], prompt.suffix, demo_config(), bias=bias)
moved_answer = tok.decode(homer_generate(model, moved, passkey.ANSWER_TOKENS))
print(f"node 0.2's chunk alone: {leaf_alone!r}; shifted 20 tokens left: {shifted!r}; boundary moved: {moved_answer!r}")

# %% [markdown]
# Is this the rule or an accident? Over 20 seeded prompts, which ones does HOMER miss, and is their needle cut?

# %%
misses, cut = [], []
for seed in range(20):
    sample = demo_prompt(tok, seed=seed)
    c = homer_prefill(model, sample.prefix, sample.context, sample.suffix, demo_config(), bias=bias)
    first, last = sample.digit_slots[0] - 5, sample.digit_slots[-1] + 1
    cut += [seed] if first // c.plan.e != last // c.plan.e else []
    misses += [seed] if not passkey.score(tok.decode(homer_generate(model, c, 7)), sample.passkey) else []
print(f"misses {misses}; needles cut by a leaf boundary {cut}")

# %% [markdown]
# Every miss has its needle cut by a chunk boundary. Not every cut needle is missed: over seeds 0–149, 23
# needles were cut and HOMER missed 8 of those, and none of the 127 intact ones. The pruning did its job;
# what failed is reading a sentence whose halves were encoded by different chunks, at overlapping positions.
# (The model card measures the same: merging without pruning misses about as often as HOMER.)


# %% [markdown]
# ## Checks

# %%
assert not passkey.score(answer, prompt.passkey) and len(in_cache) == 10, "a miss with every digit kept"
assert 0 < len(set(leaf_of.values())) - 1, "the needle spans two leaves"
assert not passkey.score(leaf_alone, prompt.passkey) and passkey.score(shifted, prompt.passkey)
assert passkey.score(moved_answer, prompt.passkey) and not passkey.score(no_pruning_answer, prompt.passkey)
assert misses and set(misses) <= set(cut), "every miss among 20 prompts has its needle cut"
print("all checks passed")

# %% [markdown]
# ## Try this
#
# 1. `python -m homer_ref.explain --seed 1 --out miss.html`: find nodes 0.1 and 0.2 in the picture and the two
#    halves of the needle.
# 2. The misses sit where e = 127 puts a boundary through the needle. Run the loop over `range(150)`; then with
#    64 leaves at 32x (`demo_prompt(tok, seed, multiple=32)`): more boundaries, more cut needles, more misses?
# 3. Seed 10 and seed 18 are the other misses: print their needle's leaves and predict the misread digit.
