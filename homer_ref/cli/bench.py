"""`python -m homer_ref.bench`: HOMER's memory and speed against plain inference, and our forward against HF.

Everything is reported as ratios measured side by side in one run (shared CPU machines are noisy; absolute
times are only meaningful on a quiet machine). Weights change neither memory nor time, so long inputs are
measured on a random Llama of realistic depth, the *bench model*: 16 layers, D = 256, 8 heads, 4 KV heads,
intermediate 688, vocabulary 8192 (~15M parameters).

1. memory vs context length: live KV measured by the traversal (depth-first and level-order HOMER) against the
   plain cache (P+C+S)*L, the G.2 bound, and the process's peak RSS growth during the prefill (each run in its own
   subprocess); stories260K within its depth limit; the Llama-2-7B shape from the plan alone (simulated).
2. time vs context length: HOMER prefill / plain prefill, in CPU seconds of the measuring process with one torch
   thread by default (wall-clock ratios drift with whatever else the machine runs; CPU time much less). The
   plain prefill runs the same layers over the whole prompt with torch's scaled_dot_product_attention (no
   materialised T x T matrix); both compute the last token's logits only.
3. our forward vs HF transformers' LlamaForCausalLM (sdpa) on the same weights, 512 and 2048 tokens, float32:
   rounds of one forward each, back to back in random order; the ratio is the median of the rounds' ratios.
4. operation counts: multiply-adds of HOMER vs plain prefill from the plan (attention and the rest apart).

`--json` prints one JSON object (with peak_kv_ratio_16k, time_ratio_16k, forward_time_ratio_vs_hf);
`--markdown` prints the README's tables.

`--model PATH` measures a real checkpoint instead (any format `load_model` reads), at the `--lengths` asked
(default 2048, 8192, 16384): for plain and HOMER (M = T = trained context / 2 unless given, uncalibrated: a bias
changes which tokens are kept, not the cost) side by side, each in its own subprocess, the prefill's CPU and wall
time, its peak RSS above the loaded model, the live KV (plain: the whole cache; HOMER: the traversal's measured
peak) and the HOMER / plain ratios; how much loading the checkpoint peaked at against its weights (`load_ratio`,
RSS measured in the subprocess from just after `import torch`); and `forward_time_ratio_vs_hf` at 2,048 tokens
(HF's LlamaForCausalLM built from the same weights).
"""

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch

from homer_ref.budget import check_fits, kv_bytes, plain_bytes
from homer_ref.cli.common import (
    DTYPES,
    command_parser,
    current_rss,
    parse_list,
    parse_modes,
    peak_rss,
    progress,
    reset_peak_rss,
    run_main,
)
from homer_ref.data import STORIES260K
from homer_ref.homer import homer_prefill
from homer_ref.homer.plan import HomerConfig, Plan, plan
from homer_ref.homer.traversal import g2_bound, plain_kv, simulate_live_kv
from homer_ref.llama import Llama, LlamaConfig

BENCH = LlamaConfig(
    vocab_size=8192,
    hidden_size=256,
    intermediate_size=688,
    num_hidden_layers=16,
    num_attention_heads=8,
    num_key_value_heads=4,
    head_dim=32,
    max_position_embeddings=1024,
)
LLAMA2_7B = LlamaConfig(32000, 4096, 11008, 32, 32, 32, 128, max_position_embeddings=4096)
P_BENCH = S_BENCH = 16
STORIES = STORIES260K / "stories260K.bin"


def random_model(cfg: LlamaConfig, seed: int = 0) -> Llama:
    """A Llama with seeded random weights (std 0.02, norms 1) — enough for memory and time."""
    torch.manual_seed(seed)
    model = Llama(cfg).eval().requires_grad_(False)
    for name, p in model.named_parameters():
        if "norm" not in name:
            p.normal_(0.0, 0.02)
    return model


