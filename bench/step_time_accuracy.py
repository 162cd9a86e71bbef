"""How true is the step-time model's compute term? The CPU stands in for a card.

    .venv/bin/python bench/step_time_accuracy.py

1. Probe the CPU as `zeromix up` probes a card (workers/rate_probe.py's own functions): its fp32 matmul rate
   and copy bandwidth, in the same rounds as the cases (this shared VM's speed drifts by tens of percent).
2. For three Llama-shaped models (about 5M, 25M and 100M parameters), full and LoRA, with and without
   activation checkpointing, and at two token counts: predict the forward+backward time with the planner's
   own function (`seconds_per_token`: matmul FLOPs over the measured rate x MEASURED_RATE_EFFICIENCY, plus the
   non-matmul bytes over the measured bandwidth x MEASURED_BANDWIDTH_EFFICIENCY) and measure it (the best of
   several steps: the least disturbed by anything else on the machine).
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
from orchestrator.planner.step_time import MEASURED_BANDWIDTH_EFFICIENCY, MEASURED_RATE_EFFICIENCY, seconds_per_token  # noqa: E402
from workers.rate_probe import COPY_BYTES, copy_gb_per_s, matmul_tflops  # noqa: E402

SIZES = {"5M": (256, 4, 688), "25M": (512, 6, 1376), "100M": (768, 12, 2048)}  # hidden, layers, intermediate
VOCAB, SEQ, REPEATS = 8192, 256, 9
LORA_TARGETS = ["q_proj", "v_proj"]


def _timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def config(hidden: int, layers: int, intermediate: int) -> dict:
    return {"model_type": "llama", "vocab_size": VOCAB, "hidden_size": hidden, "intermediate_size": intermediate,
            "num_hidden_layers": layers, "num_attention_heads": hidden // 64, "num_key_value_heads": hidden // 64,
            "max_position_embeddings": SEQ, "tie_word_embeddings": False, "rms_norm_eps": 1e-6}


def measured_seconds(cfg: dict) -> tuple[dict[tuple[str, bool, int], float], float, float]:
    """Forward+backward time of one model size in every case (method, checkpointing, batch), the best of
    REPEATS rounds, and the CPU probed as a card in the same rounds (fp32 matmul TFLOPS, copy GB/s: the best
    of the rounds). Cases and probe are interleaved within each round, so a drift in the machine's speed (this
    shared VM's moves by tens of percent over minutes) shifts all of them alike."""
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def build(method: str):
        torch.manual_seed(0)
        model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in cfg.items() if k != "model_type"}, attn_implementation="sdpa"))
        if method == "lora":
            model.enable_input_require_grads()  # what checkpointing needs with a frozen embedding; free without it
            model = get_peft_model(model, LoraConfig(r=8, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
        return model.train()

    models = {method: build(method) for method in ("full", "lora")}
    inputs = {batch: torch.randint(0, VOCAB, (batch, SEQ)) for batch in (2, 4)}
    cases = [(method, ckpt, batch) for method in models for ckpt in (False, True) for batch in inputs]

    def step(method: str, ckpt: bool, batch: int) -> None:
        model = models[method]
        model.gradient_checkpointing_enable() if ckpt else model.gradient_checkpointing_disable()
        model(input_ids=inputs[batch], labels=inputs[batch]).loss.backward()
        model.zero_grad(set_to_none=True)

    best = {case: float("inf") for case in cases}
    cpu, words = torch.device("cpu"), COPY_BYTES["cpu"] // 4
    tflops, gb_s = 0.0, 0.0
    for round_ in range(REPEATS + 1):
        tflops = max(tflops, matmul_tflops(cpu, torch.float32, budget_s=0.2))
        gb_s = max(gb_s, copy_gb_per_s(torch.ones(words), torch.empty(words), budget_s=0.2))
        for case in cases:
            took = _timed(lambda: step(*case))
            if round_:  # round 0 warms every case up
                best[case] = min(best[case], took)
    return best, tflops, gb_s


def main() -> None:
    print(f"the model assumes training reaches {MEASURED_RATE_EFFICIENCY:.0%} of the probed matmul rate (less for narrow models) "
          f"and {MEASURED_BANDWIDTH_EFFICIENCY:.0%} of the probed copy bandwidth")
    print(f"{'model':>6} {'method':>6} {'ckpt':>5} {'tokens':>7} {'predicted':>10} {'measured':>9} {'ratio':>6}")
    rows = {}
    for name, (hidden, layers, intermediate) in SIZES.items():
        cfg = config(hidden, layers, intermediate)
        facts = facts_from_config(cfg)
        measured_cases, rate, gb_s = measured_seconds(cfg)
        print(f"{name:>6}: this CPU probed as a card in the same rounds: fp32 matmul {rate:.3f} TFLOPS, copy {gb_s:.1f} GB/s (measured)")
        for (method, ckpt, batch), measured in measured_cases.items():
            targets = tuple(LORA_TARGETS) if method == "lora" else ()
            predicted = batch * SEQ * seconds_per_token(facts, SEQ, method, ckpt, "fp32", targets, rate * MEASURED_RATE_EFFICIENCY,
                                                        gb_s * MEASURED_BANDWIDTH_EFFICIENCY)
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
