"""`python -m homer_ref.explain` and `homer_ref.picture`: the HTML picture of what HOMER kept, checked by its
structure.

The file is parsed with the standard library's XML parser (it is well-formed XHTML) and compared with the trace
of the same HOMER run made through the library: every tree node present with its layers, every input slot of
every node either drawn kept (with its position and its token's text), drawn removed, or inside a collapsed run
of removed slots; every final cache slot with its position; and, for the demo prompt, the passkey's digits
visible in the root. On a byte-level BPE vocabulary (SmolLM2's GGUF) and on tokenizer.json files (byte-level and
sentencepiece-style), the page reads as text: no 'Ġ', 'Ċ' or '▁' anywhere, and `--mark TEXT` outlines the tokens
that `tokenizers`' own character offsets say hold the text, in every node that keeps them. Also: nothing is
fetched or scripted, the page cannot overflow sideways, and bad input is a one-line error with exit code 2.
"""

import json
import os
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import torch
from helpers import ROOT

from homer_ref import load_model, load_tokenizer
from homer_ref.homer import HomerCache, HomerConfig, homer_prefill
from homer_ref.homer.calibration import load_bias
from homer_ref.llama import Llama, LlamaConfig
from homer_ref.loading import save_hf
from homer_ref.picture import COLLAPSE, mark_text, render_html
from homer_ref.prompts import homer_parts, split_prompt
from homer_ref.tasks import passkey

CLI = [sys.executable, "-m", "homer_ref.explain"]
XHTML = "{http://www.w3.org/1999/xhtml}"
RAW_SPELLINGS = ("Ġ", "Ċ", "▁", "<0x0A>")
STORY = (
    "The old lighthouse stood at the end of a narrow spit of land, where the river met the sea.\n"
    "For more than a century its keepers climbed the spiral stairs every evening to light the lamp.\n\n"
    "When the last keeper retired, volunteers found the old log books in a wooden chest in the cellar.\n"
    "They repaired the roof, painted the walls white again, and opened the doors on Saturday afternoons.\n"
    "Children climbed to the top and looked out over the water, where seals rested on the rocks below.\n"
    "At the café by the harbour, a naïve visitor\tasked about the keepers.\n"
)
QUESTION = "Where were the log books found?"


def run_explain(*argv: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (str(ROOT), os.environ.get("PYTHONPATH")))),
           "OMP_NUM_THREADS": "1"}  # fmt: skip
    return subprocess.run(CLI + list(argv), cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)


def classes(element: ET.Element) -> set[str]:
    return set(element.get("class", "").split())


def text_of(element: ET.Element) -> str:
    """The text a token element shows, without the faint ↵ / ⇥ drawn before a newline or a tab."""
    return "".join(element.itertext()).replace("↵\n", "\n").replace("⇥\t", "\t")


def check_picture(path: Path, cache: HomerCache, texts: list[str]) -> ET.Element:
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
        assert section.get("id") == f"node-{t.level}-{t.index}" and f"node {t.level}.{t.index}" in text_of(section)
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
                assert text_of(e) == texts[int(t.input_sources[j])]
                (drawn_kept if "k" in classes(e) else drawn_removed).add(j)
                assert ("r" in classes(e)) == (e.tag == f"{XHTML}del") == ("k" not in classes(e))
        assert drawn_kept == set(t.kept.tolist()), f"node {t.level}.{t.index}: kept slots"
        assert drawn_removed == set(t.removed.tolist()), f"node {t.level}.{t.index}: removed slots"
    slots = [e for e in document.iter() if "slot" in classes(e)]
    assert [int(e.get("data-slot")) for e in slots] == list(range(len(cache.positions)))
    assert [int(e.get("data-position")) for e in slots] == cache.positions.tolist()
    assert [int(e.get("data-source")) for e in slots] == cache.sources.tolist()
    svg = next(e for e in document.iter() if e.tag.endswith("svg"))
    assert svg.get("viewBox") and svg.get("width") is None, "the tree scales to the page: no fixed width"
    assert "overflow-wrap: anywhere" in source_text and "max-width" in source_text, "text wraps inside the page"
    assert "How to read this page" in text_of(document) and "layers per tree level" in text_of(document)
    return document


def marked_in_nodes(document: ET.Element) -> dict[tuple[int, int], set[int]]:
    """Per node, the sources drawn as kept *and* marked."""
    out = {}
    for section in (e for e in document.iter() if "node" in classes(e)):
        key = (int(section.get("data-level")), int(section.get("data-index")))
        out[key] = {int(e.get("data-source")) for e in section.iter() if {"m", "k"} <= classes(e)}
    return out


