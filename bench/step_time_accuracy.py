"""How true is the step-time model's compute term? The CPU stands in for a card.

    .venv/bin/python bench/step_time_accuracy.py

1. Probe the CPU as `zeromix up` probes a card (workers/rate_probe.py): its fp32 matmul rate.
2. For three Llama-shaped models (about 5M, 25M and 100M parameters), full and LoRA, with and without
   activation checkpointing, and at two token counts: predict the forward+backward time with the planner's
   own functions (`flops_per_token` over the measured rate x MEASURED_RATE_EFFICIENCY) and measure it (the
   best of several steps: the least disturbed by anything else on the machine).
3. Print predicted vs measured per case and the worst ratio, and the model's ratios (LoRA vs full,
   checkpointing vs not, twice the tokens) beside the measured ones.

Targets: every case within 25%; every ratio within 10% of the measured ratio.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from orchestrator.model_facts import facts_from_config  # noqa: E402
from orchestrator.planner.step_time import MEASURED_RATE_EFFICIENCY, flops_per_token  # noqa: E402
from workers.rate_probe import measure  # noqa: E402

SIZES = {"5M": (256, 4, 688), "25M": (512, 6, 1376), "100M": (768, 12, 2048)}  # hidden, layers, intermediate
VOCAB, SEQ, REPEATS = 8192, 256, 7
LORA_TARGETS = ["q_proj", "v_proj"]


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def config(hidden: int, layers: int, intermediate: int) -> dict:
    return {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64,
            "max_position_embeddings": SEQ, "tie_word_embeddings": False, "rms_norm_eps": 1e-6}


def measured_seconds(cfg: dict, method: str, checkpointing: bool, batch: int) -> float:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}, attn_implementation="sdpa"))
    if checkpointing:
        model.gradient_checkpointing_enable()
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        if checkpointing:
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(r=8, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    model.train()
    tokens = torch.randint(0, VOCAB, (batch, SEQ))

    def step():
        model(input_ids=tokens, labels=tokens).loss.backward()
        model.zero_grad(set_to_none=True)

    step()  # warm-up
    return min(_timed(step) for _ in range(REPEATS))


def main() -> None:
    probed = measure("cpu")
    rate = probed.tflops("fp32")
    print(f"this CPU, probed as a card: fp32 matmul {rate:.3f} TFLOPS, memory {probed.memory_gb_s:g} GB/s (measured); the model assumes training reaches "
          f"{MEASURED_RATE_EFFICIENCY:.0%} of a measured rate")
    print(f"{'model':>6} {'method':>6} {'ckpt':>5} {'tokens':>7} {'predicted':>10} {'measured':>9} {'ratio':>6}")
    rows = {}
    for name, (hidden, layers, intermediate) in SIZES.items():
        cfg = config(hidden, layers, intermediate)
        facts = facts_from_config(cfg)
        for method in ("full", "lora"):
            for ckpt in (False, True):
                for batch in (2, 4):
                    predicted = flops_per_token(facts, SEQ, method, ckpt) * batch * SEQ / (rate * 1e12 * MEASURED_RATE_EFFICIENCY)
                    measured = measured_seconds(cfg, method, ckpt, batch)
                    rows[(name, method, ckpt, batch)] = (predicted, measured)
                    print(f"{name:>6} {method:>6} {str(ckpt):>5} {batch * SEQ:>7} {predicted:>9.3f}s {measured:>8.3f}s {predicted / measured:>6.2f}")
    worst = max(rows.values(), key=lambda pm: abs(pm[0] / pm[1] - 1))
    print(f"worst predicted/measured: {worst[0] / worst[1]:.2f} (target within 0.75..1.25)")
    print("ratios, model vs measured (target: within 10% of each other):")
    for label, a, b in (("LoRA / full", ("lora", False, 4), ("full", False, 4)),
                        ("checkpointing / not", ("full", True, 4), ("full", False, 4)),
                        ("twice the tokens", ("full", False, 4), ("full", False, 2))):
        for name in SIZES:
            (pa, ma), (pb, mb) = rows[(name, *a)], rows[(name, *b)]
            print(f"  {label:<22} {name:>5}: model {pa / pb:.2f}, measured {ma / mb:.2f}, off by {(pa / pb) / (ma / mb) - 1:+.0%}")


if __name__ == "__main__":
    main()
