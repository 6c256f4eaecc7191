# %% [markdown]
# # 04 · Hierarchical merging: the tree and its layer schedule
#
# Tutorial 02 cut the input into N leaves; tutorial 03 showed how a chunk drops tokens. This one puts them
# together. The leaves are the bottom of a perfect binary tree:
#
# 1. each leaf runs the **lower layers** on its own, and at the last of them drops tokens down to its target;
# 2. two reduced siblings are **merged** into one chunk `[avg prefix | left context | right context | avg suffix]`;
# 3. the merged chunk runs the **next block of layers**, and is reduced again before its own merge;
# 4. the root runs the top layers. What comes out is a KV cache for all L layers (tutorial 05).
#
# The layers are shared out by level (HOMER_SPEC.md C.1): with `lpc = ⌊(L − W) / (H + 1)⌋` layers per level and
# `lo` left over, the leaves run the W warm-up layers, the leftover layers and one block; every level above runs
# one block of `lpc` layers. The targets (D.4) make every merged chunk fit in M tokens again.
#
# We draw the tree of a story on stories260K, merge two leaves by hand and look at the result, then build the
# whole tree from the library's pieces and check it equals `homer_prefill` bit for bit.

# %%
import copy
import sys
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()  # in Jupyter: tutorials/
ROOT = HERE.parent  # the project root: homer_ref/ lives here
sys.path.insert(0, str(ROOT))
STORIES = ROOT / "homer_ref" / "data" / "stories260K"

import homer_ref
from homer_ref.homer import homer_prefill, reduction
from homer_ref.homer.calibration import calibrate_on_context
from homer_ref.homer.chunking import Chunk, make_leaf
from homer_ref.homer.merging import merge
from homer_ref.homer.plan import HomerConfig, Node, plan
from homer_ref.homer.refinement import keep_slots
from homer_ref.homer.traversal import LiveKV, depth_first
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
    print(f"note: {STORIES} not found, so this tutorial uses a tiny RANDOM model (seed 0): the choices are arbitrary")
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=512, hidden_size=64, intermediate_size=172, num_hidden_layers=5, num_attention_heads=8,
        num_key_value_heads=4, head_dim=8, max_position_embeddings=512, tie_word_embeddings=True,
    )  # fmt: skip
    return Llama(cfg).eval().requires_grad_(False), ByteTokenizer(), False


def compress(positions: list[int]) -> str:
    """[0, 1, 2, 3, 7, 8] -> '0..3 7..8': runs of consecutive positions."""
    runs, start = [], None
    for j, p in enumerate(positions):
        if start is None:
            start = p
        if j + 1 == len(positions) or positions[j + 1] != p + 1:
            runs.append(f"{start}" if start == p else f"{start}..{p}")
            start = None
    return " ".join(runs)


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
prefix_ids = [tok.bos_id]
context_ids = tok.encode(STORY, bos=False)[:400]
suffix_ids = tok.encode(" The dog was", bos=False)
P, C, S = len(prefix_ids), len(context_ids), len(suffix_ids)
config = HomerConfig(max_chunk_len=64)
p = plan(cfg.num_hidden_layers, config, P, C, S)
print(p)

# %% [markdown]
# ## 1. The tree
#
# Each node shows `tokens in → tokens out`. Leaves hold P + e + S tokens; a merged node holds its children's reduced
# lengths minus one prefix and one suffix (they are averaged into one copy). The root's target is T = M, so it
# normally prunes nothing.

# %%
WIDTH = 11  # characters per leaf


def name(node: Node) -> str:
    return (
        "root" if node.level == p.H else f"leaf {node.index}" if node.level == 0 else f"node {node.level}.{node.index}"
    )


def size(node: Node) -> str:
    return f"{p.input_len(node)}→{min(node.target, p.input_len(node))}"


def connectors(level: int) -> str:
    """The ┌──┴──┐ lines joining each node of `level` to its two children."""
    line, span = [" "] * (WIDTH * p.N), WIDTH * 2**level
    for index in range(p.N >> level):
        left, right, mid = index * span + span // 4, index * span + 3 * span // 4, index * span + span // 2
        line[left : right + 1] = "─" * (right - left + 1)
        line[left], line[mid], line[right] = "┌", "┴", "┐"
    return "".join(line)


for level in range(p.H, -1, -1):
    first, last = p.nodes[(level, 0)].layers
    nodes = [p.nodes[(level, i)] for i in range(p.N >> level)]
    print(f"level {level}  layers {first}-{last - 1}  " + "".join(size(n).center(WIDTH * 2**level) for n in nodes))
    if level:
        print(" " * 20 + connectors(level))
