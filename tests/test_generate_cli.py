"""Generation (homer_ref/decoding.py) and the CLI (`python -m homer_ref.generate`).

- stories260K: greedy decoding of 200 tokens from BOS gives exactly llama2.c's expected text, through the Python
  API and through the CLI (stdout compared byte for byte).
- Sampling: the same seed gives the same tokens; a tiny top-p is greedy; temperature 0 is the argmax of an
  independent full forward at every step; nucleus sampling never leaves the nucleus.
- Bad input through the CLI: exit status 2 (invalid input) and a one-line `error: ...` (or argparse's usage +
  error) on stderr, never a traceback. The same cases through the API are in test_loading.py.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import BAD_INPUTS, ROOT, build_bad_inputs, make_hf_llama

from homer_ref import load_model, load_tokenizer
from homer_ref.decoding import generate_plain, sample_next

CLI = [sys.executable, "-m", "homer_ref.generate"]
STORIES = ROOT / "homer_ref" / "data" / "stories260K"  # llama2.c's .bin and tok512.model, one folder


def cli_env() -> dict[str, str]:
    """The environment of a CLI run: homer_ref importable from the project root; one thread (tiny model)."""
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def run_cli_batch(runs: dict[str, list[str]], timeout: float = 300) -> dict[str, subprocess.CompletedProcess]:
    """Run several CLI invocations at once (each mostly waits on `import torch`), keyed like `runs`."""
    procs = {
        name: subprocess.Popen(
            CLI + argv, cwd=ROOT, env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, argv in runs.items()
    }
    results = {}
    for name, proc in procs.items():
        out, err = proc.communicate(timeout=timeout)
        results[name] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    return results


# ----------------------------------------------------------------------------------------------- stories260K


def test_stories260k_greedy_200_tokens_api(stories_dir):
    """llama2.c's own golden check, through load_model + generate_plain + the tokenizer."""
    model = load_model(stories_dir / "stories260K.bin")
    tok = load_tokenizer(stories_dir / "tok512.model")
    ids = generate_plain(model, [tok.bos_id], 200)
    assert len(ids) == 200
    expected = (stories_dir / "expected_greedy_200.txt").read_text(encoding="utf-8")
    got = tok.decode(ids)
    first = next((i for i, (a, b) in enumerate(zip(got, expected)) if a != b), min(len(got), len(expected)))
    assert got == expected, (
        f"first difference at character {first}: {got[first : first + 40]!r} vs expected "
        f"{expected[first : first + 40]!r}"
    )


def test_stories260k_greedy_200_tokens_cli(stories_dir):
    """The same golden through the command line: stdout is exactly the expected bytes, exit 0, no traceback."""
    argv = ["--model", str(stories_dir / "stories260K.bin"), "--tokenizer", str(stories_dir / "tok512.model")]
    result = run_cli_batch({"golden": argv + ["--max-new-tokens", "200", "--temperature", "0"]})["golden"]
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stdout.encode("utf-8") == (stories_dir / "expected_greedy_200.txt").read_bytes()


# ----------------------------------------------------------------------------------------------- sampling


@pytest.fixture(scope="module")
def small_model(tmp_path_factory):
    """A random tiny GQA model (float32) through the production loader; no shared data needed."""
    d = tmp_path_factory.mktemp("small")
    make_hf_llama(d, num_attention_heads=4, num_key_value_heads=2, head_dim=6, hidden_size=16, seed=3)
    return load_model(d)


PROMPT = [1, 5, 9, 2, 30]


def test_same_seed_same_tokens(small_model):
    runs = [generate_plain(small_model, PROMPT, 40, temperature=1.0, top_p=0.9, seed=s) for s in (11, 11, 12)]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2], "seeds 11 and 12 sampled the same 40 tokens: is the seed used at all?"
    assert runs[0] != generate_plain(small_model, PROMPT, 40), "temperature 1 sampled exactly the greedy text"


def test_tiny_top_p_is_greedy(small_model):
    greedy = generate_plain(small_model, PROMPT, 40, temperature=0.0)
    for seed in (0, 1):
        assert generate_plain(small_model, PROMPT, 40, temperature=1.5, top_p=1e-9, seed=seed) == greedy


def test_temperature_zero_is_the_argmax_of_a_full_forward(small_model):
    """Greedy decoding with the KV cache vs an argmax loop that re-runs the whole sequence each step."""
    ids = list(PROMPT)
    with torch.no_grad():
        for _ in range(30):
            ids.append(int(np.argmax(small_model(torch.tensor([ids]))[0, -1].numpy())))
    assert generate_plain(small_model, PROMPT, 30, temperature=0.0) == ids[len(PROMPT) :]


