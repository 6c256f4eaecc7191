"""homer_ref.testing.compare_traces and `python -m homer_ref.compare`: every kind of divergence is found, reported
at the right place in execution order with its slots named, and nothing else is; every message has a documented
form (docs/TRACE_FORMAT.md, "Every message").

Each test starts from a committed fixture trace (fixtures/cases/four_leaves: P = 2, C = 44, S = 2, 4 leaves running
layers 0-1 and pruning 15 -> 10 slots, level 1 running layers 2-3 and pruning 16 -> 10, the root running 4-5; 6
layers, 16 final slots; with checkpoints), changes one thing, and checks the report's first divergence word for
word where the format is fixed. Expected slot names are built from the trace's own sources, P and C: "context token
j" is the prompt's context token j = source - P.
"""

import json
import re
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
from homer_ref.testing import (
    Trace,
    assert_traces_match,
    compare_traces,
    decision_gaps,
    decision_margin,
    load_trace,
)
from homer_ref.testing.trace import parse_input

ROOT = Path(__file__).resolve().parent.parent
CASE = ROOT / "fixtures" / "cases" / "four_leaves"
TRACE = CASE / "trace.safetensors"
P, C = 2, 44


@pytest.fixture
def expected() -> Trace:
    return load_trace(TRACE)


def is_checkpoint(key: str) -> bool:
    return key.startswith("node.") and key.split(".")[3] in ("hidden", "keys", "values")


def changed(trace: Trace, checkpoints: bool = False, **tensors) -> Trace:
    """A copy of `trace` with some tensors replaced (None deletes one; `node__1__0__kept` is node.1.0.kept), without
    its node checkpoints unless `checkpoints` (an edited decision would not match them)."""
    out = {k: v.copy() for k, v in trace.tensors.items() if checkpoints or not is_checkpoint(k)}
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


def slot(trace: Trace, i: int, level=None, index=None, position=True) -> str:
    """The documented slot name, from the trace's sources: 'slot 11 (context token 9, position 11)'."""
    if level is None:
        sources, positions = trace.tensors["sources"], trace.tensors["positions"]
    else:
        sources, positions = trace.node(level, index, "input_sources"), trace.node(level, index, "input_positions")
    s = int(sources[i])
    part = f"prefix token {s}" if s < P else f"context token {s - P}" if s < P + C else f"suffix token {s - P - C}"
    return f"slot {i} ({part}, position {positions[i]})" if position else f"slot {i} ({part})"


# ----------------------------------------------------------------------------------------------- matching


def test_a_trace_matches_itself(expected):
    report = compare_traces(TRACE, TRACE)
    assert report.ok and report.first_divergence is None and report.divergences == []
    assert "traces match (7 nodes with checkpoints, 6 layers, 16 slots" in str(report)
    assert_traces_match(TRACE, expected)
    assert "traces match (7 nodes, 6 layers" in str(compare_traces(expected, changed(expected)))


def test_differences_within_tolerance_pass(expected):
    keys = expected.tensors["keys.3"] * (1 + 5e-5) + 5e-5  # |Δ| <= atol + rtol·|x| everywhere
    scores = expected.node(1, 0, "scores") + 5e-5
    assert compare_traces(expected, changed(expected, keys__3=keys, node__1__0__scores=scores)).ok
    assert not compare_traces(expected, changed(expected, keys__3=keys), atol=1e-6, rtol=0).ok


def test_scores_are_compared_at_float32_resolution_at_least(expected):
    """Scores are float32 in every trace: a float64 comparison (atol 1e-9) still lets them differ by float32
    rounding of the logits, and no more."""
    scores = expected.node(1, 0, "scores").copy()
    scores[3] += 2e-6
    assert compare_traces(expected, changed(expected, node__1__0__scores=scores), atol=1e-9, rtol=1e-9).ok
    scores[3] += 1e-4
    assert not compare_traces(expected, changed(expected, node__1__0__scores=scores), atol=1e-9, rtol=1e-9).ok