print(" " * 20 + "".join(name(n).center(WIDTH) for n in nodes))

# %% [markdown]
# ## 2. The layer schedule
#
# Which node runs which layer, and where the reductions happen (✂ marks a node's last layer when it prunes):

# %%
schedule = {}  # layer -> level that runs it
for layer in range(cfg.num_hidden_layers - 1, -1, -1):
    level = next(lv for lv in range(p.H + 1) if p.nodes[(lv, 0)].layers[0] <= layer < p.nodes[(lv, 0)].layers[1])
    schedule[layer] = level
    cells = []
    for i in range(p.N >> level):
        node = p.nodes[(level, i)]
        prunes = layer == node.layers[1] - 1 and p.input_len(node) > node.target
        cells.append((("✂ " if prunes else "") + name(node)).center(WIDTH * 2**level - 1) + "|")
    print(f"layer {layer} |" + "".join(cells))

# %% [markdown]
# With 5 layers and a tree of height H = 3 there are H + 1 = 4 levels: lpc = ⌊5/4⌋ = 1 layer per level and lo = 1
# left over, which goes to the leaves (they run 2 layers). Llama-2-7B with W = 12 warm-up layers and H = 2 would
# give its leaves layers 0–19, then blocks 20–25 and 26–31 (HOMER_SPEC.md C.1).
#
# ## 3. One merge step, by hand
#
# A node runs its block of layers with `attend` and `feed_forward`; at its last layer, between the two, it scores
# its tokens and keeps all but the lowest (tutorial 03), in every layer it holds (`keep_slots`, tutorial 05).
# These few lines are all of HOMER's per-node work. The bias comes from `calibrate_on_context`: calibration on
# the input's own context, the library's fallback when no table was made beforehand.

# %%
bias = calibrate_on_context(model, context_ids, config.max_chunk_len)  # [L, M]


def run_node(node: Node, chunk: Chunk) -> Chunk:
    """Run the node's layers on `chunk`; at its last layer, after attention, drop the slots below its target."""
    first, last = node.layers
    k = len(chunk) - node.target  # how many to remove (nothing when the chunk already fits)
    for layer in range(first, last):
        h, keys, values, last_logits = model.attend(layer, chunk.h[None], chunk.positions, last_query=True)
        chunk.h = h[0]
        chunk.keys.append(keys[0])  # [Hkv, n, Dh]
        chunk.values.append(values[0])
        if layer == last - 1 and k > 0:
            sig = reduction.significance(last_logits[0], chunk.positions, chunk.is_context, bias[layer])
            kept, _ = reduction.select(sig, k)
            chunk = keep_slots(chunk, kept)
        chunk.h = model.feed_forward(layer, chunk.h[None])[0]
    return chunk


def run_leaf(i: int) -> Chunk:
    leaf = make_leaf(p, i, prefix_ids, context_ids, suffix_ids)
    return run_node(p.nodes[(0, i)], Chunk(model.embed_tokens(leaf.ids), leaf.positions, leaf.is_context, leaf.sources))


left, right = run_leaf(0), run_leaf(1)
left_copy, right_copy = copy.deepcopy(left), copy.deepcopy(right)  # `merge` consumes its inputs
merged = merge(left, right, P, S)
print(f"after the merge, leaf 0's chunk holds {len(left.keys)} layers of cache: merge frees its inputs (tutorial 06)")

for title, chunk in (("left (leaf 0)", left_copy), ("right (leaf 1)", right_copy), ("merged", merged)):
    pos = chunk.positions.tolist()
    print(
        f"{title:14s} {len(chunk):3d} slots, {len(chunk.keys)} layers of cache   positions "
        f"{compress(pos[:P])} | {compress(pos[P:-S])} | {compress(pos[-S:])}"
    )

# %% [markdown]
# The merged chunk, slot by slot (`p` prefix, `a` context from the left child, `b` from the right child, `s`
# suffix):
#
# - **Positions are not re-numbered.** Both children's contexts came from leaves whose positions start at P, so
#   the merged chunk's positions overlap and go backwards. Attention stays causal by *sequence index*: a right
#   token still sees every left token, even one with a larger position.
# - **The affixes are averaged, not repeated.** Each child has its own copy of the prefix and the suffix; the
#   merged chunk holds one copy, the mean of the two (hidden states, and K and V in every layer).

