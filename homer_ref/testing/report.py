"""The outcome of comparing two traces: a `Report` of `Divergence`s in execution order, and the names and numbers
its messages use (slots named by their part of the prompt, floats and layer spans formatted alike everywhere).
Every message form is listed in docs/TRACE_FORMAT.md ("Comparing two traces").
"""

import json
import math
from dataclasses import dataclass, field

import numpy as np


@dataclass(frozen=True)
class Divergence:
    where: str  # "node 1.0, layer 5", "final cache, layer 3", "logits", "metadata 'input'", ...
    what: str  # one sentence: what differs, the first differing element, expected vs got

    def __str__(self) -> str:
        return f"{self.where}: {self.what}"


@dataclass
class Report:
    """The outcome of `compare_traces`: every divergence, in execution order."""

    expected: str
    actual: str
    atol: float
    rtol: float
    divergences: list[Divergence] = field(default_factory=list)
    summary: str = ""  # what was compared: nodes, layers, slots

    @property
    def ok(self) -> bool:
        return not self.divergences

    @property
    def first_divergence(self) -> str | None:
        """The first divergence in execution order, as one line; None when the traces match."""
        return str(self.divergences[0]) if self.divergences else None

    def to_dict(self) -> dict:
        return {
            "ok": self.ok,
            "expected": self.expected,
            "actual": self.actual,
            "atol": self.atol,
            "rtol": self.rtol,
            "compared": self.summary,
            "first_divergence": self.first_divergence,
            "divergences": [{"where": d.where, "what": d.what} for d in self.divergences],
        }

    def format(self, limit: int | None = 20) -> str:
        head = f"expected: {self.expected}\nactual:   {self.actual}\n"
        tol = f"atol {self.atol:g}, rtol {self.rtol:g}"
        if self.ok:
            return head + f"traces match ({self.summary}; {tol})"
        lines = [head + f"traces DIVERGE: {len(self.divergences)} divergence(s) ({self.summary}; {tol})"]
        lines.append(f"first divergence: {self.first_divergence}")
        lines.append("all, in execution order:")
        shown = self.divergences if limit is None else self.divergences[:limit]
        lines += [f"  {i + 1}. {d}" for i, d in enumerate(shown)]
        if len(shown) < len(self.divergences):
            lines.append(f"  ... and {len(self.divergences) - len(shown)} more")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.format()


def fmt_float(x: float) -> str:
    return f"{x:.4f}" if math.isfinite(x) and abs(x) < 1e4 else f"{x:.4g}"


def layer_span(layers: np.ndarray) -> str:
    first, last = int(layers[0]), int(layers[1])
    return f"{first}-{last - 1}" if last > first else f"none ([{first}, {last}))"


def short_text(value) -> str:
    if value is None:
        return "absent"
    text = json.dumps(value.tolist() if isinstance(value, np.ndarray) else value)
    return text if len(text) <= 60 else text[:57] + "..."


def bad_floats(expected: np.ndarray, actual: np.ndarray, atol: float, rtol: float) -> np.ndarray:
    """Boolean mask of elements outside tolerance; infinities must match exactly, NaN never passes."""
    with np.errstate(invalid="ignore"):  # inf - inf
        close = np.isfinite(expected) & (np.abs(actual - expected) <= atol + rtol * np.abs(expected))
    same_inf = np.isinf(expected) & (expected == actual)
    return ~(close | same_inf)


def abs_diff(expected: np.ndarray, actual: np.ndarray) -> np.ndarray:
    """|actual - expected|, with NaN (including inf - inf of unequal infinities) counted as +inf."""
    with np.errstate(invalid="ignore"):
        diff = np.abs(actual - expected)
    diff[(expected == actual)] = 0.0  # equal infinities
    return np.where(np.isnan(diff), np.inf, diff)


class SlotNames:
    """Names the slots of one list (a node's input, or the final cache) by their part of the prompt:
    "slot 11 (context token 9, position 11)". From the expected trace: its positions, its sources when it has
    them (else the part only, from the slot's place: the first P slots are the prefix, the last S the suffix)."""

    def __init__(self, positions: np.ndarray, sources: np.ndarray | None, affixes: tuple[int, int, int] | None):
        self.positions, self.sources, self.affixes = positions, sources, affixes

    def part(self, slot: int) -> str | None:
        """'context token 9' (or 'context' when the sources are unknown); None without the input metadata."""
        if self.affixes is None:
            return None
        P, C, S = self.affixes
        if self.sources is not None:
            s = int(self.sources[slot])
            return (
                f"prefix token {s}" if s < P else f"context token {s - P}" if s < P + C else f"suffix token {s - P - C}"
            )
        n = self.positions.size
        return f"prefix token {slot}" if slot < P else f"suffix token {slot - n + S}" if slot >= n - S else "context"

    def name(self, slot: int, position: bool = True) -> str:
        """'slot 11 (context token 9, position 11)'; without the position when `position` is False."""
        details = [self.part(slot)] + ([f"position {int(self.positions[slot])}"] if position else [])
        details = [d for d in details if d]
        return f"slot {slot} ({', '.join(details)})" if details else f"slot {slot}"

    def counts(self) -> str:
        """'2 prefix + 12 context + 2 suffix' (empty without the input metadata)."""
        if self.affixes is None:
            return ""
        P, C, S = self.affixes
        if self.sources is not None:
            P, S = int((self.sources < P).sum()), int((self.sources >= P + C).sum())
        return f"{P} prefix + {self.positions.size - P - S} context + {S} suffix"
