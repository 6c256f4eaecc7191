"""`python -m homer_ref.eval` (homer_ref/cli/eval.py) on tiny random models: the output is well-formed, the protocols
score what they claim, and the helpers agree with the library.

- passkey and perplexity print one JSON object per line with task, mode, length, trained_context and the metric,
  for every mode; progress goes to stderr, never stdout.
- perplexity scores every token of the requested range exactly once in every mode (HOMER_SPEC.md H.2), and a
  sliding window as long as the document is the plain forward.
- the batched greedy decoder equals `generate_plain`; the digit tracking through HOMER's trace is consistent
  with the final cache; bad arguments exit 2 with a one-line error.
"""

import json
import math
import os
import random
import subprocess
import sys

import pytest
import torch
from helpers import ROOT
from safetensors.torch import save_file

from homer_ref import load_model, load_tokenizer
from homer_ref.cli.common import run_main
from homer_ref.cli.eval import PASSKEY_MODES, main
from homer_ref.decoding import generate_plain, greedy_batch
from homer_ref.homer import homer_prefill
from homer_ref.homer.calibration import calibrate
from homer_ref.homer.plan import HomerConfig
from homer_ref.loading.weights import rope_scaled
from homer_ref.tasks.passkey import SHIPPED_MODEL as DEFAULT_MODEL
from homer_ref.tasks.passkey import passkey_prompts, surviving_context

TOKENIZER = DEFAULT_MODEL / "tokenizer.model"
TINY = dict(vocab_size=288, num_hidden_layers=4, max_position_embeddings=64)  # the shipped tokenizer's vocabulary


@pytest.fixture
def tiny(tiny_hf_model, tmp_path):
    """(model directory, bias file) of a random 4-layer model with a 64-token trained context; beside the bias, a
    YaRN x2 table (`yarn_bias.safetensors`, windows of 2 * 64 - the answer's room) for the homer-yarn modes."""
    model_dir, _ = tiny_hf_model(**TINY)
    model = load_model(model_dir)
    windows = [[random.Random(i).randrange(3, 288) for _ in range(128)] for i in range(4)]
    bias_path = tmp_path / "bias.safetensors"
    save_file({"bias": calibrate(model, [w[:64] for w in windows])}, str(bias_path))
    yarn = calibrate(rope_scaled(model, "yarn", 2.0), [w[:120] for w in windows])
    save_file({"bias": yarn}, str(tmp_path / "yarn_bias.safetensors"))
    return model_dir, bias_path


def rows_of(capsys) -> list[dict]:
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert rows, captured.err
    return rows


def test_passkey_json_is_well_formed_for_every_mode(tiny, capsys, tmp_path, monkeypatch):
    model_dir, bias = tiny
    argv = ["passkey", "--model", str(model_dir), "--tokenizer", str(TOKENIZER), "--bias", str(bias)]
    argv += ["--bias-yarn", str(bias.parent / "yarn_bias.safetensors"), "--modes", ",".join(PASSKEY_MODES)]
    argv += ["--lengths", "1,2", "--samples", "2", "--json"]
    assert main(argv) == 0
    rows = rows_of(capsys)
    assert [(r["mode"], r["length"]) for r in rows] == [(m, n) for n in (64, 128) for m in PASSKEY_MODES]
    for row in rows:
        assert row["task"] == "passkey" and row["trained_context"] == 64 and row["samples"] == 2
        assert 0.0 <= row["accuracy"] <= 1.0 and row["correct"] == round(2 * row["accuracy"])
        assert row["chat"] is False and row["prompt_tokens"] == row["length"] - 8  # no template: plain text
        assert row["seconds"] > 0 and row["cpu_seconds"] > 0 and row["peak_rss_mib"] >= row["rss_start_mib"] > 0
        if row["mode"].startswith("homer-yarn"):  # YaRN x2: twice the context, less the answer's room
            assert row["max_chunk_len"] == 120 and row["rope_factor"] == 2.0
        elif row["mode"].startswith("homer"):
            assert 0.0 <= row["digits_kept"] <= 1.0 and row["max_chunk_len"] == 56  # 64 - the answer room
        if row["mode"] == "homer-no-pruning":  # the diagnostic removes nothing: every digit survives
            assert row["digits_kept"] == 1.0 and row["copy_kept"] == 1.0
    # homer-yarn without --bias-yarn: a table computed once with YaRN active (not the one given for `homer`)
    monkeypatch.setenv("HOMER_REF_CACHE", str(tmp_path / "empty_cache"))
    assert main(argv[:5] + ["--modes", "homer-yarn", "--lengths", "1", "--samples", "1", "--json"]) == 0
    assert "bias: computed once" in capsys.readouterr().err


def test_explain_follows_the_digits_through_the_tree(tiny, capsys):
    """--explain prints, for a failed HOMER sample, every node that held passkey digits (each copy's digits, '_'
    where removed) and the final cache, consistent with the trace."""
    model_dir, _ = tiny
    argv = ["passkey", "--model", str(model_dir), "--tokenizer", str(TOKENIZER), "--modes", "homer-random"]
    assert main(argv + ["--lengths", "4", "--samples", "3", "--explain", "--json"]) == 0
    captured = capsys.readouterr()
    failed = [b for b in captured.err.split("  homer-random: sample ")[1:] if "failed" in b.splitlines()[0]]
    row = json.loads(captured.out)
    assert len(failed) == 3 - row["correct"] > 0
    for block in failed:
        lines = [line.strip() for line in block.splitlines()[1:] if line.startswith("    ")]
        assert lines[0].startswith("node 0.") and lines[-1].startswith("final cache: ")
        final = lines[-1].removeprefix("final cache: ").split(";")[0].split(" | ")
        assert len(final) == 2 and all(len(c) == 5 and set(c) <= set("0123456789_") for c in final)


