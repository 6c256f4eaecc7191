# %% [markdown]
# # 05 · Propagative refinement: one decision, every layer
#
# Tokens are dropped at different heights of the tree. A token that survives its leaf but is dropped by a node
# higher up already has keys and values in the layers below — computed while it was still in play. If those
# stayed, the lower layers of the cache would hold more tokens than the upper ones, and a newly generated token
# would attend to a different set of tokens in every layer.
#
# **Propagative refinement** (HOMER_SPEC.md F): whenever a node prunes at its layer k, the same slots are
# dropped from its cache in **every layer 0..k**. Lower-layer caches were already pruned by earlier decisions,
# so in the end each token is either kept in every layer or gone from every layer. The result is an ordinary,
# compact KV cache: the same K slots in each of the L layers, ready for generation.
#
# We first watch `refinement.keep_slots` on one chunk, then replay `homer_prefill`'s trace to see, for every
# token of a story, in which layers its K/V were computed and what is left of it in the final cache.

# %%
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()  # in Jupyter: tutorials/
ROOT = HERE.parent  # the project root: homer_ref/ lives here
sys.path.insert(0, str(ROOT))
STORIES = ROOT / "homer_ref" / "data" / "stories260K"

import homer_ref
from homer_ref.decoding import decode
from homer_ref.homer import homer_generate, homer_prefill
from homer_ref.homer.calibration import calibrate_on_context
from homer_ref.homer.chunking import Chunk, make_leaf
from homer_ref.homer.plan import HomerConfig
from homer_ref.homer.refinement import keep_slots
from homer_ref.llama import Llama, LlamaConfig


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


model, tok, IS_REAL = load_subject()
cfg = model.cfg
L = cfg.num_hidden_layers
torch.set_grad_enabled(False)
torch.set_num_threads(1)  # the model is tiny: on a shared CPU, extra threads cost more than they save

STORY = (
    "Once upon a time, there was a little girl named Lily. She had a small red ball. "
    "Every day she played with the ball in the park near her house. "
    "One day, Lily met a big brown dog. The dog was friendly and wanted to play too. "
    "Lily threw the ball and the dog ran fast to get it. They played all day and had lots of fun."
)
prefix_ids = [tok.bos_id]
context_ids = tok.encode(STORY, bos=False)[:120]  # (the byte stand-in tokenizer makes more tokens: cut)
suffix_ids = tok.encode(" The dog was", bos=False)
P, C, S = len(prefix_ids), len(context_ids), len(suffix_ids)
config = HomerConfig(max_chunk_len=P + 19 + S)  # E = 19: small chunks, a tall tree over a short text
bias = calibrate_on_context(model, context_ids, config.max_chunk_len)
cache = homer_prefill(model, prefix_ids, context_ids, suffix_ids, config, bias=bias)
p = cache.plan
print(p)

# %% [markdown]
# ## 1. `keep_slots` on one chunk
#
# Leaf 0 by hand: after the attention half of its last layer the chunk holds a K/V cache for each layer it ran,
# all with the same slots. Pruning keeps the slots `homer_prefill` kept (from its trace, `cache.nodes[0].kept`),
# and `keep_slots` applies that one choice to the hidden states, the positions, and the cache of every layer.

# %%
leaf = p.nodes[(0, 0)]
ids, positions, is_context, sources = make_leaf(p, 0, prefix_ids, context_ids, suffix_ids)
chunk = Chunk(model.embed_tokens(ids), positions, is_context, sources)
for layer in range(*leaf.layers):
    h, k, v, _ = model.attend(layer, chunk.h[None], chunk.positions)
    chunk.h = h[0]
    chunk.keys.append(k[0])  # [Hkv, n, Dh]
    chunk.values.append(v[0])
    if layer < leaf.layers[1] - 1:  # the reduction happens before the MLP of the last layer
        chunk.h = model.feed_forward(layer, chunk.h[None])[0]