def test_homer_cache_and_float64_traces_are_accepted(expected):
    data = json.loads((CASE / "input.json").read_text())
    prefix, context, suffix, config = parse_input(data)
    model = load_model(ROOT / "fixtures" / "models" / "mha", dtype=torch.float64)
    bias = load_bias(CASE / "bias.safetensors")
    result = homer_prefill(model, prefix, context, suffix, config, bias=bias, all_logits=True, checkpoints=True)
    report = compare_traces(expected, result)
    assert report.ok, str(report)
    assert "with checkpoints" in report.summary


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
    scores = expected.node(0, 1, "scores")
    assert report.first_divergence == (
        f"node 0.1, layer 1: kept slots differ at 2 of {n} input slots; first: expected "
        f"{slot(expected, swap_out, 0, 1)}, got {slot(expected, swap_in, 0, 1)}; scores expected/actual: "
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
    assert [d.where for d in report.divergences] == ["node 0.3", "node 2.0"]
    assert report.first_divergence == (
        f"node 0.3: input positions differ at 1 of {leaf_pos.size} slots; first: "
        f"{slot(expected, 7, 0, 3, position=False)}, expected position {expected.node(0, 3, 'input_positions')[7]}, "
        "got 99"
    )


@pytest.mark.parametrize(
    "what, value, message",
    [
        ("layers", [0, 3], "node 1.0: ran layers 0-2, expected 2-3"),
        ("target", [9], "node 1.0: target expected 10, got 9"),
        ("input_positions", np.arange(15),
         "node 1.0: input has 15 slots, expected 16 (2 prefix + 12 context + 2 suffix)"),
        ("kept", np.arange(11), "node 1.0, layer 3: kept 11 of 16 slots, expected 10"),
        ("scores", None, "node 1.0, layer 3: the expected trace has scores (the node removes 6 slots) "
                         "but the actual has none"),
        ("removed", [0], None),
    ],
)  # fmt: skip
def test_node_field_differs(expected, what, value, message):
    report = compare_traces(expected, changed(expected, **{f"node__1__0__{what}": value}))
    if message is None:
        assert report.first_divergence.startswith("node 1.0, layer 3: removed slots [0], expected [")
    else:
        assert report.first_divergence == message


def test_input_counts_name_the_parts_when_both_traces_have_sources(expected):
    """An implementation that keeps both children's suffix copies: 2 slots too many, and the parts say where."""
    sources = expected.node(1, 0, "input_sources")
    more = np.r_[sources[:-2], [46, 47], sources[-2:]]
    actual = changed(expected, node__1__0__input_positions=np.arange(18), node__1__0__input_sources=more)
    assert compare_traces(expected, actual).first_divergence == (
        "node 1.0: input has 18 slots (2 prefix + 12 context + 4 suffix), expected 16 "
        "(2 prefix + 12 context + 2 suffix)"
    )


def test_input_sources_differ(expected):
    sources = expected.node(0, 2, "input_sources").copy()
    sources[4] = 47  # a suffix token where a context token belongs
    report = compare_traces(expected, changed(expected, node__0__2__input_sources=sources))
    assert report.first_divergence == (
        f"node 0.2: input sources differ at 1 of 15 slots; first: {slot(expected, 4, 0, 2)}, got suffix token 1"
    )


def test_slots_are_named_by_part_without_sources(expected):
    """An expected trace without sources (an older one, or the NumPy oracle's) still names the parts: the first P
    slots are the prefix, the last S the suffix."""
    bare = changed(expected, sources=None, **{f"node__{lv}__{i}__input_sources": None for lv, i in expected.nodes})
    scores = bare.node(0, 0, "scores").copy()
    scores[5] += 1
    report = compare_traces(bare, changed(bare, node__0__0__scores=scores))
    assert report.first_divergence == (
        f"node 0.0, layer 1: scores differ at 1 of 15 slots; largest at slot 5 (context, position 5): "
        f"expected {scores[5] - 1:.4f}, got {scores[5]:.4f}"
    )
    scores[14] = 0.0
    report = compare_traces(bare, changed(bare, node__0__0__scores=scores))
    assert "largest at slot 14 (suffix token 1, position 14): expected inf, got 0.0000" in report.first_divergence


def test_scores_differ(expected):
    scores = expected.node(0, 0, "scores").copy()
    scores[5] += 0.25
    scores[0] = 1.0  # an affix slot (+inf expected) with a finite score
    report = compare_traces(expected, changed(expected, node__0__0__scores=scores))
    assert report.first_divergence == (
        f"node 0.0, layer 1: scores differ at 2 of {scores.size} slots; largest at "
        "slot 0 (prefix token 0, position 0): expected inf, got 1.0000"
    )


def test_scores_on_a_node_that_removes_nothing(expected):
    """The root of four_leaves keeps all 16 slots: an implementation that writes its scores anyway is told so."""
    actual = changed(expected, node__2__0__scores=np.zeros(16))
    assert compare_traces(expected, actual).first_divergence == (
        "node 2.0, layer 5: the actual trace has scores, but the node removes nothing (16 input "
        "slots, target 16); write scores only for nodes that remove slots"
    )


def test_missing_and_extra_nodes(expected):
    order = expected.tensors["node_order"]
    leaf = {f"node__0__0__{f}": None for f in ("layers", "target", "input_positions", "input_sources", "kept",
                                                 "removed", "scores")}  # fmt: skip
    actual = changed(expected, node_order=np.concatenate([order[1:], [[5, 0]]]), **leaf)
    report = compare_traces(expected, actual)
    assert report.first_divergence == "node 0.0: missing from the actual trace"
    assert str(report.divergences[-1]) == "node 5.0: in the actual trace but not in the expected one"


def test_node_records_without_node_order_are_compared(expected):
    """Only node_order is missing: said as such, and the records are compared all the same."""
    scores = expected.node(1, 1, "scores").copy()
    scores[2] += 1
    report = compare_traces(expected, changed(expected, node_order=None, node__1__1__scores=scores))
    assert report.first_divergence == (
        "nodes: the actual trace has node records but no node_order tensor ([nodes, 2]: the (level, index) of "
        "every node in execution order); its records are compared all the same"
    )
    assert report.divergences[1].where == "node 1.1, layer 3" and len(report.divergences) == 2


def test_final_cache_only(expected):
    bare = {k: v for k, v in expected.tensors.items() if not k.startswith("node")}
    report = compare_traces(expected, bare)
    assert report.first_divergence == (
        "nodes: the actual trace has no node records (no node_order, no node.* tensors); write them, or compare "
        "the final cache only (--final-only, nodes=False)"
    )
    assert compare_traces(expected, bare, nodes=False).ok
    assert "final cache only" in compare_traces(expected, bare, nodes=False).summary


def test_node_order_itself_is_not_compared(expected):
    """A level-order (breadth-first) implementation is correct too: nodes are matched by (level, index)."""
    order = expected.tensors["node_order"]
    bfs = order[np.lexsort((order[:, 1], order[:, 0]))]
    assert not np.array_equal(bfs, order)
    assert compare_traces(expected, changed(expected, node_order=bfs)).ok


# ----------------------------------------------------------------------------------------------- checkpoints


def test_a_forward_difference_is_named_at_its_node_and_layer(expected):
    """Node (1, 0)'s keys of layer 2 differ (its first layer: the merge or layer 1's output): reported there, on
    its kept slots, before its decision — and the later nodes' own checkpoints still match."""
    keys = expected.node(1, 0, "keys.2").copy()  # [Hkv, kept, Dh]
    keys[1, 3, 2] += 0.5
    actual = changed(expected, checkpoints=True, node__1__0__keys__2=keys)
    report = compare_traces(expected, actual)
    input_slot = int(expected.node(1, 0, "kept")[3])
    where = f"head 1, {slot(expected, input_slot, 1, 0)}, dim 2"
    assert report.first_divergence == (
        f"node 1.0, layer 2: keys differ at 1 of {keys.size} elements; first at {where}; max |Δ| 0.5 at "
        f"{where}: expected {keys[1, 3, 2] - 0.5:.4f}, got {keys[1, 3, 2]:.4f}"
    )
    assert len(report.divergences) == 1


def test_checkpoints_are_compared_on_the_slots_both_keep(expected):
    """A different decision is reported as such, not as K/V differences: the node's checkpoints are compared on
    the slots both traces keep, through their input slot indices."""
    kept, removed = expected.node(0, 1, "kept"), expected.node(0, 1, "removed")
    swap_out, swap_in = int(kept[-3]), int(removed[0])
    new_kept = np.sort(np.append(np.setdiff1d(kept, [swap_out]), swap_in))
    new_removed = np.sort(np.append(np.setdiff1d(removed, [swap_in]), swap_out))

    def moved(name: str) -> np.ndarray:  # the checkpoint over the actual's kept slots; the new one holds zeros
        x = expected.node(0, 1, name)
        axis = 0 if name == "hidden" else 1
        columns = [np.take(x, [list(kept).index(s)], axis) if s in kept else np.zeros_like(np.take(x, [0], axis))
                   for s in new_kept]  # fmt: skip
        return np.concatenate(columns, axis=axis)

    names = ("hidden", "keys.0", "keys.1", "values.0", "values.1")
    edits = {f"node__0__1__{name.replace('.', '__')}": moved(name) for name in names}
    actual = changed(expected, checkpoints=True, node__0__1__kept=new_kept, node__0__1__removed=new_removed, **edits)
    report = compare_traces(expected, actual)
    assert report.first_divergence.startswith("node 0.1, layer 1: kept slots differ at 2 of 15"), report


def test_a_missing_refinement_is_named_at_the_node(expected):
    """Leaf 0 prunes at layer 1 but keeps all 15 slots in its layer-0 cache: named at leaf 0, layer 0."""
    full = np.zeros((4, 15, 4))
    actual = changed(expected, checkpoints=True, node__0__0__keys__0=full)
    assert compare_traces(expected, actual).first_divergence == (
        "node 0.0, layer 0: keys hold 15 slots at the node's end, but the node keeps 10: a pruning "
        "decision applies to every layer the node holds (propagative refinement, HOMER_SPEC.md F)"
    )


def test_output_hidden_states_differ(expected):
    hidden = expected.node(0, 2, "hidden").copy()  # [kept, D]
    hidden[4, 7] -= 0.125
    report = compare_traces(expected, changed(expected, checkpoints=True, node__0__2__hidden=hidden))
    where = f"{slot(expected, int(expected.node(0, 2, 'kept')[4]), 0, 2)}, dim 7"
    assert report.first_divergence == (
        f"node 0.2, layer 1: output hidden states differ at 1 of {hidden.size} elements; first at "
        f"{where}; max |Δ| 0.125 at {where}: expected {hidden[4, 7] + 0.125:.4f}, got {hidden[4, 7]:.4f}"
    )


def test_checkpoints_are_optional(expected):
    """Compared when both traces have them: an actual trace without checkpoints, or with some missing, says so."""
    assert compare_traces(expected, changed(expected)).ok
    partial = changed(expected, checkpoints=True, node__1__1__values__3=None)
    assert compare_traces(expected, partial).first_divergence == (
        "node 1.1, layer 3: the actual trace lacks node.1.1.values.3 (it has other checkpoints)"
    )


# ----------------------------------------------------------------------------------------------- final cache


def test_keys_differ_at_one_layer(expected):
    """A context slot's layer 3 was computed by one node of level 1: the report names it."""
    keys = expected.tensors["keys.3"].copy()  # [Hkv, K, Dh]
    keys[1, 5, 2] += 0.5
    keys[2, 9, 0] -= 0.001
    report = compare_traces(expected, changed(expected, keys__3=keys))
    where = f"head 1, {slot(expected, 5)}, dim 2"
    node = "node 1.0" if expected.tensors["sources"][5] < P + C / 2 else "node 1.1"
    assert report.first_divergence == (
        f"final cache, layer 3: keys differ at 2 of {keys.size} elements; first at {where}; max |Δ| 0.5 at {where}: "
        f"expected {expected.tensors['keys.3'][1, 5, 2]:.4f}, got {keys[1, 5, 2]:.4f}; layer 3 of slot 5 was "
        f"computed by {node}"
    )
    assert len(report.divergences) == 1


def test_an_affix_slot_is_computed_by_every_node_of_the_level(expected):
    values = expected.tensors["values.0"].copy()
    values[0, 15, 1] += 1
    report = compare_traces(expected, changed(expected, values__0=values))
    assert report.first_divergence.endswith(
        "; layer 0 of slot 15 was computed by every level-0 node (averaged at the merges)"
    )
    assert "first at head 0, slot 15 (suffix token 1, position 14), dim 1" in report.first_divergence


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
        f"final cache: positions differ at 1 of 16 slots; first: {slot(expected, 3, position=False)}, expected "
        f"{positions[3] - 2}, got {positions[3]}"
    )
    assert str(report.divergences[1]) == "final cache: last_position_id expected 14, got 0"
    assert "values differ at 1 of" in report.divergences[2].what and "got nan" in report.divergences[2].what
    assert report.divergences[3].what.startswith(
        "logits differ at 1 of 1024 elements; first at slot 15 (suffix token 1, position 14), token 7"
    )
    assert report.divergences[3].what.endswith("; from the output of the root, node 2.0")


