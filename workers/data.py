"""Samples, batches and the per-rank slicing of each global batch.

Every rank computes the same shuffled order from (seed, epoch), takes its own slice of each global batch
and cuts it into `grad_accum` micro-batches of its own size. Nothing depends on what ran before, so a
resumed job picks up at any step.
"""

from __future__ import annotations

import functools
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

IGNORE_INDEX = -100  # label value that cross-entropy skips (prompt and padding tokens)


@dataclass(frozen=True)
class Sample:
    input_ids: list[int]
    labels: list[int]


@dataclass(frozen=True)
class Batch:
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor

    @property
    def loss_tokens(self) -> int:
        """Tokens that carry loss once labels are shifted for next-token prediction."""
        return int((self.labels[:, 1:] != IGNORE_INDEX).sum())


def read_records(dataset: dict) -> list[dict]:
    path = Path(dataset["path"])
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    if dataset["format"] == "text":
        return [{"text": line} for line in lines]
    return [json.loads(line) for line in lines]


def tokenize(records: list[dict], dataset: dict, tokenizer, seq_len: int) -> list[Sample]:
    """Language-model samples (loss on every token) or instruction samples (loss on the completion only)."""
    eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    samples = []
    for record in records:
        if dataset.get("prompt_field"):
            prompt = tokenizer(record[dataset["prompt_field"]], add_special_tokens=False)["input_ids"]
            answer = tokenizer(record[dataset["completion_field"]], add_special_tokens=False)["input_ids"] + eos
            ids = (prompt + answer)[:seq_len]
            labels = ([IGNORE_INDEX] * len(prompt) + answer)[:seq_len]
        else:
            ids = (tokenizer(record.get(dataset.get("text_field") or "text"), add_special_tokens=False)["input_ids"] + eos)[:seq_len]
            labels = list(ids)
        samples.append(Sample(ids, labels))
    return samples


def collate(samples: list[Sample], pad_id: int) -> Batch:
    """Right-pad to the longest sample of this micro-batch. Made in host memory: the loop moves each micro-batch
    to the card as it runs it."""
    width = max(len(s.input_ids) for s in samples)
    ids = torch.full((len(samples), width), pad_id, dtype=torch.long, device="cpu")
    labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long, device="cpu")
    mask = torch.zeros((len(samples), width), dtype=torch.long, device="cpu")
    for row, s in enumerate(samples):
        n = len(s.input_ids)
        ids[row, :n] = torch.tensor(s.input_ids, device="cpu")
        labels[row, :n] = torch.tensor(s.labels, device="cpu")
        mask[row, :n] = 1
    return Batch(ids, mask, labels)


@dataclass(frozen=True)
class GlobalBatchSampler:
    """Which samples each rank takes at each optimizer step.

    The data is read as one stream of shuffled epochs laid end to end, and global batch k is positions
    [k*B, (k+1)*B) of that stream, so every sample is used exactly once per epoch (a batch may straddle two
    epochs) and step k is a pure function of k: a resumed job takes the same batches. Rank r takes a
    contiguous slice of `micro_batches[r] * grad_accum` samples of each global batch, in `grad_accum`
    micro-batches of `micro_batches[r]`.
    """

    num_samples: int
    micro_batches: tuple[int, ...]
    grad_accum: int
    seed: int

    @property
    def global_batch(self) -> int:
        return sum(self.micro_batches) * self.grad_accum

    @functools.lru_cache(maxsize=2)  # the current epoch, and the next one when a batch straddles them
    def epoch_order(self, epoch: int) -> list[int]:
        order = list(range(self.num_samples))
        random.Random(self.seed * 1_000_003 + epoch).shuffle(order)
        return order

    def global_indices(self, step: int) -> list[int]:
        start = step * self.global_batch
        picked: list[int] = []
        while len(picked) < self.global_batch:
            epoch, offset = divmod(start + len(picked), self.num_samples)
            take = min(self.num_samples - offset, self.global_batch - len(picked))
            picked += self.epoch_order(epoch)[offset : offset + take]
        return picked

    def rank_micro_batches(self, step: int, rank: int) -> list[list[int]]:
        start = sum(self.micro_batches[:rank]) * self.grad_accum
        size = self.micro_batches[rank]
        mine = self.global_indices(step)[start : start + size * self.grad_accum]
        return [mine[i * size : (i + 1) * size] for i in range(self.grad_accum)]
