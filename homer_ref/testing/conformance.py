"""The conformance kit: run an implementation on every fixture case and compare its traces with the answer keys.

The fixtures folder (homer_ref's `fixtures/`, or a vendored copy) lists its cases in `manifest.json`: for each, a
model, an input JSON, an optional calibration table, the answer-key trace, its compute dtype and its tolerance.

    cases = load_cases("fixtures")                       # every case, paths resolved
    result = run_case(cases[0], "mytool --model {model} --input {input} --bias {bias} --out {out}", workdir)
    result.ok, result.status, result.message             # "pass" | "diverge" | "error", the first divergence
    report = check_case(case, "mine.safetensors")        # compare_traces at the case's tolerance

An *implementation* is either a command template — `{model}`, `{input}`, `{bias}` and `{out}` are replaced by the
case's model path (an HF directory, or the stories260K .bin), input JSON, calibration table and the trace to
write; `{bias}` becomes an empty argument for cases without a table (`uncalibrated`, `random`), so an
implementation treats an empty `--bias` as none — or a Python callable `(case, out) -> trace`, returning a trace
`load_trace` reads (a path, a dict of tensors, a HomerCache) or None after writing `out`.

`python -m homer_ref.conformance --cmd "..."` is the command-line form (homer_ref/cli/conformance.py);
`fixtures/test_conformance_template.py` the pytest form.
"""

import hashlib
import json
import shlex
import string
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from homer_ref.testing.compare import compare_traces
from homer_ref.testing.read import load_trace
from homer_ref.testing.report import Report

PLACEHOLDERS = ("model", "input", "bias", "out")
REQUIRED_PLACEHOLDERS = ("model", "input", "out")  # without them a command cannot run a case
_PACKAGE_ROOT = Path(__file__).resolve().parents[2]  # the folder holding homer_ref/ (a checkout or site-packages)


@dataclass(frozen=True)
class FixtureCase:
    """One case of a fixtures folder, with absolute paths."""

    name: str
    rule: str  # the rule of HOMER_SPEC.md the case pins
    model: Path  # HF model directory, or a llama2.c .bin
    input: Path  # input JSON: ids and HOMER settings
    bias: Path | None  # calibration table, None for uncalibrated and random cases
    trace: Path  # the answer key
    dtype: str  # compute dtype of the answer key: float32 or float64
    atol: float
    rtol: float


def default_fixtures() -> Path | None:
    """The fixtures folder of the homer_ref checkout this module runs from, None when there is none (installed)."""
    folder = _PACKAGE_ROOT / "fixtures"
    return folder if (folder / "manifest.json").is_file() else None


def _model_path(fixtures: Path, entry: dict, models: dict) -> Path:
    """The case's model: inside the folder, else (a model the folder does not ship) homer_ref's own copy, checked
    against the manifest's size and sha256."""
    path = fixtures / entry["model"]
    if path.exists():
        return path
    model = next((m for m in models.values() if m.get("path") == entry["model"]), {})
    if not model.get("package_file"):
        raise ValueError(f"case {entry['name']}: model {path} does not exist; copy homer_ref's fixtures/ again")
    copy = _PACKAGE_ROOT / model["package_file"]
    if not copy.is_file():
        raise ValueError(f"case {entry['name']}: {path} is not in the fixtures folder and homer_ref has no "
                         f"{model['package_file']}; put the model at {path}")  # fmt: skip
    digest = hashlib.sha256(copy.read_bytes()).hexdigest()
    if model.get("sha256") and digest != model["sha256"]:
        raise ValueError(f"case {entry['name']}: {copy} has sha256 {digest}, the manifest expects {model['sha256']}")
    return copy