def test_final_sources_differ(expected):
    sources = expected.tensors["sources"].copy()
    sources[4] = 3  # context token 1 where context token 10 belongs
    assert compare_traces(expected, changed(expected, sources=sources)).first_divergence == (
        f"final cache: sources differ at 1 of 16 slots; first: {slot(expected, 4)}, got context token 1"
    )


def test_cache_length_and_layers_differ(expected):
    short = {k: (v[:, :-1] if k.startswith(("keys", "values")) else v) for k, v in expected.tensors.items()}
    short["positions"], short["logits"] = expected.tensors["positions"][:-1], expected.tensors["logits"][:-1]
    short["sources"] = expected.tensors["sources"][:-1]
    assert compare_traces(expected, short, nodes=False).first_divergence == "final cache: holds 15 slots, expected 16"
    fewer = changed(expected, keys__5=None, values__5=None)
    assert compare_traces(expected, fewer).first_divergence == "final cache: has 5 layers, expected 6"


def test_a_layer_that_keeps_more_slots_names_the_first_node_to_prune_it(expected):
    """No propagative refinement, seen in the final cache only: layer 0 holds more slots than the root keeps,
    and the report names the first node that removes slots from layer 0 (leaf 0, pruning at layer 1)."""
    wide = np.zeros((4, 30, 4))
    report = compare_traces(expected, changed(expected, keys__0=wide))
    assert report.first_divergence == (
        "final cache, layer 0: keys hold 30 slots, expected 16, the slots the root keeps in every layer; node "
        "0.0 is the first to remove slots from this layer by propagative refinement (it prunes at layer 1)"
    )


