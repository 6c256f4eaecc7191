"""The answer key: what other HOMER implementations test against.

trace.py    the trace format written (docs/TRACE_FORMAT.md): a HomerCache -> named tensors
compare.py  compare_traces / assert_traces_match: the first divergence, in execution order
"""

from homer_ref.testing.compare import (
    DEFAULT_ATOL,
    DEFAULT_RTOL,
    Report,
    Trace,
    assert_traces_match,
    compare_traces,
    decision_gaps,
    decision_margin,
    load_trace,
)

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "Report",
    "Trace",
    "assert_traces_match",
    "compare_traces",
    "decision_gaps",
    "decision_margin",
    "load_trace",
]
