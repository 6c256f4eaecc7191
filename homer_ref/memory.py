"""The process's memory: freed activations returned to the system, and the resident set measured.

`return_freed_memory` is the setting every command runs with (glibc's malloc otherwise keeps a long prompt's freed
activations). `Measured` times a block of work and reads its peak resident set, as the benchmarks and `eval`
report them; `current_rss` / `peak_rss` / `reset_peak_rss` read Linux's /proc (0 or the lifetime peak elsewhere).
"""

import ctypes
import re
import resource
import time
from pathlib import Path

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter


def return_freed_memory(threshold: int = 1 << 20) -> bool:
    """Have glibc's malloc serve every block of >= `threshold` bytes from its own memory map, so that a freed
    activation goes back to the system at once. True if set; False where the C library is not glibc.

    By default glibc raises that threshold to the largest block freed so far (up to 32 MiB); after a few layers a
    long prompt's activations come from the heap, interleave with the KV cache and are never returned, so the
    resident set stays well above what is alive (tests/test_memory.py shows it). Every command sets this; Python
    API users get the same with the environment variable MALLOC_MMAP_THRESHOLD_=1048576."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(M_MMAP_THRESHOLD, threshold))
    except (OSError, AttributeError):
        return False


class Measured:
    """Wall time, CPU time and peak RSS of one block of work: `with Measured() as m: ...`, then `m.row()`.

    The peak is the process's resident-set high-water mark (Linux `VmHWM`), reset when the block starts (writing 5
    to /proc/self/clear_refs), so that each measured block reports its own peak even in a long-running process.
    Where the reset is unavailable the peak is the process's lifetime `ru_maxrss` (`peak_is_lifetime` says so)."""

    def __enter__(self) -> "Measured":
        self.peak_is_lifetime = not reset_peak_rss()
        self.rss_start = current_rss()
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu
        self.peak = peak_rss()

    def row(self) -> dict:
        """seconds (wall), cpu_seconds (this process), peak_rss_mib and rss_start_mib (resident set at the start)."""
        mib = 2**20
        row = {"seconds": round(self.wall, 2), "cpu_seconds": round(self.cpu, 2)}
        row |= {"peak_rss_mib": round(self.peak / mib), "rss_start_mib": round(self.rss_start / mib)}
        return row | ({"peak_rss_is_lifetime": True} if self.peak_is_lifetime else {})


def _status_kib(field: str) -> int | None:
    try:
        match = re.search(rf"^{field}:\s+(\d+) kB", Path("/proc/self/status").read_text(), re.MULTILINE)
    except OSError:
        return None
    return int(match.group(1)) if match else None


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark to its current RSS (Linux >= 4.0); False where that is impossible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        return False
    return _status_kib("VmHWM") is not None


def current_rss() -> int:
    """Bytes resident now (0 where /proc is unavailable)."""
    return (_status_kib("VmRSS") or 0) * 1024


def peak_rss() -> int:
    """Bytes: the peak resident set since the last `reset_peak_rss` (or since the process started)."""
    hwm = _status_kib("VmHWM")
    return hwm * 1024 if hwm is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