# ----------------------------------------------------------------------------------------------- metadata


def with_metadata(trace: Trace, **changes) -> Trace:
    return Trace(trace.tensors, {**trace.metadata, **changes}, "other")


def test_metadata_input_differs(expected):
    data = json.loads(expected.metadata["input"])
    data["target_len"] = 12
    report = compare_traces(expected, with_metadata(expected, input=json.dumps(data)))
    message = "metadata 'input': the traces come from different inputs: target_len expected 16, got 12"
    assert report.first_divergence == message


def test_input_defaults_stand_for_absent_keys(expected):
    """An input without the optional keys (reduction calibrated, seed 0, dtype float32) is the same input."""
    data = json.loads(expected.metadata["input"])
    assert (data["reduction"], data["seed"], data["dtype"]) == ("calibrated", 0, "float32")
    minimal = {k: v for k, v in data.items() if k not in ("reduction", "seed", "dtype")}
    assert compare_traces(expected, with_metadata(expected, input=json.dumps(minimal))).ok
    minimal["seed"] = 3
    report = compare_traces(expected, with_metadata(expected, input=json.dumps(minimal)))
    assert report.first_divergence == "metadata 'input': the traces come from different inputs: seed expected 0, got 3"


def test_plan_is_compared_on_its_documented_keys(expected):
    """The manifest's plan (with final_len and nodes) is a valid plan; a documented key that differs or is absent
    is a divergence."""
    manifest = json.loads((ROOT / "fixtures" / "manifest.json").read_text())
    plan = next(c["plan"] for c in manifest["cases"] if c["name"] == "four_leaves")
    assert {"final_len", "nodes"} <= plan.keys()
    assert compare_traces(expected, with_metadata(expected, plan=json.dumps(plan))).ok
    report = compare_traces(expected, with_metadata(expected, plan=json.dumps({**plan, "lo": 1})))
    assert report.first_divergence == "metadata 'plan': the traces come from different plans: lo expected 0, got 1"
    lacking = {k: v for k, v in plan.items() if k != "R"}
    report = compare_traces(expected, with_metadata(expected, plan=json.dumps(lacking)))
    assert report.first_divergence == "metadata 'plan': the traces come from different plans: R expected 10, got absent"


