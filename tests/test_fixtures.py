"""The golden fixtures (fixtures/, made by scripts/make_fixtures.py) are reproducible and correct.

- Drift: regenerating every fixture gives byte-identical models, inputs, bias tables and manifest, and traces
  equal to the committed ones: integers exactly, floats within 1e-5 (float32 results may differ across machines
  by BLAS rounding; every pruning decision wins by >= MIN_MARGIN, so none can flip).
- Correctness: the NumPy oracle (reference/, float64, written independently of the torch code) agrees with
  every committed trace within the kit's default tolerance, node by node.
- Coverage: the cases cover every rule of the plan (one chunk, 2/4/8 leaves, short-right rule, leftover layers,
  T < M, P = 0, GQA, the uncalibrated and random modes), and stay small enough to vendor.

To update the fixtures after a deliberate change of the algorithm or the format: `python scripts/make_fixtures.py`
and commit fixtures/ (and bump FORMAT_VERSION in homer_ref/trace.py if the format changed).
"""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest

from homer_ref.homer.plan import HomerConfig, plan
from homer_ref.testing import compare_traces, decision_margin, load_trace
from reference import homer_np, llama_np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
REGENERATION_TOL = 1e-5  # committed float32 trace vs float32 regenerated here (same code, other BLAS maybe)
ORACLE_TOL = 1e-4  # float32 trace vs the float64 oracle: float32 rounding through a few layers


def _load_script():
    spec = importlib.util.spec_from_file_location("make_fixtures", ROOT / "scripts" / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_fixtures = _load_script()
CASES = {case.name: case for case in make_fixtures.CASES}
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text()) if (FIXTURES / "manifest.json").is_file() else {}


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    """The static fixture files written afresh (traces are made per case, by the tests below)."""
    out = tmp_path_factory.mktemp("fixtures")
    for rel, data in make_fixtures.static_files().items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    return out


def test_static_files_are_byte_identical():
    """Models, inputs, bias tables and the manifest are integer arithmetic: identical bytes everywhere."""
    expected = make_fixtures.static_files()
    committed = {str(p.relative_to(FIXTURES)) for p in FIXTURES.rglob("*") if p.is_file()}
    traces = {f"cases/{name}/trace.safetensors" for name in CASES}
    assert committed == set(expected) | traces, (
        f"fixtures/ holds other files than the script makes: extra {sorted(committed - set(expected) - traces)}, "
        f"missing {sorted(set(expected) | traces - committed)}; run python scripts/make_fixtures.py"
    )
    stale = [rel for rel, data in expected.items() if (FIXTURES / rel).read_bytes() != data]
    assert not stale, f"committed fixtures differ from what the script makes: {stale}; run scripts/make_fixtures.py"


@pytest.mark.parametrize("name", list(CASES))
def test_trace_regenerates(name, regenerated):
    """The trace CLI, run again on the committed inputs, writes the committed trace."""
    fresh = make_fixtures.make_trace(regenerated, CASES[name])
    committed = load_trace(FIXTURES / "cases" / name / "trace.safetensors")
    report = compare_traces(committed, fresh, atol=REGENERATION_TOL, rtol=REGENERATION_TOL)
    assert report.ok, f"the trace of case {name} drifted from the committed one:\n{report}"
    fresh_metadata = load_trace(fresh).metadata
    for key in ("format_version", "input", "plan", "dtype", "model", "bias"):
        assert fresh_metadata.get(key) == committed.metadata.get(key), f"metadata {key!r} of {name} drifted"


@pytest.mark.parametrize("name", list(CASES))
def test_oracle_agrees_with_fixture(name):
    """The independent NumPy oracle reproduces every committed trace: same nodes, decisions, cache and logits."""
    entry = next(c for c in MANIFEST["cases"] if c["name"] == name)
    config, weights = llama_np.load_hf(str(FIXTURES / entry["model"]))
    data = json.loads((FIXTURES / entry["input"]).read_text())
    bias = llama_np.read_safetensors(str(FIXTURES / entry["bias"]))["bias"] if entry["bias"] else None
    result = homer_np.homer_prefill(
        config,
        weights,
        data["prefix_ids"],
        data["context_ids"],
        data["suffix_ids"],
        data["max_chunk_len"],
        data["target_len"],
        data["warmup_layers"],
        bias=bias,
        reduction=data["reduction"],
        seed=data["seed"],
    )
    report = compare_traces(FIXTURES / entry["trace"], result, atol=ORACLE_TOL, rtol=ORACLE_TOL)
    assert report.ok, f"the NumPy oracle disagrees with fixture {name}:\n{report}"


