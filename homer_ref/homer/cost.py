"""What a HOMER prefill costs, from its plan alone (no model run): the bytes it will hold at its peak, checked
before any work (`budget.check_fits`), and its multiply-adds against the plain prefill's (`bench`).

The live KV comes from the traversal's simulated timeline (`traversal.simulate_live_kv`), which the tests check
against the timeline a run measures.
"""

from homer_ref.budget import activation_bytes, kv_bytes
from homer_ref.homer.plan import Plan
from homer_ref.homer.traversal import simulate_live_kv
from homer_ref.llama import LlamaConfig


def homer_bytes(cfg: LlamaConfig, p: Plan, traversal: str, itemsize: int, all_logits: bool = False) -> int:
    """HOMER's prefill: its peak live KV (from the plan alone), one chunk's activations and the final logits."""
    chunk = min(p.M, p.P + p.C + p.S)
    return (
        kv_bytes(cfg, max(simulate_live_kv(p, traversal)), itemsize)
        + activation_bytes(cfg, chunk, itemsize)
        + (p.final_len if all_logits else 1) * cfg.vocab_size * max(itemsize, 4)
    )


def macs(cfg: LlamaConfig, p: Plan) -> dict[str, float]:
    """Multiply-adds of HOMER's prefill and of the plain prefill over the same prompt, attention (QK^T and PV)
    apart from the rest (projections and MLP): plain_attention, plain_other, homer_attention, homer_other."""
    D, F, Hq, Hkv, Dh = (
        cfg.hidden_size,
        cfg.intermediate_size,
        cfg.num_attention_heads,
        cfg.num_key_value_heads,
        cfg.head_dim,
    )
    proj = D * (Hq + 2 * Hkv) * Dh + Hq * Dh * D  # q, k, v, o per token
    mlp = 3 * D * F

    def attention(n: int) -> float:  # causal: n(n+1)/2 query-key pairs, twice (scores and weighted sum)
        return 2 * Hq * Dh * n * (n + 1) / 2

    n_plain = p.P + p.C + p.S
    counts = {
        "plain_attention": cfg.num_hidden_layers * attention(n_plain),
        "plain_other": cfg.num_hidden_layers * n_plain * (proj + mlp),
        "homer_attention": 0.0,
        "homer_other": 0.0,
    }
    for node in p.nodes.values():
        n, (first, last) = p.input_len(node), node.layers
        kept = min(n, node.target)  # the MLP of its last layer runs on the kept slots only
        counts["homer_attention"] += (last - first) * attention(n)
        counts["homer_other"] += (last - first) * n * proj + ((last - first - 1) * n + kept) * mlp
    return counts
