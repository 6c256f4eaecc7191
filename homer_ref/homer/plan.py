"""HOMER's settings and the plan they imply: chunk counts, tree height, layer schedule and every node's target.

Implements HOMER_SPEC.md B.1 (number of leaves), C.1 (layer schedule), D.4 (reduction targets, including the
short-right rule on the *raw* leaf length) and the configuration checks of N.2.6. Everything here is plain
integer arithmetic on (L, M, T, W, P, C, S); `plan(...)` computes it once, in one visible place, and the
result prints as a table for a reader.

Paper symbol -> code name (one meaning per letter in every file of homer_ref, reference/, tests and tutorials):
    L num_layers, W warmup_layers, M max_chunk_len (affixes included), T target_len, P/C/S prefix/context/suffix
    lengths, E = M-P-S context tokens a chunk can hold, N0 = ceil(C/E), H = ceil(log2 N0) tree height,
    N = 2**H leaves, e = ceil(C/N) context tokens per leaf, lpc layers per tree level, lo leftover layers,
    R = P + floor(E/2) + S the default reduced length of a child, K slots of the final cache, n slots of a node.
Tree nodes are named "node h.i": level h (0 the leaves, H the root), index i from the left (the trace format's
`node.h.i.*` tensors; `Node.name`).

Defaults, resolved here and nowhere else: T = M when not given (`HomerConfig.target`); W by the official
scripts' rule (below); M for generation = half the trained context (`default_max_chunk_len`, the official
scripts). The tasks resolve their own M in the library too: the passkey task leaves room for the answer
(`tasks.passkey.homer_config`), perplexity derives its segments from M (`tasks.perplexity.Segments`).

Warm-up layers: the official scripts, `MergeManager` and `homer_args` use W = 12 on Llama-2's 32 layers (only
`patch()` defaults to 0; HOMER_SPEC.md A, K.9). With `warmup_layers=None` homer_ref keeps that fraction for any
depth, W = round(12 L / 32), lowered only as far as the tree needs (a tree of height H needs H + 1 <= L - W
layers): `default_warmup_layers`.

Deviations from the official code (HOMER_SPEC.md N.2.6): every invalid configuration raises a `ValueError`
naming the constraint and a fix, where the official code crashes or silently lets chunks grow past M
(lpc = 0). C = 0 is allowed: one leaf holding prefix + suffix, i.e. the plain forward.
"""

import math
from dataclasses import dataclass, field
from typing import NamedTuple

REDUCTIONS = ("calibrated", "uncalibrated", "random")
# Not HOMER: "none" merges without pruning anything: every node's target is its whole input (chunks grow past
# M, the final cache holds every token). A diagnostic only (`eval passkey --modes homer-no-pruning`): it
# separates what merging costs from what pruning costs.
DIAGNOSTIC_REDUCTIONS = ("none",)


@dataclass(frozen=True)
class HomerConfig:
    max_chunk_len: int  # M: the longest chunk, prefix and suffix included
    target_len: int | None = None  # T: length of the final cache; None means T = M (the official default)
    warmup_layers: int | None = None  # W: layers only the leaves run; None: the official scripts' rule (below)
    reduction: str = "calibrated"  # calibrated | uncalibrated | random (the paper's ablation modes) | none
    seed: int = 0  # for reduction="random"

    @property
    def target(self) -> int:
        """T: `target_len`, or M when it is None (the official default)."""
        return self.max_chunk_len if self.target_len is None else self.target_len


def default_max_chunk_len(trained_context: int) -> int:
    """M for generation when none is given: half the trained context, as the official scripts (HOMER_SPEC.md N.1)."""
    return trained_context // 2


def generation_config(trained_context: int, max_chunk_len: int | None = None, **settings) -> HomerConfig:
    """The settings for continuing a prompt, every default that needs the model resolved: M = half the trained
    context unless given; `settings` are HomerConfig's other fields (T = M and W's rule are resolved by `plan`)."""
    M = default_max_chunk_len(trained_context) if max_chunk_len is None else max_chunk_len
    return HomerConfig(M, **settings)


@dataclass(frozen=True)
class Node:
    level: int  # height in the tree: 0 for leaves, H for the root
    index: int  # left-to-right index within its level
    leaves: tuple[int, int]  # the leaves it covers, [first, last)
    layers: tuple[int, int]  # the decoder layers it runs, [first, last); it may prune at layer last-1
    target: int  # length it is reduced to at its last layer (nothing is removed if it is already shorter)

    @property
    def name(self) -> str:
        """ "node h.i": level h, index i (the trace format's `node.h.i.*`)."""
        return f"node {self.level}.{self.index}"


