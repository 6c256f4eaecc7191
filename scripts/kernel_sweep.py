"""Run the golden and fixture tests under every CPU kernel choice and thread count: `python scripts/kernel_sweep.py`.

Floats differ between CPUs: MKL and ATen pick other kernels on other machines (AVX-512, AVX2, SSE4.2, ARM), and
another thread count sums in another order. The golden comparisons must hold across that spread — decisions
exactly, floats within tolerances measured across it (tests/helpers.py TOL). This script runs them here under
each setting the machine can emulate:

    MKL_ENABLE_INSTRUCTIONS = SSE4_2, AVX2, AVX512   (MKL never goes above what the CPU has: on a CPU without
                                                      AVX-512 the last one runs its AVX2 kernels)
    ATEN_CPU_CAPABILITY = default                    (ATen's scalar kernels instead of its vectorised ones)

each with 1 and 2 torch threads (HOMER_REF_TEST_THREADS, read by tests/conftest.py), and prints one table row per
run with the largest |Δ| each tolerance met. Exit 0 when every run passes. `--quick` runs the fixture tests only,
`--full` the whole suite (about 10 x the suite's time), `--settings A,B` only the settings whose label contains one
of the words (e.g. `--settings SSE4_2,default`).
"""

import argparse
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GOLDEN = [  # the tests that compare against committed or independent goldens
    "tests/test_fixtures.py",  # committed traces vs a float64 regeneration, and vs the NumPy oracle
    "tests/test_stories260K.py",
    "tests/test_llama.py",  # llama2.c's golden text; HF transformers; the NumPy oracle
    "tests/test_homer.py",  # HOMER vs the NumPy oracle, the spec's worked example
    "tests/test_passkey_model.py",  # the shipped model's seeded decisions
    "tests/test_generate_demo.py",
    "tests/test_gguf.py",  # gguf's dequantization, transformers' GGUF reading
    "tests/test_smollm2.py",  # a real Llama vs HF, golden answers
]
SETTINGS = [
    ("as installed", {}),
    ("MKL_ENABLE_INSTRUCTIONS=SSE4_2", {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}),
    ("MKL_ENABLE_INSTRUCTIONS=AVX2", {"MKL_ENABLE_INSTRUCTIONS": "AVX2"}),
    ("MKL_ENABLE_INSTRUCTIONS=AVX512", {"MKL_ENABLE_INSTRUCTIONS": "AVX512"}),
    ("ATEN_CPU_CAPABILITY=default", {"ATEN_CPU_CAPABILITY": "default"}),
]
MEASURED = re.compile(r"^(\S+)\s+max \|Δ\| (\S+)", re.M)


def cpu_flags() -> str:
    try:
        return next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
    except (OSError, StopIteration):
        return ""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="the fixture tests only")
    parser.add_argument("--full", action="store_true", help="the whole suite")
    parser.add_argument("--settings", help="comma-separated words: only the settings whose label contains one")
    args = parser.parse_args()
    tests = GOLDEN[:1] if args.quick else ["tests"] if args.full else GOLDEN
    words = args.settings.split(",") if args.settings else None
    settings = [(label, env) for label, env in SETTINGS if words is None or any(w in label for w in words)]
    avx512 = "avx512f" in cpu_flags()
    print(f"CPU: {'with' if avx512 else 'without'} AVX-512; tests: {' '.join(tests)}")
    print("| setting | threads | result | seconds | largest max |Δ| (tolerance key) |")
    print("|---|---:|---|---:|---|")
    failed = 0
    for label, env in settings:
        for threads in (1, 2):
            run_env = {**os.environ, **env, "HOMER_REF_TEST_THREADS": str(threads)}
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tests],
                                 cwd=ROOT, env=run_env, capture_output=True, text=True)  # fmt: skip
            summary = out.stdout.strip().splitlines()[-1] if out.stdout.strip() else out.stderr.strip()[-200:]
            measured = sorted(MEASURED.findall(out.stdout), key=lambda m: -float(m[1]))
            worst = ", ".join(f"{v} ({k})" for k, v in measured[:3]) or "-"
            if out.returncode != 0:
                failed += 1
                print(out.stdout[-3000:], file=sys.stderr)
            print(f"| {label} | {threads} | {summary} | {time.perf_counter() - t0:.0f} | {worst} |", flush=True)
    print(f"{'all runs passed' if not failed else f'{failed} run(s) FAILED'}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
