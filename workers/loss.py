"""The training loss without the whole micro-batch's logits at once.

A causal LM's logits are seq_len x vocab a sample: Llama 3's 128,256 words at 2,048 tokens make 0.5 GB in bf16, and
the loss's fp32 copy and its gradient add 1 GB more each, more than every other activation of an 8B QLoRA under
activation checkpointing. So the model's output head sees none of the tokens in the model's forward (a pre-hook hands
it an empty slice of the final hidden states and keeps them), and the loss runs the head itself on a chunk of tokens at
a time, each chunk under non-reentrant activation checkpointing: a chunk's logits exist while its loss is computed and
again while its gradient is, never beside another chunk's (torchtune's chunked output loss and Liger's fused linear
cross-entropy do the same). Positions whose label is ignored (a prompt, padding) are dropped before the head: they
never get logits. The chunks' token losses sum to what the whole logits gave (tests/test_loss.py); the planner counts
one chunk's logits (orchestrator/planner/memory.py).

Every rank of a world takes the same number of chunks, its own tokens spread over them (some may be empty): under
ZeRO-3 each call of the head gathers its weight, a collective, and ranks with uneven micro-batches that chunked by a
fixed size would call it a different number of times and hang (measured: gloo's connection reset).

The loss is computed inside the model's forward (a forward hook on the model puts it in the output as `loss`, as
transformers does when given labels), so it is what DeepSpeed's engine hands back: the engine hooks its forward's
outputs to start its backward bookkeeping (timers, ZeRO's reduction state) when their gradient arrives, and a loss
computed from the hidden states outside the forward would reach the weights' gradients without passing through
them. The head is called as a module, so ZeRO-3's hooks gather its weight for each chunk, and again when backward
recomputes it.
"""

from __future__ import annotations

IGNORED = -100  # the label of a position that has no loss (workers/data.py)


def whole_logits_loss(logits, labels, reduction: str = "sum"):
    """The cross-entropy of each next token from a model's whole logits (in fp32, ignored positions left out): what the
    chunks' losses sum to (tests/test_loss.py), and how the tests and benches score a trained model."""
    import torch.nn.functional as F

    return F.cross_entropy(logits[:, :-1].float().reshape(-1, logits.size(-1)), labels[:, 1:].reshape(-1).to(logits.device),
                           ignore_index=IGNORED, reduction=reduction)


def chunks_for(micro_batches, seq_len: int, chunk_tokens: int) -> int:
    """The number of chunks every rank of a world takes, so that none holds more than `chunk_tokens` tokens' logits
    at once (`micro_batches`: the world's, whose largest sets it; 0 tokens a chunk: one chunk)."""
    return max(1, -(-max(micro_batches) * seq_len // chunk_tokens)) if chunk_tokens else 1


class ChunkedLoss:
    """Hooked onto `model` (what DeepSpeed's engine calls) at the start of training; per micro-step:
    `arm(labels, chunks)`, then the engine's forward, whose output's `loss` is the sum of its tokens' losses (its
    `logits` are empty)."""

    def __init__(self, model):
        self.head = model.get_output_embeddings()
        # Gemma 2 squashes its logits (transformers applies it after the head): so must a head run outside the model
        self.softcap = getattr(model.config, "final_logit_softcapping", None)
        self._labels, self._chunks, self._hidden = None, 1, None
        self.head.register_forward_pre_hook(self._take)
        model.register_forward_hook(self._put)

    def arm(self, labels, chunks: int = 1) -> None:
        """The model's next forward computes the loss of these labels, its tokens spread over `chunks` (the head's
        next call is the model's own: its input is kept and it gets an empty slice)."""
        self._labels, self._chunks = labels, chunks

    def _take(self, _module, args):
        if self._labels is None:
            return None  # the loss's own calls of the head, forward and recomputed; a forward not armed
        self._hidden = args[0]
        return (args[0][..., :0, :], *args[1:])

    def _put(self, _module, _args, output):
        if self._labels is None:
            return None
        labels, self._labels = self._labels, None
        output["loss"] = self.token_loss_sum(labels)
        return output

    def token_loss_sum(self, labels):
        """The sum over the micro-batch's tokens of the cross-entropy of each next token (fp32), from the hidden
        states the model's forward just left."""
        import torch
        from torch.utils.checkpoint import checkpoint

        if self._hidden is None:
            raise RuntimeError("the model's forward never called its output head: its hidden states are not known")
        hidden, self._hidden = self._hidden, None
        states = hidden[:, :-1].reshape(-1, hidden.size(-1))
        targets = labels[:, 1:].reshape(-1).to(states.device)
        kept = targets != IGNORED
        states, targets = states[kept], targets[kept]
        if self._chunks == 1:
            return self._loss(states, targets)
        size = max(1, -(-len(targets) // self._chunks))
        total = torch.zeros((), dtype=torch.float32, device=states.device)
        for start in range(0, size * self._chunks, size):  # (as many chunks as every other rank, even where empty)
            total = total + checkpoint(self._loss, states[start:start + size], targets[start:start + size], use_reentrant=False)
        return total

    def _loss(self, states, targets):
        import torch
        import torch.nn.functional as F

        logits = self.head(states)
        if self.softcap:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return F.cross_entropy(logits.float(), targets, reduction="sum")
