# %% [markdown]
# # 03 · The plan: chunks, positions, the layer schedule and every node's target
#
# Before any layer runs, HOMER's whole tree is fixed by integer arithmetic on a few lengths (HOMER_SPEC.md B.1,
# C.1, D.4): how many leaves, which context tokens each holds, at which positions, which layers each tree level
# runs, and how many tokens each node keeps. `plan()` computes all of it in one place; this tutorial
# re-derives every number from its rule on the shipped passkey model and the prompt of tutorial 01.
#
# | symbol | meaning |
# |---|---|
# | L, W | layers, warm-up layers (run by the leaves only, before any merging) |
# | M, T | the longest chunk, prefix and suffix included; the final cache length |
# | P, C, S | prefix, context, suffix lengths |
# | E = M − P − S | the most context tokens one chunk can hold |
# | N0 = ⌈C/E⌉, H = ⌈log2 N0⌉, N = 2^H | chunks needed; tree height; leaves (**rounded up to a power of two**) |
# | e = ⌈C/N⌉ | context tokens per leaf (the last leaf may hold fewer) |

# %%
import math

from common import DEMO_M, demo_config, demo_prompt, passkey_model, runs

from homer_ref.homer import plan
from homer_ref.homer.chunking import make_leaf

model, tok, bias = passkey_model()
prompt = demo_prompt(tok)
L, config = model.cfg.num_hidden_layers, demo_config()
P, C, S, M = len(prompt.prefix), len(prompt.context), len(prompt.suffix), DEMO_M
p = plan(L, config, P, C, S)
E = M - P - S
N0 = math.ceil(C / E)
H = math.ceil(math.log2(N0))
N, e = 2**H, math.ceil(C / 2**H)
print(f"P={P} C={C} S={S} M={M}:  E={E}  N0={N0}  H={H}  N={N}  e={e}   plan says {p.E} {p.N0} {p.H} {p.N} {p.e}")
print("context tokens per leaf:", list(p.leaf_context))

# %% [markdown]
# Nine chunks would do, but the tree is always a *perfect* binary tree: 9 becomes 16 leaves, and the context is
# then shared evenly, e = 127 tokens each — barely more than half of E = 237. The last leaf holds what is left.
#
# ## 1. The leaves, and their positions
#
# Leaf i is `[prefix | context[i·e : (i+1)·e] | suffix]`: every leaf gets its own copy of the prefix (here BOS)
# and of the suffix (the question). Positions are **local and reused** (B.3): every leaf's context starts at
# position P, whatever its place in the document, and suffix token j sits at **P + e + j in every leaf**.

# %%
leaves = {i: make_leaf(p, i, prompt.prefix, prompt.context, prompt.suffix) for i in range(N)}  # each: ids,
for i in (0, 9, N - 1):  # positions, is_context (the reduction mask: only context can be pruned), sources
    ids, positions, is_context, _ = leaves[i]
    text = "".join(tok.token_texts(ids[P : P + 6].tolist()))
    print(f"leaf {i:2d}: {len(ids)} slots, positions {runs(positions[:P])} | {runs(positions[P:-S])} | "
          f"{runs(positions[-S:])}   context starts {text!r} ...")  # fmt: skip

# %% [markdown]
# The last leaf holds fewer context tokens, so a **gap** opens between its context and its suffix: its suffix
# still sits at P + e. Why? Merging (tutorial 05) averages the suffix copies of two siblings slot by slot —
# their keys and values in every layer. A key carries its position as a rotation (tutorial 02), and the average
# of two keys rotated by the *same* angle is a key at that position; rotated by different angles it would be
# neither. The rule makes every copy agree. At layer 0, where a key depends only on its token and its position,
# the suffix keys of leaf 0 and of the short last leaf are then identical — and would not be without the rule:


# %%
def layer0_keys(ids, positions):  # [Hkv, n, Dh]
    return model.attend(0, model.embed_tokens(ids)[None], positions)[1][0]


first, last = leaves[0], leaves[N - 1]
same = (layer0_keys(first.ids, first.positions)[:, -S:] - layer0_keys(last.ids, last.positions)[:, -S:]).abs().max()
no_gap = last.positions.clone()
no_gap[-S:] -= e - p.leaf_context[-1]  # the suffix right after the short context: P + c + j
shifted = (layer0_keys(first.ids, first.positions)[:, -S:] - layer0_keys(last.ids, no_gap)[:, -S:]).abs().max()
print(f"suffix keys at layer 0, leaf 0 vs leaf {N - 1}: max |Δ| = {float(same):.1e} with the rule, "
      f"{float(shifted):.2f} with the suffix right after the short context")  # fmt: skip
print(f"largest position any leaf uses: {max(int(l.positions.max()) for l in leaves.values())} = P+e+S-1 < M = {M}")

# %% [markdown]
# ## 2. The layer schedule
#
# Every tree level gets its own block of layers (C.1): with Lm = L − W merging layers and H + 1 levels,
# lpc = ⌊Lm / (H+1)⌋ layers per level, and the lo = Lm − lpc·(H+1) left over go to the **leaves**, which also
# run the W warm-up layers. A leaf runs layers [0, W+lo+lpc); a level-h node runs [W+lo+lpc·h, W+lo+lpc·(h+1)).
# Each node prunes at the last layer of its block, after that layer's attention and before its MLP (C.2).


# %%
def schedule(L: int, W: int, H: int) -> list[tuple[int, int]]:
    lpc = (L - W) // (H + 1)
    lo = (L - W) - lpc * (H + 1)
    return [(0, W + lo + lpc)] + [(W + lo + lpc * h, W + lo + lpc * (h + 1)) for h in range(1, H + 1)]


