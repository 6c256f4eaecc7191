"""The user's path: `python -m homer_ref.generate` as the README shows it, with its defaults, timed from outside.

Every run is a fresh process (`python -m homer_ref.generate --model MODEL --prompt-file FILE`, the defaults
otherwise: 100 new tokens, greedy, M = T = half the trained context, the calibrated reduction), its wall time
measured around it, its CPU time and peak resident set read from the kernel when it ends (`os.wait4`). The user
cache starts empty (`HOMER_REF_CACHE` a new directory), so the first HOMER run computes the calibration table
and the second finds it. The runs:

    short        a prompt of a few dozen tokens: the baseline the others' memory is measured above
    plain        the long prompt with --mode plain
    homer first  the long prompt (longer than the trained context: HOMER), computing the table
    homer again  the same, the table now cached
    homer long   a prompt twice as long with --max-chunk-len 2048 (M = T = 2048; the cached table serves it)

The prompts are passkey haystacks in plain text (`tasks.passkey`), sized in the model's own tokens, the question
on the last line (the default split makes it the suffix).
"""

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from homer_ref.loading import load_config, load_tokenizer
from homer_ref.tasks import passkey

GIB = 2**30


def prompt_text(tok, length: int, seed: int = 0) -> str:
    """A passkey haystack of about `length` tokens of `tok`, as the text a user would put in a file."""
    (p,) = passkey.passkey_prompts(tok, length, 1, seed)
    return tok.decode(p.context).strip() + "\n" + tok.decode(p.suffix).strip() + "\n"


def run_generate(argv: list[str], env: dict, stderr_path: Path) -> dict:
    """One `python -m homer_ref.generate` process: wall and CPU seconds, peak RSS, the last stderr lines."""
    command = [sys.executable, "-m", "homer_ref.generate", *argv]
    with open(stderr_path, "w") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=err, text=True)
        out = proc.stdout.read()
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    log = stderr_path.read_text().splitlines()
    if proc.returncode != 0:
        raise RuntimeError(f"generate {' '.join(argv)} exited {proc.returncode}: {log[-1:] if log else ''}")
    return {
        "wall_seconds": wall,
        "cpu_seconds": usage.ru_utime + usage.ru_stime,
        "peak_rss_mib": usage.ru_maxrss / 1024,  # KiB on Linux
        "output": out.strip()[:60],
        "bias": next((line.removeprefix("bias: ") for line in reversed(log) if line.startswith("bias: ")), ""),
    }


def user_path(model: str, length: int = 16384, long_length: int = 32768, long_chunk: int = 2048, report=print) -> dict:
    """The five runs of the module docstring, and the targets they are measured against."""
    tok = load_tokenizer(model)
    trained = load_config(model).max_position_embeddings
    if length <= trained:
        raise ValueError(f"--user-path needs a length above the trained context ({trained}) so that HOMER runs")
    with tempfile.TemporaryDirectory(prefix="homer_ref_user_path.") as tmp:
        tmp = Path(tmp)
        env = {**os.environ, "HOMER_REF_CACHE": str(tmp / "cache"), "HOMER_REF_PROGRESS": "0"}
        files = {"short": "In one sentence, what is a river?\n", "long": prompt_text(tok, length),
                 "longer": prompt_text(tok, long_length)}  # fmt: skip
        for name, text in files.items():
            (tmp / f"{name}.txt").write_text(text, encoding="utf-8")
        runs = [
            ("short", "short", []),
            ("plain", "long", ["--mode", "plain"]),
            ("homer first", "long", []),
            ("homer again", "long", []),
            ("homer long", "longer", ["--max-chunk-len", str(long_chunk)]),
        ]
        rows = []
        for name, prompt, extra in runs:
            argv = ["--model", model, "--prompt-file", str(tmp / f"{prompt}.txt"), *extra]
            report(f"bench: user path: {name} ({' '.join(extra) or 'defaults'}) ...")
            row = {"run": name, "tokens": len(tok.encode(files[prompt])), **run_generate(argv, env, tmp / "err.txt")}
            row["command"] = (
                f"python -m homer_ref.generate --model MODEL --prompt-file {prompt}.txt {' '.join(extra)}".strip()
            )
            rows.append(row)
            bias = f"; bias: {row['bias']}" if row["bias"] else ""
            report(
                f"bench: user path: {name}: {row['wall_seconds']:.1f} s wall, {row['cpu_seconds']:.1f} s CPU, "
                f"peak RSS {row['peak_rss_mib']:.0f} MiB{bias}"
            )
    by = {r["run"]: r for r in rows}
    for r in rows:
        r["extra_rss_mib"] = r["peak_rss_mib"] - by["short"]["peak_rss_mib"]
    plain, first, again, long = by["plain"], by["homer first"], by["homer again"], by["homer long"]
    ratio = lambda a, b, key: a[key] / max(b[key], 1.0)  # noqa: E731 (1 MiB or 1 s at least: tiny models)
    targets = [
        ("plain peak RSS above the short run <= 1.5 GiB", plain["extra_rss_mib"] / 1024, "GiB", 1.5),
        ("HOMER (table cached) wall <= 0.5x plain's", ratio(again, plain, "wall_seconds"), "x", 0.5),
        ("HOMER (table cached) memory above the short run <= 0.5x plain's", ratio(again, plain, "extra_rss_mib"),
         "x", 0.5),
        ("HOMER's first run (computing the table) wall <= 1.5x plain's", ratio(first, plain, "wall_seconds"), "x", 1.5),
        (f"HOMER at {long['tokens']:,} tokens (M = T = {long_chunk}) above the short run <= 1 GiB",
         long["extra_rss_mib"] / 1024, "GiB", 1.0),
    ]  # fmt: skip
    return {
        "model": model,
        "cache": "a new temporary directory",
        "runs": rows,
        "targets": [
            {"target": t, "measured": f"{v:.2f} {unit}", "value": v, "met": v <= bound} for t, v, unit, bound in targets
        ],  # fmt: skip
    }
