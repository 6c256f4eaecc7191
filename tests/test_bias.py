"""Where the calibration table comes from (`homer_ref.bias`): one policy for the commands and the Python API.

Order: a table given > `homer_bias.safetensors` beside the model > the user cache > computed once on the default
calibration text and cached. The cache is keyed by the model's content (a copy of the checkpoint elsewhere hits
it), serves any M up to its width, and never serves another model, dtype or width silently; a damaged or
mismatched file is recomputed, an unwritable cache degrades to a table in memory with a warning, and an
interrupted save leaves no file. The computed table is `calibrate` on the text's windows (checked against the
definition), and `eval`'s default modes now run on a model that ships no table.
"""

import json
import os
import shutil
import stat

import pytest
import torch
from safetensors.torch import save_file

from homer_ref import atomic, bias_for, load_model, load_tokenizer
from homer_ref.bias import BIAS_FILE, CALIBRATION_WINDOWS, cache_dir, model_key, text_ids
from homer_ref.cli.eval import main as eval_main
from homer_ref.data import CALIBRATION_TEXT
from homer_ref.homer.calibration import calibrate, windows_from_ids
from homer_ref.tasks.passkey import SHIPPED_MODEL

M = 24  # small windows: the shipped model calibrates 4 x 24 tokens in a blink


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty user cache of the test's own."""
    monkeypatch.setenv("HOMER_REF_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def shipped():
    return load_model(SHIPPED_MODEL), load_tokenizer(SHIPPED_MODEL)


def notes():
    said = []
    return said, said.append


def test_the_cache_directory_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("HOMER_REF_CACHE", str(tmp_path / "a"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("HOMER_REF_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "homer_ref"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "homer_ref"


def test_computed_once_then_found_in_the_cache(cache, shipped):
    model, tok = shipped
    said, report = notes()
    first = bias_for(model, tok, M, report=report)
    assert first.source.startswith("computed") and len(list(cache.iterdir())) == 1
    assert said[0].startswith("bias: computed once") and str(cache) in said[0]
    windows = windows_from_ids(text_ids(tok), M, CALIBRATION_WINDOWS)
    assert torch.equal(first.table, calibrate(model, windows)), "the definition: calibrate on the text's windows"
    assert all(w == tok.encode(CALIBRATION_TEXT.read_text(), bos=False)[:M] for w in windows[:1])
    again = bias_for(model, tok, M, report=report)
    assert again.source.startswith("cache: ") and torch.equal(again.table, first.table) and len(said) == 1
    narrower = bias_for(model, tok, M // 2, report=report)  # a table at least M wide serves any smaller M
    assert narrower.source.startswith("cache: ") and narrower.table.shape[1] == M
    wider = bias_for(model, tok, 2 * M, report=report)  # a wider M is computed (and replaces the narrower table)
    assert wider.source.startswith("computed") and "covers distances < 24" in said[-2]
    assert len(list(cache.iterdir())) == 1


def test_keyed_by_content_not_path(cache, shipped, tmp_path):
    model, tok = shipped
    bias_for(model, tok, M, report=lambda m: None)
    copy = load_model(shutil.copytree(SHIPPED_MODEL, tmp_path / "elsewhere"))
    assert model_key(copy) == model_key(model)
    assert bias_for(copy, tok, M, report=lambda m: None).source.startswith("cache: ")
    with torch.no_grad():
        copy.layers[3].mlp.up_proj.weight.mul_(1.001)  # a fine-tune of it is another model
    assert model_key(copy) != model_key(model)
    assert bias_for(copy, tok, M, report=lambda m: None).source.startswith("computed")
    as64 = load_model(SHIPPED_MODEL, dtype=torch.float64)  # another dtype: its own table
    assert bias_for(as64, tok, M, report=lambda m: None).source.startswith("computed")
    assert len(list(cache.iterdir())) == 3


def test_a_damaged_or_mismatched_cache_file_is_recomputed(cache, shipped):
    model, tok = shipped
    path = bias_for(model, tok, M, report=lambda m: None).source.split("saved to ")[1]
    good = open(path, "rb").read()
    open(path, "wb").write(good[: len(good) // 2])  # truncated
    said, report = notes()
    assert bias_for(model, tok, M, report=report).source.startswith("computed") and "cannot be read" in said[0]
    save_file({"bias": torch.zeros(8, M)}, path, metadata={"model_key": "another", "dtype": "float32"})
    said, report = notes()
    assert bias_for(model, tok, M, report=report).source.startswith("computed")
    assert "made for another model_key" in said[0]
    assert bias_for(model, tok, M, report=report).source.startswith("cache: ")


def test_an_unwritable_cache_degrades_to_a_table_in_memory(tmp_path, monkeypatch, shipped):
    if os.geteuid() == 0:  # root writes anywhere: a file where the directory should be makes it unwritable
        blocked = tmp_path / "blocked"
        blocked.write_text("not a directory")
        monkeypatch.setenv("HOMER_REF_CACHE", str(blocked / "cache"))
    else:
        blocked = tmp_path / "ro"
        blocked.mkdir()
        blocked.chmod(stat.S_IRUSR | stat.S_IXUSR)
        monkeypatch.setenv("HOMER_REF_CACHE", str(blocked))
    model, tok = shipped
    said, report = notes()
    table = bias_for(model, tok, M, report=report)
    assert table.source.startswith("computed in memory") and table.table.shape == (8, M)
    assert len(said) == 1 and said[0].startswith("warning: bias: cannot save the calibration table")


def test_an_interrupted_save_leaves_no_file(cache, shipped, monkeypatch):
    model, tok = shipped

    def interrupted(tensors, filename, metadata=None):
        open(filename, "wb").write(b"\0" * 100)
        raise KeyboardInterrupt

    monkeypatch.setattr(atomic, "save_file", interrupted)
    with pytest.raises(KeyboardInterrupt):
        bias_for(model, tok, M, report=lambda m: None)
    assert list(cache.iterdir()) == [], "no table and no temporary file"


def test_a_given_table_comes_first_and_is_checked(cache, shipped, tmp_path):
    model, tok = shipped
    beside = bias_for(model, tok, 248, model_path=SHIPPED_MODEL, report=lambda m: None)
    assert beside.source == f"beside the model: {SHIPPED_MODEL / BIAS_FILE}" and not cache.exists()
    assert bias_for(model, tok, 16, bias=torch.ones(8, 16)).source == "given"
    path = tmp_path / "mine.safetensors"
    save_file({"bias": torch.ones(8, 300)}, str(path))
    assert bias_for(model, tok, 300, bias=path, model_path=SHIPPED_MODEL).source == f"--bias {path}"
    save_file({"bias": torch.ones(30, 300)}, str(path))
    with pytest.raises(ValueError, match="the bias table has 30 layers but the model has 8"):
        bias_for(model, tok, 300, bias=path)
    wider = bias_for(model, tok, 300, model_path=SHIPPED_MODEL, report=lambda m: None)  # beside covers 256 only
    assert wider.source.startswith("computed")
    with pytest.raises(ValueError, match="pass a tokenizer or --bias"):
        bias_for(load_model(SHIPPED_MODEL, dtype=torch.float64), None, M)


def test_eval_default_modes_run_on_a_model_without_a_table(tmp_path, tiny_hf_model, capsys, cache):
    """`eval passkey` with its default modes on a model that ships no table: the table is computed once, then
    found in the cache by the next run."""
    model_dir, _ = tiny_hf_model(vocab_size=288, num_hidden_layers=4, max_position_embeddings=64)
    argv = ["passkey", "--model", str(model_dir), "--tokenizer", str(SHIPPED_MODEL / "tokenizer.model")]
    argv += ["--lengths", "2", "--samples", "1", "--json"]
    assert eval_main(argv) == 0
    captured = capsys.readouterr()
    assert "bias: computed once" in captured.err
    modes = [json.loads(line)["mode"] for line in captured.out.splitlines()]
    assert "homer" in modes and "plain" in modes
    assert eval_main(argv + ["--modes", "homer"]) == 0
    assert "homer: M=56 T=56, bias cache: " in capsys.readouterr().err
