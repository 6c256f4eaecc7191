"""`python -m homer_ref.generate` with no arguments: the passkey demo on the shipped model shows what HOMER is for.

It scores plain inference and HOMER side by side on the same prompts at 8x the trained context, shows one prompt in
full where plain inference fails and HOMER answers right, and prints HOMER's continuation of that prompt on stdout.
"""

import re
import subprocess
import sys

from helpers import ROOT


def test_generate_without_arguments_runs_the_passkey_demo():
    run = subprocess.run(
        [sys.executable, "-m", "homer_ref.generate"], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert run.returncode == 0, run.stderr
    assert re.fullmatch(r"\d{5} \.", run.stdout.strip()), run.stdout  # stdout: HOMER's continuation only
    assert "(8.0x)" in run.stderr
    plain = int(re.search(r"plain inference: +(\d+)/16 right", run.stderr)[1])
    homer = int(re.search(r"HOMER: +(\d+)/16 right", run.stderr)[1])
    assert homer >= 14 and plain <= 6, run.stderr  # the model card: HOMER 96.0%, plain 9.5% at 8x
    key = re.search(r"true passkey: (\d{5})", run.stderr)[1]
    assert re.search(rf">>>\s+The\s+pass\s+key\s+is\s+{key}\s", run.stderr)  # the prompt in full, passkey marked
    assert run.stdout.strip() == f"{key} ."
    assert re.search(r"HOMER answered '\d{5} \.' \(right\); plain inference answered '.*' \(wrong\)", run.stderr)
    assert "HOMER plan: L=8 W=3 M=248 T=248 P=1 C=" in run.stderr  # the resolved plan, printed once
    assert len(re.findall(r"^\s+\d+\.\d+\s+\[", run.stderr, flags=re.M)) == 31, "16 leaves: 31 nodes listed"
    assert "bias: beside the model:" in run.stderr and "peak live KV" in run.stderr