def demo_run(seed: int = 0) -> tuple[HomerCache, list[str], passkey.PasskeyPrompt]:
    """The demo's HOMER run, made here through the library: the prompt, settings and bias the command uses."""
    model, tok = load_model(passkey.SHIPPED_MODEL), load_tokenizer(passkey.SHIPPED_MODEL)
    trained = model.cfg.max_position_embeddings
    prompt = passkey.demo_prompt(tok, trained, seed)
    bias = load_bias(passkey.SHIPPED_MODEL / "homer_bias.safetensors")
    cache = homer_prefill(model, prompt.prefix, prompt.context, prompt.suffix, HomerConfig(trained - 8), bias=bias)
    return cache, tok.token_texts(prompt.ids), prompt


def test_the_demo_picture_shows_every_node_slot_and_the_digits_in_the_root(tmp_path):
    out = tmp_path / "demo.html"
    run = run_explain("--out", str(out))
    assert run.returncode == 0, run.stderr
    cache, texts, prompt = demo_run()
    assert cache.plan.N == 16  # the readability target: 16 leaves
    document = check_picture(out, cache, texts)
    root = next(e for e in document.iter() if e.get("id") == f"node-{cache.plan.H}-0")
    marked = [text_of(e) for e in root.iter() if "m" in classes(e) and "k" in classes(e)]
    assert "".join(marked).replace(" ", "") == str(prompt.passkey) * 2, "both copies of the digits, kept in the root"
    cache_digits = [text_of(e[0]) for e in document.iter() if {"slot", "m"} <= classes(e)]  # e[0]: the token
    assert "".join(cache_digits).replace(" ", "") == str(prompt.passkey) * 2
    runs = [e for e in document.iter() if "run" in classes(e)]
    assert runs and all(not any("m" in classes(x) for x in e.iter()) for e in runs)
    assert f"true passkey: {prompt.passkey}" in text_of(document)


def tiny_model_dir(path: Path, vocab_size: int, layers: int = 6) -> Path:
    """A random homer_ref Llama (trained context 64) saved as an HF directory: the weights do not matter here."""
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size, 16, 32, layers, 4, 2, 4, max_position_embeddings=64)
    save_hf(Llama(cfg).eval(), path)
    return path


def expected_marks(tok, text: str, parts, needle: str) -> set[int]:
    """Sources of the tokens holding `needle` (in the context or the question), from `tokenizers`' own character
    offsets of each part's text (not from homer_ref's token texts)."""
    ids, found = [i for part in parts for i in part], set()
    start = len(parts[0]) - len(tok._tk.encode(split_prompt(text)[0], add_special_tokens=False).ids)  # BOS
    for part_text in split_prompt(text):
        encoding = tok._tk.encode(part_text, add_special_tokens=False)
        assert encoding.ids == ids[start : start + len(encoding.ids)]  # (an over-long suffix's head is context)
        spans = [(m.start(), m.end()) for m in re.finditer(re.escape(needle), part_text)]
        found |= {start + i for i, (a, b) in enumerate(encoding.offsets) if any(a < e and s < b for s, e in spans)}
        start += len(encoding.ids)
    assert found, needle
    return found


def check_readable_and_marked(out: Path, model_dir: Path, tok, needle: str, M: int) -> None:
    """The page of `explain --model model_dir` reads as text and marks `needle` wherever a node keeps it."""
    text = STORY + QUESTION
    parts = homer_parts(tok, text, M)
    cache = homer_prefill(load_model(model_dir), *parts, HomerConfig(M, reduction="uncalibrated"))
    assert cache.plan.N >= 4
    source = out.read_text(encoding="utf-8")
    assert not [raw for raw in RAW_SPELLINGS if raw in source], "the vocabulary's spelling leaked into the page"
    document = check_picture(out, cache, tok.token_texts([i for part in parts for i in part]))
    marks = expected_marks(tok, text, parts, needle)
    for t in cache.nodes:  # every node that keeps a marked token draws it marked, and marks nothing else
        kept = {int(t.input_sources[j]) for j in t.kept.tolist()}
        assert marked_in_nodes(document)[(t.level, t.index)] == kept & marks, t.name
    final = {int(e.get("data-source")) for e in document.iter() if {"slot", "m"} <= classes(e)}
    assert final == set(cache.sources.tolist()) & marks
    assert any(marked_in_nodes(document).values()), "the marked text is kept somewhere"


def test_a_byte_level_gguf_vocabulary_reads_as_text(tmp_path, smollm2_gguf):
    """SmolLM2's GGUF vocabulary (byte-level BPE: spaces are 'Ġ', newlines 'Ċ'), on a random model of its size."""
    tok = load_tokenizer(smollm2_gguf)
    model_dir = tiny_model_dir(tmp_path / "model", tok.vocab_size)
    (tmp_path / "story.txt").write_text(STORY + QUESTION, encoding="utf-8")
    out = tmp_path / "page.html"
    run = run_explain("--model", str(model_dir), "--tokenizer", str(smollm2_gguf), "--prompt-file",
                      str(tmp_path / "story.txt"), "--max-chunk-len", "40", "--reduction", "uncalibrated",
                      "--mark", "log books", "--mark", "no such text", "--out", str(out))  # fmt: skip
    assert run.returncode == 0, run.stderr
    assert "warning: --mark 'no such text' does not occur in the prompt" in run.stderr
    check_readable_and_marked(out, model_dir, tok, "log books", 40)


