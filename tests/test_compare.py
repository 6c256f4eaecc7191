"""homer_ref.testing.compare_traces and `python -m homer_ref.compare`: every kind of divergence is found, reported
at the right place in execution order, and nothing else is.

Each test starts from a committed fixture trace (fixtures/cases/four_leaves: 4 leaves, 7 nodes, 6 layers, 16
slots), changes one thing, and checks the report's first divergence word for word where the format is fixed.
"""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.numpy import save_file

from homer_ref.cli import compare
from homer_ref.cli.common import run_main
from homer_ref.homer import homer_prefill
from homer_ref.homer.calibration import load_bias
from homer_ref.loading import load_model
from homer_ref.testing import Trace, assert_traces_match, compare_traces, decision_margin, load_trace
from homer_ref.testing.trace import parse_input

ROOT = Path(__file__).resolve().parent.parent
CASE = ROOT / "fixtures" / "cases" / "four_leaves"
TRACE = CASE / "trace.safetensors"


@pytest.fixture
def expected() -> Trace:
    return load_trace(TRACE)


def changed(trace: Trace, **tensors) -> Trace:
    """A copy of `trace` with some tensors replaced (None deletes one)."""
    out = {k: v.copy() for k, v in trace.tensors.items()}
    for key, value in tensors.items():
        key = key.replace("__", ".")
        if value is None:
            del out[key]
        else:
            out[key] = np.asarray(value)
    return Trace(out, dict(trace.metadata), "actual")


def save(trace: Trace, path: Path, dtype=np.float32) -> Path:
    tensors = {k: (v.astype(dtype) if v.dtype == np.float64 else v) for k, v in trace.tensors.items()}
    save_file(tensors, str(path), metadata=trace.metadata)
    return path


# ----------------------------------------------------------------------------------------------- matching


def test_a_trace_matches_itself(expected):
    report = compare_traces(TRACE, TRACE)
    assert report.ok and report.first_divergence is None and report.divergences == []
    assert "traces match (7 nodes, 6 layers, 16 slots" in str(report)
    assert_traces_match(TRACE, expected)


def test_differences_within_tolerance_pass(expected):
    keys = expected.tensors["keys.3"] * (1 + 5e-5) + 5e-5  # |Δ| <= atol + rtol·|x| everywhere
    scores = expected.node(1, 0, "scores") + 5e-5
    assert compare_traces(expected, changed(expected, keys__3=keys, node__1__0__scores=scores)).ok
    assert not compare_traces(expected, changed(expected, keys__3=keys), atol=1e-6, rtol=0).ok


def test_homer_cache_and_float64_traces_are_accepted(expected):
    data = json.loads((CASE / "input.json").read_text())
    prefix, context, suffix, config = parse_input(data)
    model = load_model(ROOT / "fixtures" / "models" / "mha", dtype=torch.float64)
    bias = load_bias(CASE / "bias.safetensors")
    result = homer_prefill(model, prefix, context, suffix, config, bias=bias, all_logits=True)
    report = compare_traces(expected, result)
    assert report.ok, str(report)


# ----------------------------------------------------------------------------------------------- nodes


def test_kept_slots_differ(expected):
    n = expected.node(0, 1, "input_positions").size
    kept = expected.node(0, 1, "kept")
    removed = expected.node(0, 1, "removed")
    # keep the first removed slot instead of the last kept context slot (slot n-3: the suffix is the last 2)
    swap_out, swap_in = int(kept[-3]), int(removed[0])
    new_kept = np.sort(np.append(np.setdiff1d(kept, [swap_out]), swap_in))
    new_removed = np.sort(np.append(np.setdiff1d(removed, [swap_in]), swap_out))
    actual = changed(expected, node__0__1__kept=new_kept, node__0__1__removed=new_removed)
    report = compare_traces(expected, actual)
    pos = expected.node(0, 1, "input_positions")
    scores = expected.node(0, 1, "scores")
    assert report.first_divergence == (
        f"node (level 0, index 1), layer 1: kept slots differ at 2 of {n} input slots; first: expected slot "
        f"{swap_out} (position {pos[swap_out]}), got slot {swap_in} (position {pos[swap_in]}); scores expected/actual: "
        f"slot {swap_out} {scores[swap_out]:.4f}/{scores[swap_out]:.4f}, slot {swap_in} {scores[swap_in]:.4f}/"
        f"{scores[swap_in]:.4f}"
    )
    assert len(report.divergences) == 1  # only the node's records were edited: nothing downstream differs


