"""The oracle kit: compare a HOMER trace with homer_ref's, and name the first place they diverge.

A *trace* is what `python -m homer_ref.trace` writes (format: docs/TRACE_FORMAT.md): the final compact cache
(positions, keys, values, logits, last_position_id) and, for every tree node, the layers it ran, its target, its
input positions, its significance scores and the slots it kept — optionally also its *checkpoints* (its output
hidden states and the K/V of the layers it ran, at its end). Another implementation writes the same tensors for
the same input, and

    report = compare_traces("fixtures/cases/four_leaves/trace.safetensors", "mine.safetensors")
    print(report.first_divergence)   # e.g. "node 0.0, layer 1: kept slots differ at 2 of 15 ..."

walks both in execution order — every node in the expected trace's `node_order` (its input, then the layers it
ran, then its decision, then its output), then the final cache — and reports every difference, the first one
being the place to start debugging: once one node differs, everything after it differs too. Integers (layers,
targets, positions, sources, kept/removed slots) must be equal; floats must satisfy
|actual - expected| <= atol + rtol * |expected|, with +inf (the affixes' scores) equal. Slots are named by their
part of the prompt, e.g. "slot 11 (context token 9, position 11)", and final-cache divergences by the node that
computed the layer.

The parts: `read.py` (`load_trace` reads a trace file, a dict of tensors, a `HomerCache` or the NumPy oracle's
result; `decision_margin` says how close a trace's pruning decisions were to a tie), `report.py` (Report,
Divergence, how slots are named) and this comparer. `assert_traces_match` is the pytest form;
`python -m homer_ref.compare` the command-line form (any language). The message forms are listed in
docs/TRACE_FORMAT.md ("Comparing two traces"); tests/test_compare.py checks that every one is documented.
"""

import json

import numpy as np

from homer_ref.testing.read import Trace, load_trace
from homer_ref.testing.report import (
    Divergence,
    Report,
    SlotNames,
    abs_diff,
    bad_floats,
    fmt_float,
    layer_span,
    short_text,
)
from homer_ref.testing.trace import PLAN_KEYS, input_with_defaults
from homer_ref.testing.validate import shape_text

DEFAULT_ATOL = 1e-4  # float32 against float32 or float64, through a few layers of O(1) activations
DEFAULT_RTOL = 1e-4
# Scores are float32 in every trace, float64 ones included: float32(head-max logit) - float32(bias). Two correct
# float64 implementations may round a logit to neighbouring float32 values (one ulp: 1e-6 at |logit| = 8), so
# scores are compared with at least these tolerances, whatever the trace's; decisions never hinge on so little
# (every fixture decision wins by >= 1e-3 or is an exact tie).
SCORE_ATOL_FLOOR = 1e-5
SCORE_RTOL_FLOOR = 1e-6


