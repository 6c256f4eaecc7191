"""Our forward pass against HF transformers' `LlamaForCausalLM` (sdpa) on the same weights, float32.

Rounds of one forward each, ours and HF's back to back in a seeded random order; each round's ratio is ours / HF's
CPU time, so a load that drifts over minutes slows both of a pair alike, and neither always runs first (caches,
page faults). `ratio` is the median of the rounds' ratios, `ratio_q1` / `ratio_q3` their quartiles (the spread
that noise alone gives); `ours_s` and `hf_s` are the median times. The logits are compared once (a correctness
check, `max_abs_logit_diff`).
"""

import random
import statistics
import tempfile
import time
from functools import partial

import torch

from homer_ref.llama import Llama


def hf_copy(model: Llama):
    """HF's LlamaForCausalLM holding `model`'s weights (saved as an HF directory, read back), in its dtype.

    Loaded without a dtype argument, then cast: `dtype=` is transformers >= 4.56's spelling and `torch_dtype=` the
    older one, while `.to` works with every version."""
    from transformers import LlamaForCausalLM

    from homer_ref.loading import save_hf

    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp)
        hf = LlamaForCausalLM.from_pretrained(tmp, attn_implementation="sdpa")
    return hf.to(model.embed_tokens.weight.dtype).eval()


def forward_vs_hf(model: Llama, lengths: list[int], repeats: int, report) -> list[dict]:
    """One row per length: ours_s, hf_s, ratio (median of the rounds'), ratio_q1, ratio_q3, max_abs_logit_diff."""
    try:
        hf = hf_copy(model)
    except ImportError:
        report("bench: transformers is not installed (pip install -e '.[test]'); skipping the HF comparison")
        return []
    rows = []
    for n in lengths:
        x = torch.randint(3, model.cfg.vocab_size, (1, n), generator=torch.Generator().manual_seed(n))
        runs = {"ours": partial(model, x), "hf": partial(hf, x, use_cache=False)}
        times: dict[str, list[float]] = {"ours": [], "hf": []}
        order = random.Random(n)
        with torch.no_grad():
            ours_logits, hf_logits = runs["ours"](), runs["hf"]().logits  # warm-up, and a correctness check
            delta = (ours_logits - hf_logits).abs().max().item()
            del ours_logits, hf_logits
            for _ in range(repeats):
                for name in order.sample(sorted(runs), 2):
                    t = time.process_time()
                    runs[name]()
                    times[name].append(time.process_time() - t)
        ratios = sorted(a / b for a, b in zip(times["ours"], times["hf"]))
        ours_s, hf_s = statistics.median(times["ours"]), statistics.median(times["hf"])
        ratio, q1, q3 = statistics.median(ratios), ratios[(repeats - 1) // 4], ratios[(3 * repeats) // 4]
        rows.append({"length": n, "ours_s": ours_s, "hf_s": hf_s, "ratio": ratio, "ratio_q1": q1, "ratio_q3": q3,
                     "repeats": repeats, "max_abs_logit_diff": delta})  # fmt: skip
        report(f"bench: forward {n} tokens: homer_ref {ours_s:.3f} s, HF {hf_s:.3f} s (medians of {repeats}); "
               f"ratio {ratio:.3f} (quartiles {q1:.3f}-{q3:.3f})")  # fmt: skip
    return rows
