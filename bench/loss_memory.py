"""What the loss holds in memory: the whole micro-batch's logits, or one chunk of tokens' at a time (workers/loss.py).

One training step (forward and backward) of a 2-layer Llama with Llama 2's 32,000-word vocabulary, fp32 (a Pascal
card's precision; `--precision bf16` for a newer card's), on this machine's CPU, its loss computed either way, from
the same weights and batch: per way the most memory the step held above what the process held before it (measured:
Linux's resident high-water mark, reset before the step, with MALLOC_MMAP_THRESHOLD_ at 64 KiB so that every tensor
maps pages of its own and the high-water mark follows the live bytes, as a card's allocator peak does), its time, the
loss and the largest gradient difference; beside them the planner's estimate of the activations
(orchestrator/planner/memory.py). The chunk is the planner's (LOSS_CHUNK_BYTES of logits at the loss's peak:
orchestrator/planner/memory.logit_bytes_per_token). About a minute on 2 cores.

    .venv/bin/python bench/loss_memory.py [--seq-len 1024] [--micro-batch 4] [--vocab 32000] [--precision fp32|bf16]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from orchestrator.demo.task import TINY_LLAMA  # noqa: E402
from orchestrator.model_facts import facts_from_config  # noqa: E402
from orchestrator.planner import memory  # noqa: E402

MIB = 2**20
MODEL = {**TINY_LLAMA, "hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 4, "num_key_value_heads": 4,
         "max_position_embeddings": 4096}


def step(model, way: str, input_ids, labels, chunks: int) -> tuple[float, float, float]:
    """(loss, seconds, MiB held above the start at the step's peak) of one forward and backward."""
    from workers.loss import ChunkedLoss, whole_logits_loss
    from workers.telemetry import PeakAbove

    model.zero_grad(set_to_none=True)
    with PeakAbove(on_gpu=False) as peak:
        began = time.perf_counter()
        if way == "whole":  # what the training loop did before workers/loss.py, its `logits` held through backward
            logits = model(input_ids=input_ids).logits
            loss = whole_logits_loss(logits, labels)
        else:
            ChunkedLoss(model).arm(labels, chunks)
            loss = model(input_ids=input_ids).loss
        loss.backward()
        seconds = time.perf_counter() - began
    return loss.item(), seconds, peak.bytes / MIB


def measure(seq_len: int, micro_batch: int, vocab: int, precision: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from workers.loss import chunks_for

    config = {**MODEL, "vocab_size": vocab}
    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**config)).to({"fp32": torch.float32, "bf16": torch.bfloat16}[precision])
    input_ids = torch.randint(3, vocab, (micro_batch, seq_len), generator=torch.Generator().manual_seed(1))
    labels = input_ids.clone()
    shape = memory.TrainingShape(facts_from_config(config), sum(p.numel() for p in model.parameters()), seq_len, precision, False)
    chunk = memory.loss_chunk_tokens(vocab, precision)
    chunks = chunks_for((micro_batch,), seq_len, chunk)
    step(model, "chunked", input_ids, labels, chunks)  # (warm-up: the first step allocates the gradients)
    rows = {}
    for way in ("whole", "chunked", "whole", "chunked"):  # each twice, alternating; the second of each is printed
        rows[way] = (*step(model, way, input_ids, labels, chunks), {n: p.grad.clone() for n, p in model.named_parameters()})
    whole_logits = micro_batch * seq_len * memory.logit_bytes_per_token(vocab, precision)
    layers = memory.layer_activation_bytes_per_sample(shape) * micro_batch
    print(f"one step of a {shape.facts.n_params / 1e6:.1f}M-parameter Llama (2 layers of 256, vocabulary {vocab:,}), {precision}, micro-batch "
          f"{micro_batch} x {seq_len} tokens, one thread; the loss's chunk: {chunk:,} tokens ({chunks} chunks)\n")
    print(f"{'loss':<34} {'peak above start':>17} {'step':>8} {'activations, plan (estimate)':>30}")
    estimates = {"whole": layers + whole_logits, "chunked": memory.activation_bytes(shape, micro_batch)}
    for way, label in (("whole", "whole logits (before)"), ("chunked", f"{chunks} chunks of logits (workers/loss.py)")):
        loss, seconds, peak, _ = rows[way]
        print(f"{label:<34} {peak:>13,.0f} MiB {seconds:>7.2f}s {estimates[way] / MIB:>26,.0f} MiB")
    gap = max((rows["chunked"][3][n] - g).abs().max().item() / g.abs().max().item() for n, g in rows["whole"][3].items())
    print(f"\nloss {rows['whole'][0]:.6f} whole, {rows['chunked'][0]:.6f} chunked; largest gradient difference {gap:.1e} of the "
          f"gradient's scale (sums in another order, in {precision})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-len", type=int, default=1024)
    parser.add_argument("--micro-batch", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=32000)
    parser.add_argument("--precision", choices=["fp32", "bf16"], default="fp32")
    parser.add_argument("--measure", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        return measure(args.seq_len, args.micro_batch, args.vocab, args.precision)
    # glibc reads the threshold at start: the measurement runs in a process of its own
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "PYTHONPATH": str(REPO)}
    sys.exit(subprocess.run([sys.executable, __file__, "--measure", "--seq-len", str(args.seq_len), "--micro-batch", str(args.micro_batch),
                             "--vocab", str(args.vocab), "--precision", args.precision], env=env).returncode)


if __name__ == "__main__":
    main()