class _Comparer:
    """Walks two traces in execution order, collecting a `Divergence` for every difference."""

    def __init__(self, expected: Trace, actual: Trace, atol: float, rtol: float):
        self.e, self.a, self.atol, self.rtol = expected, actual, atol, rtol
        self.out: list[Divergence] = []
        self.checkpoints = 0  # nodes whose checkpoints were compared

    def add(self, where: str, what: str) -> None:
        self.out.append(Divergence(where, what))

    # --- metadata: a different input or plan explains everything after it
    def metadata(self) -> None:
        for key in ("input", "plan"):
            if key not in self.e.metadata or key not in self.a.metadata:
                continue
            values = []
            for trace in (self.e, self.a):
                try:
                    values.append(json.loads(trace.metadata[key]))
                except ValueError:
                    values.append(None)
            e, a = values
            if not isinstance(e, dict) or not isinstance(a, dict):
                which = "expected" if not isinstance(e, dict) else "actual"
                self.add(f"metadata '{key}'", f"the {which} trace's value is not a JSON object")
                continue
            if key == "input":  # the documented defaults stand for absent optional keys
                e, a = input_with_defaults(e), input_with_defaults(a)
            else:  # the documented keys only: a plan may carry more (the manifest's adds final_len and nodes)
                e, a = {k: e.get(k) for k in PLAN_KEYS}, {k: a.get(k) for k in PLAN_KEYS}
            diff = [k for k in sorted(e.keys() | a.keys()) if e.get(k) != a.get(k)]
            if diff:
                detail = f"{diff[0]} expected {short_text(e.get(diff[0]))}, got {short_text(a.get(diff[0]))}"
                self.add(f"metadata '{key}'", f"the traces come from different {key}s: {detail}")

    # --- nodes, in the expected trace's execution order
    def nodes(self) -> None:
        expected_nodes = self.e.nodes
        if not expected_nodes:
            return
        actual_nodes = self.a.recorded_nodes
        if not actual_nodes:
            self.add(
                "nodes",
                "the actual trace has no node records (no node_order, no node.* tensors); write them, "
                "or compare the final cache only (--final-only, nodes=False)",
            )
            return
        if not self.a.nodes:
            self.add(
                "nodes",
                "the actual trace has node records but no node_order tensor ([nodes, 2]: the (level, "
                "index) of every node in execution order); its records are compared all the same",
            )
        for level, index in expected_nodes:
            self.node(level, index, set(actual_nodes))
        for level, index in actual_nodes:
            if (level, index) not in set(expected_nodes):
                self.add(f"node {level}.{index}", "in the actual trace but not in the expected one")

    def node(self, level: int, index: int, actual_nodes: set) -> None:
        """One node: its input, the K/V of the layers it ran, its decision, its output (stops at the first)."""
        e = lambda what: self.e.node(level, index, what)
        a = lambda what: self.a.node(level, index, what)
        where = f"node {level}.{index}"
        if (level, index) not in actual_nodes:
            self.add(where, "missing from the actual trace")
            return
        for what in ("layers", "target", "input_positions", "kept", "removed"):
            if a(what) is None:
                self.add(where, f"the actual trace lacks node.{level}.{index}.{what}")
                return
        layers = e("layers")
        if not np.array_equal(layers, a("layers")):
            self.add(where, f"ran layers {layer_span(a('layers'))}, expected {layer_span(layers)}")
            return
        first, last = int(layers[0]), int(layers[1])
        if int(e("target")[0]) != int(a("target")[0]):
            self.add(where, f"target expected {int(e('target')[0])}, got {int(a('target')[0])}")
            return
        slots = SlotNames(e("input_positions"), e("input_sources"), self.e.affixes())
        if not self.inputs(where, slots, e, a):
            return
        both = self.e.has_checkpoints(level, index) and self.a.has_checkpoints(level, index)
        self.checkpoints += both
        if both:  # the layers the node ran, in order: the K/V each computed (before the decision)
            for layer in range(first, last):
                for kind in ("keys", "values"):
                    if not self.checkpoint(f"{where}, layer {layer}", level, index, f"{kind}.{layer}", kind, slots):
                        return
        where_layer = f"{where}, layer {last - 1}"  # the reduction layer
        if not self.decision(where_layer, slots, e, a):
            return
        if both:  # its output: after the MLP of its last layer
            self.checkpoint(where_layer, level, index, "hidden", "output hidden states", slots)

    def inputs(self, where: str, slots: SlotNames, e, a) -> bool:
        """The node's input slots: count, positions, sources (when both traces have them). True when equal."""
        pos_e, pos_a = e("input_positions"), a("input_positions")
        if pos_e.shape != pos_a.shape:
            src_a = a("input_sources")  # the actual's parts, when it names them
            ours = (
                SlotNames(pos_a, src_a, self.e.affixes()).counts()
                if src_a is not None and src_a.size == pos_a.size
                else ""
            )
            got = f" ({ours})" if ours else ""
            want = f" ({slots.counts()})" if slots.counts() else ""
            self.add(where, f"input has {pos_a.size} slots{got}, expected {pos_e.size}{want}")
            return False
        if not np.array_equal(pos_e, pos_a):
            bad = np.flatnonzero(pos_e != pos_a)
            i = int(bad[0])
            self.add(
                where,
                f"input positions differ at {bad.size} of {pos_e.size} slots; first: {slots.name(i, position=False)}, "
                f"expected position {int(pos_e[i])}, got {int(pos_a[i])}",
            )
            return False
        src_e, src_a = e("input_sources"), a("input_sources")
        if src_e is not None and src_a is not None and not np.array_equal(src_e, src_a):
            bad = np.flatnonzero(src_e != src_a)
            i = int(bad[0])
            theirs = SlotNames(pos_a, src_a, self.e.affixes()).part(i) or f"source {int(src_a[i])}"
            self.add(
                where,
                f"input sources differ at {bad.size} of {src_e.size} slots; first: {slots.name(i)}, got {theirs}",
            )
            return False
        return True

    def checkpoint(self, where: str, level: int, index: int, name: str, what: str, slots: SlotNames) -> bool:
        """A node's checkpoint tensor (hidden [kept, D], keys/values [Hkv, kept, Dh]) on the slots both traces
        keep, compared through their input slot indices. True when it matches."""
        exp, act = self.e.node(level, index, name), self.a.node(level, index, name)
        kept_e, kept_a = self.e.node(level, index, "kept"), self.a.node(level, index, "kept")
        axis = 0 if name == "hidden" else 1  # the slot axis (validation checked the ranks)
        if exp is None or exp.shape[axis] != kept_e.size:  # a malformed answer key: nothing to compare against
            return True
        if act is None:
            self.add(where, f"the actual trace lacks node.{level}.{index}.{name} (it has other checkpoints)")
            return False
        if act.shape[axis] != kept_a.size:
            n = act.shape[axis]
            self.add(
                where,
                f"{what} hold {n} slots at the node's end, but the node keeps {kept_a.size}: a pruning "
                "decision applies to every layer the node holds (propagative refinement, HOMER_SPEC.md F)",
            )
            return False
        common = np.intersect1d(kept_e, kept_a)
        exp = np.take(exp, np.searchsorted(kept_e, common), axis=axis)
        act = np.take(act, np.searchsorted(kept_a, common), axis=axis)
        note = "" if np.array_equal(kept_e, kept_a) else f" (on the {common.size} slots both traces keep)"
        return self.tensor(where, what, exp, act, lambda s: slots.name(int(common[s])), note)

    def decision(self, where: str, slots: SlotNames, e, a) -> bool:
        """Kept slots, removed slots, scores at the reduction layer. True when they agree."""
        kept_e, kept_a, scores_e, scores_a = e("kept"), a("kept"), e("scores"), a("scores")
        n = slots.positions.size
        if kept_e.size != kept_a.size:
            self.add(where, f"kept {kept_a.size} of {n} slots, expected {kept_e.size}")
            return False
        if not np.array_equal(kept_e, kept_a):
            only_e = np.setdiff1d(kept_e, kept_a)  # kept by the expected implementation only
            only_a = np.setdiff1d(kept_a, kept_e)
            if not only_e.size or not only_a.size:  # the same slots, but out of order or repeated
                expected = short_text(kept_e)
                self.add(where, f"kept slots {short_text(kept_a)}, expected {expected} (ascending, each once)")
                return False
            i, j = int(only_e[0]), int(only_a[0])

            def score(scores, slot):
                return "-" if scores is None or slot >= scores.size else fmt_float(float(scores[slot]))

            self.add(
                where,
                f"kept slots differ at {only_e.size + only_a.size} of {n} input slots; first: expected "
                f"{slots.name(i)}, got {slots.name(j)}; scores expected/actual: slot {i} "
                f"{score(scores_e, i)}/{score(scores_a, i)}, slot {j} {score(scores_e, j)}/{score(scores_a, j)}",
            )
            return False
        if not np.array_equal(e("removed"), a("removed")):
            self.add(where, f"removed slots {short_text(a('removed'))}, expected {short_text(e('removed'))}")
            return False
        if scores_e is None and scores_a is not None:
            target = int(e("target")[0])
            self.add(
                where,
                f"the actual trace has scores, but the node removes nothing ({n} input slots, target "
                f"{target}); write scores only for nodes that remove slots",
            )
            return False
        if scores_e is not None and scores_a is None:
            self.add(
                where,
                f"the expected trace has scores (the node removes {e('removed').size} slots) but the actual has none",
            )
            return False
        if scores_e is None:
            return True
        bad = bad_floats(scores_e, scores_a, max(self.atol, SCORE_ATOL_FLOOR), max(self.rtol, SCORE_RTOL_FLOOR))
        if bad.any():
            diff = np.where(bad, abs_diff(scores_e, scores_a), 0.0)
            w = int(diff.argmax())
            self.add(
                where,
                f"scores differ at {int(bad.sum())} of {bad.size} slots; largest at {slots.name(w)}: expected "
                f"{fmt_float(scores_e[w])}, got {fmt_float(scores_a[w])}",
            )
            return False
        return True

    # --- the final cache
    def final(self) -> None:
        pos_e, pos_a = self.e.tensors["positions"], self.a.tensors["positions"]
        slots = SlotNames(pos_e, self.e.tensors.get("sources"), self.e.affixes())
        if pos_e.shape != pos_a.shape:
            self.add("final cache", f"holds {pos_a.size} slots, expected {pos_e.size}")
            return
        if not np.array_equal(pos_e, pos_a):
            bad = np.flatnonzero(pos_e != pos_a)
            i = int(bad[0])
            self.add(
                "final cache",
                f"positions differ at {bad.size} of {pos_e.size} slots; first: {slots.name(i, position=False)}, "
                f"expected {int(pos_e[i])}, got {int(pos_a[i])}",
            )
        src_e, src_a = self.e.tensors.get("sources"), self.a.tensors.get("sources")
        if src_e is not None and src_a is not None and not np.array_equal(src_e, src_a):
            bad = np.flatnonzero(src_e != src_a)
            i = int(bad[0])
            theirs = SlotNames(pos_a, src_a, self.e.affixes()).part(i) or f"source {int(src_a[i])}"
            self.add(
                "final cache",
                f"sources differ at {bad.size} of {src_e.size} slots; first: {slots.name(i)}, got {theirs}",
            )
        last_e, last_a = int(self.e.tensors["last_position_id"][0]), int(self.a.tensors["last_position_id"][0])
        if last_e != last_a:
            self.add("final cache", f"last_position_id expected {last_e}, got {last_a}")
        L = self.e.num_layers
        if self.a.num_layers != L:
            self.add("final cache", f"has {self.a.num_layers} layers, expected {L}")
        for layer in range(min(L, self.a.num_layers)):
            for kind in ("keys", "values"):
                where, key = f"final cache, layer {layer}", f"{kind}.{layer}"
                exp, act = self.e.tensors[key], self.a.tensors[key]  # load_trace checked both have every layer
                if act.ndim == 3 and act.shape[0::2] == exp.shape[0::2] and act.shape[1] != exp.shape[1]:
                    self.add(
                        where,
                        f"{kind} hold {act.shape[1]} slots, expected {exp.shape[1]}, the slots the root "
                        f"keeps in every layer{self.first_pruner(layer)}",
                    )
                else:
                    self.tensor(where, kind, exp, act, slots.name, by=lambda s, layer=layer: self.computed_by(layer, s))
        root = f"; from the output of the root, node {self.e.nodes[-1][0]}.0" if self.e.nodes else ""
        self.tensor(
            "logits", "logits", self.e.tensors["logits"], self.a.tensors["logits"], slots.name, by=lambda s: root
        )

    def first_pruner(self, layer: int) -> str:
        """Who should have removed slots from layer `layer`: '; node l.i is the first to remove slots
        from this layer by propagative refinement (it prunes at layer r)' for the first node of the expected trace
        that prunes above the layer (r > layer), else the first that prunes at it; '' when no node prunes it."""
        pruners = []
        for level, index in self.e.nodes:
            removed, layers = self.e.node(level, index, "removed"), self.e.node(level, index, "layers")
            if removed is not None and removed.size and int(layers[1]) - 1 >= layer:
                pruners.append((int(layers[1]) - 1 > layer, level, index, int(layers[1]) - 1))
        above = [p for p in pruners if p[0]]
        if not pruners:
            return ""
        _, level, index, r = (above or pruners)[0]
        how = " by propagative refinement" if above else ""
        node = f"node {level}.{index}"
        return f"; {node} is the first to remove slots from this layer{how} (it prunes at layer {r})"

    def computed_by(self, layer: int, slot: int) -> str:
        """'; layer 2 of slot 5 was computed by node 1.0': the node of the expected trace that ran
        this layer for the slot's token (for an affix slot, every node of that level: the merges average them)."""
        level = next((lv for lv, i in self.e.nodes if layer in range(*self.e.node(lv, i, "layers"))), None)
        sources = self.e.tensors.get("sources")
        if level is None:
            return ""
        if sources is None or self.e.affixes() is None:
            return f"; layer {layer} was computed by the level-{level} nodes"
        source, (P, C, _) = int(sources[slot]), self.e.affixes()
        if not P <= source < P + C:
            return f"; layer {layer} of slot {slot} was computed by every level-{level} node (averaged at the merges)"
        for lv, i in self.e.nodes:
            inputs = self.e.node(lv, i, "input_sources")
            if lv == level and inputs is not None and source in inputs:
                return f"; layer {layer} of slot {slot} was computed by node {lv}.{i}"
        return ""

    def tensor(self, where, what, expected, actual, name_slot, note: str = "", by=None) -> bool:
        """keys/values [Hkv, K, Dh], hidden states [K, D] or logits [K, V], within tolerance. True when they match.

        `name_slot(s)` names slot s; `note` ends the message; `by(s)` (optional) names who computed slot s."""
        if expected.shape != actual.shape:
            self.add(where, f"{what} have shape {shape_text(actual)}, expected {shape_text(expected)}")
            return False
        bad = bad_floats(expected, actual, self.atol, self.rtol)
        if not bad.any():
            return True
        diff = abs_diff(expected, actual)
        worst = np.unravel_index(int(diff.argmax()), diff.shape)
        first = tuple(int(i) for i in np.argwhere(bad)[0])

        def at(index) -> str:
            if expected.ndim == 3:  # keys, values
                return f"head {index[0]}, {name_slot(index[1])}, dim {index[2]}"
            return f"{name_slot(index[0])}, {'token' if what == 'logits' else 'dim'} {index[1]}"

        slot = first[1] if expected.ndim == 3 else first[0]
        self.add(
            where,
            f"{what} differ at {int(bad.sum())} of {bad.size} elements{note}; first at {at(first)}; max |Δ| "
            f"{diff[worst]:.3g} at {at(worst)}: expected {fmt_float(expected[worst])}, got {fmt_float(actual[worst])}"
            + (by(slot) if by else ""),
        )
        return False


