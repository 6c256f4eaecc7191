"""GGUF checkpoints and tokenizers (homer_ref/loading/gguf.py) against independent sources, on tiny files.

- Every quantization type the README lists (F32, F16, BF16, Q8_0, Q4_0, Q4_1, Q4_K, Q6_K): a tiny random Llama is
  written with `gguf.GGUFWriter` (quantized by `gguf.quants.quantize`, or random K-quant blocks of the documented
  layout); homer_ref's loaded weights equal `gguf.quants.dequantize` of the stored bytes with the q/k permutation
  undone by the test's own code, and its logits equal those of HF `transformers` reading the same GGUF file itself
  (its own dequantization, permutation and config mapping).
- The "llama" (sentencepiece) GGUF vocabulary: homer_ref's tokenizer encodes like the sentencepiece model it was
  written from, and like transformers' tokenizer read from the same GGUF file.
- Config from metadata: tied output when `output.weight` is absent, RoPE theta, GQA, trained context.
"""

import pytest
import torch
from helpers import (
    GGUF_TYPES,
    STORIES_DIR,
    assert_close,
    hf_logits,
    llama3_rope_factors,
    make_hf_llama,
    our_logits,
    write_tiny_gguf,
)

from homer_ref import load_model, load_tokenizer
from homer_ref.loading import checkpoint_names, load_config

pytest.importorskip("gguf", reason="needs the models extra: pip install 'homer_ref[models]'")
TINY = dict(
    vocab_size=512,
    hidden_size=256,
    intermediate_size=256,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    max_position_embeddings=64,
    num_hidden_layers=2,
)  # fmt: skip  (K-quants need rows of 256)
TOKENIZER = STORIES_DIR / "tok512.model"
TEXT = "Once upon a time, there was a little girl named Lily. She loved to play outside in the park with her dog."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(directory, HF float32 model) of a tiny random Llama whose vocabulary is stories260K's tokenizer's."""
    d = tmp_path_factory.mktemp("gguf")
    return d, make_hf_llama(d / "hf", seed=3, **TINY)


def hf_from_gguf(path):
    """transformers' own reading of a GGUF file (dequantization, q/k permutation, config): the oracle."""
    transformers = pytest.importorskip("transformers")
    pytest.importorskip("accelerate", reason="transformers reads GGUF files only with accelerate installed")
    transformers.utils.logging.disable_progress_bar()
    transformers.utils.logging.set_verbosity_error()
    model = transformers.LlamaForCausalLM.from_pretrained(
        str(path.parent), gguf_file=path.name, dtype=torch.float32, attn_implementation="eager"
    )
    return model.eval()


@pytest.mark.parametrize("qtype", GGUF_TYPES)
def test_every_quantization_type_loads_as_gguf_and_transformers_read_it(tiny, qtype):
    d, hf = tiny
    path = d / f"tiny-{qtype}.gguf"
    expected = write_tiny_gguf(path, hf, qtype, tokenizer_model=TOKENIZER, seed=1)
    model = load_model(path)
    state = model.state_dict()
    for ours, theirs in checkpoint_names(model.cfg).items():  # exact: both are gguf's float32 dequantization
        assert torch.equal(state[ours], torch.from_numpy(expected[theirs])), f"{qtype}: {theirs}"
    oracle = hf_from_gguf(path)
    tokens = load_tokenizer(path).encode(TEXT)
    assert_close(our_logits(model, tokens), hf_logits(oracle, tokens), "hf_float32", f"{qtype} logits vs HF's GGUF")


def test_config_from_metadata_and_tied_output(tiny):
    d, hf = tiny
    path = d / "tied.gguf"
    write_tiny_gguf(path, hf, "F32", tokenizer_model=TOKENIZER, skip=("output.weight",))
    cfg = load_config(path)
    assert (cfg.num_hidden_layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim) == (2, 4, 2, 64)
    assert (cfg.vocab_size, cfg.max_position_embeddings, cfg.rope_theta) == (512, 64, 10000.0)
    assert cfg.tie_word_embeddings
    model = load_model(path)
    assert model.lm_head.weight is model.embed_tokens.weight
    write_tiny_gguf(d / "untied.gguf", hf, "F32", tokenizer_model=TOKENIZER)
    assert not load_config(d / "untied.gguf").tie_word_embeddings