def test_sample_document_decodes_no_more_than_asked(tiny_hf_model):
    """A model with a long trained context is asked for a short document: the stories are cut to what is missing
    (it used to decode up to trained - 1 tokens per story whatever the length)."""
    from homer_ref.tasks.perplexity import sample_document

    model_dir, _ = tiny_hf_model(vocab_size=288, num_hidden_layers=2, max_position_embeddings=8192)
    model = load_model(model_dir)
    calls = []
    real = model.forward_cached
    model.forward_cached = lambda *a, **k: calls.append(1) or real(*a, **k)
    ids = sample_document(model, 40, seed=0, bos=1, stop=(2,))
    assert len(ids) == 40 and ids[0] == 1
    assert len(calls) <= 40  # one forward per sampled token (and per story's BOS)


def test_perplexity_scores_every_token_once_in_every_mode(tiny, capsys):
    model_dir, bias = tiny
    modes = "plain,linear,dynamic,yarn,sliding,homer,homer-uncalibrated,homer-random"
    argv = ["perplexity", "--model", str(model_dir), "--tokenizer", str(TOKENIZER), "--length", "4", "--modes", modes]
    argv += ["--json"]
    assert main(argv + ["--score-from", "100", "--score-to", "230"]) == 0
    rows = rows_of(capsys)
    assert [r["mode"] for r in rows] == modes.split(",")
    for row in rows:
        assert row["task"] == "perplexity" and row["length"] == 256 and row["trained_context"] == 64
        assert row["tokens_scored"] == 130 and math.isfinite(row["perplexity"]) and row["perplexity"] > 1
    by_mode = {r["mode"]: r["perplexity"] for r in rows}
    assert by_mode["linear"] != by_mode["plain"]
    # A sliding window as long as the document is the plain forward.
    assert main(argv[:-3] + ["--modes", "plain,sliding", "--window", "256", "--score-from", "1", "--json"]) == 0
    plain, sliding = rows_of(capsys)
    assert sliding["tokens_scored"] == plain["tokens_scored"] == 255
    assert sliding["perplexity"] == pytest.approx(plain["perplexity"], rel=1e-6)


def test_cli_streams_json_on_stdout_and_progress_on_stderr(tiny):
    model_dir, _ = tiny
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    argv = ["passkey", "--model", str(model_dir), "--tokenizer", str(TOKENIZER), "--lengths", "1", "--samples", "1"]
    argv += ["--modes", "plain,homer-uncalibrated", "--json"]
    proc = subprocess.run(
        [sys.executable, "-m", "homer_ref.eval", *argv], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["mode"] for line in proc.stdout.splitlines()] == ["plain", "homer-uncalibrated"]
    assert "passkey plain 64" in proc.stderr


def test_bad_arguments_exit_2_with_a_one_line_error(tiny, capsys):
    model_dir, _ = tiny
    base = ["passkey", "--model", str(model_dir), "--tokenizer", str(TOKENIZER), "--samples", "1"]
    assert run_main(main, base + ["--modes", "plain,nope"]) == 2
    assert "unknown mode 'nope'" in capsys.readouterr().err
    assert run_main(main, base + ["--modes", "homer", "--bias", str(model_dir / "none.safetensors")]) == 2
    assert "none.safetensors" in capsys.readouterr().err
    assert run_main(main, base + ["--modes", "homer-random", "--lengths", "2", "--max-chunk-len", "12"]) == 2
    assert "error:" in capsys.readouterr().err


def test_greedy_batch_equals_generate_plain(tiny):
    model = load_model(tiny[0])
    prompts = passkey_prompts(load_tokenizer(TOKENIZER), 64, 3, seed=5, instruction=False)
    assert len({len(p.ids) for p in prompts}) == 1
    batched = greedy_batch(model, [p.ids for p in prompts], 6)
    assert batched == [generate_plain(model, p.ids, 6) for p in prompts]
    scaled = rope_scaled(model, "yarn", 4.0)
    assert scaled.cfg.rope_scaling.factor == 4.0 and rope_scaled(model, "linear", 1.0) is model
    assert torch.equal(scaled.layers[0].self_attn.q_proj.weight, model.layers[0].self_attn.q_proj.weight)


def test_surviving_context_follows_the_trace(tiny):
    model = load_model(tiny[0])
    (prompt,) = passkey_prompts(load_tokenizer(TOKENIZER), 128, 1, seed=0, instruction=True)
    cache = homer_prefill(model, prompt.prefix, prompt.context, prompt.suffix, HomerConfig(48, reduction="random"))
    assert cache.plan.N == 4
    kept = surviving_context(cache)
    assert len(kept) == len(cache.positions) - len(prompt.prefix) - len(prompt.suffix)
    assert kept == sorted(set(kept)) and 0 <= kept[0] and kept[-1] < len(prompt.context)
    # Positions of the kept context slots are the leaf-local positions of those context indices.
    e, P = cache.plan.e, cache.plan.P
    assert cache.positions[P : P + len(kept)].tolist() == [P + i % e for i in kept]
    short = homer_prefill(model, prompt.prefix, prompt.context[:20], prompt.suffix, HomerConfig(64))
    assert surviving_context(short) == list(range(20))  # one leaf, nothing pruned
