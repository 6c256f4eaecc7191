"""The passkey task (homer_ref/tasks/passkey.py) and the shipped model (homer_ref/data/passkey_model).

- The task's generator is pure and seeded, gives prompts of exactly the requested length, puts the passkey at
  the requested depth, and counts tokens the way the shipped tokenizer does.
- The shipped model loads, its files match the model card's sizes and hashes, it fits in 8 MB, and its
  tokenizer is reproduced byte for byte by the training script.
- Correctness: a seeded `eval passkey` run of the shipped model at 1x (inside the trained context) gives >= 95%
  on 40 samples; at 8x plain inference fails and HOMER succeeds (12 seeded samples).
"""

import hashlib
import importlib.util
import json
import random
import re

import pytest
import torch
from helpers import ROOT

from homer_ref import load_model, load_tokenizer
from homer_ref.cli.eval import main
from homer_ref.homer.calibration import load_bias
from homer_ref.tasks import passkey
from homer_ref.tasks.passkey import SHIPPED_MODEL as DEFAULT_MODEL

CARD_ROW = re.compile(r"^\| `([^`]+)` \| ([\d,]+) \| `([0-9a-f]{64})` \|$")


def training_script():
    spec = importlib.util.spec_from_file_location("train_passkey_model", ROOT / "scripts" / "train_passkey_model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ----------------------------------------------------------------------------------------------- the task


@pytest.mark.parametrize("n", [60, 61, 100, 249, 256, 1000, 2040])
@pytest.mark.parametrize("instruction", [False, True])
def test_make_sample_has_exactly_the_requested_length(n, instruction):
    prefix, context, suffix, key = passkey.make_sample(random.Random(n), n, instruction=instruction)
    assert 1 + sum(passkey.count_tokens(t) for t in (prefix, context, suffix)) == n
    assert passkey.passkey_sentence(key) in context and suffix == passkey.QUESTION
    assert 10**4 <= key < 10**5


def test_make_sample_is_seeded_and_places_the_passkey_at_the_depth():
    assert passkey.make_sample(random.Random(7), 500) == passkey.make_sample(random.Random(7), 500)
    assert passkey.make_sample(random.Random(7), 500) != passkey.make_sample(random.Random(8), 500)
    _, start, _, key = passkey.make_sample(random.Random(1), 500, depth=0.0)
    _, end, _, key_end = passkey.make_sample(random.Random(1), 500, depth=1.0)
    assert start.startswith(passkey.passkey_sentence(key)) and end.endswith(passkey.passkey_sentence(key_end))
    _, middle, _, key_mid = passkey.make_sample(random.Random(1), 2000, depth=0.5)
    assert abs(middle.index(passkey.passkey_sentence(key_mid)) / len(middle) - 0.5) < 0.05
    with pytest.raises(ValueError, match="depth"):
        passkey.make_sample(random.Random(0), 500, depth=1.5)
    with pytest.raises(ValueError, match="at least"):
        passkey.make_sample(random.Random(0), 20)


def test_score_takes_the_first_integer():
    assert passkey.score(" 48219 .", 48219)
    assert passkey.score("48219 12", 48219)
    assert not passkey.score(" 4821 9", 48219)
    assert not passkey.score("12 48219", 48219)
    assert not passkey.score(" the pass key", 48219)


# ----------------------------------------------------------------------------------------------- the shipped model


def test_shipped_model_loads_and_its_tokenizer_counts_like_the_task():
    model = load_model(DEFAULT_MODEL)
    tok = load_tokenizer(DEFAULT_MODEL)
    assert model.cfg.max_position_embeddings == 256 and model.cfg.num_attention_heads == 8
    assert tok.vocab_size == model.cfg.vocab_size and (tok.bos_id, tok.eos_id) == (1, 2)
    for word in passkey.vocabulary():
        assert len(tok.encode(word, bos=False)) == 1, word
    rng = random.Random(0)
    for n in (60, 256, 700):
        prefix, context, suffix, key = passkey.make_sample(rng, n, instruction=True)
        for text in (prefix, context, suffix, passkey.answer_text(key)):
            assert len(tok.encode(text, bos=False)) == passkey.count_tokens(text), text
    assert tok.decode(tok.encode(passkey.answer_text(48219), bos=False)).strip() == "48219 ."


def test_shipped_files_match_the_model_card():
    card = (DEFAULT_MODEL / "README.md").read_text()
    rows = {m[1]: (int(m[2].replace(",", "")), m[3]) for line in card.splitlines() if (m := CARD_ROW.match(line))}
    needed = {"config.json", "model.safetensors", "tokenizer.model", "homer_bias.safetensors"}
    assert needed <= rows.keys(), f"the card lists {sorted(rows)}"
    for name, (size, digest) in rows.items():
        data = (DEFAULT_MODEL / name).read_bytes()
        assert len(data) == size, name
        assert hashlib.sha256(data).hexdigest() == digest, name
    total = sum(p.stat().st_size for p in DEFAULT_MODEL.iterdir())
    assert total <= 8_000_000, f"the shipped model is {total:,} bytes, more than 8 MB"
    for needle in ("Training", "Wall time", "python scripts/train_passkey_model.py", "Measured accuracy"):
        assert needle in card
    meta = json.loads((DEFAULT_MODEL / "training.json").read_text())
    assert meta["parameters"] == sum(p.numel() for p in load_model(DEFAULT_MODEL).parameters())


def test_shipped_bias_table_covers_the_trained_context():
    bias = load_bias(DEFAULT_MODEL / "homer_bias.safetensors")
    assert bias.dtype == torch.float32 and bias.shape == (8, 256) and torch.isfinite(bias).all()


def test_training_script_reproduces_the_shipped_tokenizer():
    assert training_script().train_tokenizer(0) == (DEFAULT_MODEL / "tokenizer.model").read_bytes()


def test_shipped_model_retrieves_the_passkey_in_context(capsys):
    """Correctness: inside the trained context the shipped model finds the passkey (>= 95% of 40 samples)."""
    code = main(["passkey", "--lengths", "1", "--modes", "plain", "--samples", "40", "--seed", "0", "--json"])
    assert code == 0
    (row,) = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (row["task"], row["mode"], row["length"], row["samples"]) == ("passkey", "plain", 256, 40)
    assert row["accuracy"] >= 0.95, row


def test_homer_finds_the_passkey_where_plain_inference_fails(capsys):
    """At 8x the trained context (seeded): plain inference fails, calibrated HOMER succeeds (card: 9.5% vs 96.0%)."""
    argv = ["passkey", "--lengths", "8", "--modes", "plain,homer", "--samples", "12", "--seed", "0", "--json"]
    assert main(argv) == 0
    plain, homer = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert (plain["mode"], homer["mode"], homer["length"]) == ("plain", "homer", 2048)
    assert plain["accuracy"] <= 0.25 and homer["accuracy"] >= 11 / 12, (plain, homer)
    assert homer["copy_kept"] >= 11 / 12  # the trace: a complete copy of the passkey survived the pruning


def test_training_selection_score_is_homers_significance():
    """The training script's selection loss ranks by `last_query_logits`; it must be the score HOMER prunes by:
    the head-max of `Llama.attend`'s last-query logits (a separate code path) on the prompt cut at its last
    token, and the batch's masks must mark the context and, inside it, the passkey sentence."""
    script = training_script()
    model, tok = load_model(DEFAULT_MODEL), load_tokenizer(DEFAULT_MODEL)
    tokens, valid, last, digits, context, needle = script.make_batch(tok, random.Random(5), 3, 120, tok.eos_id)
    h = model.embed_tokens(tokens)
    with torch.no_grad():
        for layer in range(2):
            keys = model.attend(layer, h, torch.arange(tokens.shape[1]))[1]
            score = script.last_query_logits(model, layer, h, keys, last)  # [B, n]
            for b in range(3):
                n = int(last[b]) + 1
                expected = model.attend(layer, h[b : b + 1, :n], torch.arange(n), last_query=True)[3][0].amax(0)
                torch.testing.assert_close(score[b, :n], expected, atol=1e-4, rtol=0)
            h = model.feed_forward(layer, model.attend(layer, h, torch.arange(tokens.shape[1]))[0])
    for b in range(3):
        ids = tokens[b].tolist()
        sentence = tok.encode(passkey.passkey_sentence(int("".join(tok.piece(d) for d in digits[b]))), bos=False)
        start = int(needle[b].nonzero()[0])
        assert ids[start : start + len(sentence)] == sentence and int(needle[b].sum()) == len(sentence)
        assert bool((context[b] | ~needle[b]).all())  # the sentence lies inside the context
        assert not context[b, 0] and not context[b, int(last[b])]  # BOS and the question's last token are affixes
