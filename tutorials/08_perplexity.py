# %% [markdown]
# # 08 · Perplexity past the trained context
#
# HOMER's second job: language modelling on a text longer than the model was trained on. stories260K was
# trained on 512-token windows. Take a 1,536-token text it wrote itself (so it is in-domain) and predict every
# token from the ones before, following the official perplexity protocol (HOMER_SPEC.md H.2) step by step; then
# check it, token for token, against the library's `homer_ref.tasks.perplexity` (what
# `python -m homer_ref.eval perplexity` runs), and compare with plain inference and a sliding window.

# %%
import torch
import torch.nn.functional as F
from common import stories_document, stories_model

from homer_ref.homer import HomerConfig, continuation_logits, homer_prefill
from homer_ref.homer.calibration import calibrate_on_context
from homer_ref.tasks.perplexity import nll_homer, nll_plain, nll_sliding

lm, lm_tok = stories_model()
ids = stories_document(lm, lm_tok)  # three 512-token stories it wrote, one after the other: 1,536 tokens
print(f"{len(ids)} tokens; trained context {lm.cfg.max_position_embeddings}")

# %% [markdown]
# ## 1. The protocol
#
# With segment length ev = M = 256 and prefix = suffix = P = S = M / 32 = 8 tokens:
#
# 1. the first 2·ev tokens are predicted by one plain forward (it fits in the trained context);
# 2. then for end = 2·ev, 3·ev, ...: everything before `end` is compressed by HOMER — prefix = the first P tokens,
#    suffix = the S tokens just before `end`, context = all between — and the next ev tokens are fed after the
#    compact cache (at positions last_position + 1, + 2, ...), each predicting the token after it.
#
# Every token is predicted exactly once. The HOMER cache's own `logits[-1]` would predict token `end` again; the
# protocol does not use it. Here the bias table is calibrated on the first 2·ev tokens, which every scored token
# has already seen (`python -m homer_ref.eval perplexity` takes the table every command uses instead:
# `homer_ref.bias`, computed once on ordinary English and cached; the protocol is the same).

# %%
M = ev = 256
P = S = 8
bias = calibrate_on_context(lm, ids[: 2 * ev], M)
nll = {}  # target index -> negative log-likelihood


def score(first_target: int, rows: torch.Tensor) -> None:  # rows[j] predicts token first_target + j
    targets = list(range(first_target, min(first_target + len(rows), len(ids))))
    losses = F.cross_entropy(rows[: len(targets)].double(), torch.tensor([ids[t] for t in targets]), reduction="none")
    nll.update(zip(targets, losses.tolist()))


score(1, lm(torch.tensor([ids[: 2 * ev]]))[0])  # step 1: targets 1 .. 2ev
for end in range(2 * ev, len(ids), ev):  # step 2
    prefix, context, suffix = ids[:P], ids[P : end - S], ids[end - S : end]
    part = homer_prefill(lm, prefix, context, suffix, HomerConfig(max_chunk_len=M), bias=bias)
    score(end + 1, continuation_logits(lm, part, ids[end : end + ev]))
    print(f"  end {end}: {end} tokens -> {len(part.positions)} cached slots, positions <= {int(part.positions.max())}")
assert sorted(nll) == list(range(1, len(ids))), "every token predicted once"

# %% [markdown]
# Each HOMER call compresses everything before `end` into at most M slots whose positions stay below M, so the
# ev tokens fed after it sit at positions below M + ev = 512: inside the trained context, however long the text.
#
# ## 2. Against plain inference and a sliding window
#
# Score the last 512 tokens (all of them past the trained context) three ways, with the library's functions:
# plain inference over the whole text, a 512-token window moved by 256, and the protocol. The library's
# protocol must be ours, token for token.

# %%
lo, hi = 1024, len(ids)
results = {
    "plain": nll_plain(lm, ids, lo, hi),
    "sliding window": nll_sliding(lm, ids, lo, hi, window=512, stride=256),
    "HOMER (ours)": {t: v for t, v in nll.items() if lo <= t < hi},
    "HOMER (library)": nll_homer(lm, ids, lo, hi, HomerConfig(max_chunk_len=M), segment_len=ev, affix_len=P, bias=bias),
}
ppl = {name: torch.tensor(list(v.values())).mean().exp().item() for name, v in results.items()}
for name, value in ppl.items():
    print(f"  {name:16s} perplexity {value:6.2f}")

# %% [markdown]
# Plain inference degrades once positions pass 512: the model never saw them. The window and HOMER both keep
# every position inside the trained context. Here the stories are independent, so long context cannot help:
# this is the "HOMER does not break the model" check, and HOMER should stay close to the window.

# %% [markdown]
# ## Checks

# %%
assert results["HOMER (ours)"] == results["HOMER (library)"], "our protocol is the library's, token for token"
assert ppl["plain"] > 1.1 * ppl["sliding window"], "plain inference degrades past 512 tokens"
assert ppl["HOMER (ours)"] < 1.1 * ppl["sliding window"], "HOMER stays close to the window"
print("all checks passed")

# %% [markdown]
# ## Try this
#
# 1. A shorter segment (`ev = 128`): more HOMER calls, each with more context compressed. Better or worse than the
#    window? Predict, then run.
# 2. Without the bias (`bias=None`): how much does calibration matter here?
# 3. `nll_plain(lm, ids, lo, hi, rope="yarn")` and `rope="dynamic"`: RoPE scaling instead of HOMER.
# 4. The same from the command line: `python -m homer_ref.eval perplexity --model homer_ref/data/stories260K
#    --length 3 --modes plain,sliding,homer` (the directory holds llama2.c's .bin and its tokenizer).