def test_metadata_that_is_not_json(expected):
    report = compare_traces(expected, with_metadata(expected, input="{prefix_ids: ..."))
    assert report.first_divergence == "metadata 'input': the actual trace's value is not a JSON object"


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


@pytest.mark.parametrize("kind", ["missing", "garbage", "not_a_trace", "version", "floats_for_ints"])
def test_reader_errors(tmp_path, expected, kind):
    path = tmp_path / "x.safetensors"
    if kind == "garbage":
        path.write_bytes(b"not a safetensors file")
    elif kind == "not_a_trace":
        save_file({"bias": np.zeros((2, 3), np.float32)}, str(path))
    elif kind == "version":
        save(Trace(expected.tensors, {**expected.metadata, "format_version": "9"}), path)
    elif kind == "floats_for_ints":
        save(changed(expected, positions=expected.tensors["positions"].astype(np.float64)), path)
    match = {
        "missing": "no such file",
        "garbage": "not a readable safetensors file",
        "not_a_trace": "not a valid HOMER trace \\(docs/TRACE_FORMAT.md\\): no positions, last_position_id, logits, "
        "keys.0, values.0 tensor \\(found bias\\)",
        "version": "format_version '9'; this homer_ref reads 1",
        "floats_for_ints": "'positions' holds float64 values, expected integers",
    }[kind]
    with pytest.raises(ValueError, match=match):
        load_trace(path)


