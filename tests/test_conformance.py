"""The conformance kit as an implementer uses it: `homer_ref.testing` (load_cases, run_case, check_case) and
`python -m homer_ref.conformance --cmd "..."`.

- homer_ref's own trace command, run through `--cmd` exactly as the docs show it, passes every fixture case.
- A broken implementation (tests/mutations.py: the significance takes the mean over heads) is reported per case,
  with the first divergence that docs/TRACE_FORMAT.md's worked example documents; exit code 1.
- Cases load from homer_ref's fixtures/ and from a vendored copy (the stories260K model then comes from the
  package); {bias} is an empty argument for cases without a table; a command that fails or writes no trace is an
  ERROR line, not a crash; invalid arguments are one-line errors with exit code 2.
"""

import hashlib
import json
import re
import shutil
import sys
from pathlib import Path

import pytest

from homer_ref.cli import conformance
from homer_ref.cli.common import run_main
from homer_ref.testing import check_case, load_cases, load_trace, run_case
from homer_ref.testing.conformance import command_argv, summary

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
TRACE_CMD = "python -m homer_ref.trace --model {model} --input {input} --bias {bias} --out {out}"
BROKEN_CMD = f"{sys.executable} tests/mutations.py mean_over_heads --model {{model}} --input {{input}} " \
             "--bias {bias} --out {out}"  # fmt: skip
PY = sys.executable


def documented_first_divergence() -> str:
    """The first divergence that docs/TRACE_FORMAT.md promises for the mean-over-heads implementation on four_leaves."""
    match = re.search(r"^first divergence: (node .*)$", (ROOT / "docs" / "TRACE_FORMAT.md").read_text(), re.MULTILINE)
    assert match, "docs/TRACE_FORMAT.md lost its worked example"
    return match.group(1)


# ----------------------------------------------------------------------------------------------- the command


def test_homer_refs_own_trace_command_passes_every_case(capsys, monkeypatch):
    """The command of the docs, on every case, through subprocesses (two at a time): 25 PASS lines, exit 0."""
    monkeypatch.chdir(ROOT)  # `python -m homer_ref.trace` finds this checkout
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    assert run_main(conformance.main, ["--cmd", TRACE_CMD, "--jobs", "2"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:2] for line in lines[:-1]] == [["PASS", c["name"]] for c in manifest["cases"]]
    assert lines[-1] == f"{len(manifest['cases'])} cases: {len(manifest['cases'])} pass, 0 diverge, 0 errors"