def test_first_divergence_follows_execution_order(expected):
    """Damage the root and leaf 3: leaf 3 (executed 5th) comes first, the root (executed last) second."""
    root_pos = expected.node(2, 0, "input_positions").copy()
    root_pos[4] += 1
    leaf_pos = expected.node(0, 3, "input_positions").copy()
    leaf_pos[7] = 99
    actual = changed(expected, node__2__0__input_positions=root_pos, node__0__3__input_positions=leaf_pos)
    report = compare_traces(expected, actual)
    assert [d.where for d in report.divergences] == ["node (level 0, index 3)", "node (level 2, index 0)"]
    assert report.first_divergence == (
        f"node (level 0, index 3): input positions differ at 1 of {leaf_pos.size} slots; first: slot 7, "
        f"expected position {expected.node(0, 3, 'input_positions')[7]}, got 99"
    )  # fmt: skip


@pytest.mark.parametrize(
    "what, value, message",
    [
        ("layers", [0, 3], "node (level 1, index 0): ran layers 0-2, expected 2-3"),
        ("target", [9], "node (level 1, index 0): target expected 10, got 9"),
        ("input_positions", np.arange(15), "node (level 1, index 0): input has 15 slots, expected 16"),
        ("kept", np.arange(11), "node (level 1, index 0), layer 3: kept 11 of 16 slots, expected 10"),
        ("scores", None, "node (level 1, index 0), layer 3: the expected trace has scores (the node pruned) but the "
                         "actual has none"),
        ("removed", [0], None),
    ],
)  # fmt: skip
def test_node_field_differs(expected, what, value, message):
    report = compare_traces(expected, changed(expected, **{f"node__1__0__{what}": value}))
    if message is None:
        assert report.first_divergence.startswith("node (level 1, index 0), layer 3: removed slots [0], expected [")
    else:
        assert report.first_divergence == message


def test_scores_differ(expected):
    scores = expected.node(0, 0, "scores").copy()
    scores[5] += 0.25
    scores[0] = 1.0  # an affix slot (+inf expected) with a finite score
    report = compare_traces(expected, changed(expected, node__0__0__scores=scores))
    pos = expected.node(0, 0, "input_positions")
    assert report.first_divergence == (
        f"node (level 0, index 0), layer 1: scores differ at 2 of {scores.size} slots; largest at slot 0 "
        f"(position {pos[0]}): expected inf, got 1.0000"
    )


def test_missing_and_extra_nodes(expected):
    order = expected.tensors["node_order"]
    actual = changed(expected, node_order=np.concatenate([order[1:], [[5, 0]]]))
    report = compare_traces(expected, actual)
    assert report.first_divergence == "node (level 0, index 0): missing from the actual trace"
    assert str(report.divergences[-1]) == "node (level 5, index 0): in the actual trace but not in the expected one"


def test_final_cache_only(expected):
    bare = {k: v for k, v in expected.tensors.items() if not k.startswith("node")}
    report = compare_traces(expected, bare)
    assert report.first_divergence.startswith("nodes: the actual trace has no node records")
    assert compare_traces(expected, bare, nodes=False).ok
    assert "final cache only" in compare_traces(expected, bare, nodes=False).summary


def test_node_order_itself_is_not_compared(expected):
    """A level-order (breadth-first) implementation is correct too: nodes are matched by (level, index)."""
    order = expected.tensors["node_order"]
    bfs = order[np.lexsort((order[:, 1], order[:, 0]))]
    assert not np.array_equal(bfs, order)
    assert compare_traces(expected, changed(expected, node_order=bfs)).ok


# ----------------------------------------------------------------------------------------------- final cache


def test_keys_differ_at_one_layer(expected):
    keys = expected.tensors["keys.3"].copy()  # [Hkv, K, Dh]
    keys[1, 5, 2] += 0.5
    keys[2, 9, 0] -= 0.001
    report = compare_traces(expected, changed(expected, keys__3=keys))
    pos = expected.tensors["positions"]
    assert report.first_divergence == (
        f"final cache, layer 3: keys differ at 2 of {keys.size} elements; first at head 1, slot 5 (position "
        f"{pos[5]}), dim 2; max |Δ| 0.5 at head 1, slot 5 (position {pos[5]}), dim 2: expected "
        f"{expected.tensors['keys.3'][1, 5, 2]:.4f}, got {keys[1, 5, 2]:.4f}"
    )
    assert len(report.divergences) == 1


def test_values_logits_positions_and_last_position(expected):
    values = expected.tensors["values.0"].copy()
    values[0, 0, 0] = np.nan
    logits = expected.tensors["logits"].copy()
    logits[-1, 7] += 1
    positions = expected.tensors["positions"].copy()
    positions[3] += 2
    actual = changed(expected, values__0=values, logits=logits, positions=positions, last_position_id=[0])
    report = compare_traces(expected, actual)
    assert [d.where for d in report.divergences] == ["final cache"] * 2 + ["final cache, layer 0", "logits"]
    assert str(report.divergences[0]) == (
        f"final cache: positions differ at 1 of 16 slots; first: slot 3, expected {positions[3] - 2}, "
        f"got {positions[3]}"
    )
    assert str(report.divergences[1]) == "final cache: last_position_id expected 14, got 0"
    assert "values differ at 1 of" in report.divergences[2].what and "got nan" in report.divergences[2].what
    assert report.divergences[3].what.startswith("logits differ at 1 of 1024 elements; first at slot 15 (position 14)")


