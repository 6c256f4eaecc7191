# %% [markdown]
# # 06 · Depth-first order: memory that grows with the tree's height, not the input
#
# Any order that finishes both children before their parent computes the same tree. The order decides how
# much KV cache is alive at once (HOMER_SPEC.md G):
#
# - **level-order**: every leaf, then every level-1 node, ... After the leaves, all N reduced leaves wait
#   together: memory grows **linearly** with the input.
# - **depth-first** (post-order): finish the left subtree, keep its result, finish the right subtree, merge,
#   free both. Besides the node at work, at most **one finished sibling per level** waits for its merge:
#   memory grows with the tree's height, **logarithmically** with the input.
#
# Measured in *token-layers* (one token's K and V in one layer), the depth-first peak is bounded by (G.2)
#
# ```
# sum over levels h < H of  R_h · ℓ(h)   +   M · L        against   (P + C + S) · L   for the plain cache
# ```
#
# with R_h the reduced length of a level-h child and ℓ(h) = W + lo + lpc·(h+1) the layers it holds. The
# official code walks depth-first but keeps every right child alive until the end, so its memory grows
# linearly after all (G.3); homer_ref frees each child as soon as it is merged (N.2.1).

# %%
import torch
from common import demo_config, demo_prompt, passkey_model

from homer_ref.homer import HomerConfig, homer_prefill, plan
from homer_ref.homer.traversal import g2_bound, plain_kv, simulate_live_kv

model, tok, bias = passkey_model()
L = model.cfg.num_hidden_layers


def run(multiple: float, traversal: str):
    prompt = demo_prompt(tok, multiple=multiple)
    return homer_prefill(model, prompt.prefix, prompt.context, prompt.suffix, demo_config(), bias, traversal)


runs = {traversal: run(8, traversal) for traversal in ("depth_first", "level_order")}
p = runs["depth_first"].plan

# %% [markdown]
# ## 1. Live KV over time
#
# `homer_prefill` meters the live KV after the attention of every layer of every node: the finished chunks
# waiting for a sibling plus the chunk at work (`cache.kv_timeline`). One character per observation, in
# execution order (a leaf runs 4 layers, every node above one):

# %%
top = max(max(c.kv_timeline) for c in runs.values())
for name, c in runs.items():
    print(
        f"{name:12s}"
        + "".join(" ▁▂▃▄▅▆▇█"[round(8 * v / top)] for v in c.kv_timeline)
        + f"  peak {c.peak_kv_token_layers}"
    )
print(f"G.2 bound {g2_bound(p)}, plain cache {plain_kv(p)} token-layers")
held = [p.R * p.held_layers(h) for h in range(p.H)]
print(f"the bound's terms: a reduced child of R = {p.R} slots per level, holding ℓ(h) = "
      f"{[p.held_layers(h) for h in range(p.H)]} layers: {held}, + M·L = {p.M * L}")  # fmt: skip

# %% [markdown]
# Depth-first climbs a step each time it descends into a right subtree (one more finished sibling waiting)
# and drops at every merge; its peak comes at the last leaf, with one sibling waiting at each level.
# Level-order piles up all 16 reduced leaves, then a whole level at a time.
#
# The meter's timeline can also be *predicted* from the plan alone (`simulate_live_kv`, no model): that is how
# the bound is evaluated for models too large to run. It matches the measurement exactly:

# %%
for name, c in runs.items():
    print(f"{name:12s} simulated from the plan == measured: {simulate_live_kv(p, name) == c.kv_timeline}")
df, lo = runs["depth_first"], runs["level_order"]
same = torch.equal(df.positions, lo.positions) and torch.equal(df.logits, lo.logits)
same = same and all(torch.equal(a, b) for a, b in zip(df.keys + df.values, lo.keys + lo.values))
print(f"both orders give a bit-identical cache and logits: {same}")