def test_sentencepiece_vocabulary_encodes_like_sentencepiece_and_transformers(tiny):
    """The "llama" GGUF tokenizer: the same ids as the .model it came from, and as transformers' GGUF tokenizer."""
    import sentencepiece

    transformers = pytest.importorskip("transformers")
    d, hf = tiny
    path = d / "vocab.gguf"
    write_tiny_gguf(path, hf, "F32", tokenizer_model=TOKENIZER)
    tok, sp = load_tokenizer(path), sentencepiece.SentencePieceProcessor(model_file=str(TOKENIZER))
    theirs = transformers.AutoTokenizer.from_pretrained(str(d), gguf_file=path.name)
    texts = [TEXT, "  two  spaces, a tab\tand\nnew lines", "Ünïcödé → bytes ✓ 1234", "Tom's dog didn't bark."]
    for text in texts:
        assert tok.encode(text, bos=False) == theirs(text, add_special_tokens=False).input_ids, text
        if "  " not in text and "\n" not in text:  # tok512 also collapses whitespace runs; GGUF keeps no normalizer
            assert tok.encode(text, bos=False) == sp.encode(text), text
            assert tok.decode(tok.encode(text)) == sp.decode(sp.encode(text)), text
    assert (tok.vocab_size, tok.bos_id, tok.eos_id, tok.add_bos) == (512, 1, 2, True)
    assert tok.encode("Hi")[0] == 1 and tok.piece(tok.encode("Hi", bos=False)[0]) == sp.id_to_piece(sp.encode("Hi")[0])


def test_llama3_rope_scaling_from_rope_freqs(tmp_path):
    """Llama 3.1+ GGUF files store RoPE scaling as per-frequency divisors (rope_freqs.weight): the llama3
    parameters are recovered, and the logits at positions past the original context equal HF's llama3 model."""
    rope = {"rope_type": "llama3", "rope_theta": 10000.0, "factor": 8.0, "low_freq_factor": 1.0,
            "high_freq_factor": 4.0, "original_max_position_embeddings": 64}  # fmt: skip
    config = dict(TINY, vocab_size=61, rope_parameters=rope, max_position_embeddings=512)
    hf = make_hf_llama(tmp_path / "hf", seed=5, **config)
    path = tmp_path / "llama3.gguf"
    write_tiny_gguf(path, hf, "F32", extra={"rope_freqs.weight": llama3_rope_factors(rope, 64)})
    rs = load_config(path).rope_scaling
    assert (rs.rope_type, rs.factor, rs.low_freq_factor, rs.original_max_position_embeddings) == ("llama3", 8, 1, 64)
    assert rs.high_freq_factor == pytest.approx(4.0, rel=1e-4)
    tokens = list(range(3, 61)) * 4
    positions = list(range(200, 200 + len(tokens)))
    our = our_logits(load_model(path), tokens, positions)
    assert_close(our, hf_logits(hf, tokens, positions), "hf_float32", "llama3 RoPE from rope_freqs vs HF")


def test_a_tensor_stored_with_no_rows_is_a_damaged_file(tmp_path):
    """A header whose stored shape has no rows (found by the fuzz test: a division by zero) is one clean error."""
    import gguf
    import numpy as np

    from homer_ref.loading import CheckpointError
    from homer_ref.loading.gguf import StoredTensor, dequantized

    path = tmp_path / "damaged.gguf"
    path.write_bytes(bytes(64))
    f32 = gguf.GGMLQuantizationType.F32
    for stored_shape in [(0, 32), (3, 32)]:  # no rows; rows that do not divide the shape
        tensor = StoredTensor("blk.0.attn_q.weight", 0, np.dtype(np.float32), stored_shape, f32, (4, 32))
        with pytest.raises(CheckpointError, match="damaged"):
            dequantized(tensor, path)
