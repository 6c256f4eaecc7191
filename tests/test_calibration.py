"""Calibration (HOMER_SPEC.md D.2, N.2.4): the table equals its definition computed by the NumPy oracle."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import ROOT, assert_close
from safetensors import safe_open

from homer_ref import load_model
from homer_ref.homer.calibration import calibrate, calibrate_on_context, windows_from_ids
from reference import llama_np

pytest.importorskip("transformers")


def oracle_bias(config: dict, weights: dict, windows: list[list[int]]) -> np.ndarray:
    """bias[l][d] = mean over windows of max over heads of the last query's logit at distance d (float64)."""
    L, R = config["num_hidden_layers"], len(windows[0])
    total = np.zeros((L, R))
    for window in windows:
        h = llama_np.embed(config, weights, window)
        for layer in range(L):
            h, _, _, last_logits = llama_np.attention_layer(config, weights, layer, h, list(range(R)))
            head_max = last_logits.max(axis=0)  # [n] by slot
            for slot in range(R):
                total[layer, R - 1 - slot] += head_max[slot]  # distance from the last token
            h = llama_np.mlp_layer(config, weights, layer, h)
    return total / len(windows)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_calibration_equals_the_definition(tiny_hf_model, kv_heads):
    path, _ = tiny_hf_model(num_hidden_layers=3, num_key_value_heads=kv_heads)
    model = load_model(path, dtype=torch.float64)
    config, weights = llama_np.load_hf(path)
    rng = np.random.default_rng(0)
    windows = [rng.integers(0, config["vocab_size"], 12).tolist() for _ in range(3)]
    bias = calibrate(model, windows)
    assert bias.dtype == torch.float32 and bias.shape == (3, 12)
    assert_close(bias, oracle_bias(config, weights, windows), "oracle_float32", "calibration bias")


def test_windows_cover_the_text_evenly_and_refuse_short_text():
    ids = list(range(100))
    windows = windows_from_ids(ids, 10, 4)
    assert [w[0] for w in windows] == [0, 30, 60, 90] and all(len(w) == 10 for w in windows)
    with pytest.raises(ValueError, match="fewer than one window"):
        windows_from_ids(ids[:5], 10, 4)


def test_calibration_on_a_short_context_pads_to_max_chunk_len(tiny_hf_model):
    path, _ = tiny_hf_model(num_hidden_layers=2)
    model = load_model(path, dtype=torch.float64)
    context = list(range(3, 13))  # 10 tokens, M = 16
    bias = calibrate_on_context(model, context, 16, samples=2)
    assert bias.shape == (2, 16)
    assert torch.equal(bias[:, :10], calibrate(model, [context, context]))
    assert torch.equal(bias[:, 10:], bias[:, 9:10].expand(-1, 6))


def test_calibrate_cli_writes_a_table_with_metadata(stories_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("Once upon a time there was a little dog. He liked to run in the park with his friends. " * 20)
    out = tmp_path / "bias.safetensors"
    cmd = [sys.executable, "-m", "homer_ref.calibrate", "--model", str(stories_dir / "stories260K.bin")]
    cmd += ["--tokenizer", str(stories_dir / "tok512.model"), "--text", str(text), "--max-chunk-len", "64"]
    cmd += ["--samples", "3", "--out", str(out)]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HOMER_REF_PROGRESS": "1"})
    assert run.returncode == 0, run.stderr
    assert "from 3 windows" in run.stderr and "15/15" in run.stderr, "a bar counting 3 windows x 5 layers, asked for"
    quiet = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "HOMER_REF_PROGRESS": ""})
    assert quiet.returncode == 0 and "15/15" not in quiet.stderr, "no bar when stderr is not a terminal"
    with safe_open(str(out), "pt") as f:
        bias, meta = f.get_tensor("bias"), f.metadata()
    assert bias.shape == (5, 64) and bias.dtype == torch.float32
    assert meta["max_chunk_len"] == "64" and meta["samples"] == "3" and "rope_theta" in meta["rope"]
    # the recent-token effect calibration exists for: on average the last query attends more to nearby tokens
    assert bias[:, :4].mean() > bias[:, 32:].mean()


def test_calibrate_cli_refuses_a_text_shorter_than_one_window(stories_dir, tmp_path):
    text = tmp_path / "short.txt"
    text.write_text("Once upon a time.")
    cmd = [sys.executable, "-m", "homer_ref.calibrate", "--model", str(stories_dir / "stories260K.bin")]
    cmd += ["--tokenizer", str(stories_dir / "tok512.model"), "--text", str(text), "--max-chunk-len", "64"]
    cmd += ["--out", str(tmp_path / "b.safetensors")]
    run = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    assert run.returncode == 2 and "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith("error: calibration text has")
    assert not (tmp_path / "b.safetensors").exists()
