"""HOMER prefill: a long prompt in, a compact KV cache out (HOMER_SPEC.md M, N); and what to do with it.

`homer_prefill` ties the concepts together, one module each:
    plan.py        E, N, H, e, the layer schedule, every node's target          (B.1, C.1, D.4)
    chunking.py    leaves: [prefix | context slice | suffix], local positions    (B.2-B.4)
    reduction.py   significance of the last query, the k lowest removed         (C.2, D.1-D.3)
    merging.py     [avg prefix | left ctx | right ctx | avg suffix]             (E)
    refinement.py  a pruning decision applied to every lower layer's cache      (F)
    traversal.py   depth-first order with children freed, and a live-KV meter   (G)

A node runs its block of layers; at the *last* layer of the block, after attention and before the MLP, it
drops len - target context tokens (C.2), and the same slots are dropped from every lower layer's cache.
The root's output is a cache with the same K slots in all L layers, their positions (reused, not monotonic),
and the logits of every kept slot. New tokens continue at positions last_position + 1, + 2, ... (N.2.5).

Deviations from the official code are listed in each module's docstring and in the README; the ones that
live here: N.2.5 (generation positions: +1 for the first generated token too; sampling applies to it) and
N.2.7 (batch: one prompt at a time, no hidden batch-size-1 assumption: the API takes one prompt).
"""

from dataclasses import dataclass

import torch

from homer_ref.budget import activation_bytes, check_fits, kv_bytes
from homer_ref.decoding import check_ids, decode
from homer_ref.homer import reduction
from homer_ref.homer.chunking import Chunk, make_leaf
from homer_ref.homer.merging import merge
from homer_ref.homer.plan import HomerConfig, Node, Plan, plan
from homer_ref.homer.refinement import keep_slots
from homer_ref.homer.traversal import TRAVERSALS, LiveKV, depth_first, level_order, simulate_live_kv
from homer_ref.llama import Cache, Llama, LlamaConfig


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
        """The trace of tree node (level, index): level 0 the leaves, `plan.H` the root."""
        return next(t for t in self.nodes if (t.level, t.index) == (level, index))


def check_bias(bias: torch.Tensor, num_layers: int, max_chunk_len: int) -> torch.Tensor:
    """The bias table as float32 [L, R], or a ValueError naming what is wrong with it."""
    if not isinstance(bias, torch.Tensor) or not bias.is_floating_point() or bias.dim() != 2:
        raise ValueError("the bias table must be a float tensor [num_layers, R]; compute one with homer_ref.calibrate")
    if bias.shape[0] != num_layers:
        raise ValueError(f"the bias table has {bias.shape[0]} layers but the model has {num_layers}: wrong model?")
    if bias.shape[1] < max_chunk_len:
        raise ValueError(
            f"the bias table covers distances < {bias.shape[1]} but max_chunk_len is {max_chunk_len}: "
            f"recalibrate with --max-chunk-len {max_chunk_len} or lower max_chunk_len"
        )
    if not torch.isfinite(bias).all():
        raise ValueError("the bias table holds NaN or Inf values; recalibrate it")
    return bias.to(torch.float32)


def homer_bytes(cfg: LlamaConfig, p: Plan, traversal: str, itemsize: int, all_logits: bool = False) -> int:
    """HOMER's prefill: its peak live KV (from the plan alone), one chunk's activations and the final logits."""
    chunk = min(p.M, p.P + p.C + p.S)
    return (
        kv_bytes(cfg, max(simulate_live_kv(p, traversal)), itemsize)
        + activation_bytes(cfg, chunk, itemsize)
        + (p.final_len if all_logits else 1) * cfg.vocab_size * max(itemsize, 4)
    )


def check_inputs(
    model: Llama, ids: tuple, config: HomerConfig, bias: torch.Tensor | None, traversal: str, all_logits: bool
) -> tuple[list[list[int]], Plan, torch.Tensor | None]:
    """Every check made before any work (ids, settings, bias, memory): the ids as lists, the plan, the bias."""
    cfg, device = model.cfg, model.embed_tokens.weight.device
    ids = [check_ids(x, cfg.vocab_size, name) for x, name in zip(ids, ("prefix_ids", "context_ids", "suffix_ids"))]
    P, C, S = map(len, ids)
    p = plan(cfg.num_hidden_layers, config, P, C, S)
    if traversal not in TRAVERSALS:
        raise ValueError(f"traversal must be one of {', '.join(TRAVERSALS)}, got {traversal!r}")
    itemsize = model.embed_tokens.weight.element_size()
    fix = "use a smaller max_chunk_len / target_len, a shorter context, or the depth_first traversal"
    needed = homer_bytes(cfg, p, traversal, itemsize, all_logits)
    check_fits(needed, f"HOMER on {P + C + S} tokens ({p.N} leaves)", fix, device)
    if bias is not None:
        return ids, p, check_bias(bias, cfg.num_hidden_layers, p.M).to(device)
    if config.reduction == "calibrated" and (p.N > 1 or p.root.target < P + C + S):
        raise ValueError(
            "reduction='calibrated' needs a bias table (compute one with `python -m homer_ref.calibrate`), "
            "or choose reduction='uncalibrated' or 'random'"
        )
    return ids, p, None


