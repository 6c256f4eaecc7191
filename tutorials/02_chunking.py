# %% [markdown]
# # 02 · Chunking: how a long input becomes the leaves of HOMER's tree
#
# A model trained on 512-token windows cannot read 4,000 tokens at once. HOMER's first step is to cut the long
# input into chunks the model *can* read, called the **leaves** of a binary tree. HOMER's input comes in three
# parts, chosen by the caller:
#
# ```
# [ prefix | ..................... context ..................... | suffix ]
#   e.g. the instruction        the long document                e.g. the question
# ```
#
# Only the context is cut. **Every leaf gets its own copy of the prefix and of the suffix**, so every chunk sees
# the instruction and the question. The symbols, used everywhere in homer_ref:
#
# | symbol | meaning |
# |---|---|
# | M | the longest chunk, prefix and suffix included (`max_chunk_len`) |
# | P, C, S | prefix, context, suffix lengths |
# | E = M − P − S | the most context tokens one chunk can hold |
# | N0 = ⌈C / E⌉ | chunks needed |
# | H = ⌈log2 N0⌉, N = 2^H | tree height, leaves: **N0 rounded up to a power of two** (a perfect binary tree) |
# | e = ⌈C / N⌉ | context tokens per leaf (the last leaf may hold fewer) |
#
# Positions are the surprising part: they are **local and reused**. Every leaf's context starts at position P,
# whatever its place in the document, so the model never sees a position beyond the range it was trained on.
#
# This tutorial needs no model, only `homer_ref.plan` (the arithmetic) and `homer_ref.chunking` (the leaves).
# It follows HOMER_SPEC.md sections B.1–B.5.

# %%
import math
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent if "__file__" in globals() else Path.cwd()  # in Jupyter: tutorials/
ROOT = HERE.parent  # the project root: homer_ref/ lives here
sys.path.insert(0, str(ROOT))
STORIES = ROOT / "homer_ref" / "data" / "stories260K"

import homer_ref
from homer_ref.homer.chunking import leaf_positions, leaf_span, make_leaf
from homer_ref.homer.plan import HomerConfig, plan


class ByteTokenizer:
    """Stand-in for the sentencepiece tokenizer when stories260K is absent: one token per byte (ids 3..258)."""

    bos_id = 1

    def encode(self, text: str, bos: bool = True) -> list[int]:
        return [self.bos_id] * bos + [3 + b for b in text.encode("utf-8")]

    def decode(self, ids) -> str:
        return bytes(int(i) - 3 for i in ids if 3 <= int(i) < 259).decode("utf-8", errors="replace")


if (STORIES / "tok512.model").is_file():
    tok = homer_ref.load_tokenizer(STORIES / "tok512.model")
else:
    print(f"note: {STORIES} not found, so this tutorial uses one token per byte instead of stories260K's tokenizer")
    tok = ByteTokenizer()


def text_of(ids: list[int]) -> str:
    """Token ids as text, with BOS shown as <s>."""
    if ids and ids[0] == tok.bos_id:
        return "<s>" + tok.decode(ids[1:])
    return tok.decode(ids)


def piece(token_id: int) -> str:
    """One token as text; sentencepiece writes a leading space as '▁'."""
    return tok.piece(token_id) if hasattr(tok, "piece") else repr(tok.decode([token_id]))[1:-1]


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


# %% [markdown]
# ## 1. The arithmetic, on the worked example of HOMER_SPEC.md (section L)
#
# A model of L = 8 layers, chunks of at most M = 8 tokens, one prefix token, one suffix token, and 24 context
# tokens. `plan(L, HomerConfig(...), P, C, S)` computes every derived number in one place and prints them;
# the node table below the numbers is the tree, which tutorial 04 explains.

# %%
worked = plan(8, HomerConfig(max_chunk_len=8, warmup_layers=2), P=1, C=24, S=1)
print(worked)

# %% [markdown]
# E = 8 − 1 − 1 = 6 context tokens fit in a chunk, so 24 tokens need N0 = 4 chunks: a tree of height H = 2 with
# N = 4 leaves of e = 6 context tokens each.
#
# ## 2. Rounding up to a power of two
#
# The tree is always a *perfect* binary tree, so N0 = 3 chunks become N = 4 leaves, and the context is then
# shared evenly: e = ⌈C/N⌉ is recomputed from N, so leaves are often only a little over half full. A sweep over
# C with the same M = 8, P = S = 1 (E = 6):