def test_decision_margin(expected):
    margin = decision_margin(expected)
    assert 0 < margin < 1
    gaps = decision_gaps(expected)
    assert set(gaps) == {(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1)} and margin == min(gaps.values())
    scores = expected.node(0, 0, "scores")
    removed, kept = expected.node(0, 0, "removed"), expected.node(0, 0, "kept")
    finite = scores[kept][np.isfinite(scores[kept])]
    assert gaps[(0, 0)] == finite.min() - scores[removed].max()


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

    for argv in ([str(TRACE), str(TRACE), "--atol", "-1"], [str(TRACE)], ["--validate", str(TRACE), str(TRACE)]):
        with pytest.raises(SystemExit) as exit_:
            run_main(compare.main, argv)
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


# ----------------------------------------------------------------------------------------------- the contract


def documented_forms() -> list[re.Pattern]:
    """The message forms of docs/TRACE_FORMAT.md ("Every message"), as patterns: {placeholder} is any text,
    possibly empty (`{parts}`, `{note}`, `{pruner}`, `{computed by}` and `{root}` are empty in some reports)."""
    doc = (ROOT / "docs" / "TRACE_FORMAT.md").read_text()
    block = doc.split("### Every message", 1)[1].split("```", 2)[1]
    forms = [line for line in block.splitlines()[1:] if line.strip()]
    return [re.compile(re.sub(r"\\\{[^}]*\\\}", ".*?", re.escape(form)) + "$") for form in forms]


