"""`python -m homer_ref.calibrate`: compute HOMER's distance-bias table from a text file (HOMER_SPEC.md N.2.4)."""

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from homer_ref.cli.common import (
    MODEL_HELP,
    check_out,
    command_parser,
    open_model,
    open_tokenizer,
    progress,
    run_main,
    save_atomic,
)
from homer_ref.homer.calibration import calibrate, windows_from_ids
from homer_ref.loading.weights import rope_scaled


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "calibrate",
        "Average the head-max last-query attention logit by distance over windows of a text, per "
        "layer, and save it as HOMER's calibration bias (safetensors, key 'bias', [L, M] float32).",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--tokenizer", help="tokenizer.json, sentencepiece .model or .gguf (default: the model's own)")
    p.add_argument("--text", required=True, type=Path, help="UTF-8 text file to calibrate on")
    p.add_argument("--max-chunk-len", required=True, type=int, help="M: the table covers distances 0..M-1")
    p.add_argument("--samples", type=int, default=32, help="number of windows of M tokens (default 32)")
    p.add_argument(
        "--yarn",
        type=float,
        metavar="FACTOR",
        help="calibrate the model with YaRN RoPE scaling by FACTOR, for HOMER with YaRN (eval's homer-yarn): YaRN "
        "scales the attention logits, so the table differs (HOMER_SPEC.md I.1)",
    )
    p.add_argument("--out", required=True, type=Path, help="output .safetensors file")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_chunk_len < 1 or args.samples < 1:
        parser.error("--max-chunk-len and --samples must be >= 1")
    if args.yarn is not None and not args.yarn >= 1:
        parser.error(f"--yarn must be a factor >= 1, got {args.yarn}")
    try:
        text = args.text.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        parser.error(f"--text {args.text} is not UTF-8 ({e.reason}); re-save it as UTF-8")
    except OSError as e:
        parser.error(f"--text {args.text}: {e.strerror}")
    check_out(parser, args.out)
    tokenizer = open_tokenizer(args.model, args.tokenizer)
    ids = tokenizer.encode(text, bos=False)
    model = open_model(args.model, tokenizer, check=lambda cfg: windows_from_ids(ids, args.max_chunk_len, args.samples))
    if args.yarn is not None:
        model = rope_scaled(model, "yarn", args.yarn)
    windows = windows_from_ids(ids, args.max_chunk_len, args.samples)
    t0 = time.perf_counter()
    total = torch.zeros(model.cfg.num_hidden_layers, args.max_chunk_len, dtype=torch.float64)
    for i, window in enumerate(windows):  # one window at a time, so progress can be shown
        total += calibrate(model, [window]).to(torch.float64)
        progress(f"calibrate: window {i + 1}/{len(windows)} ({time.perf_counter() - t0:.1f} s)")
    bias = (total / len(windows)).to(torch.float32)
    rope = asdict(model.cfg.rope_scaling) | {"rope_theta": model.cfg.rope_theta}
    metadata = {
        "model": str(args.model),
        "max_chunk_len": str(args.max_chunk_len),
        "samples": str(len(windows)),
        "rope": json.dumps(rope),
        "text": str(args.text),
    }
    save_atomic({"bias": bias.contiguous()}, args.out, metadata)
    progress(f"wrote {args.out}: bias [{bias.shape[0]}, {bias.shape[1]}] from {len(windows)} windows")
    return 0


def entry() -> None:
    """`python -m homer_ref.calibrate` and the `homer-calibrate` console script."""
    sys.exit(run_main(main))
