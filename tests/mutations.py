"""Realistic mistakes in a HOMER implementation, each a small edit of homer_ref's own source (tests/test_mutations.py).

A `Mutation` names the rule it breaks and the edit: in the source of one or more homer_ref functions, each `old`
code text (which must occur exactly once) becomes `new`. Code is matched, not comments: comments are taken out of
the function's source first, so rewording a comment never breaks a mutation. `applied(mutation)` compiles the
edited functions and puts them wherever homer_ref holds the originals (module attributes, class methods) until
the block ends, so the trace command then runs the broken implementation. `starts_at(trace, case)` says, from the
answer key alone, which node the mistake first changes — None when it changes nothing in that case — so the test
can check that the kit's first divergence names it.

    python tests/mutations.py NAME --model ... --input ... --bias ... --out ...

runs the trace command with mistake NAME applied: a broken implementation with a command line, for the
conformance command's tests.
"""

import contextlib
import importlib
import inspect
import io
import json
import struct
import sys
import textwrap
import tokenize
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors.numpy import load_file

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # `python tests/mutations.py` from a checkout
    sys.path.insert(0, str(ROOT))

from homer_ref import llama  # noqa: E402
from homer_ref.homer import HomerConfig, chunking, merging, prefill, reduction, refinement  # noqa: E402
from homer_ref.testing import FixtureCase, Trace  # noqa: E402

plan = importlib.import_module("homer_ref.homer.plan")  # the module (the package's `plan` is the function)

Node = tuple[int, int]


@dataclass(frozen=True)
class Mutation:
    name: str
    mistake: str  # the rule an implementer got wrong (HOMER_SPEC.md section)
    edits: tuple[tuple[Callable, str, str], ...]  # (function, old source text, new source text)
    starts_at: Callable[[Trace, FixtureCase], Node | None]  # the node where the trace first changes, or None
    harmless: bool = False  # the spec says the results do not change
    crashes: str = ""  # why the broken implementation may raise on some cases (then it writes no trace there)


# ----------------------------------------------------------------------------------------------- where it starts


def model_info(case: FixtureCase) -> dict:
    """Query heads, KV heads, RoPE type and trained length of a case's model (config.json or the .bin header)."""
    if case.model.suffix == ".bin":
        dim, hidden, layers, hq, hkv, vocab, seq_len = struct.unpack("<7i", case.model.read_bytes()[:28])
        return {"hq": hq, "hkv": hkv, "rope": "default", "max_pos": seq_len}
    c = json.loads((case.model / "config.json").read_text())
    rope = (c.get("rope_scaling") or {}).get("rope_type", "default")
    return {"hq": c["num_attention_heads"], "hkv": c["num_key_value_heads"], "rope": rope,
            "max_pos": c["max_position_embeddings"]}  # fmt: skip


def reduction_mode(case: FixtureCase) -> str:
    return json.loads(case.input.read_text()).get("reduction", "calibrated")


def first(trace: Trace, test) -> Node | None:
    """The first node in execution order for which test(node records) holds."""
    for level, index in trace.nodes:
        if test(lambda what, lv=level, i=index: trace.node(lv, i, what)):
            return level, index
    return None


def prunes(node) -> bool:
    return node("removed").size > 0


def first_node(trace, case) -> Node:
    return trace.nodes[0]


def first_pruning(trace, case) -> Node | None:
    return first(trace, prunes)


def first_attention_pruning(trace, case) -> Node | None:
    """The first node whose decision comes from attention (not the random mode's scores)."""
    return None if reduction_mode(case) == "random" else first_pruning(trace, case)


def first_merged(trace, case) -> Node | None:
    return next(((level, index) for level, index in trace.nodes if level > 0), None)


def first_tie(trace, case) -> Node | None:
    """The first node whose cut falls inside a group of equal scores (the (score, index) rule decides)."""

    def tie(node) -> bool:
        if not prunes(node):
            return False
        scores, removed, kept = node("scores"), node("removed"), node("kept")
        return bool(np.isin(kept, np.flatnonzero(scores == scores[removed].max())).any())

    return first(trace, tie)


def first_logit_pruning(trace, case) -> Node | None:
    """The first pruning node whose last query's logits are not all zero (in the `ties` case they are: its scores
    are exactly -bias), so that a mistake in how the heads' logits are combined can show."""
    if reduction_mode(case) == "random":
        return None
    bias = load_file(str(case.bias))["bias"] if case.bias else None

    def logits(node) -> bool:
        scores, pos, layer = node("scores"), node("input_positions"), int(node("layers")[1]) - 1
        offset = 0 if bias is None else bias[layer][pos[-1] - pos]
        finite = np.isfinite(scores)
        return bool(np.any(scores[finite] + offset[finite] != 0)) if bias is not None else bool(np.any(scores[finite]))

    return first(trace, lambda node: prunes(node) and logits(node))


