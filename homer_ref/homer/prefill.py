"""HOMER prefill: a long prompt in, a compact KV cache out (HOMER_SPEC.md M, N); and what to do with it.

The algorithm reads top to bottom in this file, each step a function a reader (or a tutorial) can call:

    leaf_chunk(run, i)           leaf i's input: [prefix | context slice | suffix], embedded           (B.2-B.4)
    run_node(run, node, chunk)   one node: its block of layers; at the last one, after attention and before
                                 the MLP, it drops its least significant context slots to its target, from
                                 every layer it holds                                              (C.2, D, F)
    depth_first(run, h, i)       node h.i after its subtree: left subtree, right subtree, merge, the node —
                                 the order that keeps memory logarithmic                                  (E, G)
    level_order(run)             every leaf, then every level-1 node, ...: the same numbers, more memory
    homer_prefill(...)           the checks, one traversal from the root, the root's logits

A `Run` holds what every node of one prefill shares (the model, the plan, the prompt, how slots are scored, the
live-KV meter). The concepts each step uses have a module each: plan.py, chunking.py, reduction.py,
merging.py, refinement.py, traversal.py (the meter and the memory bounds), calibration.py.

The root's output is a cache with the same K slots in all L layers, their positions (reused, not monotonic),
and the last slot's logits (every kept slot's with `all_logits`). New tokens continue at positions
last_position + 1, + 2, ... (N.2.5).

Deviations from the official code are listed in each module's docstring and in the README; the ones that
live here: N.2.5 (generation positions: +1 for the first generated token too; sampling applies to it) and
N.2.7 (batch: one prompt at a time, no hidden batch-size-1 assumption: the API takes one prompt).
"""

from dataclasses import dataclass, field

import torch

from homer_ref.budget import check_fits, kv_bytes
from homer_ref.decoding import check_ids, decode, feed_forward_in_rows
from homer_ref.homer import reduction
from homer_ref.homer.calibration import check_bias
from homer_ref.homer.chunking import Chunk, make_leaf
from homer_ref.homer.cost import homer_bytes
from homer_ref.homer.merging import merge
from homer_ref.homer.plan import HomerConfig, Node, Plan, plan
from homer_ref.homer.refinement import keep_slots
from homer_ref.homer.traversal import TRAVERSALS, LiveKV
from homer_ref.llama import Cache, Llama
from homer_ref.progress import Progress


@dataclass
class NodeTrace:
    """What one tree node did, for readers and for other implementations' tests."""

    level: int
    index: int
    layers: tuple[int, int]  # [first, last) decoder layers run
    target: int
    input_positions: torch.Tensor  # [n] positions of its input slots
    input_sources: torch.Tensor  # [n] prompt index of each input slot (prefix + context + suffix; `Plan.part`)
    scores: torch.Tensor | None  # [n] float32 significance at its last layer (+inf on affixes); None if no pruning
    kept: torch.Tensor  # [K] ascending indices into its input slots
    removed: torch.Tensor  # [n-K] ascending indices into its input slots
    # Checkpoints, recorded only when asked (`homer_prefill(..., checkpoints=True)`): the node's state at its end,
    # so that another implementation's forward pass can be checked node by node (docs/TRACE_FORMAT.md).
    hidden: torch.Tensor | None = None  # [K, D] the hidden states it hands up (after its last layer's MLP)
    keys: list[torch.Tensor] | None = None  # per layer it ran, layers[0] .. layers[1]-1: [Hkv, K, Dh] after RoPE
    values: list[torch.Tensor] | None = None  # per layer it ran: [Hkv, K, Dh]

    @property
    def name(self) -> str:
        """ "node h.i": level h, index i (as `plan.Node.name` and the trace format's `node.h.i.*`)."""
        return f"node {self.level}.{self.index}"