def every_message(expected: Trace) -> list[str]:
    """One report line of every kind: each edit below makes one form (see the tests above for the exact lines)."""
    e = expected
    kept, removed = e.node(0, 1, "kept"), e.node(0, 1, "removed")
    swapped = np.sort(np.append(np.setdiff1d(kept, [kept[-3]]), removed[0]))
    order = e.tensors["node_order"]
    plan = json.loads(e.metadata["plan"])
    data = json.loads(e.metadata["input"])
    leaf = {f"node__0__0__{f}": None for f in ("layers", "target", "input_positions", "input_sources", "kept",
                                                 "removed", "scores")}  # fmt: skip
    more = np.r_[e.node(1, 0, "input_sources")[:-2], [46, 47], e.node(1, 0, "input_sources")[-2:]]
    bare = {k: v for k, v in e.tensors.items() if not k.startswith("node")}
    nan_keys = e.tensors["keys.1"].copy()
    nan_keys[0, 3, 0] = np.nan
    edits = [
        with_metadata(e, input=json.dumps({**data, "seed": 1})),
        with_metadata(e, plan=json.dumps({**plan, "H": 3})),
        with_metadata(e, plan="[1, 2]"),
        bare,
        changed(e, node_order=None),
        changed(e, node_order=np.concatenate([order[1:], [[5, 0]]]), **leaf),
        changed(e, node_order=None, node__1__0__kept=None),
        changed(e, node__1__0__layers=[0, 3]),
        changed(e, node__1__0__target=[9]),
        changed(e, node__1__0__input_positions=np.arange(15)),
        changed(e, node__1__0__input_positions=np.arange(18), node__1__0__input_sources=more),
        changed(e, node__0__3__input_positions=np.arange(15) + 1),
        changed(e, node__0__2__input_sources=np.arange(15)),
        changed(e, checkpoints=True, node__1__0__keys__2=e.node(1, 0, "keys.2") + 1),
        changed(e, checkpoints=True, node__0__0__keys__0=np.zeros((4, 15, 4))),
        changed(e, checkpoints=True, node__0__0__keys__0=np.zeros((2, 10, 4))),
        changed(e, checkpoints=True, node__1__1__values__3=None),
        changed(e, checkpoints=True, node__0__2__hidden=e.node(0, 2, "hidden") + 1),
        changed(e, node__1__0__kept=np.arange(11)),
        changed(e, node__0__1__kept=swapped, node__0__1__removed=np.setdiff1d(np.arange(15), swapped)),
        changed(e, node__1__0__removed=[0]),
        changed(e, node__1__0__kept=e.node(1, 0, "kept")[::-1]),
        changed(e, node__2__0__scores=np.zeros(16)),
        changed(e, node__1__0__scores=None),
        changed(e, node__1__0__scores=e.node(1, 0, "scores") + 1),
        {
            **{
                k: (
                    v[:, :-1]
                    if k.startswith(("keys", "values"))
                    else v[:-1]
                    if k in ("positions", "sources", "logits")
                    else v
                )
                for k, v in bare.items()
            }
        },  # fmt: skip
        changed(e, positions=e.tensors["positions"] + 1, last_position_id=[0], sources=e.tensors["sources"] * 0),
        changed(e, keys__5=None, values__5=None),
        changed(e, keys__0=np.zeros((4, 30, 4))),
        changed(e, keys__0=np.zeros((2, 16, 8))),
        changed(e, keys__1=nan_keys, values__2=e.tensors["values.2"] + 1),
        changed(e, keys__4=e.tensors["keys.4"] + 1, logits=e.tensors["logits"] + 1),
        changed(e, logits=e.tensors["logits"][:, :-1]),
    ]
    lines = []
    for actual in edits:
        try:
            lines += [str(d) for d in compare_traces(e, actual).divergences]
        except ValueError:  # the reader refuses a few malformed edits on purpose: not a report line
            pass
    return lines


def test_every_message_form_is_documented(expected):
    """Every line the comparison writes has a form in docs/TRACE_FORMAT.md, and every documented form occurs."""
    forms = documented_forms()
    lines = every_message(expected)
    undocumented = [line for line in lines if not any(f.match(line) for f in forms)]
    assert not undocumented, "report lines without a documented form:\n" + "\n".join(undocumented)
    unused = [f.pattern for f in forms if not any(f.match(line) for line in lines)]
    assert not unused, "documented forms the comparison never wrote:\n" + "\n".join(unused)