# %% [markdown]
# ## 2. Growth with the input
#
# From 2x to 16x the trained context, the plain cache grows with the input; level-order at least holds
# N · R · ℓ(0) (every reduced leaf at once); depth-first adds about one reduced chunk per extra level.

# %%
print(f"  {'x':>3s} {'N':>3s} {'plain':>7s} {'level-order':>12s} {'depth-first':>12s} {'G.2 bound':>10s}")
sweep = {}
for multiple in (2, 4, 8, 16):
    a, b = run(multiple, "depth_first"), run(multiple, "level_order")
    sweep[multiple] = (a, b)
    print(f"  {multiple:3d} {a.plan.N:3d} {plain_kv(a.plan):7d} {b.peak_kv_token_layers:12d} "
          f"{a.peak_kv_token_layers:12d} {g2_bound(a.plan):10d}")  # fmt: skip

# %% [markdown]
# The bound needs only the plan, so it can be evaluated at the paper's scale: Llama-2-7B (L = 32, W = 12,
# M = 2048, prefix and suffix of 100 tokens; 16 KiB per token-layer in fp16). The last columns are
# HOMER_SPEC.md G.3's counts from running the official code on that shape: as released (right children kept
# alive), and with its right children freed.

# %%
official = {4096: 139720, 8192: 221772, 16384: 384752, 32768: 745556, 65536: 1609912}  # as released
freed = {4096: 82472, 8192: 100132, 16384: 121888, 32768: 151112, 65536: 192860}  # right children freed
print(f"  {'tokens':>7s} {'N':>3s} {'plain GiB':>10s} {'bound GiB':>10s} {'official':>10s} {'freed':>8s} {'bound':>8s}")
llama2 = {}
for total in official:
    pl = llama2[total] = plan(32, HomerConfig(2048, warmup_layers=12), P=100, C=total - 200, S=100)
    print(f"  {total:7d} {pl.N:3d} {plain_kv(pl) * 16 / 2**20:10.1f} {g2_bound(pl) * 16 / 2**20:10.2f} "
          f"{official[total]:10d} {freed[total]:8d} {g2_bound(pl):8d}")  # fmt: skip

# %% [markdown]
# Sixteen times the input, twice the bound: from 4k to 64k tokens the plain cache grows from 2 to 32 GiB, the
# depth-first bound from 1.8 to 3.6 GiB — and the official code, keeping its right children, reaches 24.6 GiB.
#
# ## Checks

# %%
for c in runs.values():
    assert len(c.kv_timeline) == sum(t.layers[1] - t.layers[0] for t in c.nodes)
    assert max(c.kv_timeline) == c.peak_kv_token_layers
assert same and all(simulate_live_kv(p, name) == c.kv_timeline for name, c in runs.items())
for a, b in sweep.values():
    assert a.peak_kv_token_layers <= g2_bound(a.plan) and a.peak_kv_token_layers <= b.peak_kv_token_layers
    assert b.peak_kv_token_layers >= a.plan.N * a.plan.R * a.plan.held_layers(0)
    assert torch.equal(a.logits, b.logits)
assert sweep[16][0].peak_kv_token_layers < 2 * sweep[2][0].peak_kv_token_layers, "8x the input, < 2x the memory"
assert plain_kv(sweep[16][0].plan) > 7 * plain_kv(sweep[2][0].plan)
assert all(official[t] > g2_bound(pl) >= freed[t] for t, pl in llama2.items()), "the bound holds G.3's counts"
print("all checks passed")

# %% [markdown]
# ## Try this
#
# 1. Predict the depth-first peak at 32x from the table, then check it (`run(32, "depth_first")`: 64 leaves
#    need 7 levels; the model has 8 layers).
# 2. `demo_config(max_chunk_len=128)` at 8x: more, shorter chunks. Which of plain / level-order / depth-first
#    changes most?
# 3. With W = 2 warm-up layers (`demo_config(warmup_layers=2)`), every finished chunk holds more layers: find
#    where that shows up in the bound's terms.
