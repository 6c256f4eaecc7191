"""The Tokenizer interface over every kind, which file a path means, the conventions read from the model's files,
token ids in and out of `generate`, and the order of the checks (cheap ones before the weights are read).

Oracles: `tokenizers`' own encoding of the tokenizer.json under test, sentencepiece's of tok512.model,
transformers' `apply_chat_template`, and llama2.c's golden text.
"""

import json
import shutil
from pathlib import Path

import pytest
import torch
from helpers import ROOT, STORIES_DIR

import homer_ref.cli.common as common
from homer_ref import CheckpointError, load_tokenizer
from homer_ref.cli.generate import main as generate_main
from homer_ref.loading.tokenizer import HFTokenizer, SentencePieceTokenizer, find_tokenizer_file

tokenizers = pytest.importorskip("tokenizers", reason="needs the models extra: pip install 'homer_ref[models]'")
MHA = ROOT / "fixtures" / "models" / "mha"  # L=6, V=64, trained context 64, no tokenizer
CORPUS = ["the cat sat on the mat", "the dog ate the bone", "a bird sang in the tree"] * 20
TEMPLATE = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}{{ eos_token }}{% endfor %}"
TEMPLATE += "{% if add_generation_prompt %}[assistant]{% endif %}"


def bpe_tokenizer_json(path: Path, vocab_size: int = 64, bos: bool = True) -> Path:
    """A real byte-level BPE tokenizer.json of `vocab_size` ids, trained by `tokenizers` ("<s>" 0... see specials),
    whose post-processor prepends <s> when `bos` (the convention tokenizer_config may override)."""
    from tokenizers import decoders, models, pre_tokenizers, processors, trainers

    tk = tokenizers.Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    specials = ["<unk>", "<s>", "</s>", "<|end|>"]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:40])  # fmt: skip
    tk.train_from_iterator(CORPUS, trainer)
    if bos:
        tk.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    path.parent.mkdir(parents=True, exist_ok=True)
    tk.save(str(path))
    return path


@pytest.fixture
def hf_dir(tmp_path):
    """The MHA fixture model (vocabulary 64) with a tokenizer.json of 64 ids beside it."""
    d = Path(shutil.copytree(MHA, tmp_path / "model"))
    bpe_tokenizer_json(d / "tokenizer.json")
    assert tokenizers.Tokenizer.from_file(str(d / "tokenizer.json")).get_vocab_size() == 64
    return d


def test_tokenizer_json_encodes_as_tokenizers_does_with_the_post_processor_convention(hf_dir):
    tok = load_tokenizer(hf_dir)
    own = tokenizers.Tokenizer.from_file(str(hf_dir / "tokenizer.json"))
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 64
    for text in CORPUS[:3] + ["the cat ate the bird"]:
        assert tok.encode(text) == own.encode(text).ids  # bos=None: the post-processor's <s>
        assert tok.encode(text, bos=False) == own.encode(text, add_special_tokens=False).ids
        assert tok.decode(tok.encode(text)) == text
    assert (tok.bos_id, tok.add_bos, tok.eos_id) == (1, True, None)  # no tokenizer_config: the post-processor's <s>


