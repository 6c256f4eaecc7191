"""Deviations from the official code not pinned elsewhere: N.2.7 (one prompt at a time, no silent batch-size-1)."""

import pytest
import torch

from homer_ref.homer import continuation_logits, homer_prefill
from homer_ref.homer.plan import HomerConfig
from homer_ref.llama import Llama, LlamaConfig


@pytest.fixture(scope="module")
def model() -> Llama:
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=40, hidden_size=16, intermediate_size=24, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=4,
    )  # fmt: skip
    return Llama(cfg).eval().to(torch.float64)


CONFIG = HomerConfig(10, 10, 0, "uncalibrated")


@pytest.mark.parametrize(
    "context",
    [[[3, 4, 5], [6, 7, 8]], torch.tensor([[3, 4, 5, 6]]), torch.tensor([3.0, 4.0]), [3, 4.5]],
    ids=["nested-list", "2d-tensor", "float-tensor", "float-id"],
)
def test_a_batch_or_non_integer_ids_are_refused(model, context):
    with pytest.raises(ValueError, match="one prompt|integer"):
        homer_prefill(model, [1], context, [2], CONFIG)


def test_prompts_processed_one_at_a_time_match_the_batched_plain_forward(model):
    """Two prompts through HOMER one at a time equal a batched plain forward when nothing is pruned."""
    prompts = [list(range(3, 11)), list(range(20, 28))]
    batched = model(torch.tensor([[1] + p + [2] for p in prompts]))  # [2, 10, V], a real batch of 2
    for row, p in enumerate(prompts):
        cache = homer_prefill(model, [1], p, [2], CONFIG, all_logits=True)
        assert torch.allclose(cache.logits, batched[row], atol=1e-12, rtol=0)
        tensor_input = homer_prefill(
            model, torch.tensor([1]), torch.tensor(p), torch.tensor([2]), CONFIG, all_logits=True
        )
        assert torch.equal(tensor_input.logits, cache.logits)
        nxt = continuation_logits(model, cache, [5, 6])
        full = model(torch.tensor([[1] + p + [2, 5, 6]]))[0, -2:]
        assert torch.allclose(nxt, full, atol=1e-12, rtol=0)
