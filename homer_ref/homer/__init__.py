"""HOMER itself: one module per concept, in the order a prompt meets them (HOMER_SPEC.md, docs/).

plan.py         HomerConfig, plan(): E, N, H, e, the layer schedule, every node's target   (B.1, C.1, D.4)
chunking.py     leaves [prefix | context slice | suffix], local positions, reduction mask  (B.2-B.4)
reduction.py    significance of the last query; (score, index) selection                  (C.2, D.1-D.3)
merging.py      [avg prefix | left context | right context | avg suffix]                   (E)
refinement.py   a pruning decision applied to every lower layer's cache                    (F)
traversal.py    depth-first and level-order orders, the live-KV meter, the G.2 bound       (G)
calibration.py  the distance bias table, and reading it from a file                       (D.2, N.2.4)
prefill.py      homer_prefill (the algorithm end to end), continuation, generation         (H, M, N)
"""

from homer_ref.homer.plan import HomerConfig, Plan, plan
from homer_ref.homer.prefill import HomerCache, NodeTrace, continuation_logits, homer_generate, homer_prefill

__all__ = [
    "HomerCache",
    "HomerConfig",
    "NodeTrace",
    "Plan",
    "continuation_logits",
    "homer_generate",
    "homer_prefill",
    "plan",
]
