"""`python -m homer_ref.compare --validate FILE` and homer_ref.testing.validate_trace: one trace checked against
docs/TRACE_FORMAT.md with no expected trace — names, dtypes, shapes, and what follows from them.

Every committed fixture is valid; each edit below breaks one rule and must be named (all problems are listed, not
only the first); a file that cannot be read at all is exit code 2.
"""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from homer_ref.cli import compare
from homer_ref.cli.common import run_main
from homer_ref.testing import load_trace, validate_trace

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"
TRACE = FIXTURES / "cases" / "four_leaves" / "trace.safetensors"  # 7 nodes, leaves prune 15 -> 10 at layer 1


def write(path: Path, tensors: dict, metadata: dict, **edits) -> Path:
    """The trace's tensors (float32 floats, int64 integers) with edits (None deletes; __ stands for .)."""
    out = {k: (v.astype(np.float32) if v.dtype == np.float64 else v) for k, v in tensors.items()}
    for key, value in edits.items():
        key = key.replace("__", ".")
        if value is None:
            out.pop(key)
        else:
            out[key] = value
    save_file(out, str(path), metadata=metadata)
    return path


@pytest.mark.parametrize("name", sorted(p.parent.name for p in FIXTURES.glob("cases/*/trace.safetensors")))
def test_every_fixture_is_valid(name):
    problems, holds = validate_trace(FIXTURES / "cases" / name / "trace.safetensors")
    assert problems == [] and "checkpoints on" in holds


T = load_trace(TRACE)
META = dict(T.metadata)
BAD = {
    "unknown name": (dict(node__0__0__score=np.zeros(15, np.float32)), "unknown tensor 'node.0.0.score'"),
    "wrong dtype": (dict(positions=T.tensors["positions"].astype(np.float32)), "'positions' has dtype F32"),
    "wrong rank": (dict(last_position_id=np.zeros((1, 1), np.int64)), "'last_position_id' has shape [1, 1], "
                   "expected [1]"),
    "missing layer": (dict(values__3=None), "no 'values.3' tensor"),
    "layer shape": (dict(keys__2=np.zeros((4, 15, 4), np.float32)), "'keys.2' has shape [4, 15, 4], expected [Hkv, "
                    "K, Dh] = [4, 16, 4]"),
    "last position": (dict(last_position_id=np.array([3])), "'last_position_id' is 3, but the last slot's position "
                      "is 14"),
    "node field": (dict(node__1__0__target=None), "no 'node.1.0.target' tensor (every node in node_order needs"),
    "not a split": (dict(node__0__0__removed=np.array([2, 3, 4, 8, 9])), "'node.0.0.kept' and 'node.0.0.removed' "
                    "must split the input slots 0 .. 14 between them"),
    "removed count": (dict(node__0__0__kept=np.arange(11), node__0__0__removed=np.arange(11, 15)),
                      "'node.0.0.removed' holds 4 slots; a node of 15 input slots and target 10 removes max(0, n - "
                      "target) = 5"),
    "scores missing": (dict(node__0__0__scores=None), "no 'node.0.0.scores': a node that removes slots records"),
    "scores on a non-pruning node": (dict(node__2__0__scores=np.zeros(16, np.float32)), "'node.2.0.scores' on a "
                                     "node that removes nothing"),
    "finite affix": (dict(node__0__1__scores=np.zeros(15, np.float32)), "'node.0.1.scores' is finite on a prefix "
                     "or suffix slot"),
    "node not in order": (dict(node_order=T.tensors["node_order"][1:]), "node.0.0.* tensors, but (level 0, index "
                          "0) is not in 'node_order'"),
    "partial checkpoint": (dict(node__1__1__values__2=None), "no 'node.1.1.values.2': a node with checkpoints has"),
    "checkpoint shape": (dict(node__0__2__hidden=np.zeros((15, 16), np.float32)), "'node.0.2.hidden' has shape "
                         "[15, 16], expected [kept, D]: the node's 10 kept slots"),
    "root size": (dict(node__2__0__kept=np.arange(15), node__2__0__removed=np.array([15])),
                  "the root node.2.0 keeps 15 slots but the final cache holds 16"),
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(BAD))
def test_each_broken_rule_is_named(name, tmp_path):
    edits, message = BAD[name]
    problems, _ = validate_trace(write(tmp_path / "t.safetensors", T.tensors, META, **edits))
    assert any(p.message.startswith(message) for p in problems), [p.message for p in problems]


def test_metadata_problems(tmp_path):
    plan = {k: v for k, v in json.loads(META["plan"]).items() if k != "lo"}
    metadata = {**META, "input": json.dumps({"prefix_ids": [1]}), "plan": json.dumps(plan)}
    del metadata["format_version"]
    messages = [p.message for p in validate_trace(write(tmp_path / "t.safetensors", T.tensors, metadata))[0]]
    assert messages == [
        "no 'format_version' in the metadata: write \"1\"",
        "metadata 'input' is not a valid input: the input JSON lacks context_ids, max_chunk_len, suffix_ids, "
        "target_len, warmup_layers",
        "metadata 'plan' lacks the integer(s) lo (keys: L W M T P C S E N H e lpc lo R)",
    ]


def test_cli(tmp_path, capsys):
    assert run_main(compare.main, ["--validate", str(TRACE)]) == 0
    assert capsys.readouterr().out == f"{TRACE}: a valid HOMER trace (6 layers, 16 slots, 7 nodes, checkpoints on 7)\n"

    bad = write(tmp_path / "bad.safetensors", T.tensors, META, **BAD["unknown name"][0], **BAD["last position"][0])
    assert run_main(compare.main, ["--validate", str(bad)]) == 1
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith(f"{bad}: 2 problem(s) with the trace format (docs/TRACE_FORMAT.md)")
    assert out[1].startswith("  1. unknown tensor 'node.0.0.score'") and out[2].startswith("  2. 'last_position_id'")

    assert run_main(compare.main, ["--validate", str(bad), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] is False and len(report["problems"]) == 2 and report["file"] == str(bad)

    assert run_main(compare.main, ["--validate", str(tmp_path / "absent.safetensors")]) == 2
    assert "absent.safetensors: no such file" in capsys.readouterr().err
