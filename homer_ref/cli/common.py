"""What every command shares: one-line errors with fixes, exit codes, and progress on stderr.

Exit codes: 0 success, 2 invalid input (bad arguments, files, configurations: a `ValueError`),
1 any other failure at run time (I/O, memory, an unexpected exception), 130 interrupted (Ctrl-C).
Set HOMER_REF_TRACEBACK=1 to see the traceback of an unexpected exception.
"""

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from homer_ref.loading import CheckpointError, check_tokenizer, load_config, load_model, load_tokenizer
from homer_ref.loading.tokenizer import find_tokenizer_file
from homer_ref.memory import return_freed_memory

DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def run_main(main: Callable[[list[str] | None], int], argv: list[str] | None = None) -> int:
    """Call `main(argv)`, turning exceptions into a one-line `error: ...` on stderr and an exit code. Every
    command runs with `return_freed_memory`."""
    return_freed_memory()
    try:
        return main(argv)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    except ValueError as e:  # includes CheckpointError and invalid HOMER configurations
        print(f"error: {_one_line(e)}", file=sys.stderr)
        return 2
    except (OSError, RuntimeError, MemoryError) as e:
        print(f"error: {type(e).__name__}: {_one_line(e)}", file=sys.stderr)
        return 1
    except Exception as e:  # a bug in homer_ref: still one line, unless asked for the traceback
        if os.environ.get("HOMER_REF_TRACEBACK"):
            raise
        print(
            f"error: unexpected {type(e).__name__}: {_one_line(e)} (a bug in homer_ref: please report it with the "
            "command line; HOMER_REF_TRACEBACK=1 shows the traceback)",
            file=sys.stderr,
        )
        return 1


def _one_line(e: BaseException) -> str:
    """The first line of an exception's message (torch's can span many lines)."""
    lines = str(e).strip().splitlines()
    return lines[0] + (f" [... {len(lines) - 1} more lines]" if len(lines) > 1 else "") if lines else "(no message)"


def check_out(parser: argparse.ArgumentParser, out: Path) -> None:
    """A usage error unless `--out` names a file in an existing directory."""
    if out.is_dir():
        parser.error(f"--out {out} is a directory; give a file name, e.g. {out / 'out.safetensors'}")
    if not out.parent.is_dir():
        parser.error(f"--out {out}: directory {out.parent} does not exist")


def set_threads_for(model: torch.nn.Module) -> None:
    """One torch thread for small models: their matrices are too small to share, and on a busy machine the
    threads' spin-waiting made a 2,048-token HOMER prefill of the shipped model ~80x slower (0.26 s vs 23 s)."""
    if sum(p.numel() for p in model.parameters()) < 50_000_000:
        torch.set_num_threads(1)


def parse_list(text: str, kind, name: str) -> list:
    try:
        values = [kind(v) for v in text.split(",") if v.strip()]
    except ValueError as e:
        raise ValueError(f"--{name}: expected a comma-separated list, got {text!r}") from e
    if not values:
        raise ValueError(f"--{name}: empty list")
    return values


def parse_modes(text: str, allowed: tuple[str, ...], name: str = "modes") -> list[str]:
    modes = parse_list(text, str, name)
    bad = [m for m in modes if m not in allowed]
    if bad:
        raise ValueError(f"--{name}: unknown mode {bad[0]!r}; choose from {', '.join(allowed)}")
    return list(dict.fromkeys(modes))


MODEL_HELP = "HF model directory, .gguf or llama2.c .bin checkpoint"


def command_parser(command: str, description: str) -> argparse.ArgumentParser:
    """The argument parser of `python -m homer_ref.<command>` (also installed as `homer-<command>`)."""
    return argparse.ArgumentParser(prog=f"python -m homer_ref.{command}", description=description)


def progress(message: str) -> None:
    """One line of progress on stderr (stdout is kept for results, so commands pipe)."""
    print(message, file=sys.stderr, flush=True)


def open_tokenizer(model: str, tokenizer: str | None, required: bool = True):
    """The tokenizer of `--tokenizer`, else the model's own (its directory's, or a GGUF file's vocabulary).

    Not `required` (token ids in and out): None when the model has no tokenizer file, instead of an error."""
    if tokenizer is None and not required:
        try:
            found = find_tokenizer_file(Path(model))
        except CheckpointError:
            return None
        if found.suffix == ".gguf":
            from homer_ref.loading.gguf import has_vocabulary

            if not has_vocabulary(found):
                return None
    return load_tokenizer(tokenizer or model)


def open_model(model: str, tokenizer, dtype: torch.dtype = torch.float32, check: Callable | None = None):
    """The model, after the cheap checks: the tokenizer's vocabulary against the model's config, then `check(cfg)`
    (e.g. token ids in range), all before a single weight is read (a large model takes seconds and GBs to load)."""
    cfg = load_config(model)
    if tokenizer is not None:
        check_tokenizer(tokenizer, cfg)
    if check is not None:
        check(cfg)
    loaded = load_model(model, dtype=dtype)
    set_threads_for(loaded)
    return loaded