def first_noncontiguous_pruning(trace, case) -> Node | None:
    """Calibrated mode: the first pruning node whose positions are not its slot order (merged or gapped)."""
    if reduction_mode(case) != "calibrated":
        return None

    def gapped(node) -> bool:  # position distances differ from sequence distances somewhere
        pos = node("input_positions")
        return not np.array_equal(pos[-1] - pos, np.arange(pos.size)[::-1])

    return first(trace, lambda node: prunes(node) and gapped(node))


def first_gqa_pruning(trace, case) -> Node | None:
    info = model_info(case)
    return first_logit_pruning(trace, case) if 1 < info["hkv"] < info["hq"] else None


def first_pruning_with_layers_below(trace, case) -> Node | None:
    """The first node that removes slots while holding a layer below its reduction layer."""
    return first(trace, lambda node: prunes(node) and node("layers")[1] - 1 > 0)


def first_pruning_block(trace, case) -> Node | None:
    """The first pruning node that runs more than one layer (so its first layer is not its last)."""
    return first(trace, lambda node: prunes(node) and node("layers")[1] - node("layers")[0] > 1)


def leaf_zero_if_split(trace, case) -> Node | None:
    return (0, 0) if len(trace.nodes) > 1 else None


def first_short_leaf(trace, case) -> Node | None:
    """The first leaf with a gap between its context and its suffix (a short last leaf, B.3)."""
    P, S = len(json.loads(case.input.read_text())["prefix_ids"]), len(json.loads(case.input.read_text())["suffix_ids"])
    return first(trace, lambda node: node("layers")[0] == 0 and len(trace.nodes) > 1 and
                 node("input_positions")[-S] - node("input_positions")[-S - 1] > 1 and
                 node("input_positions").size > P + S)  # fmt: skip


def first_dynamic_length_mismatch(trace, case) -> Node | None:
    """Dynamic NTK: the first node whose slot count and largest position + 1 differ where it matters."""
    limit = model_info(case)["max_pos"]
    if model_info(case)["rope"] != "dynamic":
        return None

    def differs(node) -> bool:
        n, reach = node("input_positions").size, int(node("input_positions").max()) + 1
        return n != reach and max(n, reach) > limit

    return first(trace, differs)


def first_plan_difference(trace, case) -> Node | None:
    """Plan mistakes: the first node whose layers or target differ between the answer key and the plan homer_ref
    computes now (inside `applied`, the mutated one)."""
    data = json.loads(case.input.read_text())
    config = HomerConfig(data["max_chunk_len"], data["target_len"], data["warmup_layers"], data["reduction"])
    lengths = (len(data[k]) for k in ("prefix_ids", "context_ids", "suffix_ids"))
    nodes = plan.plan(trace.num_layers, config, *lengths).nodes
    for level, index in trace.nodes:
        layers, target = trace.node(level, index, "layers"), trace.node(level, index, "target")
        if (tuple(int(x) for x in layers), int(target[0])) != (
            nodes[(level, index)].layers,
            nodes[(level, index)].target,
        ):
            return level, index
    return None


def leaf_zero_for(rope_type: str):
    return lambda trace, case: trace.nodes[0] if model_info(case)["rope"] == rope_type else None


# ----------------------------------------------------------------------------------------------- the mistakes

_LAYERS = "return (0, W + lo + lpc) if level == 0 else (W + lo + lpc * level, W + lo + lpc * (level + 1))"
_PRUNE = """        if reduces:
            scores = significance(run, node, layer, last_logits, chunk)
            kept, removed = reduction.select(scores, n - node.target)
            chunk = keep_slots(chunk, kept)
        chunk.h = feed_forward_in_rows(model, layer, chunk.h[None])[0]"""
_ATTEND = "h, keys, values, last_logits = model.attend(layer, chunk.h[None], chunk.positions, last_query=asks)"
_SCORE = "last_logits = (k_rep @ q[:, :, -1, :, None].to(score_dtype)).squeeze(-1) / math.sqrt(Dh)"
_AVG_SUFFIX = "(left.narrow(dim, nl - S, S) + right.narrow(dim, nr - S, S)) / 2,"

