"""`python -m homer_ref.bench`: HOMER's memory and speed against plain inference, and our forward against HF's.

Everything is a ratio measured side by side in one run; the measurements are `homer_ref.benchmark` (its
docstrings say how each is taken). Without `--model`, the suites of the README on the bench model (a random
Llama of realistic depth), stories260K and Llama-2-7B's shape:

1. memory vs context length: live KV measured by the traversal (depth-first and level-order HOMER) against the
   plain cache (P+C+S)*L, the G.2 bound, and the peak RSS growth of each prefill (each in its own subprocess);
2. time vs context length: HOMER prefill / plain prefill, in CPU seconds of the measuring process (one torch
   thread by default), beside the multiply-adds of each;
3. our forward vs HF transformers' LlamaForCausalLM (sdpa) on the same weights, 512 and 2048 tokens.

`--json` prints one JSON object (with peak_kv_ratio_16k, time_ratio_16k, forward_time_ratio_vs_hf); `--markdown`
prints the README's tables.

`--model PATH` measures a real checkpoint at the `--lengths` asked: plain and HOMER prefill (M = T = half the
trained context unless given; uncalibrated: a bias changes which tokens are kept, not the cost) side by side,
loading's peak against the weights, and `forward_time_ratio_vs_hf` at 2,048 tokens. `--model PATH --user-path`
measures what a user gets instead: `python -m homer_ref.generate` with its defaults, each run a fresh process with
an empty user cache (`homer_ref.benchmark.user_path`), and the targets it is held to.
"""

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

from homer_ref.benchmark import hf, measure, tables, user_path
from homer_ref.cli.common import DTYPES, command_parser, parse_list, parse_modes, progress, run_main


def build_parser() -> argparse.ArgumentParser:
    p = command_parser("bench", "HOMER memory/speed benchmarks, as ratios.")
    p.add_argument("--json", action="store_true", help="print one JSON object with every measurement")
    p.add_argument("--markdown", action="store_true", help="print the README's results tables")
    p.add_argument("--quick", action="store_true", help="short lengths only (a smoke run, not the README figures)")
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (default 1: CPU times stay comparable under load)"
    )
    p.add_argument("--model", help="measure this checkpoint (HF directory, .gguf or .bin) instead of the suites")
    p.add_argument("--user-path", action="store_true", help="--model: time `generate` as a user runs it (targets)")
    p.add_argument("--lengths", help="--model: prompt lengths in tokens (default 2048,8192,16384; --user-path 16384)")
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


def machine() -> str:
    return (f"{os.cpu_count()} CPU cores, torch {torch.__version__}, {torch.get_num_threads()} thread(s); times are "
            "CPU seconds of the measuring process")  # fmt: skip


def run_one(args, W) -> int:
    """`--one MODEL MODE N M`: one measurement in this process (what `measure.measure` runs as a subprocess)."""
    model_name, mode, n, M = args.one
    if model_name not in ("bench", "stories") and not Path(model_name).exists():
        raise ValueError(f"--one: unknown model {model_name!r} (bench, stories or a model path)")
    if mode not in measure.MODES:
        raise ValueError(f"--one: unknown mode {mode!r} (an internal option of bench)")
    n, M = parse_list(n, int, "one")[0], parse_list(M, int, "one")[0]
    print(json.dumps(measure.measure_one(model_name, mode, n, M, args.target_len, W, DTYPES[args.dtype])))
    return 0


def run_model(args, W, t0: float) -> int:
    """`--model PATH` (with or without --user-path)."""
    if args.user_path:
        lengths = parse_list(args.lengths or "16384", int, "lengths")
        result = user_path.user_path(args.model, lengths[0], report=progress)
        result |= {"machine": f"{os.cpu_count()} CPU cores, torch {torch.__version__}; each `generate` with torch's "
                   "default threads; wall seconds, and CPU seconds of the whole process",
                   "total_s": time.perf_counter() - t0}  # fmt: skip
        writer = tables.user_path_markdown
    else:
        modes = ["homer_depth_first" if m == "homer" else m for m in parse_modes(args.modes, ("plain", "homer"))]
        lengths = parse_list(args.lengths or "2048,8192,16384", int, "lengths")
        result = measure.model_suite(args.model, lengths, modes, args.max_chunk_len, args.target_len, W, args.dtype,
                                     progress)  # fmt: skip
        rows = hf.forward_vs_hf(measure.load_for_bench(args.model, DTYPES[args.dtype]), [2048], args.hf_repeats,
                                progress) if args.hf_repeats else []  # fmt: skip
        result |= {"forward_vs_hf": rows, "forward_time_ratio_vs_hf": rows[-1]["ratio"] if rows else None}
        result |= {"machine": machine(), "total_s": time.perf_counter() - t0}
        writer = tables.model_markdown
    if args.json:
        print(json.dumps(result))
    if args.markdown or not args.json:
        print(f"Machine: {result['machine']}. ({result['total_s']:.0f} s)\n\n" + writer(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    W = None if args.warmup_layers == "default" else parse_list(args.warmup_layers, int, "warmup-layers")[0]
    if args.one:
        return run_one(args, W)
    if args.user_path and args.model is None:
        parser.error("--user-path needs --model (the checkpoint to run `generate` on)")
    t0 = time.perf_counter()
    if args.model is not None:
        return run_model(args, W, t0)
    lengths = [1024, 2048] if args.quick else [1024, 2048, 4096, 8192, 16384]
    result = {
        "machine": machine(),
        "command": "python -m homer_ref.bench" + (" --quick" if args.quick else "") + " --markdown",
        "memory": measure.memory_and_time(lengths, 512, "bench", progress),
        "stories": measure.memory_and_time([1024, 2048, 4096] if not args.quick else [1024], 512, "stories", progress)
        if measure.STORIES.is_file()
        else [],
        "llama2_7b": measure.llama2_7b_shape([4096, 8192, 16384, 32768, 65536]),
        "forward_vs_hf": hf.forward_vs_hf(
            measure.random_model(measure.BENCH), [512] if args.quick else [512, 2048], 3 if args.quick else 9, progress
        ),  # fmt: skip
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
        print(tables.suites_markdown(result))
    return 0


def entry() -> None:
    """`python -m homer_ref.bench` and the `homer-bench` console script."""
    sys.exit(run_main(main))