# %%
n_left_ctx = len(left_copy) - P - S
strip = "p" * P + "a" * n_left_ctx + "b" * (len(merged) - P - S - n_left_ctx) + "s" * S
print(strip)
print("positions:", merged.positions.tolist())
print("affix copies before averaging, max |left - right|:")
print(
    f"  prefix: hidden {float((left_copy.h[:P] - right_copy.h[:P]).abs().max()):.2e}, "
    f"keys {max(float((a[:, :P] - b[:, :P]).abs().max()) for a, b in zip(left_copy.keys, right_copy.keys)):.2e}"
)
print(
    f"  suffix: hidden {float((left_copy.h[-S:] - right_copy.h[-S:]).abs().max()):.2e}, "
    f"keys {max(float((a[:, -S:] - b[:, -S:]).abs().max()) for a, b in zip(left_copy.keys, right_copy.keys)):.2e}"
)

# %% [markdown]
# The prefix copies are identical: with causal attention a prefix token sees only the prefix, the same in every
# leaf, so averaging changes nothing. The suffix copies differ, because each one attended to a different
# context: their average is a suffix that has "read" both. That is what the next layers' last query works
# with when it scores the merged chunk.
#
# ## 4. The whole tree, from these pieces
#
# `traversal.depth_first` walks the tree in post-order — left subtree, right subtree, merge, run the parent —
# calling our `run_leaf` and `run_node` (why this order, and what it saves, is tutorial 06). The result should
# be exactly what `homer_prefill` computes.

# %%
root = depth_first(p, run_leaf, run_node, lambda a, b: merge(a, b, P, S), LiveKV())
cache = homer_prefill(model, prefix_ids, context_ids, suffix_ids, config, bias=bias, all_logits=True)
same = (
    torch.equal(root.positions, cache.positions)
    and all(torch.equal(a, b) for a, b in zip(root.keys + root.values, cache.keys + cache.values))
    and torch.equal(model.logits(root.h[None])[0], cache.logits)
)
print(f"hand-built root: {len(root)} slots in {len(root.keys)} layers; identical to homer_prefill: {same}")
print("execution order:", " → ".join(f"{t.level}.{t.index}" for t in cache.nodes))
print("node inputs (slots):", {f"{t.level}.{t.index}": len(t.input_positions) for t in cache.nodes})

# %% [markdown]
# ## Checks

# %%
# The schedule: every layer is run by exactly one level, bottom-up and contiguous; leaves get W + lo + lpc layers.
assert [schedule[layer] for layer in range(cfg.num_hidden_layers)] == sorted(schedule.values())
assert p.nodes[(0, 0)].layers == (0, p.W + p.lo + p.lpc) and p.root.layers[1] == cfg.num_hidden_layers
# The merge: [avg prefix | left context | right context | avg suffix], positions copied, never re-numbered.
assert len(merged) == len(left_copy) + len(right_copy) - P - S
assert merged.positions.tolist() == left_copy.positions.tolist()[:-S] + right_copy.positions.tolist()[P:]
# Tensor by tensor: the hidden states [n, D], then K and V of every layer, [Hkv, n, Dh] seen as [n, Hkv, Dh].
slot_major = [(merged.h, left_copy.h, right_copy.h)] + [
    (m.transpose(0, 1), a.transpose(0, 1), b.transpose(0, 1))
    for m, a, b in zip(
        merged.keys + merged.values, left_copy.keys + left_copy.values, right_copy.keys + right_copy.values
    )
]
for ours, a, b in slot_major:
    assert torch.equal(ours[P:-S], torch.cat([a[P:-S], b[P:-S]]))
    assert torch.equal(ours[:P], (a[:P] + b[:P]) / 2) and torch.equal(ours[-S:], (a[-S:] + b[-S:]) / 2)
# Prefix copies agree exactly (causal attention), suffix copies do not (each saw its own context).
assert torch.equal(left_copy.h[:P], right_copy.h[:P]) and not torch.allclose(left_copy.h[-S:], right_copy.h[-S:])
assert len(left.keys) == len(right.keys) == 0, "merge frees its children"
# Every chunk any node runs fits in M tokens, and matches the plan's arithmetic.
assert all(len(t.input_positions) == p.input_len(p.nodes[(t.level, t.index)]) <= p.M for t in cache.nodes)
# Post-order: a node runs right after its right subtree.
order = [(t.level, t.index) for t in cache.nodes]


def post_order(level: int, index: int) -> list[tuple[int, int]]:
    return (
        [] if level < 0 else post_order(level - 1, 2 * index) + post_order(level - 1, 2 * index + 1) + [(level, index)]
    )


assert order == post_order(p.H, 0) and len(order) == 2 * p.N - 1
# The pieces composed by hand are HOMER: bit-identical to homer_prefill.
assert same
print("all checks passed")