def input_ids(cfg: LlamaConfig, n: int, seed: int = 0) -> tuple[list[int], list[int], list[int]]:
    """(prefix, context, suffix) of n tokens in all, P = S = 16."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, cfg.vocab_size, (n,), generator=g).tolist()
    return ids[:P_BENCH], ids[P_BENCH : n - S_BENCH], ids[n - S_BENCH :]


@torch.no_grad()
def plain_prefill(model: Llama, ids: list[int]) -> torch.Tensor:
    """The plain forward over the whole prompt, keeping the full cache; returns the last token's logits."""
    needed = plain_bytes(model.cfg, len(ids), 0, model.embed_tokens.weight.element_size())
    check_fits(needed, f"the plain prefill of {len(ids)} tokens", "benchmark shorter lengths (--quick)")
    h = model.embed_tokens(torch.tensor([ids]))
    positions = torch.arange(len(ids))
    cache = []
    for layer in range(model.cfg.num_hidden_layers):
        h, k, v, _ = model.attend(layer, h, positions)
        cache.append((k, v))
        h = model.feed_forward(layer, h)
    return model.logits(h[:, -1:])[0, -1]


def load_for_bench(model_name: str, dtype: torch.dtype = torch.float32) -> Llama:
    """The model a measurement runs on: the bench model, stories260K, or a checkpoint path."""
    if model_name == "bench":
        return random_model(BENCH)
    from homer_ref.loading import load_model

    return load_model(STORIES if model_name == "stories" else model_name, dtype=dtype)


def measure_one(model_name: str, mode: str, n: int, M: int, T: int | None = None, W: int | None = 0,
                dtype: torch.dtype = torch.float32) -> dict:  # fmt: skip
    """One prefill (in this process): CPU and wall time, live KV, and peak RSS above the loaded model; and what
    loading the model peaked at above the process's RSS before it (the RSS marks are reset: `Measured`)."""
    reset_peak_rss()
    before = current_rss()
    model = load_for_bench(model_name, dtype)
    load_peak, loaded = peak_rss() - before, current_rss()
    cfg, itemsize = model.cfg, model.embed_tokens.weight.element_size()
    prefix, context, suffix = input_ids(cfg, n)
    config = HomerConfig(M, T, W, "uncalibrated")
    warm = input_ids(cfg, min(n, 2 * M))  # warm up kernels on a short input first
    homer_prefill(model, *warm, config)
    cpu, wall, live, final = [], [], 0, 0
    reset_peak_rss()
    while len(cpu) < 3 and sum(wall) < 2.0:  # short runs are repeated (best of up to 3); long ones run once
        c0, w0 = time.process_time(), time.perf_counter()
        if mode == "plain":
            plain_prefill(model, prefix + context + suffix)
            live = final = n * cfg.num_hidden_layers
        else:
            traversal = "depth_first" if mode == "homer_depth_first" else "level_order"
            cache = homer_prefill(model, prefix, context, suffix, config, traversal=traversal)
            live, final = cache.peak_kv_token_layers, len(cache.positions) * cfg.num_hidden_layers
            del cache
        cpu.append(time.process_time() - c0)
        wall.append(time.perf_counter() - w0)
    mib = 2**20
    return {
        "mode": mode,
        "length": n,
        "seconds": min(cpu),  # CPU time of this process: robust to other load on a shared machine
        "wall_seconds": min(wall),
        "live_kv": live,  # token-layers
        "live_kv_mib": kv_bytes(cfg, live, itemsize) / mib,
        "final_kv_mib": kv_bytes(cfg, final, itemsize) / mib,
        "rss_growth_mib": (peak_rss() - loaded) / mib,  # peak RSS above the loaded model
        "weights_mib": sum(p.numel() * p.element_size() for p in model.parameters()) / mib,
        "load_peak_mib": load_peak / mib,
    }


def measure(model_name: str, mode: str, n: int, M: int, T: int | None = None, W: int | None = 0,
            dtype: str = "float32") -> dict:  # fmt: skip
    """`measure_one` in a fresh subprocess (same torch thread count), so that its peak RSS is its own."""
    cmd = [sys.executable, "-m", "homer_ref.bench", "--threads", str(torch.get_num_threads()), "--dtype", dtype]
    cmd += [] if T is None else ["--target-len", str(T)]
    cmd += ["--warmup-layers", "default" if W is None else str(W), "--one", model_name, mode, str(n), str(M)]
    out = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        raise RuntimeError(f"benchmark subprocess failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout)


# ----------------------------------------------------------------------------------------------- counts


def macs(cfg: LlamaConfig, p: Plan) -> dict[str, float]:
    """Multiply-adds of HOMER's prefill and of the plain prefill, attention (QK^T and PV) apart from the rest."""
    D, F, Hq, Hkv, Dh = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    )
    proj = D * (Hq + 2 * Hkv) * Dh + Hq * Dh * D  # q, k, v, o per token
    mlp = 3 * D * F

    def attention(n: int) -> float:  # causal: n(n+1)/2 query-key pairs, twice (scores and weighted sum)
        return 2 * Hq * Dh * n * (n + 1) / 2

    n_plain = p.P + p.C + p.S
    plain = {
        "attention": cfg.num_hidden_layers * attention(n_plain),
        "other": cfg.num_hidden_layers * n_plain * (proj + mlp),
    }
    homer = {"attention": 0.0, "other": 0.0}
    for node in p.nodes.values():
        n, (first, last) = p.input_len(node), node.layers
        kept = min(n, node.target)
        homer["attention"] += (last - first) * attention(n)
        homer["other"] += (last - first) * n * proj + ((last - first - 1) * n + kept) * mlp
    return {
        "plain_attention": plain["attention"],
        "plain_other": plain["other"],
        **{f"homer_{k}": v for k, v in homer.items()},
    }


