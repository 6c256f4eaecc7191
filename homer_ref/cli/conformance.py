"""`python -m homer_ref.conformance --cmd "..."`: run an implementation on every fixture case and compare its traces.

    python -m homer_ref.conformance --cmd "mytool --model {model} --input {input} --bias {bias} --out {out}"

For each case of the fixtures folder's manifest (homer_ref's `fixtures/` by default, `--fixtures DIR` for a
vendored copy) the command runs with the placeholders replaced: `{model}` the model (an HF directory, or the
stories260K .bin), `{input}` the input JSON, `{bias}` the calibration table — an empty argument for the cases that
have none, so an implementation treats an empty `--bias` as none — and `{out}` the trace to write. Its trace is
compared with the case's answer key at the case's tolerance (homer_ref.testing.check_case).

One line per case (PASS / DIVERGE with the first divergence / ERROR with what went wrong), then a summary; `--json`
prints one JSON object instead. Exit codes: 0 every case passes, 1 any case diverges or fails to produce a trace,
2 invalid input (arguments, a --cmd without {model} {input} {out}, an unknown case, no fixtures folder).
"""

import argparse
import json
import sys
import tempfile
from pathlib import Path

from homer_ref.cli.common import command_parser, progress, run_main
from homer_ref.testing.conformance import check_template, load_cases, run_cases, summary


def build_parser() -> argparse.ArgumentParser:
    p = command_parser(
        "conformance",
        "Run a HOMER implementation on every fixture case and compare each trace it writes with the "
        "answer key: one line per case and a summary. Exit 0 all pass, 1 any diverge or fail, 2 invalid input.",
    )
    p.add_argument(
        "--cmd",
        required=True,
        help="the implementation's command, with placeholders: \"mytool --model {model} --input {input} --bias "
        '{bias} --out {out}" ({bias} is an empty argument for cases without a table)',
    )
    p.add_argument("--fixtures", type=Path, help="the fixtures folder (default: this homer_ref checkout's fixtures/)")
    p.add_argument("--cases", nargs="+", metavar="NAME", help="run these cases only (names, or comma-separated)")
    p.add_argument("--atol", type=float, help="absolute tolerance for every case (default: each case's own)")
    p.add_argument("--rtol", type=float, help="relative tolerance for every case (default: each case's own)")
    p.add_argument("--final-only", action="store_true", help="compare the final cache only, not the tree nodes")
    p.add_argument("--jobs", type=int, default=1, help="cases run at once (1)")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds one case may run (600)")
    p.add_argument("--keep", type=Path, metavar="DIR", help="write the implementation's traces to DIR and keep them")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    for name in ("atol", "rtol"):
        value = getattr(args, name)
        if value is not None and not value >= 0:
            parser.error(f"--{name} must be >= 0, got {value}")
    if args.jobs < 1 or not args.timeout > 0:
        parser.error(f"--jobs must be >= 1 and --timeout > 0, got {args.jobs} and {args.timeout}")
    if args.keep is not None and args.keep.exists() and not args.keep.is_dir():
        parser.error(f"--keep {args.keep} is a file; give a directory")
    check_template(args.cmd)  # a ValueError (exit 2) before any case runs
    names = None if args.cases is None else [n for word in args.cases for n in word.split(",") if n]
    cases = load_cases(args.fixtures, names)
    options = dict(atol=args.atol, rtol=args.rtol, nodes=not args.final_only, timeout=args.timeout)
    with tempfile.TemporaryDirectory(prefix="homer-conformance-") as tmp:
        workdir = Path(tmp) if args.keep is None else args.keep
        workdir.mkdir(parents=True, exist_ok=True)
        progress(f"running {len(cases)} case(s) with {args.jobs} job(s); traces in {workdir}")
        results = run_cases(cases, args.cmd, workdir, jobs=args.jobs, **options)
    ok = all(r.ok for r in results)
    if args.json:
        print(json.dumps({"ok": ok, "summary": summary(results), "cases": [r.to_dict() for r in results]}, indent=2))
        return 0 if ok else 1
    for r in results:
        print(r.line())
    print(summary(results))
    failed = next((r for r in results if r.status == "diverge"), None)
    if failed is not None:
        trace = failed.trace if args.keep is not None else "ACTUAL (keep the traces with --keep DIR)"
        print(f"full report of a case: python -m homer_ref.compare {failed.case.trace} {trace}", file=sys.stderr)
    return 0 if ok else 1


def entry() -> None:
    """`python -m homer_ref.conformance` and the `homer-conformance` console script."""
    sys.exit(run_main(main))
