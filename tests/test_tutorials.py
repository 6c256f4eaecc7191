"""Every tutorial runs to the end (its own asserts included), with stories260K and with the random stand-in.

A tutorial is a script `tutorials/NN_*.py`; it exits non-zero when one of its checks fails. It finds stories260K
at `../shared/data/stories260K` relative to the project; the second variant copies the project to a temporary
folder without a `shared/` beside it, so the fallback a user without the test data sees is exercised too.
"""

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import STORIES_DIR

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))


def run_tutorial(script: Path, cwd: Path) -> None:
    result = subprocess.run(
        [sys.executable, str(script.relative_to(cwd))], cwd=cwd, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, (
        f"{script.name} exited with {result.returncode}\n--- stdout (end) ---\n{result.stdout[-3000:]}\n"
        f"--- stderr (end) ---\n{result.stderr[-3000:]}"
    )


def test_tutorials_are_found_and_indexed():
    assert TUTORIALS, "no tutorials/NN_*.py found"
    index = (ROOT / "tutorials" / "README.md").read_text(encoding="utf-8")
    missing = [t.name for t in TUTORIALS if t.name not in index]
    assert not missing, f"tutorials/README.md does not list {missing}"


@pytest.mark.parametrize("script", TUTORIALS, ids=[t.stem for t in TUTORIALS])
def test_tutorial_runs(script: Path):
    if not (STORIES_DIR / "stories260K.bin").is_file():
        pytest.skip(f"shared test data not found: {STORIES_DIR} (the fallback variant below still runs)")
    run_tutorial(script, ROOT)


@pytest.fixture(scope="module")
def project_without_shared(tmp_path_factory) -> Path:
    """A copy of the project, as a fresh clone has it, in a folder with no `shared/` next to it."""
    copy = tmp_path_factory.mktemp("alone") / "project"
    skip = (".git", "__pycache__", "*.egg-info", ".pytest_cache", ".ruff_cache", ".hypothesis", ".benchmarks", "out")
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(*skip))
    assert not (copy.parent / "shared").exists()  # the tutorials look for ../shared from the project root
    return copy


@pytest.mark.parametrize("script", TUTORIALS, ids=[t.stem for t in TUTORIALS])
def test_tutorial_runs_without_shared_data(script: Path, project_without_shared: Path):
    run_tutorial(project_without_shared / "tutorials" / script.name, project_without_shared)