# ----------------------------------------------------------------------------------------------- suites


def forward_vs_hf(model: Llama, lengths: list[int], repeats: int) -> list[dict]:
    """Time our forward and HF's LlamaForCausalLM on the same weights (float32), `repeats` rounds of one each.

    Each round runs the two back to back in a seeded random order, and its ratio is ours / HF's CPU time: a load
    that drifts over minutes slows both of a pair alike, and neither always runs first (caches, page faults).
    `ratio` is the median of the rounds' ratios, `ratio_q1`/`ratio_q3` their quartiles (the spread that noise
    alone gives); `ours_s` and `hf_s` are the median times."""
    try:
        from transformers import LlamaForCausalLM
    except ImportError:
        progress("bench: transformers is not installed (pip install -e '.[test]'); skipping the HF comparison")
        return []
    from homer_ref.loading import save_hf

    with tempfile.TemporaryDirectory() as tmp:
        save_hf(model, tmp)
        hf = LlamaForCausalLM.from_pretrained(tmp, attn_implementation="sdpa", dtype=model.embed_tokens.weight.dtype)
    hf = hf.eval()
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
        progress(f"bench: forward {n} tokens: homer_ref {ours_s:.3f} s, HF {hf_s:.3f} s (medians of {repeats}); "
                 f"ratio {ratio:.3f} (quartiles {q1:.3f}-{q3:.3f})")  # fmt: skip
    return rows


def model_suite(path: str, lengths: list[int], modes: list[str], M: int | None, T: int | None, W: int | None,
                dtype: str, hf_repeats: int) -> dict:  # fmt: skip
    """`--model PATH`: plain and HOMER prefill at each length, side by side, and our forward against HF's."""
    from homer_ref.loading import load_config

    cfg = load_config(path)
    M = M or cfg.max_position_embeddings // 2
    rows = []
    for n in lengths:
        row = {"length": n, "M": M, "T": T or M}
        for mode in modes:
            r = measure(path, mode, n, M, T, W, dtype)
            label = "homer" if mode.startswith("homer") else mode
            row |= {f"{label}_{k}": v for k, v in r.items() if k not in ("mode", "length")}
            row |= {"weights_mib": r["weights_mib"], "load_peak_mib": r["load_peak_mib"]}
            progress(
                f"bench: {path} {mode} {n} tokens: {r['seconds']:.1f} s CPU ({r['wall_seconds']:.1f} s wall), peak RSS "
                f"{r['rss_growth_mib']:.0f} MiB above the model, live KV {r['live_kv_mib']:.0f} MiB"
            )
        if len(modes) == 2:
            row["time_ratio"] = row["homer_seconds"] / row["plain_seconds"]
            row["rss_ratio"] = row["homer_rss_growth_mib"] / row["plain_rss_growth_mib"]
            row["live_kv_ratio"] = row["homer_live_kv_mib"] / row["plain_live_kv_mib"]
        rows.append(row)
    loaded = rows[0]
    result = {"model": path, "dtype": dtype, "M": M, "T": T or M, "W": "default" if W is None else W, "rows": rows}
    result |= {"weights_mib": loaded["weights_mib"], "load_peak_mib": loaded["load_peak_mib"]}
    result["load_ratio"] = loaded["load_peak_mib"] / loaded["weights_mib"]
    result["forward_vs_hf"] = []
    if hf_repeats:
        model = load_for_bench(path, DTYPES[dtype])
        result["forward_vs_hf"] = forward_vs_hf(model, [2048], hf_repeats)
    hf_rows = result["forward_vs_hf"]
    result["forward_time_ratio_vs_hf"] = hf_rows[-1]["ratio"] if hf_rows else None
    return result


