"""`python -m homer_ref.calibrate`: compute HOMER's distance-bias table from a text (HOMER_SPEC.md D.2, N.2.4).

The other commands find or compute a table themselves (`homer_ref.bias`: beside the model, the user cache, or
computed once on the default calibration text); this one makes a table of your choosing (your own text, more
windows, YaRN active) to ship beside a model as homer_bias.safetensors or to pass as --bias.
"""

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

from homer_ref.atomic import save_atomic
from homer_ref.cli.common import (
    MODEL_HELP,
    check_out,
    command_parser,
    open_model,
    open_tokenizer,
    progress,
    run_main,
)
from homer_ref.data import CALIBRATION_TEXT
from homer_ref.homer.calibration import calibrate, windows_from_ids
from homer_ref.loading.weights import rope_scaled
from homer_ref.progress import progress_bar


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "calibrate",
        "Average the head-max last-query attention logit by distance over windows of a text, per "
        "layer, and save it as HOMER's calibration bias (safetensors, key 'bias', [L, M] float32).",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--tokenizer", help="tokenizer.json, sentencepiece .model or .gguf (default: the model's own)")
    p.add_argument(
        "--text", type=Path, default=CALIBRATION_TEXT, help="UTF-8 text file to calibrate on (default: homer_ref's own)"
    )
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
    L = model.cfg.num_hidden_layers
    with progress_bar(len(windows) * L, f"calibrating on {len(windows)} windows", "layer") as bar:
        bias = calibrate(model, windows, bar)
    rope = asdict(model.cfg.rope_scaling) | {"rope_theta": model.cfg.rope_theta}
    metadata = {
        "model": str(args.model),
        "max_chunk_len": str(args.max_chunk_len),
        "samples": str(len(windows)),
        "rope": json.dumps(rope),
        "text": str(args.text),
    }
    save_atomic({"bias": bias.contiguous()}, args.out, metadata)
    progress(f"wrote {args.out}: bias [{bias.shape[0]}, {bias.shape[1]}] from {len(windows)} windows "
             f"({time.perf_counter() - t0:.1f} s)")  # fmt: skip
    return 0


def entry() -> None:
    """`python -m homer_ref.calibrate` and the `homer-calibrate` console script."""
    sys.exit(run_main(main))
