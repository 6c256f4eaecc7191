"""Every realistic mistake of tests/mutations.py is caught by the fixtures, through the same conformance path an
implementer uses, and the first divergence names the node where the mistake first changes the trace; the one the
spec calls harmless (pruning after the MLP instead of before, N.1) passes every case.

The implementation under test is homer_ref's trace command (with --checkpoints, as an implementer's trace may be),
run in this process with one mistake applied — a small edit of homer_ref's own source. `homer_ref.testing.run_cases`
runs it on every fixture case and compares each trace with the answer key at the case's tolerance, as for any
implementation. Where the mistake starts comes from the answer key alone (`Mutation.starts_at`): for each case
either the node whose records it first changes — and the first divergence must name that node — or nothing, and
the case must pass. A mistake that makes the implementation raise on some cases (`Mutation.crashes` says why) is
reported there as an error, without a divergence; it must still be caught with a report elsewhere. The table
(mistake -> cases that catch it -> first divergence) is printed at the end of the run.
"""

from pathlib import Path

import pytest
from helpers import MUTATION_TABLE
from mutations import MUTATIONS, applied, without_comments

from homer_ref.cli import trace
from homer_ref.testing import load_cases, load_trace, run_cases

CASES = load_cases()  # this checkout's fixtures/


def homer_ref_trace(case, out: Path) -> Path:
    """The implementation: homer_ref's trace command, in this process, with node checkpoints."""
    argv = ["--model", str(case.model), "--input", str(case.input), "--out", str(out), "--checkpoints"]
    trace.main(argv + (["--bias", str(case.bias)] if case.bias else []))
    return out


@pytest.mark.parametrize("mutation", MUTATIONS, ids=lambda m: m.name)
def test_the_mistake_is_caught_where_it_starts(mutation, tmp_path):
    with applied(mutation):
        results = run_cases(CASES, homer_ref_trace, tmp_path)
        starts = {case.name: mutation.starts_at(load_trace(case.trace), case) for case in CASES}
    caught = [r for r in results if not r.ok]
    reported = [r for r in caught if r.status == "diverge"]  # the first case whose report names a node
    names = ", ".join(r.case.name + (" (raises)" if r.status == "error" else "") for r in caught)
    first = f"{reported[0].case.name}: {reported[0].message}" if reported else "(none: every case passes)"
    MUTATION_TABLE.append((f"{mutation.name}: {mutation.mistake}", names or "-", first))

    crashed = [r for r in results if r.status == "error"]
    assert not crashed or mutation.crashes, f"the mutated implementation failed to run: {crashed[0].line()}"
    assert bool(caught) != mutation.harmless, f"{mutation.name}: caught by {[r.case.name for r in caught]}"
    assert mutation.harmless or len(crashed) < len(caught), "caught by crashes only: no report names a node"
    for r in results:
        node = starts[r.case.name]
        if node is None:
            assert r.ok, f"{r.case.name}: the mistake should change nothing here, but {r.message}"
        elif r.status == "diverge":
            assert f"node {node[0]}.{node[1]}" in r.message, f"{r.case.name}: {r.message}"
        else:
            assert r.status == "error", f"{r.case.name}: the mistake changes node {node}, but the case passes"


def test_mistakes_are_matched_in_code_not_comments():
    """Rewording a comment of homer_ref never breaks a mutation: comments are taken out before matching."""
    source = 'def f(x):\n    y = x + 1  # one more\n    # a note\n    return f"#{y}"\n'
    assert without_comments(source) == 'def f(x):\n    y = x + 1\n\n    return f"#{y}"\n'
    assert all("#" not in old for m in MUTATIONS for _, old, _ in m.edits), "an edit names code, not a comment"
