"""Where HOMER's calibration table comes from: one policy for every command and for the Python API.

    table = bias_for(model, tokenizer, max_chunk_len, bias=None, model_path=None)   # a BiasTable(tensor, source)

`reduction="calibrated"` needs a table [L, width] covering the distances < M (HOMER_SPEC.md D.2, N.2.4). In order:

1. `bias`: a tensor, or the path of a safetensors file (the commands' --bias), used as it is;
2. `homer_bias.safetensors` beside the model (`model_path`), when it covers M;
3. the user cache, `$HOMER_REF_CACHE`, else `$XDG_CACHE_HOME/homer_ref`, else `~/.cache/homer_ref`: one file per
   model *content* (not its path), compute dtype and calibration text; any table at least M wide serves;
4. otherwise computed once on the default calibration text, saved into the cache atomically, and stderr says
   where it went and what it cost. The next run finds it in step 3.

The default calibration text is `homer_ref/data/calibration/text.txt`: 9,000 words of ordinary English prose
written for this project (twelve encyclopedic topics and a short story; MIT), shipped with the package because
nothing may be downloaded at run time. The official scripts calibrate on ordinary text too (WikiText windows).
`CALIBRATION_WINDOWS` windows of M tokens spread evenly over it (overlapping when the text is short); a text
shorter than M tokens gives windows of its whole length and the remaining distances the last measured value
(metadata `measured_width`).

A cached table is never used silently for something else: its metadata (the model's content key, dtype, layer
count, width, the calibration tokens' hash) is checked against the run's, and a file that disagrees or cannot be
read is recomputed (stderr says why). A cache directory that cannot be written (read-only, full) leaves the
table computed in memory for this run, with a one-line warning. An interrupted calibration leaves no file
behind (the table is written to a temporary file and renamed).

The content key is a SHA-256 of the model's config and of 65,536 evenly spaced values of every weight tensor (in
the compute dtype): two copies of one checkpoint share a table, a fine-tune of it does not.
"""

import hashlib
import json
import os
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors import safe_open

from homer_ref.atomic import save_atomic
from homer_ref.data import CALIBRATION_TEXT
from homer_ref.homer.calibration import calibrate_on_context, check_bias, load_bias
from homer_ref.llama import Llama
from homer_ref.loading import Tokenizer
from homer_ref.progress import progress_bar

BIAS_FILE = "homer_bias.safetensors"  # where a model directory keeps its calibration table
CACHE_ENV = "HOMER_REF_CACHE"
CALIBRATION_WINDOWS = 4  # windows of M tokens: the user's first run computes them (see the README's benchmark)
SAMPLED_VALUES = 65536  # per weight tensor, in the content key


class BiasTable(NamedTuple):
    table: torch.Tensor  # [L, width] float32, width >= M
    source: str  # where it came from, for people: "--bias FILE", "beside the model: ...", "cache: ...", ...


