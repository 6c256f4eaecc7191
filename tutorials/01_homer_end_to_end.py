# %% [markdown]
# # 01 · HOMER end to end, in one page
#
# A Llama trained on 256-token texts cannot read 2,000 tokens: past its trained context, attention meets
# position ids it never saw. HOMER (Hierarchical cOntext MERging) makes it read them anyway, without training:
# it cuts the context into chunks the model can read, lets each chunk run the lower layers alone, prunes the
# tokens the question barely attends to, and merges neighbouring chunks layer block by layer block until one
# compact KV cache is left — a cache the model continues from as if it had read the whole prompt.
#
# The model is the one this project ships (`homer_ref/data/passkey_model`): 1.2M parameters, 8 layers,
# trained from scratch with a 256-token context on one task: find the 5-digit pass key hidden in filler text.
# Tutorials 02–07 open each step; this one just runs it.

# %%
from common import DEMO_M, TRAINED, demo_config, demo_prompt, passkey_model

from homer_ref.decoding import generate_plain
from homer_ref.homer import homer_generate, homer_prefill, plan
from homer_ref.tasks import passkey

model, tok, bias = passkey_model()  # bias: the calibration table shipped with the model (tutorial 04)
prompt = demo_prompt(tok)  # 8x the trained context, seed 5 (the `python -m homer_ref.generate` demo shows seed 3)
print(f"trained context {TRAINED}; prompt {len(prompt.ids)} tokens = {len(prompt.ids) / TRAINED:.1f}x")
print("the haystack begins:", tok.decode(prompt.context[:40]), "...")
print("the needle:         ", tok.decode(prompt.context[prompt.digit_slots[0] - 5 : prompt.digit_slots[-1] + 2]))
print("the question:       ", tok.decode(prompt.suffix))

# %% [markdown]
# HOMER needs the prompt in three parts: a **prefix** every chunk gets (here BOS), the long **context** that is
# chunked and pruned (the haystack), and a **suffix** every chunk gets too (the question: its last token is the
# query whose attention decides what survives). `plan` works out everything from the lengths alone: the chunks,
# the tree, which layers each node runs, how many tokens each keeps.

# %%
config = demo_config()  # M = T = 248: the longest chunk and the final cache length; W = 0 warm-up layers
P, C, S = len(prompt.prefix), len(prompt.context), len(prompt.suffix)
print(plan(model.cfg.num_hidden_layers, config, P, C, S))

# %% [markdown]
# 16 leaves of 127 context tokens (+ prefix + suffix), a tree of height 4, and a final cache of 247 slots in each
# of the 8 layers. Run it, and continue from the compact cache (generated tokens go at positions
# `cache.last_position + 1, + 2, ...`, HOMER_SPEC.md N.2.5); then ask plain inference the same question:

# %%
cache = homer_prefill(model, prompt.prefix, prompt.context, prompt.suffix, config, bias=bias)
homer_answer = tok.decode(homer_generate(model, cache, passkey.ANSWER_TOKENS))
plain_answer = tok.decode(generate_plain(model, prompt.ids, passkey.ANSWER_TOKENS))
print(f"true pass key {prompt.passkey}; HOMER answers {homer_answer!r}; plain inference {plain_answer!r}")
print(f"HOMER's cache: {len(cache.positions)} slots per layer for a {len(prompt.ids)}-token prompt")

# %% [markdown]
# Plain inference does read a pass key that sits within its last couple of hundred tokens (seed 0 is one: the
# `generate` demo's first prompt); one in the middle, like this one, it misreads. The model card measures
# plain inference at 9.5% on such prompts, HOMER at 96%.
#
# Which tokens are those 247 slots? Every slot knows where it came from: `cache.slot_sources()` names its
# prompt token, ("prefix", i), ("context", i) or ("suffix", i). The digits of the pass key are among them,
# both copies, together with the scattered filler the question happened to attend to:

# %%
sources = cache.slot_sources()
print("kept:", tok.decode([prompt.ids[s] for s in cache.sources.tolist()])[:400], "...")
digit_slots = [k for k, (part, i) in enumerate(sources) if part == "context" and i in prompt.digit_slots]
for k in digit_slots:
    part, i = sources[k]
    print(
        f"  slot {k:3d}  position {int(cache.positions[k]):3d}  context token {i:4d}  {tok.piece(prompt.context[i])!r}"
    )

# %% [markdown]
# Note the positions: the digits sit far into the context (token 1,242) but carry positions below 128.
# HOMER reuses position ids — every chunk starts its context at position P — so the model never meets a position
# it was not trained on (tutorial 03). `python -m homer_ref.explain --seed 5 --out homer.html` draws this
# whole run as one page: the tree, every node's tokens, kept and pruned, and the final cache (tutorial 05).
#
# ## Checks

# %%
assert passkey.score(homer_answer, prompt.passkey), f"HOMER should read {prompt.passkey}, answered {homer_answer!r}"
assert not passkey.score(plain_answer, prompt.passkey), "plain inference at 8x should not read it"
assert len(digit_slots) == 2 * passkey.PASSKEY_DIGITS, "both copies of the digits survive to the final cache"
assert len(cache.positions) == cache.plan.final_len == DEMO_M - 1
assert max(cache.positions.tolist()) < TRAINED, "every cached position stays inside the trained context"
print("all checks passed")

# %% [markdown]
# ## Try this
#
# 1. `demo_prompt(tok, seed=0)`, `seed=3`, ...: other pass keys at other depths. HOMER reads about 96% of them;
#    plain inference only those near the end (print `prompt.digit_slots[0]` next to its answer). Seed 1 is one
#    of HOMER's misses, which tutorial 07 takes apart.
# 2. `demo_prompt(tok, multiple=16)`: 4,096 tokens. Predict the number of leaves and the final cache length
#    before you print the plan.
# 3. `demo_config(max_chunk_len=128)`: the official scripts' choice (half the trained context). Predict: more
#    leaves, a taller tree, and — the card says — a few more misses.
# 4. `demo_config(reduction="random")`: prune random tokens instead of the unimportant ones. Are the digits
#    still in `slot_sources()`?