def model_markdown(result: dict) -> str:
    """The `--model` measurements as a table."""
    out = [
        f"**{result['model']}** ({result['dtype']}), HOMER M = {result['M']}, T = {result['T']}, W = {result['W']}, "
        f"uncalibrated; weights {result['weights_mib']:.0f} MiB, loading peaked {result['load_peak_mib']:.0f} MiB "
        f"above the process ({result['load_ratio']:.2f}x the weights)",
        "",
    ]
    modes = [m for m in ("plain", "homer") if f"{m}_seconds" in result["rows"][0]]
    header = ["tokens"]
    for m in modes:
        header += [f"{m} CPU s", f"{m} wall s", f"{m} peak RSS above model MiB", f"{m} live KV MiB"]
    if len(modes) == 2:
        header += ["time HOMER / plain", "peak RSS HOMER / plain", "live KV HOMER / plain"]
    rows = []
    for r in result["rows"]:
        cells = [str(r["length"])]
        for m in modes:
            cells += [f"{r[f'{m}_seconds']:.1f}", f"{r[f'{m}_wall_seconds']:.1f}", f"{r[f'{m}_rss_growth_mib']:.0f}",
                      f"{r[f'{m}_live_kv_mib']:.0f}"]  # fmt: skip
        if len(modes) == 2:
            cells += [f"{r['time_ratio']:.2f}", f"{r['rss_ratio']:.2f}", f"{r['live_kv_ratio']:.2f}"]
        rows.append(cells)
    out += _table(header, rows)
    for r in result["forward_vs_hf"]:
        out += ["", f"Forward pass at {r['length']} tokens: homer_ref {r['ours_s']:.2f} s, HF transformers "
                f"{r['hf_s']:.2f} s CPU (medians of {r['repeats']}): forward_time_ratio_vs_hf = {r['ratio']:.3f}, "
                f"quartiles {r['ratio_q1']:.3f}-{r['ratio_q3']:.3f} (max abs logit diff "
                f"{r['max_abs_logit_diff']:.1e})"]  # fmt: skip
    return "\n".join(out)


def memory_and_time(lengths: list[int], M: int, model_name: str) -> list[dict]:
    cfg = BENCH if model_name == "bench" else load_for_bench(model_name).cfg
    rows = []
    for n in lengths:
        row = {"model": model_name, "length": n, "M": M}
        for mode in ("plain", "homer_depth_first", "homer_level_order"):
            r = measure(model_name, mode, n, M)
            row[f"{mode}_s"], row[f"{mode}_kv"], row[f"{mode}_rss_mib"] = (
                r["seconds"],
                r["live_kv"],
                r["rss_growth_mib"],
            )
        p = plan(cfg.num_hidden_layers, HomerConfig(M, M, 0), P_BENCH, n - P_BENCH - S_BENCH, S_BENCH)
        row["g2_bound"] = g2_bound(p)
        row["plain_kv_expected"] = plain_kv(p)
        row["peak_kv_ratio"] = row["homer_depth_first_kv"] / row["plain_kv"]
        row["level_order_kv_ratio"] = row["homer_level_order_kv"] / row["plain_kv"]
        row["g2_ratio"] = row["g2_bound"] / row["plain_kv"]
        row["time_ratio"] = row["homer_depth_first_s"] / row["plain_s"]
        counts = macs(cfg, p)
        row["macs_ratio"] = (counts["homer_attention"] + counts["homer_other"]) / (
            counts["plain_attention"] + counts["plain_other"]
        )
        row["macs"] = counts
        rows.append(row)
        progress(
            f"bench: {model_name} {n} tokens: live KV depth-first {row['peak_kv_ratio']:.3f}x plain, level-order "
            f"{row['level_order_kv_ratio']:.3f}x, G.2 {row['g2_ratio']:.3f}x; time {row['time_ratio']:.2f}x plain "
            f"(MACs {row['macs_ratio']:.2f}x)"
        )
    return rows


