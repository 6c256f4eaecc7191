"""`python -m homer_ref.generate` with no arguments: the passkey demo on the shipped model runs and reports."""

import re
import subprocess
import sys

from helpers import ROOT


def test_generate_without_arguments_runs_the_passkey_demo():
    run = subprocess.run(
        [sys.executable, "-m", "homer_ref.generate"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert run.returncode == 0, run.stderr
    assert re.match(r"\d{5}", run.stdout.strip()), run.stdout  # stdout: HOMER's answer only
    assert re.search(r"true passkey: \d{5}", run.stderr) and "plain inference answered" in run.stderr
    assert "8.0x" in run.stderr and "HOMER: " in run.stderr  # the plan line: chunks, height, layers, live KV
