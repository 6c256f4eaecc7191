"""How another HOMER implementation tests itself against homer_ref's fixtures: a template to copy.

1. Vendor `fixtures/` into your project (or point FIXTURES at a homer_ref checkout).
2. Replace `run_implementation` with a call to your implementation: load the model directory, read the ids and
   settings from input.json (and the "bias" table for calibrated cases), run HOMER's prefill, and write the
   trace tensors of docs/TRACE_FORMAT.md to a .safetensors file (or return them as a dict of arrays).
3. Run pytest. Every case compares your trace with the answer key; a failure prints the first divergence in
   execution order, e.g. "node (level 0, index 0), layer 1: kept slots differ at 2 of 15 input slots; ...".
   Outside Python, run `python -m homer_ref.compare expected.safetensors yours.safetensors` instead (exit 0
   when they match, 1 when they diverge).

Here the "implementation" is homer_ref itself, run through its trace command (every case passes), and a
deliberately broken variant whose significance takes the MEAN over attention heads instead of the max
(HOMER_SPEC.md D.1). The kit must catch the variant at the first node that prunes, with exactly the report that
docs/TRACE_FORMAT.md ("Worked example: a perturbed implementation") documents.
"""

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import homer_ref.cli.trace
from homer_ref.homer import reduction
from homer_ref.testing import assert_traces_match, compare_traces

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"  # your vendored copy
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
CASES = {case["name"]: case for case in MANIFEST["cases"]}
ATOL, RTOL = MANIFEST["tolerance"]["atol"], MANIFEST["tolerance"]["rtol"]


def run_implementation(case: dict, out: Path) -> Path:
    """REPLACE ME: run your implementation on one fixture case and write its trace to `out`."""
    argv = ["--model", str(FIXTURES / case["model"]), "--input", str(FIXTURES / case["input"]), "--out", str(out)]
    if case["bias"]:
        argv += ["--bias", str(FIXTURES / case["bias"])]
    homer_ref.cli.trace.main(argv)
    return out


@pytest.mark.parametrize("name", list(CASES))
def test_implementation_matches_fixture(name, tmp_path):
    case = CASES[name]
    actual = run_implementation(case, tmp_path / "actual.safetensors")
    assert_traces_match(FIXTURES / case["trace"], actual, atol=ATOL, rtol=RTOL)


# ----------------------------------------------------------------------------------------------- the perturbed one


def mean_over_heads_significance(last_logits, positions, is_context, bias_row):
    """The bug under test: homer_ref.reduction.significance with mean() where HOMER takes max() over heads."""
    scores = last_logits.mean(dim=0).to(torch.float32)  # should be .amax(dim=0)
    if bias_row is not None:
        scores = scores - bias_row.to(torch.float32)[positions[-1] - positions]
    return scores.masked_fill(~is_context, float("inf"))


def documented_first_divergence() -> str:
    """The first divergence that docs/TRACE_FORMAT.md promises for the perturbed implementation on four_leaves."""
    doc = (ROOT / "docs" / "TRACE_FORMAT.md").read_text()
    match = re.search(r"^first divergence: (node .*)$", doc, flags=re.MULTILINE)
    assert match, "docs/TRACE_FORMAT.md lost its worked example"
    return match.group(1)


def test_perturbed_implementation_is_caught(monkeypatch, tmp_path):
    monkeypatch.setattr(reduction, "significance", mean_over_heads_significance)  # undone after the test
    case = CASES["four_leaves"]
    actual = run_implementation(case, tmp_path / "perturbed.safetensors")

    report = compare_traces(FIXTURES / case["trace"], actual, atol=ATOL, rtol=RTOL)
    assert not report.ok
    # The first pruning node is leaf 0 (it prunes at layer 1, the last of its block of layers 0-1): the two
    # criteria keep different slots there already. The decisions are integers, so this much of the line is exact
    # on every machine; the scores that follow are floats, checked to their 4 printed decimals.
    exact = "node (level 0, index 0), layer 1: kept slots differ at 2 of 15 input slots; first: expected slot "
    assert report.first_divergence.startswith(exact), report.first_divergence
    assert report.first_divergence == documented_first_divergence()

    with pytest.raises(AssertionError, match=re.escape(exact)):
        assert_traces_match(FIXTURES / case["trace"], actual, atol=ATOL, rtol=RTOL)

    # The same, from the command line, as an implementation in another language would run it.
    run = subprocess.run(
        [sys.executable, "-m", "homer_ref.compare", str(FIXTURES / case["trace"]), str(actual)],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 1, run.stderr
    assert f"first divergence: {report.first_divergence}\n" in run.stdout


def test_perturbation_is_caught_by_every_fixture_that_ranks_by_attention(monkeypatch, tmp_path):
    """All cases whose decisions come from attention logits catch the bug; the others cannot, by design:
    `one_chunk` prunes nothing, and `random` scores tokens without looking at attention."""
    monkeypatch.setattr(reduction, "significance", mean_over_heads_significance)
    caught = {}
    for name, case in CASES.items():
        actual = run_implementation(case, tmp_path / f"{name}.safetensors")
        caught[name] = not compare_traces(FIXTURES / case["trace"], actual, atol=ATOL, rtol=RTOL).ok
    assert {name for name, hit in caught.items() if not hit} == {"one_chunk", "random"}