@dataclass(frozen=True)
class Plan:
    L: int
    W: int
    M: int
    T: int  # the target as given
    P: int
    C: int
    S: int
    E: int
    N0: int
    H: int
    N: int
    e: int
    lpc: int
    lo: int
    R: int
    leaf_context: tuple[int, ...]  # context tokens of each leaf (the last one may be shorter)
    nodes: dict[tuple[int, int], Node] = field(repr=False)  # keyed by (level, index)
    config: HomerConfig = field(repr=False)  # the settings it was made from (reduction and seed included)

    @property
    def root(self) -> Node:
        return self.nodes[(self.H, 0)]

    @property
    def prunes(self) -> bool:
        """Whether any node removes slots (then the calibrated reduction needs a bias table)."""
        return any(self.input_len(node) > node.target for node in self.nodes.values())

    @property
    def final_len(self) -> int:
        """Slots in every layer of the final cache: the root's input length, cut to its target."""
        return min(self.root.target, self.input_len(self.root))

    def input_len(self, node: Node) -> int:
        """Tokens a node holds when it starts its layers (a leaf's raw length, or its children's reduced sum)."""
        if node.level == 0:
            return self.P + self.leaf_context[node.index] + self.S
        left, right = self.children(node)
        return min(self.input_len(left), left.target) + min(self.input_len(right), right.target) - self.P - self.S

    def children(self, node: Node) -> tuple[Node, Node]:
        return self.nodes[(node.level - 1, 2 * node.index)], self.nodes[(node.level - 1, 2 * node.index + 1)]

    def held_layers(self, level: int) -> int:
        """ℓ(h): how many layers' cache a node of this level holds once it is finished (HOMER_SPEC.md G.2)."""
        return self.W + self.lo + self.lpc * (level + 1)

    def part(self, source: int) -> tuple[str, int]:
        """Where prompt token `source` (an index into prefix + context + suffix) comes from: ("prefix", i),
        ("context", i) or ("suffix", i). Every slot of every node carries its source (`chunking.Chunk.sources`)."""
        if source < self.P:
            return "prefix", source
        if source < self.P + self.C:
            return "context", source - self.P
        return "suffix", source - self.P - self.C

    def post_order(self) -> list[Node]:
        """The depth-first execution order: left subtree, right subtree, then the node."""

        def walk(level: int, index: int) -> list[Node]:
            below = [] if level == 0 else walk(level - 1, 2 * index) + walk(level - 1, 2 * index + 1)
            return below + [self.nodes[(level, index)]]

        return walk(self.H, 0)

    def __str__(self) -> str:
        lines = [
            f"HOMER plan: L={self.L} W={self.W} M={self.M} T={self.T} P={self.P} C={self.C} S={self.S} "
            f"({self.config.reduction})",
            f"  E={self.E} N0={self.N0} H={self.H} N={self.N} e={self.e} lpc={self.lpc} lo={self.lo} R={self.R}",
            f"  final cache: K={self.final_len} slots in each of {self.L} layers",
            "  node      leaves     layers    in -> target",
        ]
        for node in self.post_order():
            first, last = node.layers
            lines.append(
                f"  {node.level:4d}.{node.index:<4d} [{node.leaves[0]:3d},{node.leaves[1]:3d}) "
                f"{first:4d}-{last - 1:<4d} {self.input_len(node):5d} -> {node.target}"
            )
        return "\n".join(lines)


class Shape(NamedTuple):
    """The tree's shape for lengths (P, C, S) and settings (L, M, W), before any checks (B.1, C.1)."""

    E: int  # context tokens a chunk can hold: M - P - S
    N0: int  # chunks needed: ceil(C / E)
    H: int  # tree height: ceil(log2 N0)
    N: int  # leaves: 2**H
    e: int  # context tokens per leaf: ceil(C / N) (the last leaf may hold fewer)
    lpc: int  # layers per tree level: floor((L - W) / (H + 1))
    lo: int  # leftover layers, given to the leaves: (L - W) - lpc * (H + 1)


def tree_shape(L: int, M: int, W: int, P: int, C: int, S: int) -> Shape:
    E = M - P - S
    N0 = max(1, math.ceil(C / E))
    H = math.ceil(math.log2(N0))
    N = 2**H
    e = math.ceil(C / N)
    lpc = (L - W) // (H + 1)
    return Shape(E, N0, H, N, e, lpc, (L - W) - lpc * (H + 1))


def _last_leaf_ok(M: int, P: int, C: int, S: int) -> bool:
    shape = tree_shape(1, M, 0, P, C, S)
    return shape.N == 1 or C - (shape.N - 1) * shape.e > 0


def default_warmup_layers(L: int, M: int, P: int, C: int, S: int) -> int:
    """The official scripts' warm-up (12 of Llama-2's 32 layers) at L layers, lowered only where the tree needs it."""
    H = tree_shape(L, M, 0, P, C, S).H  # the tree's height does not depend on W
    return max(0, min(round(12 * L / 32), L - (H + 1)))


