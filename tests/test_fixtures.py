"""The golden fixtures (fixtures/, made by scripts/make_fixtures.py) are reproducible and correct on any CPU.

- Static files: regenerating gives byte-identical models, inputs, bias tables, manifest and README.
- Drift, robust to the machine's kernels: every committed trace is regenerated in float64, whose rounding does not
  depend on the CPU's kernels at float32 scale, and compared with the committed trace — decisions (layers,
  targets, positions, sources, kept and removed slots, node order) exactly, floats within
  TOL["fixture_float32_vs_float64"] (float32 traces) or TOL["fixture_float64"] (float64 traces); both tolerances
  rest on spreads measured with `python scripts/make_fixtures.py --spread` (tests/helpers.py).
- Correctness: the NumPy oracle (reference/, float64, written independently of the torch code) agrees with every
  committed trace, node by node, checkpoints included; in the `ties` case it shows the ties are exact and that the
  earlier slot goes first.
- Decisions: every pruning decision wins by >= MIN_MARGIN, except the `ties` case's exact ties.
- Coverage: the cases pin every rule the spec states, and stay small enough to vendor.

To update the fixtures after a deliberate change of the algorithm or the format: `python scripts/make_fixtures.py`
and commit fixtures/ (and bump FORMAT_VERSION in homer_ref/testing/trace.py if the format changed).
"""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
from helpers import MEASURED, STORIES_DIR, TOL, llama2c_to_hf_dir

from homer_ref.testing import compare_traces, decision_gaps, load_trace
from reference import homer_np, llama_np

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


