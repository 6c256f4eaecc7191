"""The answer key: what other HOMER implementations test against.

trace.py        the trace format written (docs/TRACE_FORMAT.md): a HomerCache -> named tensors
validate.py     is it a trace? every name, dtype and shape of the format, checked without an expected trace
read.py         load_trace (a file, tensors, a HomerCache, the NumPy oracle's result); decision margins
report.py       Report and Divergence: what a comparison found, slots named by their part of the prompt
compare.py      compare_traces / assert_traces_match: the first divergence, in execution order
conformance.py  the fixture cases: load them, run an implementation on them, check its traces
"""

from homer_ref.testing.compare import DEFAULT_ATOL, DEFAULT_RTOL, assert_traces_match, compare_traces
from homer_ref.testing.conformance import (
    CaseResult,
    FixtureCase,
    check_case,
    default_fixtures,
    load_cases,
    run_case,
    run_cases,
    run_command,
)
from homer_ref.testing.read import Trace, decision_gaps, decision_margin, load_trace
from homer_ref.testing.report import Report
from homer_ref.testing.validate import validate_trace

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_RTOL",
    "CaseResult",
    "FixtureCase",
    "Report",
    "Trace",
    "assert_traces_match",
    "check_case",
    "compare_traces",
    "decision_gaps",
    "decision_margin",
    "default_fixtures",
    "load_cases",
    "load_trace",
    "run_case",
    "run_cases",
    "run_command",
    "validate_trace",
]