before = [tuple(k.shape) for k in chunk.keys]
pruned = keep_slots(chunk, cache.nodes[0].kept)
after = [tuple(k.shape) for k in pruned.keys]
print(f"leaf 0 prunes at layer {leaf.layers[1] - 1}: {len(chunk)} -> {len(pruned)} slots (target {leaf.target})")
for layer, (b, a) in enumerate(zip(before, after)):
    print(f"  layer {layer} keys [Hkv, n, Dh]: {b} -> {a}")

# %% [markdown]
# ## 2. Following every token through the tree
#
# `cache.nodes` records, for each node in execution order, its layers and which of its input slots it kept and
# removed. Replaying it with labels — `p` prefix, `s` suffix, or the index of a context token — tells where every
# token went. A merged node's inputs are `left[:-S] + right[P:]`: one prefix, both contexts, one suffix.

# %%
outputs = {}  # (level, index) -> labels of the node's output slots
dropped_at = {}  # context index -> the layer whose reduction removed it
dropped_by = {}  # context index -> the node that removed it
for t in cache.nodes:
    if t.level == 0:
        start = t.index * p.e
        inputs = ["p"] * P + list(range(start, start + p.leaf_context[t.index])) + ["s"] * S
    else:
        inputs = outputs[(t.level - 1, 2 * t.index)][:-S] + outputs[(t.level - 1, 2 * t.index + 1)][P:]
    for j in t.removed.tolist():
        dropped_at[inputs[j]] = t.layers[1] - 1
        dropped_by[inputs[j]] = f"node {t.level}.{t.index}"
    outputs[(t.level, t.index)] = [inputs[j] for j in t.kept.tolist()]
    print(
        f"node {t.level}.{t.index} (layers {t.layers[0]}-{t.layers[1] - 1}): {len(inputs):2d} slots in, "
        f"removed {len(t.removed):2d} at layer {t.layers[1] - 1}"
    )
survivors = outputs[(p.H, 0)]

# %% [markdown]
# Each column below is one context token; a mark means its keys and values were computed at that layer. A token
# dropped at layer k was computed at layers 0..k — the staircase. Without refinement, all of it would stay in the
# cache. With refinement, the final cache holds whole columns only: the survivors, in every layer.