def _load_script():
    spec = importlib.util.spec_from_file_location("make_fixtures", ROOT / "scripts" / "make_fixtures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_fixtures = _load_script()
CASES = {case.name: case for case in make_fixtures.CASES}
MANIFEST = json.loads((FIXTURES / "manifest.json").read_text())
ENTRIES = {entry["name"]: entry for entry in MANIFEST["cases"]}


@pytest.fixture(scope="module")
def regenerated(tmp_path_factory) -> Path:
    """The static fixture files written afresh (traces are made per case, by the tests below)."""
    out = tmp_path_factory.mktemp("fixtures")
    for rel, data in make_fixtures.static_files().items():
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        (out / rel).write_bytes(data)
    return out


@pytest.fixture(scope="module")
def stories_hf(tmp_path_factory) -> Path:
    """stories260K as an HF directory, converted independently of homer_ref's loader (tests/helpers.py)."""
    out = tmp_path_factory.mktemp("stories_hf")
    llama2c_to_hf_dir(STORIES_DIR / "stories260K.bin", out)
    return out


def test_static_files_are_byte_identical():
    """Models, inputs, bias tables, manifest and README are integer arithmetic: identical bytes everywhere."""
    expected = make_fixtures.static_files()
    committed = {str(p.relative_to(FIXTURES)) for p in FIXTURES.rglob("*") if p.is_file()}
    made = set(expected) | {f"cases/{name}/trace.safetensors" for name in CASES} | set(make_fixtures.HAND_WRITTEN)
    assert committed == made, (
        f"fixtures/ holds other files than the script makes: extra {sorted(committed - made)}, "
        f"missing {sorted(made - committed)}; run python scripts/make_fixtures.py"
    )
    stale = [rel for rel, data in expected.items() if (FIXTURES / rel).read_bytes() != data]
    assert not stale, f"committed fixtures differ from what the script makes: {stale}; run scripts/make_fixtures.py"


@pytest.mark.parametrize("name", list(CASES))
def test_trace_regenerates(name, regenerated):
    """The trace command, run again in float64 on the committed inputs, makes the same decisions as the committed
    trace and the same numbers within float32 rounding (float32 cases) or float64 rounding (float64 cases)."""
    case = CASES[name]
    fresh = load_trace(make_fixtures.make_trace(regenerated, case, dtype="float64", name="float64.safetensors"))
    committed = load_trace(FIXTURES / "cases" / name / "trace.safetensors")
    key = "fixture_float64" if case.dtype == "float64" else "fixture_float32_vs_float64"
    report = compare_traces(committed, fresh, atol=TOL[key].atol, rtol=TOL[key].rtol)
    assert report.ok, f"the trace of case {name} drifted from the committed one:\n{report}"
    largest, same_decisions = make_fixtures.spread(committed.tensors, fresh.tensors)
    MEASURED[key] = max(MEASURED.get(key, 0.0), largest)  # printed at the end of the run (conftest)
    assert same_decisions
    assert np.array_equal(fresh.tensors["node_order"], committed.tensors["node_order"])
    assert committed.tensors.keys() == fresh.tensors.keys()
    for key in ("format_version", "input", "plan", "model", "bias"):
        assert fresh.metadata.get(key) == committed.metadata.get(key), f"metadata {key!r} of {name} drifted"
    assert committed.metadata["dtype"] == case.dtype and fresh.metadata["dtype"] == "float64"


def test_the_spread_measurement(regenerated):
    """`make_fixtures.py --spread`: a library regeneration (any thread count) is measured against the committed
    trace; equal decisions, and the largest |Δ| within the drift tolerance."""
    committed = load_trace(FIXTURES / "cases" / "two_leaves" / "trace.safetensors").tensors
    assert make_fixtures.spread(committed, committed) == (0.0, True)
    fresh = make_fixtures.regenerate(FIXTURES, CASES["two_leaves"], "float64", threads=2)
    largest, same = make_fixtures.spread(committed, fresh)
    assert same and 0 < largest < TOL["fixture_float32_vs_float64"].atol
    fresh["node.0.0.kept"] = fresh["node.0.0.kept"][::-1].copy()
    assert not make_fixtures.spread(committed, fresh)[1]


def _oracle(entry: dict, stories_hf: Path) -> dict:
    model = stories_hf if entry["model"].endswith(".bin") else FIXTURES / entry["model"]
    config, weights = llama_np.load_hf(str(model))
    data = json.loads((FIXTURES / entry["input"]).read_text())
    bias = llama_np.read_safetensors(str(FIXTURES / entry["bias"]))["bias"] if entry["bias"] else None
    return homer_np.homer_prefill(
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


@pytest.mark.parametrize("name", list(CASES))
def test_oracle_agrees_with_fixture(name, stories_hf):
    """The independent NumPy oracle reproduces every committed trace: same nodes, decisions, cache and logits."""
    entry = ENTRIES[name]
    tol = TOL["oracle_float64" if entry["dtype"] == "float64" else "oracle_float32"]
    report = compare_traces(FIXTURES / entry["trace"], _oracle(entry, stories_hf), atol=tol.atol, rtol=tol.rtol)
    assert report.ok, f"the NumPy oracle disagrees with fixture {name}:\n{report}"
    assert "nodes with checkpoints" in report.summary  # the oracle records every node's state at its end too


@pytest.mark.parametrize("name", list(CASES))
def test_decisions_are_robust(name):
    """No pruning decision is a near-tie, so float rounding in another implementation cannot flip it; the `ties`
    case's ties are exact (a gap of 0.0, decided by the slot index), its other decisions as robust as the rest."""
    gaps = decision_gaps(FIXTURES / "cases" / name / "trace.safetensors")
    close = {node: gap for node, gap in gaps.items() if gap < make_fixtures.MIN_MARGIN}
    if name == "ties":
        assert close and set(close.values()) == {0.0}, close
    else:
        assert not close, f"{name}: decisions win by only {close}"


def test_ties_are_exact_and_the_earlier_slot_goes_first(stories_hf):
    """In the oracle's run of the `ties` case (independent of homer_ref), several context slots of a node score
    exactly the same at the cut, and the (score, index) rule removes the earlier ones and keeps the later ones."""
    result = _oracle(ENTRIES["ties"], stories_hf)
    straddling = 0
    for node in result["nodes"]:
        if node["scores"] is None:
            continue
        scores, removed, kept = node["scores"], node["removed"], node["kept"]
        cut = scores[removed].max()
        tied = np.flatnonzero(scores == cut)  # bitwise equal float32 scores
        if np.isin(tied, kept).any():  # the tie straddles the cut: the rule decides
            straddling += 1
            assert np.isin(tied, removed).any()
            assert tied[np.isin(tied, removed)].max() < tied[np.isin(tied, kept)].min(), node
    assert straddling == len(result["nodes"]) == 7  # every node of the 4-leaf tree prunes through a tie


def _plan(case):
    return make_fixtures.case_plan(case)


def test_cases_cover_the_rules():
    """Every rule the spec states has a case (the mutation test, tests/test_mutations.py, shows each one bites)."""
    plans = {name: _plan(case) for name, case in CASES.items()}

    def model(case) -> dict:
        return make_fixtures.MODELS.get(case.model, {})

    def short_right(p) -> bool:  # some child's target differs from R because its right sibling's leaf is short
        return any(node.target not in (p.R, p.root.target) for node in p.nodes.values())

    def rope(kind: str) -> bool:
        return any(model(c).get("rope_scaling", {}).get("rope_type") == kind for c in CASES.values())

    heads = {name: (model(c).get("num_attention_heads"), model(c).get("num_key_value_heads")) for name, c in
             CASES.items()}  # fmt: skip
    covered = {
        "one chunk": any(p.N == 1 for p in plans.values()),
        "2, 4, 8 and 16 leaves": {2, 4, 8, 16} <= {p.N for p in plans.values()},
        "short-right rule": any(short_right(p) for p in plans.values()),
        "leftover layers": any(p.lo > 0 and p.N > 1 for p in plans.values()),
        "W >= 2": any(p.W >= 2 and p.N > 1 for p in plans.values()),
        "target below M": any(p.T < p.M and p.N > 1 for p in plans.values()),
        "P = 0": any(p.P == 0 for p in plans.values()),
        "MHA, GQA, MQA": {"MHA", "GQA", "MQA"} <= {m["attention"] for m in MANIFEST["models"].values()},
        "head_dim >= 16": any(model(c).get("head_dim", 0) >= 16 for c in CASES.values()),
        "RoPE linear, dynamic, yarn, llama3": all(rope(k) for k in ("linear", "dynamic", "yarn", "llama3")),
        "float64": any(c.dtype == "float64" for c in CASES.values()),
        "uncalibrated, random": {"uncalibrated", "random"} <= {c.reduction for c in CASES.values()},
        "exact ties": any(c.bias_levels for c in CASES.values()),
        "stories260K": any(c.model == "stories260K" for c in CASES.values()),
    }
    assert all(covered.values()), f"not covered: {[k for k, v in covered.items() if not v]}"
    assert short_right(plans["short_right"]) and plans["short_right"].N0 == 3
    assert heads["mqa"][1] == 1 and heads["gqa_four_leaves"][1] < heads["gqa_four_leaves"][0]
    assert all(CASES[name].rule and ENTRIES[name]["rule"] == CASES[name].rule for name in CASES)
    # dynamic NTK acts only on calls whose largest position + 1 exceeds max_position_embeddings (10 here)
    dynamic = load_trace(FIXTURES / "cases" / "rope_dynamic" / "trace.safetensors")
    largest = [int(dynamic.node(lv, i, "input_positions").max()) + 1 for lv, i in dynamic.nodes]
    assert max(largest) > make_fixtures.MAX_POSITIONS["rope_dynamic"]


def test_manifest_describes_the_files():
    assert MANIFEST["format_version"] == load_trace(FIXTURES / MANIFEST["cases"][0]["trace"]).metadata["format_version"]
    for entry in MANIFEST["cases"]:
        trace = load_trace(FIXTURES / entry["trace"])
        data = json.loads((FIXTURES / entry["input"]).read_text())
        assert json.loads(trace.metadata["input"]) == data and data["dtype"] == entry["dtype"]
        assert trace.metadata["dtype"] == entry["dtype"]
        assert trace.tensors["positions"].size == entry["plan"]["final_len"]
        assert len(trace.nodes) == entry["plan"]["nodes"] == 2 * entry["plan"]["N"] - 1
        assert trace.metadata["model"] == entry["model"] and trace.metadata["bias"] == (entry["bias"] or "")
        assert entry["tolerance"] == CASES[entry["name"]].tolerance
        assert all(trace.has_checkpoints(level, index) for level, index in trace.nodes)
    for name, model in MANIFEST["models"].items():
        if model.get("shipped", True):
            assert (FIXTURES / model["path"] / "config.json").is_file(), name
        else:  # the package's copy is the file the manifest describes
            data = (ROOT / model["package_file"]).read_bytes()
            assert len(data) == model["bytes"] and not (FIXTURES / model["path"]).exists()
            assert __import__("hashlib").sha256(data).hexdigest() == model["sha256"]


def test_fixtures_are_small():
    """Small enough to vendor: under 2 MiB in all (measured 1.7 MiB: the 25 traces carry per-node checkpoints), no
    file over 300 KiB (the largest, the GQA model, is 110 KiB)."""
    sizes = {str(p.relative_to(FIXTURES)): p.stat().st_size for p in FIXTURES.rglob("*") if p.is_file()}
    assert sum(sizes.values()) < 2 * 2**20, f"fixtures total {sum(sizes.values())} bytes"
    assert max(sizes.values()) < 300 * 2**10, max(sizes, key=sizes.get)


def test_models_are_hf_checkpoints_transformers_reads():
    """A vendoring project may run the fixture models with HF transformers: the same logits as homer_ref's Llama,
    at positions 0-15 (past every RoPE scaling's trained length)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from homer_ref.loading import load_model

    tokens = json.loads((FIXTURES / "cases" / "mqa" / "input.json").read_text())["context_ids"][:16]
    for name in make_fixtures.MODELS:
        hf = transformers.LlamaForCausalLM.from_pretrained(FIXTURES / "models" / name, attn_implementation="eager")
        with torch.no_grad():
            expected = hf(input_ids=torch.tensor([tokens]), use_cache=False).logits[0].double().numpy()
            ours = load_model(FIXTURES / "models" / name, dtype=torch.float64)(torch.tensor([tokens]))[0].numpy()
        assert np.abs(ours - expected).max() < TOL["hf_float32"].atol, f"{name}: {np.abs(ours - expected).max():.2e}"
        assert math.isfinite(float(np.abs(expected).max()))
