"""HOMER itself: one module per concept, in the order a prompt meets them (HOMER_SPEC.md, docs/).

plan.py         HomerConfig, plan(): E, N, H, e, the layer schedule, every node's target   (B.1, C.1, D.4)
chunking.py     leaves [prefix | context slice | suffix], local positions, reduction mask  (B.2-B.4)
reduction.py    significance of the last query; (score, index) selection                  (C.2, D.1-D.3)
merging.py      [avg prefix | left context | right context | avg suffix]                   (E)
refinement.py   a pruning decision applied to every lower layer's cache                    (F)
traversal.py    the live-KV meter, its simulation from the plan, the G.2 bound             (G)
calibration.py  the distance bias table: computing it, reading it, checking it            (D.2, N.2.4)
cost.py         bytes and multiply-adds of a plan, before any run                          (G, J.4)
prefill.py      the algorithm assembled: leaf_chunk, run_node, depth_first, level_order,
                homer_prefill; continuation and generation                                 (H, M, N)
"""

from homer_ref.homer.plan import HomerConfig, Plan, plan
from homer_ref.homer.prefill import (
    HomerCache,
    NodeTrace,
    Run,
    continuation_logits,
    depth_first,
    homer_generate,
    homer_prefill,
    leaf_chunk,
    level_order,
    run_node,
)

__all__ = [
    "HomerCache",
    "HomerConfig",
    "NodeTrace",
    "Plan",
    "Run",
    "continuation_logits",
    "depth_first",
    "homer_generate",
    "homer_prefill",
    "leaf_chunk",
    "level_order",
    "plan",
    "run_node",
]