@pytest.mark.parametrize("name", list(CASES))
def test_decisions_are_robust(name):
    """No pruning decision is a near-tie, so float rounding in another implementation cannot flip it."""
    margin = decision_margin(FIXTURES / "cases" / name / "trace.safetensors")
    assert margin >= make_fixtures.MIN_MARGIN, f"{name}: a decision wins by only {margin:.2e}"


def _plan(case):
    L = make_fixtures.MODELS[case.model]["num_hidden_layers"]
    return plan(L, HomerConfig(case.M, case.T, case.W, case.reduction, case.seed), case.P, case.C, case.S)


def test_cases_cover_the_issue_list():
    plans = {name: _plan(case) for name, case in CASES.items()}

    def short_right(p) -> bool:  # some child's target differs from R because its right sibling's leaf is short
        return any(node.target not in (p.R, p.root.target) for node in p.nodes.values())

    def heads(case) -> tuple[int, int]:
        model = make_fixtures.MODELS[case.model]
        return model["num_attention_heads"], model["num_key_value_heads"]

    covered = {
        "one chunk": any(p.N == 1 for p in plans.values()),
        "2 leaves": any(p.N == 2 for p in plans.values()),
        "4 leaves": any(p.N == 4 for p in plans.values()),
        "8 leaves": any(p.N == 8 for p in plans.values()),
        "short-right rule": any(short_right(p) for p in plans.values()),
        "leftover layers": any(p.lo > 0 for p in plans.values()),
        "warm-up layers": any(p.W > 0 for p in plans.values()),
        "target below M": any(p.T < p.M and p.N > 1 for p in plans.values()),
        "P = 0": any(p.P == 0 for p in plans.values()),
        "GQA": any(heads(c)[1] < heads(c)[0] for c in CASES.values()),
        "MHA": any(heads(c)[1] == heads(c)[0] for c in CASES.values()),
        "uncalibrated": any(c.reduction == "uncalibrated" for c in CASES.values()),
        "random": any(c.reduction == "random" for c in CASES.values()),
    }  # fmt: skip
    assert all(covered.values()), f"not covered: {[k for k, v in covered.items() if not v]}"
    assert short_right(plans["short_right"]) and plans["short_right"].N0 == 3


def test_manifest_describes_the_files():
    assert MANIFEST["format_version"] == load_trace(FIXTURES / MANIFEST["cases"][0]["trace"]).metadata["format_version"]
    for entry in MANIFEST["cases"]:
        trace = load_trace(FIXTURES / entry["trace"])
        assert json.loads(trace.metadata["input"]) == json.loads((FIXTURES / entry["input"]).read_text())
        assert trace.tensors["positions"].size == entry["plan"]["final_len"]
        assert len(trace.nodes) == entry["plan"]["nodes"] == 2 * entry["plan"]["N"] - 1
        assert trace.metadata["model"] == entry["model"] and trace.metadata["bias"] == (entry["bias"] or "")


def test_fixtures_are_small():
    sizes = {str(p.relative_to(FIXTURES)): p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file()}
    assert sum(sizes.values()) < 2 * 2**20, f"fixtures total {sum(sizes.values())} bytes"
    assert max(sizes.values()) < 300 * 2**10, max(sizes, key=sizes.get)


def test_models_are_hf_checkpoints_transformers_reads():
    """A vendoring project may run the fixture models with HF transformers: same logits as homer_ref's Llama."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from homer_ref.loading import load_model

    tokens = json.loads((FIXTURES / "cases" / "one_chunk" / "input.json").read_text())["context_ids"]
    for name in make_fixtures.MODELS:
        hf = transformers.LlamaForCausalLM.from_pretrained(FIXTURES / "models" / name, attn_implementation="eager")
        with torch.no_grad():
            expected = hf(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].double().numpy()
            ours = load_model(FIXTURES / "models" / name, dtype=torch.float64)(torch.tensor([tokens]))[0].numpy()
        assert np.abs(ours - expected).max() < 1e-4, f"{name}: max |Δ| {np.abs(ours - expected).max():.2e}"
        assert math.isfinite(float(np.abs(expected).max()))
