"""fixtures/test_conformance_template.py, the pytest file an implementer keeps in their copy of fixtures/, works:

- as shipped (homer_ref itself is the implementation) every case passes;
- with a broken implementation (tests/mutations.py: the significance takes the mean over heads, HOMER_SPEC.md D.1)
  it fails on four_leaves with the first divergence docs/TRACE_FORMAT.md documents, and passes where the bug
  cannot show (`random`: its scores ignore attention; `one_chunk`: nothing is pruned);
- run by pytest from a vendored copy of the folder, in another directory, with HOMER_CONFORMANCE_CMD naming an
  implementation's command (the stories260K model then comes from the installed homer_ref).
"""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from mutations import BY_NAME, applied
from test_conformance import BROKEN_CMD, documented_first_divergence

ROOT = Path(__file__).resolve().parent.parent
TEMPLATE = ROOT / "fixtures" / "test_conformance_template.py"


def load_template():
    spec = importlib.util.spec_from_file_location("conformance_template", TEMPLATE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


template = load_template()


@pytest.mark.parametrize("case", template.CASES, ids=lambda case: case.name)
def test_the_template_passes_homer_ref_itself(case, tmp_path):
    template.test_matches_the_answer_key(case, tmp_path)


def test_the_template_catches_a_broken_implementation(tmp_path):
    cases = {case.name: case for case in template.CASES}
    with applied(BY_NAME["mean_over_heads"]):
        with pytest.raises(AssertionError) as failure:
            template.test_matches_the_answer_key(cases["four_leaves"], tmp_path)
        for name in ("random", "one_chunk"):
            template.test_matches_the_answer_key(cases[name], tmp_path)
    first_line, rest = str(failure.value).split("\n", 1)
    assert first_line == documented_first_divergence()
    assert rest.startswith("(case four_leaves: 4 leaves: the significance of D.1") and "traces DIVERGE" in rest


def test_a_vendored_copy_runs_under_pytest_with_a_command(tmp_path):
    """What an implementer runs: pytest on the copied folder, the implementation named by HOMER_CONFORMANCE_CMD."""
    vendored = Path(shutil.copytree(ROOT / "fixtures", tmp_path / "vendored"))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}  # homer_ref "installed"; nothing else of this checkout
    pytest_argv = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_conformance_template.py"]

    def run(command: str, selection: str) -> subprocess.CompletedProcess:
        return subprocess.run([*pytest_argv, "-k", selection], cwd=vendored, capture_output=True, text=True,
                              env={**env, "HOMER_CONFORMANCE_CMD": command}, timeout=600)  # fmt: skip

    trace_cmd = f"{sys.executable} -m homer_ref.trace --model {{model}} --input {{input}} --bias {{bias}} --out {{out}}"
    good = run(trace_cmd, "stories260K or uncalibrated")
    assert good.returncode == 0 and "2 passed" in good.stdout, good.stdout + good.stderr
    bad = run(BROKEN_CMD.replace("tests/mutations.py", str(ROOT / "tests" / "mutations.py")), "four_leaves and not gqa")
    assert bad.returncode == 1 and "1 failed" in bad.stdout, bad.stdout + bad.stderr
    assert f"AssertionError: {documented_first_divergence()}" in bad.stdout