def cache_dir() -> Path:
    """The user cache of calibration tables: $HOMER_REF_CACHE, else $XDG_CACHE_HOME/homer_ref, else ~/.cache."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "homer_ref"


def model_key(model: Llama) -> str:
    """SHA-256 (hex) of the model's config and of SAMPLED_VALUES evenly spaced values of every parameter."""
    digest = hashlib.sha256(repr(model.cfg).encode())
    for name, p in model.named_parameters():
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // SAMPLED_VALUES)
        digest.update(f"{name}:{p.dtype}:{tuple(p.shape)}".encode())
        digest.update(flat[::step].contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


def text_ids(tokenizer: Tokenizer) -> list[int]:
    """The default calibration text in the model's tokens (no BOS)."""
    return tokenizer.encode(CALIBRATION_TEXT.read_text(encoding="utf-8"), bos=False)


def beside(model_path) -> Path | None:
    """`homer_bias.safetensors` in the model's directory (or beside the model file), if there is one."""
    if model_path is None:
        return None
    path = Path(model_path)
    found = (path if path.is_dir() else path.parent) / BIAS_FILE
    return found if found.is_file() else None


def _say(report: Callable[[str], None] | None, message: str) -> None:
    (report or (lambda m: print(m, file=sys.stderr, flush=True)))(message)


def _cached(path: Path, expected: dict[str, str], max_chunk_len: int, report) -> torch.Tensor | None:
    """The cached table at `path` if its metadata matches `expected` and it covers M; else None (said why)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata, table = f.metadata() or {}, f.get_tensor("bias")
    except Exception as e:  # safetensors raises several types for damaged files
        _say(report, f"bias: the cached table {path} cannot be read ({type(e).__name__}); recomputing it")
        return None
    wrong = [k for k, v in expected.items() if metadata.get(k) != v]
    if wrong:
        _say(report, f"bias: the cached table {path} was made for another {', '.join(wrong)}; recomputing it")
        return None
    if table.dim() != 2 or table.shape[0] != int(expected["layers"]) or not torch.isfinite(table).all():
        _say(report, f"bias: the cached table {path} is damaged; recomputing it")
        return None
    if table.shape[1] < max_chunk_len:
        _say(report, f"bias: the cached table {path} covers distances < {table.shape[1]}, M is {max_chunk_len}; "
                     "recomputing it wider")  # fmt: skip
        return None
    return table


def bias_for(
    model: Llama,
    tokenizer: Tokenizer | None,
    max_chunk_len: int,
    bias: torch.Tensor | str | os.PathLike | None = None,
    model_path: str | os.PathLike | None = None,
    report: Callable[[str], None] | None = None,
) -> BiasTable:
    """The calibration table for `model` at M = `max_chunk_len`, by the policy of the module docstring.

    `report(message)` receives the one-line notes (where the table came from, what computing it cost, why a
    cached file was not used); by default they go to stderr."""
    L = model.cfg.num_hidden_layers
    if isinstance(bias, torch.Tensor):
        return BiasTable(check_bias(bias, L, max_chunk_len), "given")
    if bias is not None:
        return BiasTable(check_bias(load_bias(bias), L, max_chunk_len), f"--bias {bias}")
    found = beside(model_path)
    if found is not None:
        table = load_bias(found)
        if table.shape[1] >= max_chunk_len:
            return BiasTable(check_bias(table, L, max_chunk_len), f"beside the model: {found}")
    if tokenizer is None:
        raise ValueError(
            "reduction='calibrated' needs a calibration table: none given, none beside the model, and computing one "
            "reads the calibration text with the model's tokenizer, which it lacks; pass a tokenizer or --bias"
        )
    ids = text_ids(tokenizer)
    dtype = str(model.embed_tokens.weight.dtype).removeprefix("torch.")
    key = model_key(model)
    tokens = hashlib.sha256(json.dumps(ids).encode()).hexdigest()  # the text, in these tokens
    expected = {"model_key": key, "dtype": dtype, "layers": str(L), "calibration_tokens": tokens}
    path = cache_dir() / f"bias-{key[:20]}-{dtype}.safetensors"
    if path.is_file():
        table = _cached(path, expected, max_chunk_len, report)
        if table is not None:
            return BiasTable(check_bias(table, L, max_chunk_len), f"cache: {path}")
    t0, width, n = time.perf_counter(), min(max_chunk_len, len(ids)), CALIBRATION_WINDOWS
    with progress_bar(n * L, f"calibrating on {n} windows of {width} tokens", "layer") as bar:
        table = calibrate_on_context(model, ids, max_chunk_len, n, bar)  # [L, M]
    cost = f"{n} windows of {width} tokens of {CALIBRATION_TEXT.name}, {time.perf_counter() - t0:.0f} s"
    metadata = expected | {"width": str(max_chunk_len), "measured_width": str(width), "windows": str(n)}
    metadata |= {"text": str(CALIBRATION_TEXT.relative_to(CALIBRATION_TEXT.parents[2]))}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        save_atomic({"bias": table.contiguous()}, path, metadata)
    except OSError as e:
        _say(report, f"warning: bias: cannot save the calibration table in {path.parent} ({e.strerror or e}); "
                     "computed in memory for this run only")  # fmt: skip
        return BiasTable(table, f"computed in memory ({cost})")
    _say(report, f"bias: computed once ({cost}) and saved to {path}")
    return BiasTable(table, f"computed ({cost}), saved to {path}")