def load_cases(fixtures=None, names=None) -> list[FixtureCase]:
    """The cases of a fixtures folder (default: this checkout's `fixtures/`), all or those named, in manifest order.

    ValueError for a folder without a manifest, an unknown case name, or a model that cannot be found.
    """
    folder = Path(fixtures) if fixtures is not None else default_fixtures()
    if folder is None or not (folder / "manifest.json").is_file():
        where = f"{folder} has no manifest.json" if folder is not None else "this homer_ref has no fixtures/ folder"
        raise ValueError(f"{where}: pass the folder that holds manifest.json (a copy of homer_ref's fixtures/)")
    try:
        manifest = json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
        entries = {entry["name"]: entry for entry in manifest["cases"]}
    except (ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{folder / 'manifest.json'}: not a fixtures manifest ({e})") from e
    names = list(entries) if names is None else list(names)
    unknown = [n for n in names if n not in entries]
    if unknown:
        raise ValueError(f"no case named {', '.join(unknown)} in {folder}; cases: {', '.join(entries)}")
    default_tol = manifest.get("tolerance", {"atol": 1e-4, "rtol": 1e-4})
    cases = []
    for name in names:
        entry = entries[name]
        tol = entry.get("tolerance", default_tol)
        cases.append(
            FixtureCase(
                name=name,
                rule=entry.get("rule", ""),
                model=_model_path(folder, entry, manifest.get("models", {})),
                input=folder / entry["input"],
                bias=folder / entry["bias"] if entry.get("bias") else None,
                trace=folder / entry["trace"],
                dtype=entry.get("dtype", "float32"),
                atol=tol["atol"],
                rtol=tol["rtol"],
            )
        )
    return cases


def check_case(case: FixtureCase, actual, atol=None, rtol=None, nodes: bool = True) -> Report:
    """Compare a trace of the implementation (any source `load_trace` reads) with the case's answer key, at the
    case's tolerance unless `atol` / `rtol` are given."""
    atol = case.atol if atol is None else atol
    rtol = case.rtol if rtol is None else rtol
    return compare_traces(case.trace, actual, atol=atol, rtol=rtol, nodes=nodes)


# ----------------------------------------------------------------------------------------------- commands


def check_template(template: str) -> list[str]:
    """The template's words (shell quoting rules); ValueError for an unknown or a missing placeholder."""
    try:
        words = shlex.split(template)
    except ValueError as e:
        raise ValueError(f"--cmd {template!r}: {e}") from e
    if not words:
        raise ValueError("--cmd is empty: give the command that writes a trace, with {model} {input} {bias} {out}")
    used = {f for word in words for _, f, _, _ in string.Formatter().parse(word) if f is not None}
    unknown = sorted(used - set(PLACEHOLDERS))
    if unknown:
        raise ValueError(f"--cmd has unknown placeholder(s) {', '.join('{' + u + '}' for u in unknown)}; "
                         f"use {' '.join('{' + p + '}' for p in PLACEHOLDERS)}")  # fmt: skip
    missing = [p for p in REQUIRED_PLACEHOLDERS if p not in used]
    if missing:
        raise ValueError(f"--cmd lacks {' '.join('{' + p + '}' for p in missing)}: the command must read the case "
                         "and write its trace there")  # fmt: skip
    return words


def command_argv(template: str, case: FixtureCase, out: Path) -> list[str]:
    """The command line of one case: each placeholder replaced by a path (`{bias}` by "" when there is none)."""
    values = {"model": str(case.model), "input": str(case.input), "bias": str(case.bias or ""), "out": str(out)}
    return [word.format(**values) for word in check_template(template)]


class ImplementationError(RuntimeError):
    """The implementation failed to produce a trace (its command exited non-zero, wrote nothing, or raised)."""


def run_command(template: str, case: FixtureCase, out: Path, timeout: float | None = None) -> Path:
    """Run the command of one case; `out` when it wrote a trace there, else ImplementationError saying why."""
    argv = command_argv(template, case, out)
    try:
        run = subprocess.run(argv, capture_output=True, text=True, timeout=timeout)
    except FileNotFoundError as e:
        raise ImplementationError(f"cannot run {argv[0]!r}: {e.strerror}") from e
    except subprocess.TimeoutExpired as e:
        raise ImplementationError(f"the command ran past --timeout {timeout:g} s") from e
    if run.returncode != 0:
        last = (run.stderr.strip() or run.stdout.strip() or "no output").splitlines()[-1]
        raise ImplementationError(f"the command exited with status {run.returncode}: {last}")
    if not out.is_file():
        raise ImplementationError(f"the command exited 0 but wrote no trace at {out}")
    return out


# ----------------------------------------------------------------------------------------------- running


@dataclass
class CaseResult:
    case: FixtureCase
    status: str  # "pass", "diverge" (a trace that differs) or "error" (no readable trace)
    message: str  # the first divergence, or what went wrong; "" for a pass
    seconds: float
    trace: Path | None = None  # the implementation's trace file, when it wrote one
    report: Report | None = None

    @property
    def ok(self) -> bool:
        return self.status == "pass"

    def line(self) -> str:
        """One line for a terminal: status, case, time, and the first divergence or error."""
        text = f"{self.status.upper():8s}{self.case.name:18s}{self.seconds:6.1f} s"
        return text + (f"  {self.message}" if self.message else "")

    def to_dict(self) -> dict:
        return {
            "name": self.case.name,
            "status": self.status,
            "message": self.message,
            "seconds": round(self.seconds, 3),
            "expected": str(self.case.trace),
            "actual": None if self.trace is None else str(self.trace),
            "report": None if self.report is None else self.report.to_dict(),
        }


Implementation = str | Callable  # a command template, or (case, out) -> trace


def run_case(
    case: FixtureCase, implementation: Implementation, workdir: Path, atol=None, rtol=None, nodes: bool = True,
    timeout: float | None = None,
) -> CaseResult:  # fmt: skip
    """Run the implementation on one case (its trace goes to workdir/<case>.safetensors) and compare."""
    out = Path(workdir) / f"{case.name}.safetensors"
    start = time.perf_counter()
    written = None
    try:
        if isinstance(implementation, str):
            actual = written = run_command(implementation, case, out, timeout)
        else:
            actual = implementation(case, out)
            if actual is None:
                if not out.is_file():
                    raise ImplementationError(f"the implementation returned None but wrote no trace at {out}")
                actual = written = out
        report = check_case(case, load_trace(actual, "actual"), atol, rtol, nodes)
    except ImplementationError as e:
        return CaseResult(case, "error", str(e), time.perf_counter() - start, written)
    except ValueError as e:  # an unreadable trace, or one the comparison cannot rely on
        return CaseResult(case, "error", f"unusable trace: {e}", time.perf_counter() - start, written)
    except Exception as e:  # a Python implementation that raised
        if isinstance(implementation, str):
            raise
        message = f"the implementation raised {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
        return CaseResult(case, "error", message, time.perf_counter() - start, written)
    status = "pass" if report.ok else "diverge"
    return CaseResult(case, status, report.first_divergence or "", time.perf_counter() - start, written, report)


def run_cases(
    cases: list[FixtureCase], implementation: Implementation, workdir: Path, jobs: int = 1, **kwargs
) -> list[CaseResult]:
    """`run_case` for every case, `jobs` at a time (threads: for commands, which run as separate processes);
    results in the order of `cases`."""
    if jobs <= 1:
        return [run_case(case, implementation, workdir, **kwargs) for case in cases]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(lambda case: run_case(case, implementation, workdir, **kwargs), cases))


def summary(results: list[CaseResult]) -> str:
    """'25 cases: 24 pass, 1 diverge, 0 errors'."""
    count = {status: sum(r.status == status for r in results) for status in ("pass", "diverge", "error")}
    return f"{len(results)} cases: {count['pass']} pass, {count['diverge']} diverge, {count['error']} errors"