def blocks(L: int, W: int, H: int) -> str:
    return ", ".join(f"{a}-{b - 1}" for a, b in schedule(L, W, H))


print(f"shipped model, L={L} W=0 H={H}: lpc={p.lpc}, lo={p.lo}; levels 0..{H} run layers {blocks(L, 0, H)}")
print(f"Llama-2-7B, L=32 W=12: H=2 -> {blocks(32, 12, 2)};  H=4 -> {blocks(32, 12, 4)}")


# %% [markdown]
# ## 3. Every node's target
#
# Two sibling chunks are merged into `[prefix | left context | right context | suffix]`, which must again fit in
# M. So before a merge each child is reduced to **R = P + ⌊E/2⌋ + S** tokens (D.4): two of them hold
# P + 2·⌊E/2⌋ + S ≤ M. A leaf of P + e + S tokens therefore drops only e − ⌊E/2⌋ context tokens; a merged node,
# full again, drops ⌊E/2⌋ of them: most of the pruning happens above the leaves. The root's target is
# min(T, P+C+S) = T = M here, so with T = M it prunes nothing.
#
# **The short-right rule**: if the right child's raw leaf is already shorter than R (the short last leaf), it
# keeps everything (target r0, its raw length) and its left sibling may keep M − (r0 − P − S), so the merge
# still fills M. The official code compares the *raw* length of the right subtree's first leaf, before any
# layer runs (HOMER_SPEC.md D.4, K.3); with default settings the rule can only fire at the last pair of leaves.
# It does not on our prompt (its last leaf holds 124 context tokens > ⌊E/2⌋ = 118); at 7.9× the trained context
# it does:


# %%
def targets(p) -> dict[tuple[int, int], int]:
    """Every node's target by D.4, from the lengths alone (independently of plan())."""
    out, R = {(p.H, 0): min(p.T, p.P + p.C + p.S)}, p.P + p.E // 2 + p.S
    for level in range(p.H, 0, -1):
        for index in range(p.N >> level):
            r0 = p.P + p.leaf_context[(2 * index + 1) * 2 ** (level - 1)] + p.S  # raw first leaf of the right child
            short_right = (p.M - (r0 - p.P - p.S), r0)  # the left child may fill the merge up to M
            out[(level - 1, 2 * index)], out[(level - 1, 2 * index + 1)] = short_right if r0 < R else (R, R)
    return out


short = demo_prompt(tok, multiple=7.9)
q = plan(L, config, len(short.prefix), len(short.context), len(short.suffix))
for name, pl in (("our prompt", p), ("7.9x", q)):
    print(
        f"{name}: C={pl.C}, R={pl.R}; leaves 13, 14, 15 hold {pl.leaf_context[13:]} context tokens, targets "
        f"{[pl.nodes[(0, i)].target for i in (13, 14, 15)]}; node 1.7 gets {pl.input_len(pl.nodes[(1, 7)])} of M={M}"
    )
print("our prompt, level by level (slots in -> target):")
for h in range(H + 1):
    sizes = sorted({(p.input_len(n), n.target) for (level, _), n in p.nodes.items() if level == h}, reverse=True)
    print(f"  level {h}: " + ", ".join(f"{n} -> {t} ({max(0, n - t)} removed)" for n, t in sizes))


# %% [markdown]
# ## Checks

# %%
assert (p.E, p.N0, p.H, p.N, p.e) == (E, N0, H, N, e) and sum(p.leaf_context) == C
assert all(
    leaves[i].positions.tolist() == list(range(P + p.leaf_context[i])) + list(range(P + e, P + e + S)) for i in range(N)
), "local positions: context from P, suffix at P+e+j in every leaf"
assert float(same) == 0.0 and float(shifted) > 0.1, "the suffix rule makes the suffix keys of all leaves agree"
assert [p.nodes[(h, 0)].layers for h in range(H + 1)] == schedule(L, 0, H)
assert schedule(32, 12, 2) == [(0, 20), (20, 26), (26, 32)]  # HOMER_SPEC.md C.1's Llama-2-7B example
assert {k: n.target for k, n in p.nodes.items()} == targets(p) and {k: n.target for k, n in q.nodes.items()} == targets(
    q
)
assert all(p.input_len(n) <= M for n in p.nodes.values()) and p.final_len == P + 2 * (E // 2) + S
assert q.nodes[(0, 15)].target == q.P + q.leaf_context[15] + q.S < q.R, "the short right leaf keeps everything"
assert q.input_len(q.nodes[(1, 7)]) == M, "... and its left sibling fills the merge up to M"
print("all checks passed")

# %% [markdown]
# ## Try this
#
# 1. `demo_config(max_chunk_len=128)`: predict E, N0, N, e and R before printing `plan(...)`.
# 2. `demo_config(warmup_layers=2)` at 8×: which layers do the leaves run now? And `warmup_layers=4`? (The
#    tree needs H + 1 = 5 levels and L − W layers to share: read the error message.)
# 3. Find other prompt lengths where the short-right rule fires (`demo_prompt(tok, multiple=7.5)`, 7.6, ...):
#    what decides it is only `C − (N−1)·e` against ⌊E/2⌋.
# 4. `demo_prompt(tok, multiple=16)`: 32 leaves. How many layers does a leaf run now, and why fewer?
# 5. `demo_prompt(tok, multiple=0.9)`: the context fits one chunk. Predict the plan; then check that HOMER's
#    `cache.logits[-1]` matches the plain forward's last row, `model(torch.tensor([prompt.ids]))[0, -1]` (N.3).
