"""`save_hf` is the inverse of `load_model`, and what it writes is read the same by HF transformers."""

import pytest
import torch
from helpers import assert_close, hf_logits

from homer_ref import load_model
from homer_ref.llama import Llama, LlamaConfig, RopeScaling
from homer_ref.loading import save_hf


def _model(tied: bool, scaling: RopeScaling) -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=48, hidden_size=24, intermediate_size=40, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=6, rope_scaling=scaling, max_position_embeddings=32, tie_word_embeddings=tied,
    )  # fmt: skip
    model = Llama(cfg).eval()
    for name, p in model.named_parameters():
        if "norm" in name:
            p.data.uniform_(0.5, 1.5)
    return model


def test_round_trip_and_hf_agree(tmp_path):
    transformers = pytest.importorskip("transformers")
    for i, (tied, scaling) in enumerate([(False, RopeScaling()), (True, RopeScaling("linear", 2.0))]):
        model = _model(tied, scaling)
        save_hf(model, tmp_path / str(i))
        again = load_model(tmp_path / str(i))
        assert again.cfg == model.cfg
        tokens = torch.arange(3, 40)[None]
        assert torch.equal(again(tokens), model(tokens))
        hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path / str(i)).eval()
        assert_close(model(tokens)[0], hf_logits(hf, tokens[0].tolist()), "hf_float32", f"save_hf case {i}")