def test_cache_length_and_layers_differ(expected):
    short = {k: (v[:, :-1] if k.startswith(("keys", "values")) else v) for k, v in expected.tensors.items()}
    short["positions"], short["logits"] = expected.tensors["positions"][:-1], expected.tensors["logits"][:-1]
    assert compare_traces(expected, short, nodes=False).first_divergence == "final cache: holds 15 slots, expected 16"
    fewer = changed(expected, keys__5=None, values__5=None)
    assert compare_traces(expected, fewer).first_divergence == "final cache: has 5 layers, expected 6"


def test_metadata_input_differs(expected, tmp_path):
    data = json.loads(expected.metadata["input"])
    data["target_len"] = 12
    other = Trace(expected.tensors, {**expected.metadata, "input": json.dumps(data)}, "other")
    report = compare_traces(expected, other)
    message = "metadata 'input': the traces come from different inputs: target_len expected 16, got 12"
    assert report.first_divergence == message


# ----------------------------------------------------------------------------------------------- reading


def test_reader_accepts_lower_precision_and_int32(expected, tmp_path):
    from safetensors.torch import save_file as save_torch

    tensors = {
        k: torch.from_numpy(v).to(torch.bfloat16 if v.dtype == np.float64 else torch.int32)
        for k, v in expected.tensors.items()
    }
    save_torch(tensors, str(tmp_path / "bf16.safetensors"))
    trace = load_trace(tmp_path / "bf16.safetensors")
    assert trace.tensors["keys.0"].dtype == np.float64 and trace.tensors["positions"].dtype == np.int64
    report = compare_traces(expected, trace, atol=0.05, rtol=0.01, nodes=False)
    assert report.ok, str(report)


@pytest.mark.parametrize("kind", ["missing", "garbage", "not_a_trace", "version"])
def test_reader_errors(tmp_path, expected, kind):
    path = tmp_path / "x.safetensors"
    if kind == "garbage":
        path.write_bytes(b"not a safetensors file")
    elif kind == "not_a_trace":
        save_file({"bias": np.zeros((2, 3), np.float32)}, str(path))
    elif kind == "version":
        save(Trace(expected.tensors, {**expected.metadata, "format_version": "9"}), path)
    match = {
        "missing": "no such file",
        "garbage": "not a readable safetensors file",
        "not_a_trace": "not a HOMER trace: no positions, last_position_id, logits, keys.0, values.0 tensor",
        "version": "format_version '9'; this homer_ref reads 1",
    }[kind]
    with pytest.raises(ValueError, match=match):
        load_trace(path)


def test_decision_margin(expected):
    margin = decision_margin(expected)
    assert 0 < margin < 1
    scores = expected.node(0, 0, "scores")
    removed, kept = expected.node(0, 0, "removed"), expected.node(0, 0, "kept")
    finite = scores[kept][np.isfinite(scores[kept])]
    assert margin <= finite.min() - scores[removed].max()


def test_assert_traces_match_raises_with_the_report(expected):
    actual = changed(expected, last_position_id=[3])
    with pytest.raises(AssertionError) as err:
        assert_traces_match(TRACE, actual)
    first_line, rest = str(err.value).split("\n", 1)
    assert first_line == "final cache: last_position_id expected 14, got 3"
    assert "traces DIVERGE: 1 divergence(s)" in rest and f"expected: {TRACE}" in rest


# ----------------------------------------------------------------------------------------------- command line


def test_cli_exit_codes(expected, tmp_path, capsys):
    assert run_main(compare.main, [str(TRACE), str(TRACE)]) == 0
    assert "traces match" in capsys.readouterr().out

    bad = save(changed(expected, last_position_id=np.array([3])), tmp_path / "bad.safetensors")
    assert run_main(compare.main, [str(TRACE), str(bad), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and report["first_divergence"] == "final cache: last_position_id expected 14, got 3"

    assert run_main(compare.main, [str(TRACE), str(tmp_path / "absent.safetensors")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and "absent.safetensors: no such file" in err

    with pytest.raises(SystemExit) as exit_:
        run_main(compare.main, [str(TRACE), str(TRACE), "--atol", "-1"])
    assert exit_.value.code == 2


def test_cli_as_a_module(tmp_path, expected):
    """What a non-Python implementation runs."""
    keys = expected.tensors["keys.2"].copy()
    keys[0, 0, 0] += 1
    bad = save(changed(expected, keys__2=keys), tmp_path / "mine.safetensors")
    run = subprocess.run(
        [sys.executable, "-m", "homer_ref.compare", str(TRACE), str(bad), "--max-lines", "1"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert run.returncode == 1, run.stderr
    assert "first divergence: final cache, layer 2: keys differ at 1 of" in run.stdout
