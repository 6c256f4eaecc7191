"""The memory-optimal computation order (HOMER_SPEC.md G) and a meter of the KV memory it keeps alive.

The tree can be computed in any order that finishes both children before their parent. Depth-first
post-order (left subtree, right subtree, merge) is what makes HOMER's memory logarithmic: while a node is
being processed, the only other live state is, for each level where the path went right, the finished left
sibling waiting for its merge — at most one reduced chunk per level (G.2):

    peak KV  <=  sum over levels h < H of  R_h * l(h)   +   M * L       (token-layers)

where R_h is the reduced length of a level-h child and l(h) the number of layers it holds, against
(P+C+S) * L for the plain cache. The level-order traversal (all leaves first, then every level-1 node, ...)
gives bit-identical results but keeps a whole level alive, so its memory grows linearly with the input.

Deviation (N.2.1): every child is released as soon as it has been merged (`merging.merge` consumes it). The
official code walks depth-first but keeps every right child alive, so its memory grows linearly (G.3).

The two orders themselves are plain functions beside the node step they call (`prefill.depth_first`,
`prefill.level_order`). This module holds what is known about them: `LiveKV` measures what a traversal actually
holds (at every layer of every node, the K/V of the finished chunks waiting for a sibling and of the chunk being
processed, in token-layers and bytes); `simulate_live_kv` predicts the same timeline from the plan alone;
`g2_bound` and `plain_kv` are the two sides of the G.2 comparison.
"""

from dataclasses import dataclass, field

from homer_ref.homer.chunking import Chunk
from homer_ref.homer.plan import Node, Plan

TRAVERSALS = ("depth_first", "level_order")


@dataclass
class LiveKV:
    held: list[Chunk] = field(default_factory=list)  # finished chunks waiting to be merged
    peak_token_layers: int = 0
    peak_bytes: int = 0
    timeline: list[int] = field(default_factory=list)  # live token-layers at every observation, in order

    def hold(self, chunk: Chunk) -> None:
        self.held.append(chunk)

    def release(self, chunk: Chunk) -> None:
        self.held = [c for c in self.held if c is not chunk]

    def observe(self, current: Chunk) -> None:
        """Record the live KV now: the held chunks plus `current`, the chunk being processed."""
        token_layers = current.kv_token_layers() + sum(c.kv_token_layers() for c in self.held)
        self.peak_token_layers = max(self.peak_token_layers, token_layers)
        self.peak_bytes = max(self.peak_bytes, current.kv_bytes() + sum(c.kv_bytes() for c in self.held))
        self.timeline.append(token_layers)


def g2_bound(plan: Plan) -> int:
    """The analytic G.2 bound on depth-first peak live KV, in token-layers.

    One finished reduced child per level below the root (the largest of that level, usually R tokens) holding
    l(h) layers, plus the node being processed: at most M tokens in at most L layers.
    """
    held = 0
    for level in range(plan.H):
        reduced = max(min(plan.input_len(n), n.target) for (lv, _), n in plan.nodes.items() if lv == level)
        held += reduced * plan.held_layers(level)
    return held + plan.M * plan.L  # every node's input has at most M tokens (D.4)


def plain_kv(plan: Plan) -> int:
    """Token-layers of the plain forward's full cache: (P+C+S) * L."""
    return (plan.P + plan.C + plan.S) * plan.L


def simulate_live_kv(plan: Plan, traversal: str = "depth_first") -> list[int]:
    """The live-KV timeline (token-layers) a traversal *would* record, from the plan alone — no model needed.

    Mirrors `LiveKV.observe`: one observation after the attention of every layer of every node, counting the
    node's slots times the layers it holds plus the finished chunks held. Used for model shapes too large to
    run (e.g. Llama-2-7B at 64k) and, in the tests, as an independent check of the measured timeline.
    """
    timeline: list[int] = []

    def run(node: Node, held: int) -> int:  # returns the node's finished size in token-layers
        n, (first, last) = plan.input_len(node), node.layers
        timeline.extend(held + n * layer for layer in range(first + 1, last + 1))
        return min(n, node.target) * last

    if traversal == "depth_first":

        def solve(level: int, index: int, held: int) -> int:
            if level == 0:
                return run(plan.nodes[(0, index)], held)
            left = solve(level - 1, 2 * index, held)
            solve(level - 1, 2 * index + 1, held + left)
            return run(plan.nodes[(level, index)], held)

        solve(plan.H, 0, 0)
        return timeline
    finished = []
    for i in range(plan.N):
        finished.append(run(plan.nodes[(0, i)], sum(finished)))
    for level in range(1, plan.H + 1):
        parents: list[int] = []
        for index in range(plan.N >> level):
            waiting = sum(finished[2 * index + 2 :]) + sum(parents)
            parents.append(run(plan.nodes[(level, index)], waiting))
        finished = parents
    return timeline
