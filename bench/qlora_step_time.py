"""What does a 4-bit base cost per step? QLoRA vs LoRA forward+backward on the CPU, beside the planner's term.

    .venv/bin/python bench/qlora_step_time.py

The planner adds to a QLoRA rank's step, per micro-step, the dequantisation of every 4-bit weight in forward and
in backward (`StepInputs.dequantise_s`): each reads its packed half byte and scale and writes the compute dtype,
over the card's bandwidth (measured copy x MEASURED_BANDWIDTH_EFFICIENCY), whatever the micro-batch. This bench
measures, for two Llama-shaped models and micro-batches 1 and 4, the forward+backward time of the same LoRA
adapters on a 16-bit base (fp32 here) and on bitsandbytes' 4-bit NF4 base (its CPU backend), the best of several
rounds, with the CPU's copy bandwidth probed in the same rounds (workers/rate_probe.py), and prints the measured
extra time beside the planner's figure for it. On a card bitsandbytes dequantises in fused CUDA kernels; the
CPU backend is another implementation, so the CPU figure says how far the term is from one real backend, not
from a card.
"""

from __future__ import annotations

import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.model_facts import facts_from_config  # noqa: E402
from orchestrator.planner.step_time import DEQUANTISE_READ_BYTES, MEASURED_BANDWIDTH_EFFICIENCY  # noqa: E402
from workers.rate_probe import COPY_BYTES, copy_gb_per_s  # noqa: E402
from workers.train import load_four_bit  # noqa: E402

SIZES = {"25M": (512, 6, 1376), "100M": (768, 12, 2048)}  # hidden, layers, intermediate
VOCAB, SEQ, ROUNDS = 8192, 256, 7
FOUR_BIT = {"type": "nf4", "double_quant": True}


def config(hidden: int, layers: int, intermediate: int) -> dict:
    return {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "vocab_size": VOCAB, "hidden_size": hidden,
            "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": hidden // 64,
            "num_key_value_heads": hidden // 64, "max_position_embeddings": SEQ, "tie_word_embeddings": False,
            "rms_norm_eps": 1e-6, "torch_dtype": "float32"}


def adapted(model):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=16, lora_alpha=32, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))


def step_seconds(model, batch: int) -> float:
    ids = torch.randint(0, VOCAB, (batch, SEQ))
    started = time.perf_counter()
    model(input_ids=ids, labels=ids).loss.backward()
    return time.perf_counter() - started


def main() -> None:
    from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

    source = torch.empty(COPY_BYTES["cpu"] // 4)
    print(f"LoRA (r=16, q/v) on a 16-bit vs a 4-bit NF4 base, forward+backward, {SEQ} tokens a sample, best of {ROUNDS} rounds (measured)")
    print(f"{'model':>6} {'batch':>5} {'LoRA s':>8} {'QLoRA s':>8} {'extra s':>8} {'planner s':>10} {'ratio':>6}")
    for name, (hidden, layers, intermediate) in SIZES.items():
        cfg = config(hidden, layers, intermediate)
        with tempfile.TemporaryDirectory() as where:
            torch.manual_seed(0)
            LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k not in ("model_type", "architectures", "torch_dtype")})).save_pretrained(where)
            lora = adapted(AutoModelForCausalLM.from_pretrained(where))
            qlora = adapted(load_four_bit(where, FOUR_BIT, "fp32", "cpu"))
        facts = facts_from_config(cfg)
        for batch in (1, 4):
            best = {"lora": float("inf"), "qlora": float("inf")}
            bandwidth = 0.0
            for _ in range(ROUNDS):  # interleaved: a drift in the machine's speed moves all three alike
                best["lora"] = min(best["lora"], step_seconds(lora, batch))
                best["qlora"] = min(best["qlora"], step_seconds(qlora, batch))
                bandwidth = max(bandwidth, copy_gb_per_s(source, torch.empty_like(source), budget_s=0.3))
            moved = facts.quantised_weights * (DEQUANTISE_READ_BYTES + 4)
            planned = 2 * moved / (bandwidth * MEASURED_BANDWIDTH_EFFICIENCY * 1e9)
            extra = best["qlora"] - best["lora"]
            print(f"{name:>6} {batch:>5} {best['lora']:>8.3f} {best['qlora']:>8.3f} {extra:>8.3f} {planned:>10.4f} {extra / planned:>6.1f}"
                  f"   (copy {bandwidth:.0f} GB/s, {facts.quantised_weights / 1e6:.0f}M 4-bit weights)")


if __name__ == "__main__":
    main()