def test_sample_next_greedy_takes_the_first_maximum():
    g = torch.Generator().manual_seed(0)
    for _ in range(20):
        logits = torch.randint(0, 4, (9,)).float()  # many ties
        assert sample_next(logits, 0.0, 1.0, g) == int(np.argmax(logits.numpy()))


def test_sample_next_stays_in_the_nucleus():
    """top_p = 0.7 over probabilities [0.4, 0.25, 0.15, 0.1, 0.06, 0.04]: the nucleus is the first three tokens
    (0.4 + 0.25 < 0.7 <= 0.8); every draw lands in it and every nucleus token is drawn."""
    probs = np.array([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])
    order = np.array([3, 0, 5, 1, 4, 2])  # shuffle the vocabulary so that sorting matters
    logits = torch.empty(6, dtype=torch.float64)
    logits[order] = torch.from_numpy(np.log(probs))
    nucleus = set(order[:3].tolist())
    g = torch.Generator().manual_seed(0)
    draws = [sample_next(logits, 1.0, 0.7, g) for _ in range(300)]
    assert set(draws) == nucleus, f"drew {sorted(set(draws))}, nucleus {sorted(nucleus)}"


# ----------------------------------------------------------------------------------------------- bad input


@pytest.fixture(scope="module")
def bad_cli_runs(tmp_path_factory):
    """Every bad-input case of helpers.build_bad_inputs run through the CLI, all at once."""
    root = tmp_path_factory.mktemp("bad-cli")
    make_hf_llama(root / "good", num_attention_heads=4, num_key_value_heads=2, head_dim=6)
    cases = build_bad_inputs(root, root / "good")
    return cases, run_cli_batch({name: case.argv for name, case in cases.items()})


@pytest.mark.parametrize("name", BAD_INPUTS)
def test_bad_input_cli_one_line_error(bad_cli_runs, name):
    cases, runs = bad_cli_runs
    result = runs[name]
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    report = f"{name}: exit {result.returncode}, stderr:\n{result.stderr}"
    assert result.returncode == 2, report  # cli.py: 2 = invalid input (argparse uses 2 as well)
    assert "Traceback" not in result.stderr, report
    assert result.stdout == "", report
    if lines and lines[0].startswith("usage:"):  # argparse: the usage text, then one "prog: error: ..." line
        assert [i for i, line in enumerate(lines) if "error:" in line] == [len(lines) - 1], report
        assert lines[-1].startswith("python -m homer_ref.generate: error: "), report
    else:
        assert len(lines) == 1 and lines[0].startswith("error: "), report
    for fragment in cases[name].names:
        assert fragment in lines[-1], f"{fragment!r} not named; {report}"


# ----------------------------------------------------------------------------------------------- as --help says


def test_the_commands_do_what_their_help_says(tmp_path):
    """`--prompt` without `--model` runs the shipped model (its help says it is the default); `--prefix-ids` and
    `--suffix-ids` take a JSON list inline as well as a file; a model folder holding one llama2.c .bin (and its
    tokenizer) is that model; `bench --quick` names the command it ran."""
    (tmp_path / "context.json").write_text("[10, 11, 12]")
    runs = run_cli_batch({
        "shipped": ["--prompt", "What is the pass key ?", "--max-new-tokens", "3", "--mode", "plain"],
        "inline ids": ["--model", str(ROOT / "homer_ref" / "data" / "passkey_model"), "--prompt-ids",
                       str(tmp_path / "context.json"), "--prefix-ids", "[1]", "--suffix-ids", "[20, 21]",
                       "--print-ids", "--max-new-tokens", "2", "--mode", "homer", "--reduction", "uncalibrated"],
        "folder": ["--model", str(STORIES), "--max-new-tokens", "200", "--temperature", "0"],
    })  # fmt: skip
    for name, run in runs.items():
        assert run.returncode == 0, f"{name}: {run.stderr}"
    assert "model " + str(ROOT / "homer_ref" / "data" / "passkey_model") in runs["shipped"].stderr
    assert "HOMER plan: L=8 W=3 M=128 T=128 P=1 C=3 S=2 (uncalibrated)" in runs["inline ids"].stderr
    assert len(json.loads(runs["inline ids"].stdout)) == 2
    assert runs["folder"].stdout == (STORIES / "expected_greedy_200.txt").read_text(encoding="utf-8")
    env = cli_env()
    quick = subprocess.run([sys.executable, "-m", "homer_ref.bench", "--quick", "--markdown"], cwd=ROOT, env=env,
                           capture_output=True, text=True, timeout=600)  # fmt: skip
    assert quick.returncode == 0, quick.stderr
    assert "Command: `python -m homer_ref.bench --quick --markdown`" in quick.stdout
