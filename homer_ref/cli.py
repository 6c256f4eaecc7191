"""What every command shares: one-line errors with fixes, exit codes, and progress on stderr.

Exit codes: 0 success, 2 invalid input (bad arguments, files, configurations: a `ValueError`),
1 any other failure at run time, 130 interrupted (Ctrl-C).
"""

import sys
from collections.abc import Callable

import torch

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Call `main(argv)`, turning exceptions into a one-line `error: ...` on stderr and an exit code."""
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except ValueError as e:  # includes CheckpointError and invalid HOMER configurations
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError, MemoryError) as e:
        print(f"error: {type(e).__name__}: {e}", file=sys.stderr)
        return 1


def progress(message: str) -> None:
    """One line of progress on stderr (stdout is kept for results, so commands pipe)."""
    print(message, file=sys.stderr, flush=True)
