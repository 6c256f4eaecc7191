"""Progress of long work on stderr: a bar with the count, the rate and the time left.

Long steps — a calibration, a long plain or HOMER prefill, an evaluation cell — take a `progress` argument: any
object with `update(n)` (a `Progress`), advanced as the work goes, or None for none. The commands make one with
`progress_bar`, which draws it with tqdm (the `models` extra: `pip install 'homer_ref[models]'`), a small,
well-kept library that handles terminals, rates and nesting; without tqdm a line is printed every 10 seconds.

Bars are shown when stderr is a terminal and left out when it is not (a log file, a pipe, the tests), unless
HOMER_REF_PROGRESS=1 (or a command's --progress) asks for them; HOMER_REF_PROGRESS=0 turns them off everywhere.
"""

import contextlib
import os
import sys
import time
from collections.abc import Iterator
from typing import Protocol

ENV = "HOMER_REF_PROGRESS"


class Progress(Protocol):
    def update(self, n: int = 1) -> object: ...


def shown() -> bool:
    """Whether bars are drawn: HOMER_REF_PROGRESS=1 or 0 decides; else when stderr is a terminal."""
    setting = os.environ.get(ENV, "")
    if setting in ("0", "1"):
        return setting == "1"
    return sys.stderr.isatty()


class Lines:
    """The stand-in without tqdm: `desc: done/total unit (rate/s, ~time left)` at most every `every` seconds."""

    def __init__(self, total: int, desc: str, unit: str, every: float = 10.0):
        self.total, self.desc, self.unit, self.every = total, desc, unit, every
        self.done, self.start = 0, time.perf_counter()
        self.last = self.start

    def update(self, n: int = 1) -> None:
        self.done += n
        now = time.perf_counter()
        if now - self.last >= self.every or self.done >= self.total:
            self.last = now
            rate = self.done / max(now - self.start, 1e-9)
            left = (self.total - self.done) / rate if rate > 0 else float("inf")
            print(f"{self.desc}: {self.done}/{self.total} {self.unit} ({rate:.3g}/s, ~{left:.0f} s left)",
                  file=sys.stderr, flush=True)  # fmt: skip


@contextlib.contextmanager
def progress_bar(total: int, desc: str, unit: str = "it") -> Iterator[Progress | None]:
    """`with progress_bar(total, desc, unit) as bar: ... bar.update(n)`; `bar` is None when bars are not shown
    (`shown`), so that the work skips its updates."""
    if not shown() or total <= 0:
        yield None
        return
    try:
        from tqdm import tqdm
    except ImportError:
        yield Lines(total, desc, unit)
        return
    scaled = total >= 100_000  # "1.2M/3.4M tok-layer" for large counts, exact integers for small ones
    with tqdm(total=total, desc=desc, unit=unit, unit_scale=scaled, file=sys.stderr, dynamic_ncols=True) as bar:
        yield bar
