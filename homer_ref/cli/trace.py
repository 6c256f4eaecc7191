"""`python -m homer_ref.trace`: run HOMER on given token ids and write everything it did to a safetensors file.

The entry point other implementations call to get an answer key. Input JSON and output tensors: the trace
format, docs/TRACE_FORMAT.md (written by `homer_ref.testing.trace`).
"""

import argparse
import json
import sys
from pathlib import Path

from homer_ref.atomic import save_atomic
from homer_ref.cli.common import (
    DTYPES,
    MODEL_HELP,
    check_out,
    command_parser,
    open_model,
    progress,
    run_main,
)
from homer_ref.decoding import check_ids
from homer_ref.homer import homer_prefill
from homer_ref.homer.calibration import load_bias
from homer_ref.testing.trace import INPUT_DTYPES, input_with_defaults, parse_input, trace_metadata, trace_tensors


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "trace",
        "Run HOMER on the token ids of an input JSON and write the compact cache, logits and every "
        "tree node's decisions to a safetensors trace (the answer key for other implementations).",
    )
    p.add_argument("--model", required=True, help=MODEL_HELP)
    p.add_argument("--input", required=True, type=Path, help="input JSON (ids and HOMER settings)")
    p.add_argument(
        "--bias",
        default="",
        help="calibration table: safetensors file with a [L, width] tensor 'bias' (an empty value means none, as the "
        "conformance kit's {bias} gives for cases without a table)",
    )
    p.add_argument("--out", required=True, type=Path, help="output .safetensors file")
    p.add_argument("--dtype", choices=INPUT_DTYPES, help="compute dtype (default: the input's 'dtype', else float32)")
    p.add_argument("--traversal", choices=["depth_first", "level_order"], default="depth_first")
    p.add_argument(
        "--checkpoints",
        action="store_true",
        help="also write every node's output hidden states and the K/V of the layers it ran (larger files; "
        "lets compare name the node and layer where a forward pass first differs)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        data = json.loads(args.input.read_text(encoding="utf-8"))
    except OSError as e:
        parser.error(f"--input {args.input}: {e.strerror}")
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError, JSONDecodeError, too deep or too long numbers
        parser.error(f"--input {args.input}: not valid UTF-8 JSON ({e})")
    check_out(parser, args.out)
    prefix, context, suffix, config = parse_input(data)
    bias = load_bias(args.bias) if args.bias else None
    dtype_name = args.dtype or input_with_defaults(data)["dtype"]
    dtype = DTYPES[dtype_name]

    def check(cfg) -> None:  # before the weights are read
        for name, ids in (("prefix_ids", prefix), ("context_ids", context), ("suffix_ids", suffix)):
            check_ids(ids, cfg.vocab_size, f"'{name}'")

    model = open_model(args.model, None, dtype, check)
    result = homer_prefill(
        model,
        prefix,
        context,
        suffix,
        config,
        bias=bias,
        traversal=args.traversal,
        all_logits=True,
        checkpoints=args.checkpoints,
    )
    metadata = trace_metadata(result, data, str(args.model), args.bias, dtype_name)
    save_atomic(trace_tensors(result, dtype), args.out, metadata)
    progress(
        f"wrote {args.out}: {len(result.positions)} slots x {len(result.keys)} layers, {len(result.nodes)} nodes, "
        f"last_position_id {result.last_position}"
    )
    return 0


def entry() -> None:
    """`python -m homer_ref.trace` and the `homer-trace` console script."""
    sys.exit(run_main(main))