MUTATIONS = [
    Mutation("ties_reversed", "ties broken the other way: the later slot removed first (N.2.3)",
             ((reduction.select, "order = torch.sort(scores, stable=True).indices",
               "order = scores.numel() - 1 - torch.sort(scores.flip(0), stable=True).indices"),), first_tie),
    Mutation("gqa_modulo", "GQA: query head h scored with KV head h % Hkv instead of h // (Hq/Hkv) (N.2.2)",
             ((llama.Llama.attend, "k_rep = k.to(score_dtype).repeat_interleave(Hq // Hkv, dim=1)",
               "k_rep = k.to(score_dtype).repeat(1, Hq // Hkv, 1, 1)"),), first_gqa_pruning),
    Mutation("leftover_to_root", "leftover layers given to the root instead of the leaves (C.1)",
             ((plan.plan, _LAYERS, "return (0, W + lpc) if level == 0 else (W + lpc * level, W + lpc * (level + 1) "
               "+ (lo if level == H else 0))"),), first_plan_difference),  # fmt: skip
    Mutation("positions_reindexed", "positions re-indexed 0..n-1 after a merge instead of reused (E.3)",
             ((merging.merge, "positions=_concat(left.positions, right.positions, P, S),",
               "positions=torch.arange(len(left) + len(right) - P - S),"),), first_merged),
    Mutation("no_refinement", "no propagative refinement: a decision prunes only the layer it is made at (F)",
             ((refinement.keep_slots, "keys=[k[:, keep] for k in chunk.keys],",
               "keys=chunk.keys[:-1] + [chunk.keys[-1][:, keep]],"),
              (refinement.keep_slots, "values=[v[:, keep] for v in chunk.values],",
               "values=chunk.values[:-1] + [chunk.values[-1][:, keep]],")), first_pruning_with_layers_below),
    Mutation("suffix_from_one_child", "merged suffix taken from the right child instead of averaged (E)",
             ((merging._join, _AVG_SUFFIX, "right.narrow(dim, nr - S, S),"),), first_merged),
    Mutation("suffix_concatenated", "both children's suffix copies kept (concatenated) instead of averaged (E)",
             ((merging._join, "left.narrow(dim, P, nl - P - S),", "left.narrow(dim, P, nl - P),"),
              (merging._join, _AVG_SUFFIX, "right.narrow(dim, nr - S, S),"),
              (merging._concat, "return torch.cat([left[: len(left) - S], right[P:]])",
               "return torch.cat([left, right[P:]])")), first_merged),
    Mutation("bias_by_sequence_distance", "bias indexed by sequence distance instead of position distance (D.2)",
             ((reduction.significance, "distance = positions[-1] - positions",
               "distance = torch.arange(len(positions) - 1, -1, -1)"),), first_noncontiguous_pruning),
    Mutation("no_causal_mask", "no causal mask: every slot attends to every other (A, C.2)",
             ((llama.Llama.attend, "is_causal=cached == 0", "is_causal=False"),), first_node),
    Mutation("mean_over_heads", "significance: mean over query heads instead of max (D.1)",
             ((reduction.significance, "last_logits.amax(dim=0)", "last_logits.mean(dim=0)"),),
             first_logit_pruning),
    Mutation("softmax_scores", "significance from softmax probabilities instead of pre-softmax logits (D.1)",
             ((reduction.significance, "last_logits.amax(dim=0)", "last_logits.softmax(dim=-1).amax(dim=0)"),),
             first_attention_pruning),
    Mutation("no_rope_in_score", "significance from q and k before RoPE (D.1)",
             ((llama.Llama.attend, "q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)",
               "q0, k0 = q, k\n    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)"),
              (llama.Llama.attend, "k_rep = k.to(score_dtype)", "k_rep = k0.to(score_dtype)"),
              (llama.Llama.attend, _SCORE, _SCORE.replace("q[:, :, -1", "q0[:, :, -1"))),
             first_logit_pruning),
    Mutation("prune_before_attention_output", "pruned before the reduction layer's attention output is added: the "
             "kept slots' attention at that layer no longer sees the pruned ones (C.2)",
             ((prefill.run_node, _ATTEND, "h_in = chunk.h\n        " + _ATTEND),
              (prefill.run_node, "chunk = keep_slots(chunk, kept)",
               "chunk = keep_slots(chunk, kept)\n            chunk.h = model.attend(layer, h_in[kept][None], "
               "chunk.positions)[0][0]")), first_pruning),
    Mutation("prune_at_first_layer", "reduction at the first layer of a node's block instead of its last (C.2)",
             ((prefill.run_node, "reduces = layer == last - 1 and prunes", "reduces = layer == first and prunes"),),
             first_pruning_block),
    Mutation("global_positions", "global positions: leaf i's context at P + i*e, the suffix at P + C (B.3)",
             ((chunking.leaf_positions, "return list(range(P + c)) + list(range(P + plan.e, P + plan.e + S))",
               "return list(range(P)) + list(range(P + i * plan.e, P + i * plan.e + c)) + "
               "list(range(P + plan.C, P + plan.C + S))"),), leaf_zero_if_split,
             crashes="distances past the calibration table's M entries: IndexError in calibrated cases"),
    Mutation("no_suffix_gap", "no suffix gap: a short last leaf's suffix right after its context (B.3)",
             ((chunking.leaf_positions, "list(range(P + plan.e, P + plan.e + S))", "list(range(P + c, P + c + S))"),),
             first_short_leaf),
    Mutation("short_right_off", "short-right rule left out: every child reduced to R (D.4)",
             ((plan.plan, "(M - (r0 - P - S), r0) if r0 < R else (R, R)", "(R, R)"),), first_plan_difference),
    Mutation("root_target_m", "root reduced to M instead of T (D.4)",
             ((plan.plan, "place(H, 0, min(T, P + C + S))", "place(H, 0, min(M, P + C + S))"),),
             first_plan_difference),
    Mutation("dynamic_ntk_by_length", "dynamic NTK scaled by the slot count instead of the largest position + 1 "
             "(I.1)", ((llama.rope_cos_sin, "int(positions.max()) + 1 if positions.numel() else 0",
                        "positions.shape[-1]"),), first_dynamic_length_mismatch),
    Mutation("yarn_without_mscale", "YaRN without its attention factor on cos and sin (I.1)",
             ((llama.rope_frequencies, "return inv_freq, scale", "return inv_freq, 1.0"),), leaf_zero_for("yarn")),
    Mutation("prune_after_mlp", "pruning after the reduction layer's MLP instead of before: harmless, the MLP acts "
             "per token (N.1)",
             ((prefill.run_node, _PRUNE, "        chunk.h = feed_forward_in_rows(model, layer, chunk.h[None])[0]\n"
               + _PRUNE.rsplit("\n", 1)[0]),), lambda t, c: None, harmless=True),
]  # fmt: skip
BY_NAME = {m.name: m for m in MUTATIONS}


