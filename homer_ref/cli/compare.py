"""`python -m homer_ref.compare expected.safetensors actual.safetensors`: does a HOMER trace match the answer key?

For implementations in any language: write your trace in the format of docs/TRACE_FORMAT.md, then run this.
It prints a report whose first line after the header names the first divergence in execution order, e.g.

    first divergence: node 0.0, layer 2: kept slots differ at 2 of 14 input slots; first: ...

`python -m homer_ref.compare --validate mine.safetensors` checks one trace's tensor names, dtypes and shapes (and
what follows from them: slot indices, removed counts, checkpoints, metadata) with no expected trace.

Exit codes: 0 the traces match (the trace is valid), 1 they diverge (it is not), 2 invalid input (arguments, a
missing file, a file that is not a trace). `--json` prints the report as one JSON object instead (keys ok,
first_divergence, divergences, ... ; with --validate: ok, file, holds, problems).
"""

import argparse
import json
import sys
from pathlib import Path

from homer_ref.cli.common import command_parser, run_main
from homer_ref.testing import DEFAULT_ATOL, DEFAULT_RTOL, compare_traces
from homer_ref.testing.validate import validate_trace


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "compare",
        "Compare a HOMER trace with an expected one (e.g. a homer_ref fixture) and name the first "
        "divergence in execution order: tree nodes first (layers, target, input, the K/V of the layers each ran, "
        "kept slots, scores, output), then the final cache (positions, keys and values per layer, logits); or, "
        "with --validate, check one trace against the format. Exit 0 match, 1 diverge, 2 error.",
    )
    p.add_argument(
        "expected", type=Path, nargs="?", help="the answer key, e.g. fixtures/cases/four_leaves/trace.safetensors"
    )
    p.add_argument("actual", type=Path, nargs="?", help="the trace of the implementation under test")
    p.add_argument(
        "--validate", type=Path, metavar="FILE", help="check FILE's names, dtypes and shapes; no expected trace"
    )
    p.add_argument("--atol", type=float, default=DEFAULT_ATOL, help=f"absolute float tolerance ({DEFAULT_ATOL:g})")
    p.add_argument("--rtol", type=float, default=DEFAULT_RTOL, help=f"relative float tolerance ({DEFAULT_RTOL:g})")
    p.add_argument("--final-only", action="store_true", help="compare the final cache only, not the tree nodes")
    p.add_argument("--max-lines", type=int, default=20, help="divergences listed in the report (20; 0 = all)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    return p


def validate(path: Path, as_json: bool) -> int:
    """--validate: every problem of one trace; exit 0 when there is none."""
    problems, holds = validate_trace(path)
    if as_json:
        print(json.dumps({"ok": not problems, "file": str(path), "holds": holds,
                          "problems": [p.message for p in problems]}, indent=2))  # fmt: skip
    elif not problems:
        print(f"{path}: a valid HOMER trace ({holds})")
    else:
        print(f"{path}: {len(problems)} problem(s) with the trace format (docs/TRACE_FORMAT.md); it holds {holds}")
        print("\n".join(f"  {i + 1}. {p.message}" for i, p in enumerate(problems)))
    return 0 if not problems else 1


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.validate is not None:
        if args.expected is not None:
            parser.error("--validate FILE checks one trace: give no EXPECTED/ACTUAL with it")
        return validate(args.validate, args.json)
    if args.actual is None:
        parser.error("give EXPECTED and ACTUAL traces (or --validate FILE)")
    for name in ("atol", "rtol"):
        if not getattr(args, name) >= 0:
            parser.error(f"--{name} must be >= 0, got {getattr(args, name)}")
    if args.max_lines < 0:
        parser.error(f"--max-lines must be >= 0, got {args.max_lines}")
    report = compare_traces(args.expected, args.actual, atol=args.atol, rtol=args.rtol, nodes=not args.final_only)
    if args.json:
        print(json.dumps(report.to_dict(), indent=2))
    else:
        print(report.format(limit=args.max_lines or None))
    return 0 if report.ok else 1


def entry() -> None:
    """`python -m homer_ref.compare` and the `homer-compare` console script."""
    sys.exit(run_main(main))