# %%
reach = {c: dropped_at.get(c, L - 1) for c in range(C)}  # the highest layer each token reached
leaf_marks = "".join(str(c // p.e % 10) if c % p.e == 0 else " " for c in range(C))
print("computed K/V (what would stay without refinement)")
for layer in range(L - 1, -1, -1):
    print(f"  layer {layer} |" + "".join("█" if reach[c] >= layer else " " for c in range(C)) + "|")
print("  leaf    |" + leaf_marks + "|")
print("\nthe final cache (with refinement)")
for layer in range(L - 1, -1, -1):
    print(f"  layer {layer} |" + "".join("█" if c in survivors else " " for c in range(C)) + "|")
print("  leaf    |" + leaf_marks + "|")
computed = sum(reach[c] + 1 for c in range(C))
print(f"\ncontext token-layers computed: {computed}; kept: {sum(c in survivors for c in range(C)) * L}")

# %% [markdown]
# One token in detail — one that survived its leaf and was dropped higher up:

# %%
token = next(c for c in range(C) if dropped_at.get(c, -1) > leaf.layers[1] - 1)
print(f"context token {token} {tok.decode([context_ids[token]])!r}:")
print(f"  leaf {token // p.e} computed its K/V at layers {leaf.layers[0]}..{leaf.layers[1] - 1} and kept it")
print(f"  the nodes above computed its K/V up to layer {reach[token]}")
print(f"  {dropped_by[token]} removed it at layer {dropped_at[token]}: its K/V go from layers 0..{reach[token]}")
print(f"  final cache slots holding it: {[j for j, lab in enumerate(survivors) if lab == token]}")

# %% [markdown]
# ## 3. The compact cache
#
# Every layer holds the same slots, each with one position id. The positions repeat and go backwards (each leaf's
# context started at position P); generation continues at `last_position + 1`.

# %%
print(f"{'layer':>7s}  {'keys':>12s}  {'values':>12s}")
for layer in range(L):
    print(f"{layer:7d}  {tuple(cache.keys[layer].shape)!s:>12s}  {tuple(cache.values[layer].shape)!s:>12s}")
print("positions:", cache.positions.tolist())
print("last_position:", cache.last_position, f"(the prompt had {P + C + S} tokens)")

# %% [markdown]
# The cache is a drop-in replacement for the prompt's KV cache. Continuing the story from the full prompt (plain
# forward) and from HOMER's compact cache:

# %%
prompt = prefix_ids + context_ids + suffix_ids
logits, plain_cache = model.forward_cached(torch.tensor([prompt]))
plain = decode(model, logits[0, -1], plain_cache, next_position=len(prompt), max_new_tokens=20)
homer = homer_generate(model, cache, max_new_tokens=20)
print(f"prompt ends: ...{tok.decode(prompt[-20:])!r}")
print(f"plain ({len(prompt)} slots per layer): {tok.decode(plain)!r}")
print(f"HOMER ({len(cache.positions)} slots per layer): {tok.decode(homer)!r}")

# %% [markdown]
# ## Checks
#
# Besides the shapes, an independent check of what refinement means: for every layer a leaf ran, the final
# cache's keys of a surviving context token are exactly the keys its leaf computed for it, gathered by the
# decisions taken higher up; and the suffix slot holds the average over all leaves (each merge averages two).

# %%
K = len(cache.positions)
assert all(k.shape[1] == v.shape[1] == K for k, v in zip(cache.keys, cache.values)) and K == p.final_len
assert all(b[1] == chunk.keys[0].shape[1] and a[1] == len(pruned) == leaf.target for b, a in zip(before, after))
# Positions follow from the labels: prefix 0..P-1, context c at P + (c mod e) in its leaf, suffix at P+e+j.
prefix_positions, suffix_positions = iter(range(P)), iter(range(P + p.e, P + p.e + S))
expected_positions = [
    next(prefix_positions) if lab == "p" else next(suffix_positions) if lab == "s" else P + lab % p.e
    for lab in survivors
]
assert cache.positions.tolist() == expected_positions
# Every context token is either in the final cache or was removed exactly once.
assert sorted([c for c in survivors if c not in ("p", "s")] + list(dropped_at)) == list(range(C))
# Refinement = gathering: recompute each leaf's lower layers on its own and compare with the final cache.
leaf_keys = []  # per leaf: per leaf layer [Hkv, n, Dh]
for i in range(p.N):
    ids_i, pos_i, _, _ = make_leaf(p, i, prefix_ids, context_ids, suffix_ids)
    h, ks = model.embed_tokens(ids_i)[None], []
    for layer in range(*leaf.layers):
        h, k, _, _ = model.attend(layer, h, pos_i)
        h = model.feed_forward(layer, h)
        ks.append(k[0])
    leaf_keys.append(ks)
for slot, lab in enumerate(survivors):
    if lab not in ("p", "s"):
        i = lab // p.e  # its leaf, where it sat at slot P + (lab - i*e)
        for layer in range(*leaf.layers):
            assert torch.equal(cache.keys[layer][:, slot], leaf_keys[i][layer][:, P + lab - i * p.e])
for layer in range(*leaf.layers):
    suffix_mean = torch.stack([ks[layer][:, -S:] for ks in leaf_keys]).mean(0)  # [Hkv, S, Dh]
    assert torch.allclose(cache.keys[layer][:, -S:], suffix_mean, atol=1e-5)
assert len(homer) == 20 and len(plain) == 20
print("all checks passed")