def llama2_7b_shape(lengths: list[int]) -> list[dict]:
    """Depth-first live KV of Llama-2-7B's shape (L=32, W=12, M=T=2048, P=S=100) from the plan alone."""
    rows = []
    for n in lengths:
        p = plan(32, HomerConfig(2048, 2048, 12), 100, n - 200, 100)
        peak = max(simulate_live_kv(p, "depth_first"))
        level = max(simulate_live_kv(p, "level_order"))
        full = plain_kv(p)
        gib = 16 / 1024 / 1024  # 16 KiB per token-layer in fp16 K+V for Llama-2-7B
        rows.append(
            {
                "length": n,
                "leaves": p.N,
                "full_kv": full,
                "depth_first_kv": peak,
                "level_order_kv": level,
                "g2_bound": g2_bound(p),
                "depth_first_ratio": peak / full,
                "full_gib": full * gib,
                "depth_first_gib": peak * gib,
            }
        )
    return rows


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] + ["| " + " | ".join(r) + " |" for r in rows]


def text_plot(rows: list[dict], width: int = 60) -> list[str]:
    """Bars of live KV per length: '#' depth-first HOMER, '=' level-order HOMER, '.' plain."""
    scale = width / max(r["plain_kv"] for r in rows)
    lines = []
    for r in rows:
        for mark, key in (("#", "homer_depth_first_kv"), ("=", "homer_level_order_kv"), (".", "plain_kv")):
            label = f"{r['length']:>6}" if mark == "#" else " " * 6
            lines.append(f"{label} {mark * max(1, round(r[key] * scale)):<{width}} {r[key]:>9,}")
    return lines


def _columns(rows: list[dict], columns: list[tuple[str, str]]) -> list[str]:
    """A markdown table of `rows`: one column per (header, format string applied to the row's fields)."""
    return _table([h for h, _ in columns], [[fmt.format(**r) for _, fmt in columns] for r in rows])


MEMORY_COLUMNS = [
    ("tokens", "{length}"),
    ("live KV depth-first / plain", "{peak_kv_ratio:.3f}"),
    ("level-order / plain", "{level_order_kv_ratio:.3f}"),
    ("G.2 bound / plain", "{g2_ratio:.3f}"),
    ("peak RSS growth plain / HOMER (MiB)", "{plain_rss_mib:.0f} / {homer_depth_first_rss_mib:.0f}"),
    ("time HOMER / plain", "{time_ratio:.2f}"),
    ("MACs HOMER / plain", "{macs_ratio:.2f}"),
]
STORIES_COLUMNS = [MEMORY_COLUMNS[i] for i in (0, 1, 2, 5)]
LLAMA2_COLUMNS = [
    ("tokens", "{length}"),
    ("leaves", "{leaves}"),
    ("full cache GiB", "{full_gib:.2f}"),
    ("depth-first peak GiB", "{depth_first_gib:.2f}"),
    ("depth-first / full", "{depth_first_ratio:.3f}"),
    ("level-order / full", "{level_order_ratio:.3f}"),
]
HF_COLUMNS = [
    ("tokens", "{length}"),
    ("homer_ref s", "{ours_s:.3f}"),
    ("HF s", "{hf_s:.3f}"),
    ("ratio (median of rounds)", "{ratio:.3f}"),
    ("quartiles", "{ratio_q1:.3f}-{ratio_q3:.3f}"),
    ("max abs logit diff", "{max_abs_logit_diff:.1e}"),
]


