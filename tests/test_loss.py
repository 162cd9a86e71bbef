"""The training loss computed a chunk of tokens at a time (workers/loss.py) is the loss of the whole logits, with the
same gradients, and never keeps a micro-batch's logits for backward."""

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from orchestrator.demo.task import TINY_LLAMA
from workers.loss import IGNORED, ChunkedLoss, chunks_for, whole_logits_loss

VOCAB = 97  # a prime, so no chunk size divides the tokens evenly by accident
GEMMA2 = {"model_type": "gemma2", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2,
          "num_key_value_heads": 1, "head_dim": 16, "max_position_embeddings": 64, "final_logit_softcapping": 3.0, "vocab_size": VOCAB}


def model_of(config: dict, lora: bool = False, tied: bool = False):
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**{**config, "vocab_size": VOCAB, "tie_word_embeddings": tied}))
    model.float()
    if lora:
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    return model


def batch(samples: int = 3, tokens: int = 20):
    """Token ids, an attention mask with padding at the end of two samples, and labels that ignore a prompt and the padding."""
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(3, VOCAB, (samples, tokens), generator=generator)
    mask = torch.ones_like(input_ids)
    mask[1, 15:] = 0
    mask[2, 9:] = 0
    labels = input_ids.masked_fill(mask == 0, IGNORED)
    labels[:, :4] = IGNORED  # the prompt
    return input_ids, mask, labels


def whole_loss(model, input_ids, mask, labels):
    """What the training loop computed before: every position's logits, in fp32, then the loss over them."""
    return whole_logits_loss(model(input_ids=input_ids, attention_mask=mask).logits, labels)


def chunked_loss(model, chunks, input_ids, mask, labels):
    ChunkedLoss(model).arm(labels, chunks)
    out = model(input_ids=input_ids, attention_mask=mask)
    assert out.logits.shape[1] == 0  # the model's own head computed no logits
    return out.loss


def loss_and_grads(model, compute) -> tuple[float, dict[str, torch.Tensor]]:
    model.zero_grad()
    value = compute()
    value.backward()
    return value.item(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("config, lora, tied, chunks", [(TINY_LLAMA, False, False, 7), (TINY_LLAMA, False, True, 5), (TINY_LLAMA, True, False, 3),
                                                        (TINY_LLAMA, False, False, 1), (GEMMA2, False, True, 6), (TINY_LLAMA, False, False, 60)],
                         ids=["llama", "tied-embeddings", "lora", "one-chunk", "gemma2-softcap", "more-chunks-than-tokens"])
def test_the_chunked_loss_and_its_gradients_are_the_whole_logits_ones(config, lora, tied, chunks):
    model = model_of(config, lora, tied)
    data = batch()
    expected, expected_grads = loss_and_grads(model, lambda: whole_loss(model, *data))
    got, grads = loss_and_grads(model, lambda: chunked_loss(model, chunks, *data))
    assert got == pytest.approx(expected, rel=1e-6)
    assert grads.keys() == expected_grads.keys()
    for name, grad in grads.items():  # (fp32 sums in another order: within a millionth of the gradient's scale)
        expected_grad = expected_grads[name]
        assert (grad - expected_grad).abs().max() <= 1e-6 * expected_grad.abs().max(), name


def test_no_logits_are_kept_for_backward():
    """What a card holds between forward and backward: with the whole logits, the loss keeps every position's
    (fp32) log-probabilities; chunked, no tensor over the vocabulary at all (each chunk's are made again in backward)."""
    model, data = model_of(TINY_LLAMA), batch()
    kept = []

    def logits_kept(compute) -> int:
        kept.clear()
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            compute()
        weights = {p.untyped_storage().data_ptr() for p in model.parameters()}  # (the head's weight is kept, whole, either way)
        return sum(t.numel() for t in kept if t.dim() and t.shape[-1] == VOCAB and t.untyped_storage().data_ptr() not in weights)

    assert logits_kept(lambda: whole_loss(model, *data)) >= (data[2][:, 1:] != IGNORED).sum() * VOCAB
    assert logits_kept(lambda: chunked_loss(model, 4, *data)) == 0


def test_a_forward_not_armed_is_the_models_own():
    """Evaluation, generation: the hooks stay out of the way unless the training loop arms them for a micro-step."""
    model, (input_ids, mask, labels) = model_of(TINY_LLAMA), batch()
    loss = ChunkedLoss(model)
    plain = model(input_ids=input_ids, attention_mask=mask)
    assert plain.loss is None and plain.logits.shape == (*input_ids.shape, VOCAB)
    loss.arm(labels, 4)
    assert model(input_ids=input_ids, attention_mask=mask).loss.item() == pytest.approx(whole_loss(model, input_ids, mask, labels).item(), rel=1e-6)
    torch.testing.assert_close(model(input_ids=input_ids, attention_mask=mask).logits, plain.logits)


def test_every_rank_takes_as_many_chunks_as_the_largest_micro_batch_needs():
    """Under ZeRO-3 each chunk gathers the head's weight, a collective: ranks of uneven micro-batches take the same
    number, none holding more than the chunk's tokens."""
    assert chunks_for((3, 1, 2), 32, 5) == 20  # 96 tokens on the largest rank
    assert chunks_for((3, 1, 2), 32, 96) == 1 and chunks_for((3, 1, 2), 32, 95) == 2
    assert chunks_for((3, 1, 2), 32, 0) == 1  # no chunking asked