def test_conventions_come_from_the_model_files(hf_dir):
    """tokenizer_config.json: BOS/EOS texts, add_bos_token, chat template; generation_config.json: stop ids."""
    (hf_dir / "tokenizer_config.json").write_text(
        json.dumps(
            {"bos_token": "<s>", "eos_token": {"content": "</s>"}, "add_bos_token": False, "chat_template": TEMPLATE}
        )  # fmt: skip
    )
    (hf_dir / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 3]}))
    tok = load_tokenizer(hf_dir)
    assert (tok.bos_id, tok.eos_id, tok.add_bos, tok.stop_ids) == (1, 2, False, (2, 3))
    assert tok.encode("the cat")[:1] != [1] and tok.encode("the cat", bos=True)[0] == 1
    messages = [{"role": "user", "content": "the cat"}]
    transformers = pytest.importorskip("transformers")
    theirs = transformers.PreTrainedTokenizerFast(tokenizer_file=str(hf_dir / "tokenizer.json"), bos_token="<s>",
                                                  eos_token="</s>", chat_template=TEMPLATE)  # fmt: skip
    assert tok.apply_chat(messages) == theirs.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.chat_affixes() == ("<s>[user]", "</s>[assistant]")
    (hf_dir / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")  # transformers' newer place wins
    assert load_tokenizer(hf_dir).apply_chat(messages) == "the cat!"


def test_which_file_a_path_means(tmp_path, hf_dir):
    """tokenizer.json over tokenizer.model; a model file means its directory; the only *.model counts."""
    shutil.copy(STORIES_DIR / "tok512.model", hf_dir / "tokenizer.model")
    assert find_tokenizer_file(hf_dir) == hf_dir / "tokenizer.json"
    assert find_tokenizer_file(hf_dir / "model.safetensors") == hf_dir / "tokenizer.json"
    assert find_tokenizer_file(STORIES_DIR / "stories260K.bin") == STORIES_DIR / "tok512.model"
    assert isinstance(load_tokenizer(STORIES_DIR / "stories260K.bin"), SentencePieceTokenizer)
    bare = Path(shutil.copytree(MHA, tmp_path / "bare"))
    for name in ("a.model", "b.model"):
        shutil.copy(STORIES_DIR / "tok512.model", bare / name)
    with pytest.raises(CheckpointError, match="a.model, b.model"):
        load_tokenizer(bare)


def test_stories260K_golden_text_without_tokenizer_argument(capsys):
    """The .bin finds tok512.model beside it: llama2.c's expected greedy text with no --tokenizer."""
    argv = ["--model", str(STORIES_DIR / "stories260K.bin"), "--max-new-tokens", "200", "--temperature", "0"]
    assert generate_main(argv) == 0
    expected = (STORIES_DIR / "expected_greedy_200.txt").read_text(encoding="utf-8")
    assert capsys.readouterr().out.strip() == expected.strip()


def test_ids_in_and_out_without_any_tokenizer(tmp_path, capsys):
    """A model without a tokenizer runs from --prompt-ids with --print-ids, plain and HOMER."""
    (tmp_path / "ids.json").write_text(json.dumps(list(range(1, 40))))
    base = ["--model", str(MHA), "--prompt-ids", str(tmp_path / "ids.json"), "--print-ids", "--max-new-tokens", "5"]
    assert generate_main(base) == 0
    plain = json.loads(capsys.readouterr().out)
    assert len(plain) == 5 and all(0 <= i < 64 for i in plain)
    parts = {"prefix_ids": [1], "context_ids": list(range(2, 38)), "suffix_ids": [38, 39]}
    (tmp_path / "parts.json").write_text(json.dumps(parts))
    homer = ["--mode", "homer", "--max-chunk-len", "16", "--reduction", "uncalibrated"]
    argv = ["--model", str(MHA), "--prompt-ids", str(tmp_path / "parts.json"), "--print-ids", "--max-new-tokens", "5"]
    assert generate_main(argv + homer) == 0
    from_object = json.loads(capsys.readouterr().out)
    (tmp_path / "prefix.json").write_text("[1]")
    (tmp_path / "suffix.json").write_text("[38, 39]")
    (tmp_path / "context.json").write_text(json.dumps(list(range(2, 38))))
    argv = ["--model", str(MHA), "--prompt-ids", str(tmp_path / "context.json"), "--prefix-ids",
            str(tmp_path / "prefix.json"), "--suffix-ids", str(tmp_path / "suffix.json"), "--print-ids",
            "--max-new-tokens", "5"]  # fmt: skip
    assert generate_main(argv + homer) == 0
    assert json.loads(capsys.readouterr().out) == from_object


def test_the_calibrated_reduction_without_a_tokenizer(tmp_path, capsys):
    """With no tokenizer the calibration text cannot be read: the calibrated reduction then needs a table (one
    line saying so), and a table beside the model serves it."""
    from safetensors.torch import save_file

    from homer_ref.cli.common import run_main

    model = Path(shutil.copytree(MHA, tmp_path / "model"))
    parts = {"prefix_ids": [1], "context_ids": list(range(2, 38)), "suffix_ids": [38, 39]}
    (tmp_path / "parts.json").write_text(json.dumps(parts))
    argv = ["--model", str(model), "--prompt-ids", str(tmp_path / "parts.json"), "--print-ids", "--max-new-tokens",
            "3", "--mode", "homer", "--max-chunk-len", "16"]  # fmt: skip
    assert run_main(generate_main, argv) == 2
    assert "pass a tokenizer or --bias" in capsys.readouterr().err
    save_file({"bias": torch.zeros(6, 16)}, str(model / "homer_bias.safetensors"))
    assert run_main(generate_main, argv) == 0
    captured = capsys.readouterr()
    assert len(json.loads(captured.out)) == 3 and "bias: beside the model" in captured.err


@pytest.mark.parametrize(
    "extra, names",
    [
        (["--mode", "homer", "--max-chunk-len", "16"], ("HOMER needs the prompt split", "prefix_ids")),
        ([], ("no tokenizer.json or tokenizer.model", "--print-ids")),  # text out needs a tokenizer
    ],
)
def test_ids_errors(tmp_path, capsys, extra, names):
    (tmp_path / "ids.json").write_text(json.dumps(list(range(1, 40))))
    argv = ["--model", str(MHA), "--prompt-ids", str(tmp_path / "ids.json"), "--max-new-tokens", "2"] + extra
    argv += ["--print-ids"] if extra else []
    assert common.run_main(generate_main, argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and all(n in err for n in names), err


@pytest.mark.parametrize(
    "case, names",
    [
        ("tokenizer of another vocabulary", ("72 pieces", "vocabulary is 64")),
        ("id outside the vocabulary", ("token id 99", "[0, 64)")),
    ],
)
def test_cheap_checks_come_before_the_weights(tmp_path, monkeypatch, capsys, case, names):
    """The tokenizer's vocabulary and the ids are checked against the config before any weight is read."""
    from test_errors_api import train_tokenizer

    def no_weights(*args, **kwargs):
        raise AssertionError("the weights were read before the cheap checks")

    monkeypatch.setattr(common, "load_model", no_weights)
    if case == "tokenizer of another vocabulary":
        argv = ["--model", str(MHA), "--tokenizer", str(train_tokenizer(tmp_path / "t.model", 72)), "--prompt", "a"]
    else:
        (tmp_path / "ids.json").write_text("[1, 99]")
        argv = ["--model", str(MHA), "--prompt-ids", str(tmp_path / "ids.json"), "--print-ids"]
    assert common.run_main(generate_main, argv) == 2
    err = capsys.readouterr().err
    assert all(n in err for n in names), err
