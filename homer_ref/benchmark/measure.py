"""HOMER's memory and time against plain inference, one prefill per fresh process (so each peak RSS is its own).

Weights change neither memory nor time, so long inputs are measured on a random Llama of realistic depth, the
*bench model*: 16 layers, D = 256, 8 heads, 4 KV heads, F = 688, vocabulary 8192 (~15M parameters); `--model`
measures a real checkpoint the same way.

- `measure_one` (in this process) / `measure` (in a fresh subprocess): one prefill's CPU and wall time, live KV
  (plain: the whole cache; HOMER: the traversal's measured peak), peak RSS above the loaded model, and what
  loading the model peaked at. CPU seconds of the measuring process, one torch thread by default: wall-clock
  ratios drift with whatever else the machine runs, CPU time much less. The plain prefill is
  `decoding.prefill` (SDPA, no materialised n x n matrix, the last token's logits only), as generation runs it.
- `memory_and_time`: the bench model (or stories260K) at several lengths, with the G.2 bound and the
  multiply-adds (`homer.cost.macs`); `llama2_7b_shape`: Llama-2-7B's live KV from its plan alone;
  `model_suite`: a checkpoint at the lengths asked, plain and HOMER side by side.
"""

import json
import subprocess
import sys
import time

import torch

from homer_ref.budget import check_fits, kv_bytes, plain_bytes
from homer_ref.data import STORIES260K
from homer_ref.decoding import prefill
from homer_ref.homer import homer_prefill
from homer_ref.homer.cost import macs
from homer_ref.homer.plan import HomerConfig, plan
from homer_ref.homer.traversal import g2_bound, plain_kv, simulate_live_kv
from homer_ref.llama import Llama, LlamaConfig
from homer_ref.loading import load_config, load_model
from homer_ref.memory import current_rss, peak_rss, reset_peak_rss

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
MODES = ("plain", "homer_depth_first", "homer_level_order")


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


def plain_prefill(model: Llama, ids: list[int]) -> torch.Tensor:
    """The plain prefill of generation (`decoding.prefill`), after a memory check; the last token's logits [V]."""
    needed = plain_bytes(model.cfg, len(ids), 0, model.embed_tokens.weight.element_size())
    check_fits(needed, f"the plain prefill of {len(ids)} tokens", "benchmark shorter lengths (--quick)")
    return prefill(model, torch.tensor([ids]))[0][0]


def load_for_bench(model_name: str, dtype: torch.dtype = torch.float32) -> Llama:
    """The model a measurement runs on: the bench model, stories260K, or a checkpoint path."""
    if model_name == "bench":
        return random_model(BENCH)
    return load_model(STORIES if model_name == "stories" else model_name, dtype=dtype)


def measure_one(model_name: str, mode: str, n: int, M: int, T: int | None = None, W: int | None = 0,
                dtype: torch.dtype = torch.float32) -> dict:  # fmt: skip
    """One prefill (in this process): CPU and wall time, live KV, and peak RSS above the loaded model; and what
    loading the model peaked at above the process's RSS before it (the RSS marks are reset: `memory.Measured`)."""
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


def memory_and_time(lengths: list[int], M: int, model_name: str, report) -> list[dict]:
    """The bench model (or stories260K) at each length: plain, depth-first and level-order HOMER (M = T, W = 0)."""
    cfg = BENCH if model_name == "bench" else load_config(STORIES if model_name == "stories" else model_name)
    rows = []
    for n in lengths:
        row = {"model": model_name, "length": n, "M": M}
        for mode in MODES:
            r = measure(model_name, mode, n, M)
            row[f"{mode}_s"], row[f"{mode}_kv"], row[f"{mode}_rss_mib"] = (
                r["seconds"],
                r["live_kv"],
                r["rss_growth_mib"],
            )
        p = plan(cfg.num_hidden_layers, HomerConfig(M, M, 0), P_BENCH, n - P_BENCH - S_BENCH, S_BENCH)
        row |= {"g2_bound": g2_bound(p), "plain_kv_expected": plain_kv(p)}
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
        report(f"bench: {model_name} {n} tokens: live KV depth-first {row['peak_kv_ratio']:.3f}x plain, level-order "
               f"{row['level_order_kv_ratio']:.3f}x, G.2 {row['g2_ratio']:.3f}x; time {row['time_ratio']:.2f}x plain "
               f"(MACs {row['macs_ratio']:.2f}x)")  # fmt: skip
    return rows


def llama2_7b_shape(lengths: list[int]) -> list[dict]:
    """Depth-first live KV of Llama-2-7B's shape (L=32, W=12, M=T=2048, P=S=100) from the plan alone."""
    rows = []
    for n in lengths:
        p = plan(32, HomerConfig(2048, 2048, 12), 100, n - 200, 100)
        peak, level, full = (
            max(simulate_live_kv(p, "depth_first")),
            max(simulate_live_kv(p, "level_order")),
            plain_kv(p),
        )
        gib = 16 / 1024 / 1024  # 16 KiB per token-layer in fp16 K+V for Llama-2-7B
        rows.append({"length": n, "leaves": p.N, "full_kv": full, "depth_first_kv": peak, "level_order_kv": level,
                     "g2_bound": g2_bound(p), "depth_first_ratio": peak / full, "full_gib": full * gib,
                     "depth_first_gib": peak * gib})  # fmt: skip
    return rows


def model_suite(path: str, lengths: list[int], modes: list[str], M: int | None, T: int | None, W: int | None,
                dtype: str, report) -> dict:  # fmt: skip
    """`--model PATH`: plain and HOMER prefill at each length, side by side, each in its own subprocess."""
    from homer_ref.homer.plan import default_max_chunk_len

    config = HomerConfig(M or default_max_chunk_len(load_config(path).max_position_embeddings), T, W, "uncalibrated")
    M, T = config.max_chunk_len, config.target
    rows = []
    for n in lengths:
        row = {"length": n, "M": M, "T": T}
        for mode in modes:
            r = measure(path, mode, n, M, T, W, dtype)
            label = "homer" if mode.startswith("homer") else mode
            row |= {f"{label}_{k}": v for k, v in r.items() if k not in ("mode", "length")}
            row |= {"weights_mib": r["weights_mib"], "load_peak_mib": r["load_peak_mib"]}
            report(
                f"bench: {path} {mode} {n} tokens: {r['seconds']:.1f} s CPU ({r['wall_seconds']:.1f} s wall), "
                f"peak RSS {r['rss_growth_mib']:.0f} MiB above the model, live KV {r['live_kv_mib']:.0f} MiB"
            )
        if len(modes) == 2:
            row["time_ratio"] = row["homer_seconds"] / row["plain_seconds"]
            row["rss_ratio"] = row["homer_rss_growth_mib"] / row["plain_rss_growth_mib"]
            row["live_kv_ratio"] = row["homer_live_kv_mib"] / row["plain_live_kv_mib"]
        rows.append(row)
    loaded = rows[0]
    result = {"model": path, "dtype": dtype, "M": M, "T": T, "W": "default" if W is None else W, "rows": rows}
    result |= {"weights_mib": loaded["weights_mib"], "load_peak_mib": loaded["load_peak_mib"]}
    result["load_ratio"] = loaded["load_peak_mib"] / loaded["weights_mib"]
    return result