def check_config(L: int, config: HomerConfig, P: int, C: int, S: int) -> int:
    """Raise `ValueError` for every configuration HOMER_SPEC.md N.2.6 forbids (the message suggests a fix);
    return the warm-up layers W to use (`config.warmup_layers`, or the default rule when it is None)."""
    if not isinstance(config, HomerConfig):
        raise ValueError(f"config must be a HomerConfig(max_chunk_len, target_len, ...), got {type(config).__name__}")
    M, T = config.max_chunk_len, config.target
    W = 0 if config.warmup_layers is None else config.warmup_layers  # the rule needs the checks below first
    for name, value in (("max_chunk_len", M), ("target_len", T), ("warmup_layers", W), ("seed", config.seed)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise ValueError(f"{name} must be an integer, got {value!r}")
    if W < 0 or C < 0 or P < 0 or S < 0:
        raise ValueError(f"warmup_layers and the prefix/context/suffix lengths must be >= 0 (W={W}, P={P}, C={C})")
    if config.reduction not in REDUCTIONS + DIAGNOSTIC_REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(REDUCTIONS)}, got {config.reduction!r}")
    if S == 0:
        raise ValueError(
            "the suffix is empty (S = 0): HOMER scores tokens by the attention of the last suffix token; "
            "put at least the final token of the prompt (e.g. the question) in the suffix"
        )
    if M <= P + S:
        raise ValueError(
            f"max_chunk_len M={M} must exceed prefix + suffix = {P}+{S} so that a chunk holds context; "
            f"raise max_chunk_len above {P + S} or shorten the prefix/suffix"
        )
    if T < P + S:
        raise ValueError(
            f"target_len T={T} is below prefix + suffix = {P + S}: the prefix and suffix are never pruned; "
            f"use target_len >= {P + S}"
        )
    if W >= L:
        raise ValueError(f"warmup_layers W={W} must be below the number of layers L={L}; use W <= {L - 1}")
    if config.warmup_layers is None:
        W = default_warmup_layers(L, M, P, C, S)
    shape = tree_shape(L, M, W, P, C, S)
    E, H, N, e = shape.E, shape.H, shape.N, shape.e
    if shape.lpc == 0:
        levels = L - W
        reach = 2 ** (levels - 1) * E
        fit = math.ceil(C / 2 ** (levels - 1)) + P + S  # the smallest M whose tree fits L - W layers
        while not _last_leaf_ok(fit, P, C, S):  # a larger M never deepens the tree; skip empty last leaves
            fit += 1
        fixes = [f"max_chunk_len >= {fit}"]
        if L - H - 1 >= 0 and _last_leaf_ok(M, P, C, S):  # fewer warm-up layers cannot fix the last leaf
            fixes.append(f"warmup_layers <= {L - H - 1}")
        raise ValueError(
            f"a context of {C} tokens needs a tree of height {H} ({N} leaves of <= {E} context tokens), i.e. "
            f"{H + 1} merge levels, but only L-W = {levels} layers follow the warm-up: with these settings this "
            f"model reaches at most 2^(L-W-1)*E = {reach} context tokens; use {' or '.join(fixes)}, "
            "or shorten the context"
        )
    if not _last_leaf_ok(M, P, C, S):
        nearby = [m for d in range(1, E + 1) for m in (M + d, M - d) if m > P + S and _last_leaf_ok(m, P, C, S)]
        hint = f"; max_chunk_len={nearby[0]} would work" if nearby else ""
        raise ValueError(
            f"the last of the {N} leaves would hold {C - (N - 1) * e} context tokens (e={e} per leaf for C={C}): "
            f"it must hold at least one; change max_chunk_len or the context length{hint}"
        )
    return W


def plan(num_layers: int, config: HomerConfig, P: int, C: int, S: int) -> Plan:
    """Every derived quantity of HOMER for a model of `num_layers` layers and an input of lengths P, C, S."""
    W = check_config(num_layers, config, P, C, S)
    L, M, T = num_layers, config.max_chunk_len, config.target
    E, N0, H, N, e, lpc, lo = tree_shape(L, M, W, P, C, S)  # every field, named
    leaf_context = tuple(min((i + 1) * e, C) - i * e for i in range(N))
    R = P + E // 2 + S
    nodes: dict[tuple[int, int], Node] = {}

    def layers_of(level: int) -> tuple[int, int]:  # warm-up and leftover layers all go to the leaves (C.1)
        return (0, W + lo + lpc) if level == 0 else (W + lo + lpc * level, W + lo + lpc * (level + 1))

    def place(level: int, index: int, target: int) -> None:
        span = 2**level
        if config.reduction == "none":  # the no-pruning diagnostic: a node keeps everything its leaves hold
            target = P + sum(leaf_context[index * span : (index + 1) * span]) + S
        nodes[(level, index)] = Node(level, index, (index * span, (index + 1) * span), layers_of(level), target)
        if level == 0:
            return
        # Short-right rule (D.4), on the RAW length of the right subtree's first leaf, as the official code does.
        r0 = P + leaf_context[index * span + span // 2] + S
        left_target, right_target = (M - (r0 - P - S), r0) if r0 < R else (R, R)
        place(level - 1, 2 * index, left_target)
        place(level - 1, 2 * index + 1, right_target)

    place(H, 0, min(T, P + C + S))  # root target T* = min(T, P+C+S)
    return Plan(L, W, M, T, P, C, S, E, N0, H, N, e, lpc, lo, R, leaf_context, nodes, config)
