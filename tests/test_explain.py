"""`python -m homer_ref.explain`: the HTML picture of what HOMER kept, checked by its structure.

The file is parsed with the standard library's XML parser (it is well-formed XHTML) and compared with the trace
of the same HOMER run made through the library: every tree node present with its layers, every input slot of
every node either drawn kept (with its position and its token's text), drawn removed, or inside a collapsed run
of removed slots; every final cache slot with its position; and, for the demo prompt, the passkey's digits
visible in the root. Also: nothing is fetched or scripted, and bad input is a one-line error with exit code 2.
"""

import os
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
from helpers import ROOT

from homer_ref import load_model, load_tokenizer
from homer_ref.cli.explain import COLLAPSE, render_html, token_pieces
from homer_ref.homer import HomerCache, HomerConfig, homer_prefill
from homer_ref.homer.calibration import find_bias
from homer_ref.tasks import passkey

CLI = [sys.executable, "-m", "homer_ref.explain"]
XHTML = "{http://www.w3.org/1999/xhtml}"


def run_explain(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    return subprocess.run(CLI + list(argv), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def classes(element: ET.Element) -> set[str]:
    return set(element.get("class", "").split())


def text_of(element: ET.Element) -> str:
    return "".join(element.itertext())


def check_picture(path: Path, cache: HomerCache, pieces: list[str]) -> ET.Element:
    """Assert the picture at `path` shows `cache` exactly; return the parsed document."""
    source_text = path.read_text(encoding="utf-8")
    document = ET.fromstring(source_text)  # raises unless the file is well-formed XHTML
    assert document.tag == f"{XHTML}html"
    assert "<script" not in source_text and "url(" not in source_text and "@import" not in source_text
    for element in document.iter():  # self-contained: links only to anchors in the page, nothing loaded
        assert element.get("src") is None and element.tag != f"{XHTML}link"
        assert element.get("href") is None or element.get("href").startswith("#node-"), element.get("href")
    nodes = {(int(e.get("data-level")), int(e.get("data-index"))): e for e in document.iter() if "node" in classes(e)}
    assert set(nodes) == set(cache.plan.nodes), "every tree node has a section, and nothing else"
    anchors = {e.get("href") for e in document.iter() if e.get("href")}
    assert anchors == {f"#node-{level}-{index}" for level, index in cache.plan.nodes}, "every tree box links"
    for t in cache.nodes:
        section = nodes[(t.level, t.index)]
        assert section.get("id") == f"node-{t.level}-{t.index}"
        assert section.get("data-layers") == f"{t.layers[0]}-{t.layers[1]}"
        drawn_kept, drawn_removed = set(), set()
        for e in section.iter():
            if "run" in classes(e):  # a collapsed run of removed slots
                first, last = map(int, e.get("data-slots").split("-"))
                assert last - first + 1 >= COLLAPSE and text_of(e) == f"… {last - first + 1} pruned …"
                drawn_removed |= set(range(first, last + 1))
            elif e.get("data-slot") is not None:
                j = int(e.get("data-slot"))
                assert int(e.get("data-position")) == int(t.input_positions[j])
                assert int(e.get("data-source")) == int(t.input_sources[j])
                assert text_of(e) == pieces[int(t.input_sources[j])]
                (drawn_kept if "k" in classes(e) else drawn_removed).add(j)
                assert ("r" in classes(e)) == (e.tag == f"{XHTML}del") == ("k" not in classes(e))
        assert drawn_kept == set(t.kept.tolist()), f"node {t.level}.{t.index}: kept slots"
        assert drawn_removed == set(t.removed.tolist()), f"node {t.level}.{t.index}: removed slots"
    slots = [e for e in document.iter() if "slot" in classes(e)]
    assert [int(e.get("data-slot")) for e in slots] == list(range(len(cache.positions)))
    assert [int(e.get("data-position")) for e in slots] == cache.positions.tolist()
    assert [int(e.get("data-source")) for e in slots] == cache.sources.tolist()
    return document


def demo_run(seed: int = 0) -> tuple[HomerCache, list[str], passkey.PasskeyPrompt]:
    """The demo's HOMER run, made here through the library: the prompt, settings and bias the command uses."""
    model, tok = load_model(passkey.SHIPPED_MODEL), load_tokenizer(passkey.SHIPPED_MODEL)
    trained = model.cfg.max_position_embeddings
    prompt = passkey.demo_prompt(tok, trained, seed)
    M = trained - passkey.ANSWER_ROOM
    bias, _ = find_bias(passkey.SHIPPED_MODEL, M)
    cache = homer_prefill(model, prompt.prefix, prompt.context, prompt.suffix, HomerConfig(M), bias=bias)
    return cache, token_pieces(tok, prompt.ids), prompt


def test_the_demo_picture_shows_every_node_slot_and_the_digits_in_the_root(tmp_path):
    out = tmp_path / "demo.html"
    run = run_explain("--out", str(out))
    assert run.returncode == 0, run.stderr
    cache, pieces, prompt = demo_run()
    assert cache.plan.N == 16  # the readability target: 16 leaves
    document = check_picture(out, cache, pieces)
    root = next(e for e in document.iter() if e.get("id") == f"node-{cache.plan.H}-0")
    marked = [text_of(e) for e in root.iter() if "m" in classes(e) and "k" in classes(e)]
    assert "".join(marked) == str(prompt.passkey) * 2, "both copies of the passkey's digits, kept in the root"
    cache_digits = [text_of(e[0]) for e in document.iter() if {"slot", "m"} <= classes(e)]  # e[0]: the token
    assert "".join(cache_digits) == str(prompt.passkey) * 2
    runs = [e for e in document.iter() if "run" in classes(e)]
    assert runs and all(not any("m" in classes(x) for x in e.iter()) for e in runs)
    assert f"true passkey: {prompt.passkey}" in text_of(document)


def test_a_prompt_of_ones_own_with_generates_options(tmp_path):
    """--model, --prompt-file, --suffix and HOMER options as `generate` takes them; a picture of that run."""
    text = " ".join(passkey.FILLER * 12)
    (tmp_path / "prompt.txt").write_text(text, encoding="utf-8")
    out = tmp_path / "mine.html"
    question = " What is the pass key ?"
    argv = ["--model", str(passkey.SHIPPED_MODEL), "--prompt-file", str(tmp_path / "prompt.txt"), "--suffix"]
    run = run_explain(*argv, question, "--max-chunk-len", "64", "--reduction", "uncalibrated", "--out", str(out))
    assert run.returncode == 0, run.stderr
    model, tok = load_model(passkey.SHIPPED_MODEL), load_tokenizer(passkey.SHIPPED_MODEL)
    parts = tok.encode("", bos=True), tok.encode(text, bos=False), tok.encode(question, bos=False)
    cache = homer_prefill(model, *parts, HomerConfig(64, reduction="uncalibrated"))
    assert cache.plan.N > 4
    check_picture(out, cache, token_pieces(tok, [i for part in parts for i in part]))


def test_render_html_of_one_leaf_and_of_a_wrong_piece_count():
    cache, pieces, _ = demo_run()
    with pytest.raises(ValueError, match="pieces has 3 entries"):
        render_html(cache, pieces[:3], "x")
    model, tok = load_model(passkey.SHIPPED_MODEL), load_tokenizer(passkey.SHIPPED_MODEL)
    parts = [tok.bos_id], tok.encode("The river runs past the old mill .", bos=False), tok.encode("Where ?", bos=False)
    one = homer_prefill(model, *parts, HomerConfig(64))  # one leaf, nothing pruned: no bias needed
    document = ET.fromstring(render_html(one, token_pieces(tok, sum(parts, [])), "one leaf & <no> pruning"))
    assert [e.get("id") for e in document.iter() if "node" in classes(e)] == ["node-0-0"]
    assert "one leaf & <no> pruning" in text_of(document)


def test_bad_input_is_a_one_line_error(tmp_path):
    for argv, what in (
        (["--out", str(tmp_path)], "is a directory"),
        (["--out", str(tmp_path / "x.html"), "--prompt", "hi"], "--prompt needs --model"),
        (["--out", str(tmp_path / "x.html"), "--max-chunk-len", "0"], "--max-chunk-len must be >= 1"),
        (["--out", str(tmp_path / "no" / "x.html")], "does not exist"),
        (["--out", str(tmp_path / "x.html"), "--model", str(passkey.SHIPPED_MODEL), "--prompt", " "], "empty"),
    ):
        run = run_explain(*argv)
        assert run.returncode == 2 and what in run.stderr and "Traceback" not in run.stderr, (argv, run.stderr)
        assert not (tmp_path / "x.html").exists()