def test_a_broken_implementation_is_reported_per_case(capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(ROOT)
    argv = ["--cmd", BROKEN_CMD, "--cases", "four_leaves,random", "--keep", str(tmp_path)]
    assert run_main(conformance.main, argv) == 1
    out, err = capsys.readouterr()
    four, random, total = out.splitlines()
    assert four.startswith("DIVERGE four_leaves") and four.endswith("  " + documented_first_divergence())
    assert random.startswith("PASS    random")  # random scores ignore attention: the bug cannot show there
    assert total == "2 cases: 1 pass, 1 diverge, 0 errors"
    expected = FIXTURES / "cases" / "four_leaves" / "trace.safetensors"
    assert f"python -m homer_ref.compare {expected} {tmp_path / 'four_leaves.safetensors'}" in err
    assert load_trace(tmp_path / "four_leaves.safetensors")  # --keep keeps the implementation's traces

    assert run_main(conformance.main, [*argv[:4], "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["summary"] == total
    case = report["cases"][0]
    assert (case["name"], case["status"], case["message"]) == ("four_leaves", "diverge", documented_first_divergence())
    assert case["report"]["first_divergence"] == case["message"] and report["cases"][1]["status"] == "pass"


def test_a_failing_command_is_an_error_line(capsys, tmp_path):
    exits = f"{PY} -c 'import sys; sys.exit(\"mytool: cannot read \" + sys.argv[1])' {{model}} {{input}} {{out}}"
    assert run_main(conformance.main, ["--cmd", exits, "--cases", "one_chunk"]) == 1
    line, total = capsys.readouterr().out.splitlines()
    assert line.startswith("ERROR   one_chunk") and "the command exited with status 1: mytool: cannot read " in line
    assert total == "1 cases: 0 pass, 0 diverge, 1 errors"
    silent = f"{PY} -c pass {{model}} {{input}} {{out}}"
    assert run_main(conformance.main, ["--cmd", silent, "--cases", "one_chunk"]) == 1
    assert "the command exited 0 but wrote no trace at" in capsys.readouterr().out
    garbage = f'{PY} -c \'import sys; open(sys.argv[3], "w").write("x")\' {{model}} {{input}} {{out}}'
    assert run_main(conformance.main, ["--cmd", garbage, "--cases", "one_chunk"]) == 1
    out = capsys.readouterr().out
    assert "unusable trace: " in out and "not a readable safetensors file" in out
    sleeps = f"{PY} -c 'import time; time.sleep(30)' {{model}} {{input}} {{out}}"
    assert run_main(conformance.main, ["--cmd", sleeps, "--cases", "one_chunk", "--timeout", "0.5"]) == 1
    assert "the command ran past --timeout 0.5 s" in capsys.readouterr().out
    assert run_main(conformance.main, ["--cmd", "no-such-tool {model} {input} {out}", "--cases", "one_chunk"]) == 1
    assert "cannot run 'no-such-tool': No such file or directory" in capsys.readouterr().out


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--cmd", "mytool {model} {input}"], "--cmd lacks {out}"),
        (["--cmd", "mytool {model} {input} {out} {dtype}"], "unknown placeholder(s) {dtype}"),
        (["--cmd", "mytool {model} {input} {out}", "--cases", "four_leaves,nope"], "no case named nope"),
        (["--cmd", "mytool {model} {input} {out}", "--fixtures", "/nonexistent"], "/nonexistent has no manifest.json"),
        (["--cmd", "mytool 'unclosed {model} {input} {out}"], "No closing quotation"),
    ],
)
def test_invalid_input_is_a_one_line_error(argv, message, capsys):
    assert run_main(conformance.main, argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err


def test_invalid_options_exit_2():
    for argv in (["--cmd", "x {model} {input} {out}", "--jobs", "0"], ["--cmd", "x", "--atol", "-1"], []):
        with pytest.raises(SystemExit) as exit_:
            run_main(conformance.main, argv)
        assert exit_.value.code == 2


# ----------------------------------------------------------------------------------------------- the library


def test_cases_load_with_their_rules_dtypes_and_tolerances():
    cases = load_cases()
    manifest = json.loads((FIXTURES / "manifest.json").read_text())
    assert [c.name for c in cases] == [c["name"] for c in manifest["cases"]]
    for case in cases:
        assert case.model.exists() and case.input.is_file() and case.trace.is_file() and case.rule
        assert (case.bias is None) == (json.loads(case.input.read_text())["reduction"] != "calibrated")
        assert (case.atol, case.rtol) == ((1e-9, 1e-9) if case.dtype == "float64" else (1e-4, 1e-4))
    stories = next(c for c in cases if c.name == "stories260K")
    assert stories.model == ROOT / "homer_ref" / "data" / "stories260K" / "stories260K.bin"
    assert [c.name for c in load_cases(names=["ties", "float64"])] == ["ties", "float64"]


def test_a_vendored_copy_loads_and_checks_the_model_it_lacks(tmp_path):
    """A copy of fixtures/ elsewhere: its own files, and homer_ref's stories260K (size and sha256 checked)."""
    vendored = Path(shutil.copytree(FIXTURES, tmp_path / "my project" / "fixtures"))
    case = load_cases(vendored, ["stories260K"])[0]
    assert case.input == vendored / "cases" / "stories260K" / "input.json"
    assert case.model == ROOT / "homer_ref" / "data" / "stories260K" / "stories260K.bin"
    manifest = json.loads((vendored / "manifest.json").read_text())
    manifest["models"]["stories260K"]["sha256"] = hashlib.sha256(b"another model").hexdigest()
    (vendored / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="has sha256 b0a507e7.*, the manifest expects"):
        load_cases(vendored, ["stories260K"])


def test_bias_is_an_empty_argument_for_cases_without_a_table(tmp_path):
    """Shell quoting as in a terminal; paths with spaces stay one argument; {bias} -> '' when there is no table."""
    vendored = Path(shutil.copytree(FIXTURES, tmp_path / "with space"))
    calibrated, uncalibrated = load_cases(vendored, ["four_leaves", "uncalibrated"])
    template = "my tool --model={model} --input {input} --bias {bias} --out '{out}'"
    out = tmp_path / "out dir" / "t.safetensors"
    assert command_argv(template, calibrated, out) == [
        "my", "tool", f"--model={calibrated.model}", "--input", str(calibrated.input), "--bias", str(calibrated.bias),
        "--out", str(out),
    ]  # fmt: skip
    assert command_argv(template, uncalibrated, out)[5:7] == ["--bias", ""]


def test_python_implementations_pass_diverge_or_error(tmp_path):
    """run_case with a callable: a trace returned (any form load_trace reads), written, wrong, or an exception."""
    case = load_cases(names=["two_leaves"])[0]
    committed = load_trace(case.trace)
    assert run_case(case, lambda c, out: committed, tmp_path).status == "pass"
    assert run_case(case, lambda c, out: shutil.copyfile(c.trace, out) and None, tmp_path).status == "pass"
    other = load_trace(load_cases(names=["four_leaves"])[0].trace)
    result = run_case(case, lambda c, out: other, tmp_path)
    assert result.status == "diverge" and result.message.startswith("metadata 'input': the traces come from")
    assert result.report is not None and not result.report.ok

    def broken(c, out):
        raise KeyError("bias")

    result = run_case(case, broken, tmp_path)
    assert (result.status, result.message) == ("error", "the implementation raised KeyError: 'bias'")
    result = run_case(case, lambda c, out: None, tmp_path / "nothing")
    assert result.status == "error" and "returned None but wrote no trace" in result.message
    assert summary([result]) == "1 cases: 0 pass, 0 diverge, 1 errors"


def test_check_case_uses_the_case_tolerance():
    """A float64 case's 1e-9 tolerance rejects a float32 run of the same input; float32 cases accept it."""
    case = load_cases(names=["float64"])[0]
    from homer_ref.homer import homer_prefill
    from homer_ref.homer.calibration import load_bias
    from homer_ref.loading import load_model
    from homer_ref.testing.trace import parse_input

    prefix, context, suffix, config = parse_input(json.loads(case.input.read_text()))
    bias = load_bias(case.bias)
    result = homer_prefill(load_model(case.model), prefix, context, suffix, config, bias=bias, all_logits=True)
    assert not check_case(case, result).ok
    assert check_case(case, result, atol=1e-4, rtol=1e-4).ok