# %%
print("   C   N0  H   N   e   context per leaf")
sweep, refused = {}, {}
for C in (1, 6, 7, 12, 13, 14, 18, 24, 25, 30, 37, 48):
    try:
        p = plan(8, HomerConfig(max_chunk_len=8, warmup_layers=2), P=1, C=C, S=1)
    except ValueError as error:  # explained in section 4
        refused[C] = str(error)
        print(f"  {C:3d}  ValueError: {str(error)[:75]}...")
        continue
    sweep[C] = p
    print(f"  {C:3d}  {p.N0:2d} {p.H:2d} {p.N:3d} {p.e:3d}   {list(p.leaf_context)}")

# %% [markdown]
# C = 25 is refused: it needs N0 = 5 chunks, so N = 8 leaves of e = ⌈25/8⌉ = 4 tokens, and seven full leaves
# already hold 28 > 25 tokens — the last leaf would be empty (the official code crashes with a negative tensor
# size here). Such gaps only appear with tiny chunks; the message suggests the nearest M that works.
#
# ## 3. The leaves of a real text
#
# Now a story, with a short instruction as prefix and the beginning of a sentence as suffix (the model will be
# asked to continue it). M = 48 keeps the printout small.

# %%
STORY = (
    "Once upon a time, there was a little girl named Lily. She had a small red ball. "
    "Every day she played with the ball in the park near her house. "
    "One day, Lily met a big brown dog. The dog was friendly and wanted to play too. "
    "Lily threw the ball and the dog ran fast to get it. They played all day and had lots of fun. "
)
prefix_ids = tok.encode("A story:")  # BOS + the instruction
context_ids = tok.encode(STORY, bos=False)[:110]
suffix_ids = tok.encode(" The dog was", bos=False)
P, C, S = len(prefix_ids), len(context_ids), len(suffix_ids)
config = HomerConfig(max_chunk_len=48)
p = plan(5, config, P, C, S)  # stories260K has 5 layers
print(f"P={P} C={C} S={S}  ->  E={p.E} N0={p.N0} H={p.H} N={p.N} e={p.e}, leaves hold {list(p.leaf_context)}")
print()
print(" leaf  context slice  n    positions (prefix | context | suffix)   text")
leaves = []
for i in range(p.N):
    ids, positions, is_context, _ = make_leaf(p, i, prefix_ids, context_ids, suffix_ids)  # tensors [n]
    leaves.append((ids.tolist(), positions.tolist(), is_context.tolist()))
    start, stop = leaf_span(p, i)
    pos = positions.tolist()
    parts = f"{compress(pos[:P])} | {compress(pos[P:-S])} | {compress(pos[-S:])}"
    text = f"{text_of(prefix_ids)} | {tok.decode(context_ids[start:stop])} | {tok.decode(suffix_ids)}"
    print(f"  {i:3d}  [{start:3d}, {stop:3d})  {len(ids):3d}   {parts:36s}  {text}")

# %% [markdown]
# Every leaf starts its context at position P and puts its suffix at the same positions. That is the
# **suffix rule**: with more than one leaf, suffix token j sits at position **P + e + j in every leaf**. A full
# leaf does not notice, but the shorter last leaf gets a *gap* between its context and its suffix. Slot by slot:

# %%
ids, positions, is_context = leaves[-1]
print(" slot  part     position  token")
for j, (t, pos, ctx) in enumerate(zip(ids, positions, is_context)):
    part = "prefix" if j < P else "context" if ctx else "suffix"
    if j < P + 2 or j >= len(ids) - S - 2:  # the interesting ends; the middle is like any leaf
        print(f"  {j:3d}  {part:8s} {pos:5d}     {piece(t)}")
    elif j == P + 2:
        print("   ...")
gap = positions[len(ids) - S] - positions[len(ids) - S - 1] - 1
print(f"gap before the suffix: {gap} unused positions (the last leaf holds {p.leaf_context[-1]} < e = {p.e})")

# %% [markdown]
# Why? Merging (tutorial 04) *averages* the suffix copies of two sibling chunks slot by slot, which makes sense
# only if both copies sit at the same positions. And since every leaf uses positions 0 … P+e+S−1 ≤ M−1, the model
# never sees a position beyond M − 1, however long the document.
#
# The third field `make_leaf` returns, `is_context`, is the **reduction mask**: only context tokens may ever be
# pruned; the prefix and suffix always survive. For leaf 0 (█ = context, · = prefix or suffix):

