"""Files written whole or not at all: a temporary file beside the target, then a rename (POSIX `rename` replaces
atomically), so that an interrupted run leaves no partial file and an older output stays as it was."""

import os
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors.torch import save_file

_UMASK = os.umask(0o022)  # read once (the only way to read it is to set it), then restored on the next line
os.umask(_UMASK)


def replace_atomic(path: Path, write: Callable[[str], None]) -> None:
    """`write(tmp)` a temporary file beside `path`, then rename it: an interrupted run leaves no partial file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.close(fd)
        write(tmp)
        os.chmod(tmp, 0o666 & ~_UMASK)  # mkstemp makes the file private; give it the mode a plain open would
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def save_atomic(tensors: dict[str, torch.Tensor], path: Path, metadata: dict[str, str]) -> None:
    """A safetensors file, written atomically (`replace_atomic`)."""
    replace_atomic(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))