def compare_traces(
    expected, actual, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, nodes: bool = True
) -> Report:
    """Compare `actual` with `expected` (paths, dicts or `Trace`s, see `load_trace`); a `Report` of every
    divergence in execution order: metadata (input, plan), then every node of the expected `node_order` (layers,
    target, input, the K/V of the layers it ran when both traces have checkpoints, kept and removed slots, scores,
    its output hidden states), then the final cache (positions, sources, last_position_id, keys and values layer by
    layer, logits). `nodes=False` compares the final cache only.
    """
    if not (atol >= 0 and rtol >= 0):  # NaN tolerances would make every element diverge
        raise ValueError(f"atol and rtol must be >= 0, got {atol} and {rtol}")
    e, a = load_trace(expected, "expected"), load_trace(actual, "actual")
    c = _Comparer(e, a, atol, rtol)
    c.metadata()
    if nodes:
        c.nodes()
    c.final()
    summary = f"{len(e.nodes)} nodes, " if nodes else "final cache only, "
    if c.checkpoints:
        summary = f"{len(e.nodes)} nodes with checkpoints, "
    summary += f"{e.num_layers} layers, {e.tensors['positions'].size} slots"
    return Report(e.name, a.name, atol, rtol, c.out, summary)


def assert_traces_match(
    expected, actual, atol: float = DEFAULT_ATOL, rtol: float = DEFAULT_RTOL, nodes: bool = True
) -> Report:
    """`compare_traces`, raising AssertionError with the full report when the traces diverge (for pytest)."""
    report = compare_traces(expected, actual, atol=atol, rtol=rtol, nodes=nodes)
    if not report.ok:
        raise AssertionError(f"{report.first_divergence}\n{report}")
    return report