@dataclass
class HomerCache:
    """The compact result of a HOMER prefill: an ordinary KV cache with the same K slots in every layer."""

    keys: list[torch.Tensor]  # L x [Hkv, K, Dh], after RoPE
    values: list[torch.Tensor]  # L x [Hkv, K, Dh]
    positions: torch.Tensor  # [K] int64 position id of each slot
    sources: torch.Tensor  # [K] int64 prompt index of each slot (prefix + context + suffix; `Plan.part`)
    logits: torch.Tensor  # [1, V] (the last slot's) or [K, V] with all_logits; float32 (float64 for a float64 model)
    last_position: int  # position id of the last slot (the last suffix token)
    nodes: list[NodeTrace]  # in execution order
    plan: Plan
    peak_kv_token_layers: int  # measured by the traversal
    peak_kv_bytes: int
    kv_timeline: list[int]

    def model_cache(self) -> Cache:
        """The cache in `Llama.forward_cached`'s layout: per layer (k, v) [1, Hkv, K, Dh]."""
        return [(k[None], v[None]) for k, v in zip(self.keys, self.values)]

    def slot_sources(self) -> list[tuple[str, int]]:
        """Which prompt token each final slot holds: ("prefix", i), ("context", i) or ("suffix", i)."""
        return [self.plan.part(int(s)) for s in self.sources]

    def node(self, level: int, index: int) -> NodeTrace:
        """The trace of tree node h.i = (level, index): level 0 the leaves, `plan.H` the root."""
        return next(t for t in self.nodes if (t.level, t.index) == (level, index))


@dataclass
class Run:
    """What every node of one prefill shares: the model, the plan, the prompt's three parts, how slots are scored
    (`reduction`, `bias` [L, width >= M] on the model's device, `seed`), and what is recorded on the way."""

    model: Llama
    plan: Plan
    prefix_ids: list[int]
    context_ids: list[int]
    suffix_ids: list[int]
    bias: torch.Tensor | None = None  # for reduction="calibrated"
    checkpoints: bool = False  # keep every node's outputs in its NodeTrace
    meter: LiveKV = field(default_factory=LiveKV)  # the live KV, observed at every layer of every node
    traces: list[NodeTrace] = field(default_factory=list)  # in execution order
    progress: Progress | None = None  # advanced by each node's token-layers (`plan_work`)


@torch.no_grad()
def leaf_chunk(run: Run, i: int) -> Chunk:
    """Leaf i before its first layer: embedded tokens, local positions, reduction mask and sources (B.2-B.4)."""
    device = run.model.embed_tokens.weight.device
    leaf = make_leaf(run.plan, i, run.prefix_ids, run.context_ids, run.suffix_ids, device)
    return Chunk(run.model.embed_tokens(leaf.ids), leaf.positions, leaf.is_context, leaf.sources)


def significance(run: Run, node: Node, layer: int, last_logits: torch.Tensor | None, chunk: Chunk) -> torch.Tensor:
    """The scores [n] that node h.i prunes by at `layer`, in the plan's reduction mode (D.1-D.3, N.2.4)."""
    mode = run.plan.config.reduction
    if mode == "random":
        return reduction.random_significance(run.plan.config.seed, node.level, node.index, chunk.is_context)
    row = run.bias[layer] if mode == "calibrated" else None
    return reduction.significance(last_logits[0], chunk.positions, chunk.is_context, row)


@torch.no_grad()
def run_node(run: Run, node: Node, chunk: Chunk) -> tuple[Chunk, NodeTrace]:
    """Node h.i on its input `chunk` (n slots): its block of layers; at the last one, between attention and MLP
    (C.2), the n - target least significant context slots go, from every layer it holds (F). Returns the node's
    output (its K/V for layers 0 .. last-1) and its record."""
    model, n = run.model, len(chunk)
    positions, sources = chunk.positions, chunk.sources  # the input's, for the record
    first, last = node.layers
    scores, kept, removed = None, torch.arange(n, device=positions.device), torch.arange(0, device=positions.device)
    prunes = n > node.target
    for layer in range(first, last):
        reduces = layer == last - 1 and prunes
        asks = reduces and run.plan.config.reduction != "random"  # the last query's logits
        h, keys, values, last_logits = model.attend(layer, chunk.h[None], chunk.positions, last_query=asks)
        chunk.h = h[0]
        chunk.keys.append(keys[0])  # [Hkv, n, Dh]
        chunk.values.append(values[0])
        run.meter.observe(chunk)
        if reduces:
            scores = significance(run, node, layer, last_logits, chunk)
            kept, removed = reduction.select(scores, n - node.target)
            chunk = keep_slots(chunk, kept)  # propagative refinement (F)
        chunk.h = feed_forward_in_rows(model, layer, chunk.h[None])[0]  # a chunk longer than MLP_ROWS: in rows
    if run.progress is not None:
        run.progress.update(n * (last - first))
    ends = (chunk.h, chunk.keys[first:last], chunk.values[first:last]) if run.checkpoints else (None, None, None)
    return chunk, NodeTrace(node.level, node.index, node.layers, node.target, positions, sources, scores, kept,
                            removed, *ends)  # fmt: skip


