"""Ranks of tests/test_comm_volume.py: real DeepSpeed on CPU ranks (gloo) with zeromix's own DeepSpeed configs and
the comms logger on, for ZeRO 1/2/3 x full/LoRA x 1 and 2 accumulation steps. Rank 0 returns, per case, the bytes each
kind of collective carried in one optimizer step (after one warm-up step), as the logger recorded them. The ranks are
run by workers/local_launch.run_local, forked from its fork server (torch, DeepSpeed, transformers and PEFT imported
there once) and join as a job's ranks do (workers/collectives.RankComm.join); DeepSpeed's own launcher started each
rank as a new interpreter, some 20 s of imports a rank on two cores.
"""

from orchestrator.ds_config import Optimization, RankTuning, deepspeed_config
from workers.collectives import RankComm

# Weights above stage3_param_persistence_threshold (1e5 elements), so ZeRO-3 really gathers them.
CONFIG = {"model_type": "llama", "vocab_size": 1024, "hidden_size": 384, "intermediate_size": 1024, "num_hidden_layers": 2,
          "num_attention_heads": 6, "num_key_value_heads": 6, "max_position_embeddings": 64, "tie_word_embeddings": False,
          "rms_norm_eps": 1e-6}
LORA_TARGETS = ["q_proj", "v_proj"]
LORA_R = 4
SCALAR_BYTES = 8  # loss and overflow flags: not the model's traffic
HPZ_MAX_LIVE = 1000


def one_case(stage: int, grad_accum: int, method: str, world: int, hpz: int = 1, max_live: int | None = None) -> dict:
    import deepspeed
    import torch
    from deepspeed import comm as dist
    from transformers import LlamaConfig, LlamaForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    tuning = RankTuning(2, stage, False, False, "fp32", hpz_partition_size=hpz)
    config = deepspeed_config(tuning, grad_accum, world, 1.0, Optimization(1e-3, "constant", 0, 0.0, 100))
    if max_live:  # what a model above the live limit sees: its weights gathered again for backward
        config["zero_optimization"].update(stage3_max_live_parameters=max_live, stage3_max_reuse_distance=max_live)
    config.update(comms_logger={"enabled": True, "prof_all": True, "verbose": False, "debug": False}, wall_clock_breakdown=False)
    zero3 = HfDeepSpeedConfig(config) if stage == 3 else None  # ZeRO-3 partitions weights as they are made
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{k: v for k, v in CONFIG.items() if k != "model_type"}))
    if method == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=LORA_R, target_modules=LORA_TARGETS, task_type="CAUSAL_LM"))
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad], config=config)
    del zero3
    tokens = torch.randint(0, CONFIG["vocab_size"], (2, 16))
    for _ in range(2):  # a warm-up step, then the measured one
        dist.comms_logger.comms_dict.clear()
        for _ in range(grad_accum):
            engine.backward(engine(input_ids=tokens, labels=tokens).loss)
            engine.step()
    logged: dict[str, int] = {}
    for op, sizes in dist.comms_logger.comms_dict.items():
        logged[op] = sum(int(size) * entry[0] for size, entry in sizes.items() if int(size) > SCALAR_BYTES)
    weights = {name: p.ds_tensor.detach().clone() for name, p in engine.module.named_parameters()} if stage == 3 else {}
    engine.destroy()  # 12 engines in one process: release each one's hooks and buffers before the next
    checksum = float(sum(t.double().abs().sum() for t in weights.values()))  # this rank's partition after two steps
    return {"stage": stage, "grad_accum": grad_accum, "method": method, "world": world, "hpz": hpz, "max_live": max_live,
            "logged": logged, "partition_checksum": checksum}


def rank(mode: str, info, hosting: dict) -> dict | None:
    """One rank (`info`: a workers.collectives.RankInfo; rank 0 hosts the rendezvous on the socket `hosting` holds);
    "hpz": ZeRO++ hpZ over pairs of ranks, weights gathered twice per micro-step. Rank 0 returns what was logged."""
    import torch
    from deepspeed import comm as dist

    comm = RankComm.join(info, hosting.get(info.master_port))
    if mode == "hpz":
        cases = [one_case(3, ga, "full", comm.world, hpz, HPZ_MAX_LIVE) for hpz in (1, 2) for ga in (1, 2)]
    else:
        cases = [one_case(s, ga, m, comm.world) for m in ("full", "lora") for s in (1, 2, 3) for ga in (1, 2)]
    # Leave gloo in order: a rank that exits while its peers still hold the group open aborted once in CI
    # ("terminate called without an active exception", exit 250) after every case had run.
    dist.barrier()
    torch.distributed.destroy_process_group()
    return {"config": CONFIG, "lora_r": LORA_R, "lora_targets": LORA_TARGETS, "cases": cases} if comm.rank == 0 else None