# %%
print("".join("█" if c else "·" for c in leaves[0][2]))

# %% [markdown]
# With a single leaf (C ≤ E) there is nothing to merge, and positions are simply 0 … P+C+S−1, as in a plain
# forward pass:

# %%
short = plan(5, config, P, 20, S)
print(f"C=20: N={short.N}, positions {leaf_positions(short, 0)}")

# %% [markdown]
# ## 4. When the settings cannot work
#
# Invalid settings raise a `ValueError` that names the broken constraint and suggests a fix (the official code
# crashes or silently lets chunks grow past M; HOMER_SPEC.md N.2.6). One case small models hit quickly: every tree
# level needs its own layers, so a 5-layer model can build a tree of height at most 4.

# %%
bad_settings = {
    "no suffix": (5, HomerConfig(max_chunk_len=48), P, C, 0),
    "chunk too small": (5, HomerConfig(max_chunk_len=P + S), P, C, S),
    "tree too deep": (5, HomerConfig(max_chunk_len=48), P, 5000, S),
    "empty last leaf": (8, HomerConfig(max_chunk_len=4), 1, 5, 1),
}
errors = {}
for name, args in bad_settings.items():
    try:
        plan(*args)
    except ValueError as error:
        errors[name] = str(error)
        print(f"{name}:\n  {error}\n")

# %% [markdown]
# ## Checks
#
# The worked example and its variants match the numbers HOMER_SPEC.md section L records from running the official
# code; the leaves put the context back together exactly; the suffix rule and the position bound hold.

# %%
# Section L: E, N0, H, N, e, lpc, lo, the layer blocks and every target (5 for children, 8 for the root).
assert (worked.E, worked.N0, worked.H, worked.N, worked.e, worked.lpc, worked.lo) == (6, 4, 2, 4, 6, 2, 0)
assert [worked.nodes[(level, 0)].layers for level in range(3)] == [(0, 4), (4, 6), (6, 8)]
assert sorted(n.target for n in worked.nodes.values()) == [5] * 6 + [8]
# Section L variants: C = 14 gives a short last leaf with positions [0, 1, 2, 5]; C = 40 gives 8 leaves, lpc 1, lo 2.
assert leaf_positions(sweep[14], 3) == [0, 1, 2, 5]
v40 = plan(8, HomerConfig(max_chunk_len=8, warmup_layers=2), P=1, C=40, S=1)
assert (v40.N, v40.lpc, v40.lo, v40.nodes[(0, 0)].layers) == (8, 1, 2, (0, 5))
# The sweep: N is the smallest power of two >= N0, and the leaves share the context evenly and completely;
# the refused C are exactly those whose last leaf would be empty (recomputed here from the formulas of B.1).
assert set(refused) == {
    C
    for C in (*sweep, *refused)
    if (n := 2 ** math.ceil(math.log2(math.ceil(C / 6)))) > 1 and C <= (n - 1) * math.ceil(C / n)
}
for C, sp in sweep.items():
    assert sp.N >= sp.N0 > sp.N // 2 or sp.N == 1
    assert sum(sp.leaf_context) == C and max(sp.leaf_context) == sp.e <= sp.E and min(sp.leaf_context) > 0
# The real text: every leaf is prefix + its slice + suffix, and the slices put the context back together.
assert [t for ids, _, mask in leaves for t, m in zip(ids, mask) if m] == context_ids
assert all(ids[:P] == prefix_ids and ids[-S:] == suffix_ids for ids, _, _ in leaves)
# Local, reused positions: every context starts at P, every suffix sits at P+e+j, nothing reaches M.
assert all(pos[P] == P and pos[-S:] == list(range(P + p.e, P + p.e + S)) for _, pos, _ in leaves)
assert max(max(pos) for _, pos, _ in leaves) <= p.M - 1
assert gap == p.e - p.leaf_context[-1] > 0
assert short.N == 1 and leaf_positions(short, 0) == list(range(P + 20 + S))
# Each bad setting raised an error that says what to change.
assert set(errors) == set(bad_settings)
assert "suffix" in errors["no suffix"] and "exceed prefix + suffix" in errors["chunk too small"]
assert "max_chunk_len >=" in errors["tree too deep"] and "would hold -1" in errors["empty last leaf"]
print("all checks passed")