def depth_first(run: Run, level: int, index: int) -> Chunk:
    """Node h.i = (level, index) after its whole subtree, in post-order: left subtree, then right subtree, merge,
    the node. While the right subtree runs, the finished left child is the only state this level holds (G.2)."""
    node = run.plan.nodes[(level, index)]
    if level == 0:
        chunk, trace = run_node(run, node, leaf_chunk(run, index))
    else:
        left = depth_first(run, level - 1, 2 * index)
        run.meter.hold(left)  # the one finished sibling this level keeps while the right subtree runs
        right = depth_first(run, level - 1, 2 * index + 1)
        run.meter.release(left)
        chunk, trace = run_node(run, node, merge(left, right, run.plan.P, run.plan.S))  # merge frees both
    run.traces.append(trace)
    return chunk


def level_order(run: Run) -> Chunk:
    """Every leaf, then every level-1 node, ..., the root: bit-identical to depth-first, but a whole level is
    alive at once, so memory grows linearly with the input (G)."""
    p, finished = run.plan, []
    for i in range(p.N):
        chunk, trace = run_node(run, p.nodes[(0, i)], leaf_chunk(run, i))
        run.traces.append(trace)
        run.meter.hold(chunk)
        finished.append(chunk)
    for level in range(1, p.H + 1):
        parents = []
        for index in range(p.N >> level):
            left, right = finished[2 * index], finished[2 * index + 1]
            run.meter.release(left)
            run.meter.release(right)
            chunk, trace = run_node(run, p.nodes[(level, index)], merge(left, right, p.P, p.S))
            run.traces.append(trace)
            run.meter.hold(chunk)
            parents.append(chunk)
        finished = parents
    run.meter.release(finished[0])
    return finished[0]


def plan_work(p: Plan) -> int:
    """Token-layers a prefill runs (input slots x layers, summed over the nodes): what `Run.progress` counts."""
    return sum(p.input_len(node) * (node.layers[1] - node.layers[0]) for node in p.nodes.values())


def check_inputs(
    model: Llama, ids: tuple, config: HomerConfig | Plan, bias: torch.Tensor | None, traversal: str, all_logits: bool
) -> tuple[list[list[int]], Plan, torch.Tensor | None]:
    """Every check made before any work (ids, settings, bias, memory): the ids as lists, the plan, the bias."""
    cfg, device = model.cfg, model.embed_tokens.weight.device
    ids = [check_ids(x, cfg.vocab_size, name) for x, name in zip(ids, ("prefix_ids", "context_ids", "suffix_ids"))]
    P, C, S = map(len, ids)
    if isinstance(config, Plan):  # made by the caller for these lengths (a command prints it first)
        p = config
        if (p.L, p.P, p.C, p.S) != (cfg.num_hidden_layers, P, C, S):
            raise ValueError(
                f"the plan is for L={p.L} and P, C, S = {p.P}, {p.C}, {p.S}, but the model has "
                f"{cfg.num_hidden_layers} layers and the prompt {P}, {C}, {S} tokens: make it with plan() for them"
            )
    else:
        p = plan(cfg.num_hidden_layers, config, P, C, S)
    if traversal not in TRAVERSALS:
        raise ValueError(f"traversal must be one of {', '.join(TRAVERSALS)}, got {traversal!r}")
    itemsize = model.embed_tokens.weight.element_size()
    fix = "use a smaller max_chunk_len / target_len, a shorter context, or the depth_first traversal"
    needed = homer_bytes(cfg, p, traversal, itemsize, all_logits)
    check_fits(needed, f"HOMER on {P + C + S} tokens ({p.N} leaves)", fix, device)
    if bias is not None:
        return ids, p, check_bias(bias, cfg.num_hidden_layers, p.M).to(device)
    if p.config.reduction == "calibrated" and p.prunes:
        raise ValueError(
            "reduction='calibrated' needs a bias table: homer_ref.bias.bias_for(model, tokenizer, max_chunk_len) "
            "finds or computes one (`python -m homer_ref.calibrate` writes one), or choose "
            "reduction='uncalibrated' or 'random'"
        )
    return ids, p, None