@torch.no_grad()
def homer_prefill(
    model: Llama,
    prefix_ids: list[int],
    context_ids: list[int],
    suffix_ids: list[int],
    config: HomerConfig,
    bias: torch.Tensor | None = None,  # [L, R] with R >= M, for reduction="calibrated"
    traversal: str = "depth_first",
    all_logits: bool = False,  # the logits of every kept slot (traces, tutorials), or only the last (generation)
    checkpoints: bool = False,  # keep every node's outputs in its NodeTrace (the trace command's --checkpoints)
) -> HomerCache:
    """Compress prefix + context + suffix into a compact cache with HOMER.

    `checkpoints=True` also keeps every node's output hidden states and the K/V of the layers it ran in its
    `NodeTrace` (for the trace command's `--checkpoints`; memory grows with the whole tree, not logarithmically).
    """
    (prefix_ids, context_ids, suffix_ids), p, bias = check_inputs(
        model, (prefix_ids, context_ids, suffix_ids), config, bias, traversal, all_logits
    )
    device = model.embed_tokens.weight.device
    meter, traces = LiveKV(), []

    def significance(node: Node, layer: int, last_logits: torch.Tensor | None, chunk: Chunk) -> torch.Tensor:  # [n]
        if config.reduction == "random":
            return reduction.random_significance(config.seed, node.level, node.index, chunk.is_context)
        row = bias[layer] if config.reduction == "calibrated" else None
        return reduction.significance(last_logits[0], chunk.positions, chunk.is_context, row)

    def run_layers(node: Node, chunk: Chunk) -> Chunk:
        """The node's block of layers; at its last layer, prune to the target between attention and MLP (C.2)."""
        inputs, n = chunk, len(chunk)
        first, last = node.layers
        scores, kept, removed = None, torch.arange(n, device=device), torch.arange(0, device=device)
        prunes = n > node.target  # at the node's last layer, between attention and MLP
        for layer in range(first, last):
            asks = layer == last - 1 and prunes and config.reduction != "random"  # the last query's logits
            h, keys, values, last_logits = model.attend(layer, chunk.h[None], chunk.positions, last_query=asks)
            chunk.h = h[0]
            chunk.keys.append(keys[0])  # [Hkv, n, Dh]
            chunk.values.append(values[0])
            meter.observe(chunk)
            if layer == last - 1 and prunes:
                scores = significance(node, layer, last_logits, chunk)
                kept, removed = reduction.select(scores, n - node.target)
                chunk = keep_slots(chunk, kept)  # propagative refinement (F)
            chunk.h = model.feed_forward(layer, chunk.h[None])[0]
        record = (node.level, node.index, node.layers, node.target, inputs.positions, inputs.sources)
        ends = (chunk.h, chunk.keys[first:last], chunk.values[first:last]) if checkpoints else (None, None, None)
        traces.append(NodeTrace(*record, scores, kept, removed, *ends))
        return chunk

    def run_leaf(i: int) -> Chunk:
        leaf = make_leaf(p, i, prefix_ids, context_ids, suffix_ids, device)
        return run_layers(p.nodes[(0, i)], Chunk(model.embed_tokens(leaf.ids), *leaf[1:]))

    walk = depth_first if traversal == "depth_first" else level_order
    root = walk(p, run_leaf, run_layers, lambda a, b: merge(a, b, p.P, p.S), meter)
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
        nodes=traces,
        plan=p,
        peak_kv_token_layers=meter.peak_token_layers,
        peak_kv_bytes=meter.peak_bytes,
        kv_timeline=meter.timeline,
    )


@torch.no_grad()
def continuation_logits(model: Llama, cache: HomerCache, tokens: list[int]) -> torch.Tensor:
    """Teacher-forced logits [T, V] of `tokens` fed after the compact cache at last_position + 1, + 2, ..."""
    device = model.embed_tokens.weight.device
    tokens = check_ids(tokens, model.cfg.vocab_size, "tokens")
    x = torch.tensor([tokens], dtype=torch.long, device=device)
    positions = cache.last_position + 1 + torch.arange(len(tokens), device=device)
    return model.forward_cached(x, positions, cache.model_cache(), all_logits=True)[0][0]


@torch.no_grad()
def homer_generate(model: Llama, cache: HomerCache, max_new_tokens: int, **sampling) -> list[int]:
    """Decode after the compact cache; every generated token, the first included, at last_position + 1 + t."""
    if isinstance(max_new_tokens, int) and max_new_tokens > 0:  # else `decode` says what is wrong with it
        w, slots = model.embed_tokens.weight, len(cache.positions) + max_new_tokens
        needed = kv_bytes(model.cfg, slots * model.cfg.num_hidden_layers, w.element_size())
        check_fits(needed, f"generating {max_new_tokens} tokens", "generate fewer tokens", w.device)
    return decode(model, cache.logits[-1], cache.model_cache(), cache.last_position + 1, max_new_tokens, **sampling)