# ----------------------------------------------------------------------------------------------- applying


def without_comments(source: str) -> str:
    """`source` with its comments taken out (and the blanks before them): the code alone, line for line."""
    comments = {}  # line number -> column where its comment starts
    for token in tokenize.generate_tokens(io.StringIO(source).readline):
        if token.type == tokenize.COMMENT:
            comments[token.start[0]] = token.start[1]
    lines = source.split("\n")
    return "\n".join(line[: comments[i + 1]].rstrip() if i + 1 in comments else line for i, line in enumerate(lines))


def _patched(function: Callable, edits: list[tuple[str, str]]) -> Callable:
    """`function` compiled again from its source (comments taken out) with the edits made, in a copy of its
    module's globals."""
    source = without_comments(textwrap.dedent(inspect.getsource(function)))
    for old, new in edits:
        assert source.count(old) == 1, f"{function.__qualname__}: {old!r} occurs {source.count(old)} times"
        source = source.replace(old, new)
    namespace = dict(inspect.unwrap(function).__globals__)  # under a decorator (torch.no_grad), the function's own
    exec(compile(source, f"<mutated {function.__module__}.{function.__qualname__}>", "exec"), namespace)
    return namespace[function.__name__]


@contextlib.contextmanager
def applied(mutation: Mutation):
    """While the block runs, homer_ref uses the mutated functions: every module attribute and class method that
    holds an original function holds its edited copy instead."""
    by_function: dict[Callable, list[tuple[str, str]]] = {}
    for function, old, new in mutation.edits:
        by_function.setdefault(function, []).append((old, new))
    replacements = {function: _patched(function, edits) for function, edits in by_function.items()}
    undo = []
    holders = [m for name, m in list(sys.modules.items()) if name.startswith("homer_ref") and m is not None]
    holders += [llama.Llama]
    for holder in holders:
        for attr, value in list(vars(holder).items()):
            if any(value is original for original in replacements):
                undo.append((holder, attr, value))
                setattr(holder, attr, replacements[value])
    try:
        yield
    finally:
        for holder, attr, value in reversed(undo):
            setattr(holder, attr, value)


if __name__ == "__main__":  # python tests/mutations.py NAME [trace command arguments]
    from homer_ref.cli import trace

    name, sys.argv = sys.argv[1], [sys.argv[0], *sys.argv[2:]]
    with applied(BY_NAME[name]):
        trace.entry()