@pytest.mark.parametrize("kind", ["byte_level", "metaspace"])
def test_a_tokenizer_json_reads_as_text(tmp_path, kind):
    """tokenizer.json files trained by `tokenizers` itself: GPT-2's byte-level BPE and a sentencepiece-style BPE
    ('▁' for spaces, byte pieces <0x0A> for what it has no piece for)."""
    tokenizers = pytest.importorskip("tokenizers")
    from tokenizers import decoders, models, pre_tokenizers, trainers

    if kind == "byte_level":
        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())  # fmt: skip
        backend.train_from_iterator([STORY] * 5, trainer)
    else:  # trained on ASCII only, so that 'é', 'ï' and the tab fall back to byte pieces
        backend = tokenizers.Tokenizer(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.Metaspace()
        backend.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                             decoders.Strip(" ", 1, 0)])  # fmt: skip
        trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
        backend.train_from_iterator([STORY.replace("é", "e").replace("ï", "i").replace("\t", " ")] * 5, trainer)
        data = json.loads(backend.to_str())
        vocab = data["model"]["vocab"]
        vocab |= {f"<0x{b:02X}>": len(vocab) + b for b in range(256)}  # sentencepiece's byte pieces
        data["model"]["byte_fallback"] = True
        backend = tokenizers.Tokenizer.from_str(json.dumps(data))
    model_dir = tmp_path / "model"
    model_dir.mkdir()
    backend.save(str(model_dir / "tokenizer.json"))
    tok = load_tokenizer(model_dir / "tokenizer.json")
    tiny_model_dir(model_dir, tok.vocab_size)
    (tmp_path / "story.txt").write_text(STORY + QUESTION, encoding="utf-8")
    out = tmp_path / "page.html"
    run = run_explain("--model", str(model_dir), "--prompt-file", str(tmp_path / "story.txt"), "--max-chunk-len",
                      "40", "--reduction", "uncalibrated", "--mark", "log books", "--out", str(out))  # fmt: skip
    assert run.returncode == 0, run.stderr
    check_readable_and_marked(out, model_dir, load_tokenizer(model_dir), "log books", 40)


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
    check_picture(out, cache, tok.token_texts([i for part in parts for i in part]))


def test_a_prompt_with_no_context_is_one_node_with_a_note(tmp_path):
    """A one-line prompt: the default split makes it all suffix, nothing to chunk: one node and a note."""
    out = tmp_path / "one.html"
    run = run_explain("--prompt", "What is the pass key ?", "--out", str(out))  # the shipped model by default
    assert run.returncode == 0, run.stderr
    document = ET.fromstring(out.read_text(encoding="utf-8"))
    assert [e.get("id") for e in document.iter() if "node" in classes(e)] == ["node-0-0"]
    assert "no context part (nothing to chunk)" in text_of(document)


def test_render_html_of_one_leaf_and_of_a_wrong_text_count():
    cache, texts, _ = demo_run()
    with pytest.raises(ValueError, match="texts has 3 entries"):
        render_html(cache, texts[:3], "x")
    model, tok = load_model(passkey.SHIPPED_MODEL), load_tokenizer(passkey.SHIPPED_MODEL)
    parts = [tok.bos_id], tok.encode("The river runs past the old mill .", bos=False), tok.encode("Where ?", bos=False)
    one = homer_prefill(model, *parts, HomerConfig(64))  # one leaf, nothing pruned: no bias needed
    document = ET.fromstring(render_html(one, tok.token_texts(sum(parts, [])), "one leaf & <no> pruning"))
    assert [e.get("id") for e in document.iter() if "node" in classes(e)] == ["node-0-0"]
    assert "one leaf & <no> pruning" in text_of(document)


def test_mark_text_finds_every_token_overlapping_the_text():
    texts = ["The", " pass", " key", " is", " 4", "8", "2", " .", " The", " pass", " key"]
    assert mark_text(texts, "pass key") == {1, 2, 9, 10}
    assert mark_text(texts, "482") == {4, 5, 6} and mark_text(texts, "s k") == {1, 2, 9, 10}
    assert mark_text(texts, "absent") == set() and mark_text(texts, "") == set()


def test_bad_input_is_a_one_line_error(tmp_path):
    for argv, what in (
        (["--out", str(tmp_path)], "is a directory"),
        (["--out", str(tmp_path / "x.html"), "--max-chunk-len", "0"], "--max-chunk-len must be >= 1"),
        (["--out", str(tmp_path / "no" / "x.html")], "does not exist"),
        (["--out", str(tmp_path / "x.html"), "--model", str(passkey.SHIPPED_MODEL), "--prompt", " "], "empty"),
    ):
        run = run_explain(*argv)
        assert run.returncode == 2 and what in run.stderr and "Traceback" not in run.stderr, (argv, run.stderr)
        assert not (tmp_path / "x.html").exists()