@torch.no_grad()
def homer_prefill(
    model: Llama,
    prefix_ids: list[int],
    context_ids: list[int],
    suffix_ids: list[int],
    config: HomerConfig | Plan,  # the settings, or the plan already made from them for these lengths
    bias: torch.Tensor | None = None,  # [L, width] with width >= M, for reduction="calibrated"
    traversal: str = "depth_first",
    all_logits: bool = False,  # the logits of every kept slot (traces, tutorials), or only the last (generation)
    checkpoints: bool = False,  # keep every node's outputs in its NodeTrace (the trace command's --checkpoints)
    progress: Progress | None = None,  # advanced by token-layers, plan_work(plan) in all
) -> HomerCache:
    """Compress prefix + context + suffix into a compact cache with HOMER.

    `checkpoints=True` also keeps every node's output hidden states and the K/V of the layers it ran in its
    `NodeTrace` (for the trace command's `--checkpoints`; memory grows with the whole tree, not logarithmically).
    """
    ids, p, bias = check_inputs(model, (prefix_ids, context_ids, suffix_ids), config, bias, traversal, all_logits)
    run = Run(model, p, *ids, bias=bias, checkpoints=checkpoints, progress=progress)
    root = depth_first(run, p.H, 0) if traversal == "depth_first" else level_order(run)
    logits = model.logits(root.h[None] if all_logits else root.h[None, -1:])[0]  # [K or 1, V]
    if not torch.isfinite(logits).all():  # reported, not handed on: NaN/Inf would poison every later step
        raise RuntimeError(
            f"HOMER produced NaN/Inf logits: the model's weights hold NaN/Inf or it overflowed in {logits.dtype}; "
            "check the checkpoint or run in float32"
        )
    return HomerCache(
        keys=root.keys,
        values=root.values,
        positions=root.positions,
        sources=root.sources,
        logits=logits,
        last_position=int(root.positions[-1]),
        nodes=run.traces,
        plan=p,
        peak_kv_token_layers=run.meter.peak_token_layers,
        peak_kv_bytes=run.meter.peak_bytes,
        kv_timeline=run.meter.timeline,
    )


@torch.no_grad()
def continuation_logits(model: Llama, cache: HomerCache, tokens: list[int]) -> torch.Tensor:
    """Teacher-forced logits [n, V] of `tokens` fed after the compact cache at last_position + 1, + 2, ..."""
    device = model.embed_tokens.weight.device
    tokens = check_ids(tokens, model.cfg.vocab_size, "tokens")
    x = torch.tensor([tokens], dtype=torch.long, device=device)
    positions = cache.last_position + 1 + torch.arange(len(tokens), device=device)
    return model.forward_cached(x, positions, cache.model_cache())[0][0]


@torch.no_grad()
def homer_generate(model: Llama, cache: HomerCache, max_new_tokens: int, **sampling) -> list[int]:
    """Decode after the compact cache; every generated token, the first included, at last_position + 1 + t."""
    if isinstance(max_new_tokens, int) and max_new_tokens > 0:  # else `decode` says what is wrong with it
        w, slots = model.embed_tokens.weight, len(cache.positions) + max_new_tokens
        needed = kv_bytes(model.cfg, slots * model.cfg.num_hidden_layers, w.element_size())
        check_fits(needed, f"generating {max_new_tokens} tokens", "generate fewer tokens", w.device)
    return decode(model, cache.logits[-1], cache.model_cache(), cache.last_position + 1, max_new_tokens, **sampling)