def markdown(result: dict) -> str:
    """The README's results tables."""
    out = [
        f"Machine: {result['machine']}. Command: `python -m homer_ref.bench --markdown` ({result['total_s']:.0f} s).",
        "",
        "**Bench model** (16 layers, D=256, 8 heads / 4 KV heads, random weights), M = T = 512, P = S = 16, W = 0:",
        "",
    ]
    out += _columns(result["memory"], MEMORY_COLUMNS)
    out += ["", "Live KV against context length (bench model; one character = 1/60 of the plain cache at the longest):"]
    out += ["", "```"] + text_plot(result["memory"]) + ["```"]
    if result["stories"]:
        out += ["", "**stories260K** (5 layers), M = T = 512, within its depth limit:", ""]
        out += _columns(result["stories"], STORIES_COLUMNS)
    shape = "**Llama-2-7B shape** (L=32, W=12, M=T=2048, P=S=100), from the plan (fp16 K+V, 16 KiB per token-layer):"
    out += ["", shape, ""]
    llama2 = [r | {"level_order_ratio": r["level_order_kv"] / r["full_kv"]} for r in result["llama2_7b"]]
    out += _columns(llama2, LLAMA2_COLUMNS)
    if result["forward_vs_hf"]:
        out += ["", "**Forward pass, homer_ref vs HF transformers** (bench model, float32, rounds back to back):", ""]
        out += _columns(result["forward_vs_hf"], HF_COLUMNS)
    return "\n".join(out)


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("bench", "HOMER memory/speed benchmarks, as ratios.")
    p.add_argument("--json", action="store_true", help="print one JSON object with every measurement")
    p.add_argument("--markdown", action="store_true", help="print the README's results tables")
    p.add_argument("--quick", action="store_true", help="short lengths only (a smoke run, not the README figures)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: CPU times stay comparable under load)"
    )
    p.add_argument("--model", help="measure this checkpoint (HF directory, .gguf or .bin) instead of the suites")
    p.add_argument("--lengths", default="2048,8192,16384", help="--model: prompt lengths in tokens")
    p.add_argument("--modes", default="plain,homer", help="--model: plain, homer or both (default both)")
    p.add_argument("--max-chunk-len", type=int, help="--model: HOMER's M (default: half the trained context)")
    p.add_argument("--target-len", type=int, help="--model: HOMER's T (default: M)")
    p.add_argument(
        "--warmup-layers", default="default", help="--model: HOMER's W (default: the official scripts' rule)"
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32", help="--model: dtype (default float32)")
    p.add_argument("--hf-repeats", type=int, default=5, help="--model: timed HF comparisons (0: none)")
    p.add_argument("--one", nargs=4, metavar=("MODEL", "MODE", "N", "M"), help=argparse.SUPPRESS)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    W = None if args.warmup_layers == "default" else parse_list(args.warmup_layers, int, "warmup-layers")[0]
    if args.one:
        model_name, mode, n, M = args.one
        if model_name not in ("bench", "stories") and not Path(model_name).exists():
            raise ValueError(f"--one: unknown model {model_name!r} (bench, stories or a model path)")
        if mode not in ("plain", "homer_depth_first", "homer_level_order"):
            raise ValueError(f"--one: unknown mode {mode!r} (an internal option of bench)")
        n, M = parse_list(n, int, "one")[0], parse_list(M, int, "one")[0]
        print(json.dumps(measure_one(model_name, mode, n, M, args.target_len, W, DTYPES[args.dtype])))
        return 0
    t0 = time.perf_counter()
    machine = (
        f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s); "
        "times are CPU seconds of the measuring process"
    )
    if args.model is not None:
        modes = parse_modes(args.modes, ("plain", "homer"))
        lengths = parse_list(args.lengths, int, "lengths")
        result = model_suite(
            args.model,
            lengths,
            ["homer_depth_first" if m == "homer" else m for m in modes],
            args.max_chunk_len,
            args.target_len,
            W,
            args.dtype,
            args.hf_repeats,
        )
        result |= {"machine": machine, "total_s": time.perf_counter() - t0}
        if args.json:
            print(json.dumps(result))
        if args.markdown or not args.json:
            print(f"Machine: {machine}. ({result['total_s']:.0f} s)\n\n" + model_markdown(result))
        return 0
    lengths = [1024, 2048] if args.quick else [1024, 2048, 4096, 8192, 16384]
    result = {
        "machine": machine,
        "memory": memory_and_time(lengths, 512, "bench"),
        "stories": memory_and_time([1024, 2048, 4096] if not args.quick else [1024], 512, "stories")
        if STORIES.is_file()
        else [],
        "llama2_7b": llama2_7b_shape([4096, 8192, 16384, 32768, 65536]),
        "forward_vs_hf": forward_vs_hf(
            random_model(BENCH), [512] if args.quick else [512, 2048], 3 if args.quick else 9
        ),
    }
    last = result["memory"][-1]
    result["peak_kv_ratio_16k" if not args.quick else "peak_kv_ratio_last"] = last["peak_kv_ratio"]
    result["time_ratio_16k" if not args.quick else "time_ratio_last"] = last["time_ratio"]
    hf_rows = [r for r in result["forward_vs_hf"] if r["length"] == 2048] or result["forward_vs_hf"]
    result["forward_time_ratio_vs_hf"] = hf_rows[-1]["ratio"] if hf_rows else None
    result["total_s"] = time.perf_counter() - t0
    if args.json:
        print(json.dumps(result))
    if args.markdown or not args.json:
        print(markdown(result))
    return 0


def entry() -> None:
    """`python -m homer_ref.bench` and the `homer-bench` console script."""
    sys.exit(run_main(main))
