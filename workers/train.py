"""The training loop one rank runs, top to bottom. DeepSpeed is the only machinery: ZeRO stage, precision,
accumulation and clipping all come from the JSON config the planner wrote for this rank.

Uneven micro-batches: rank r sees n_r loss tokens of the N in this optimizer step (N all-reduced). It
back-propagates  sum_of_its_token_losses * W / N, and DeepSpeed divides the summed gradients by W, so the
update is the gradient of the mean token loss over the whole global batch, whatever each rank's share.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from types import MappingProxyType
from typing import TYPE_CHECKING

from workers.bitsandbytes_import import import_bitsandbytes
from workers.checkpoint import CHECKPOINT_DIR
from workers.collectives import RankComm, RankInfo, first_ranks

if TYPE_CHECKING:
    import socket

FINAL_DIR = "final"
OUTER_STATE = "outer_state.pt"  # beside box 0's checkpoint in outer-step mode: the outer momentum and steps taken


@dataclass(frozen=True)
class TrainConfig:
    """Everything a rank needs. Written by the head from the job spec and the plan."""

    job_id: str
    model_init: str  # "pretrained" | "scratch"
    model_path: str
    tokenizer_path: str
    dataset: dict  # path, format, text_field | prompt_field + completion_field
    method: str  # "full" | "lora" | "qlora"
    lora: dict  # r, alpha, dropout, target_modules (used when method is lora or qlora)
    seq_len: int
    micro_batches: tuple[int, ...]  # per rank, in rank order
    grad_accum: int  # the same on every rank: ZeRO-2/3 hang or crash otherwise
    total_steps: int
    ds_configs: tuple[dict, ...]  # per rank, every field explicit
    activation_checkpointing: tuple[bool, ...]  # per rank: a card short of memory recomputes, a roomy one need not
    output_dir: str
    checkpoint_every: int
    seed: int
    # Benchmark and tests only (bench/hetero_dp.py): rank r sleeps this long per sample before its backward, to
    # emulate slower cards on one CPU, from the optimizer step after `emulated_from` on. Job specs have no such
    # field and the launcher never sets it.
    emulated_seconds_per_sample: tuple[float, ...] | None = None
    emulated_from: int = 0
    # What the weights are (workers/checkpoint.what_it_trains): a checkpoint made for another model is never loaded.
    trains: str = ""
    # Per rank, the largest micro-batch its card holds at its planned settings (the plan's memory model): the
    # self-correcting split (workers/rebalance.py) moves samples within these. Empty: the split stays as planned.
    micro_batch_caps: tuple[int, ...] = ()
    # Measurement runs only (tests/test_gpu.py): train and report, but write no checkpoint and no final model
    # (a 3B full fine-tune's checkpoint is ~50 GB). Job specs have no such field.
    write_outputs: bool = True
    keep_last: int = 2  # complete checkpoints kept (workers/checkpoint.py)
    report_to: tuple[str, ...] = ()  # experiment trackers rank 0 writes (workers/tracking.py)
    plan: dict = field(default_factory=dict)  # the plan's summary: the trackers' config, each rank's metric labels
    attempt: str = ""  # this placement's Ray job id: where rank 0 posts its progress (workers/job_records.py); "" outside a job
    four_bit: dict = field(default_factory=dict)  # qlora: type, double_quant (the plan's FourBitBase); {} otherwise
    # Outer-step mode across boxes (workers/outer_steps.OuterConfig): boxes (ranks per box), inner_steps, outer_lr,
    # outer_momentum, wire. {}: one synchronous DeepSpeed world over every rank.
    outer: dict = field(default_factory=dict)
    # The tokens whose logits the loss computes at once (workers/loss.py; the plan's memory model counts one such
    # chunk). 0: a micro-batch's all at once.
    loss_chunk_tokens: int = 0

    @property
    def boxes(self) -> tuple[int, ...]:
        """Ranks per box, each its own DeepSpeed world: one box over every rank unless in outer-step mode."""
        return tuple(self.outer["boxes"]) if self.outer else (len(self.micro_batches),)

    @classmethod
    def from_json(cls, text: str) -> TrainConfig:
        raw = json.loads(text)
        raw["micro_batches"] = tuple(raw["micro_batches"])
        raw["ds_configs"] = tuple(raw["ds_configs"])
        raw["activation_checkpointing"] = tuple(raw["activation_checkpointing"])
        raw["report_to"] = tuple(raw.get("report_to", ()))
        raw["micro_batch_caps"] = tuple(raw.get("micro_batch_caps", ()))
        if raw.get("emulated_seconds_per_sample") is not None:
            raw["emulated_seconds_per_sample"] = tuple(raw["emulated_seconds_per_sample"])
        return cls(**raw)

    def to_json(self) -> str:
        return json.dumps(asdict(self))


@dataclass
class RankResult:
    rank: int
    steps: int
    first_loss: float | None = None
    last_loss: float | None = None
    tokens_per_s: float = 0.0
    precision: str = ""
    device: str = ""
    final_dir: str | None = None
    losses: list[float] = field(default_factory=list)
    # Straggler accounting, per rank (index = rank), averaged over the run's steps:
    step_time_s: float = 0.0  # mean optimizer-step time
    step_times: list[float] = field(default_factory=list)  # every step's time, measured on this rank
    busy_s: list[float] = field(default_factory=list)  # time not spent waiting for slower ranks
    wait_s: list[float] = field(default_factory=list)  # time blocked in gradient reduction beyond the fastest rank's
    history: list[dict] = field(default_factory=list)  # every step this run, every card's figures (StepStats.record)
    rebalances: list[dict] = field(default_factory=list)  # each change of the split (workers/rebalance.Rebalance.record)
    # Model-state bytes this rank's engine holds after its first optimizer step (workers/memory_report.py)
    model_state_bytes: dict[str, int] = field(default_factory=dict)
    recomputes: bool = False  # activation checkpointing on in this rank's model, as transformers reports it
    resumed_from: str = ""  # the checkpoint this run continued from, if any
    stopped_early: bool = False  # stopped with a checkpoint before its last step, as the scheduler asked (it moves the job)
    universal: bool = False  # ... loaded through DeepSpeed's universal form (saved on other ranks or another stage)
    # On a card: torch's allocator peaks over the training steps (before the final save), for the memory model's check
    card_memory: dict[str, int] = field(default_factory=dict)
    quantised_layers: int = 0  # QLoRA: the base's linear layers this rank's model holds in 4 bits (bitsandbytes' Linear4bit)
    outer_steps: int = 0  # outer-step mode: outer steps taken
    outer_bytes_sent: int = 0  # ... and, on a box's leader, the bytes it handed to the link between boxes (counted)
    outer_exchange_s: float = 0.0  # ... and the time its deltas took across the link
    outer_peak_bytes: int | None = None  # ... and the most memory an outer step held above what the rank held before it
    boxes_left: list[dict] = field(default_factory=list)  # ... and on box 0's leader, each box lost on the way (_box_left)
    boxes_back: list[dict] = field(default_factory=list)  # ... and each box let back in (_box_back)


def utilisation(busy_s: list[float], wait_s: list[float]) -> list[float]:
    """Per card: busy time over step time."""
    return [b / (b + w) if b + w else 0.0 for b, w in zip(busy_s, wait_s)]


def main(cfg: TrainConfig, info: RankInfo, hosting: Mapping[int, socket.socket] = MappingProxyType({})) -> RankResult:
    """One rank of one job: join the job's process group (its box's, in outer-step mode, and the leaders' link
    across boxes on a box's rank 0), train, leave. `hosting`: the sockets bound for the rendezvous this rank hosts,
    by port (its box's group on a box's rank 0, the leaders' link on box 0's)."""
    from workers import faults, job_records
    from workers.collectives import BoxLink

    comm = RankComm.join(info, hosting.get(info.master_port))
    if cfg.plan.get("ranks"):  # test-only (workers/faults.py): a rank that dies before its box meets the others
        faults.die(cfg.plan["job"], cfg.plan["ranks"][comm.me]["card"], 0)
    lost = functools.partial(job_records.lost_boxes, cfg.attempt)  # (the boxes the job's driver saw die)
    link = None
    if cfg.outer and comm.rank == 0:
        link = BoxLink.ask_back(info) if info.life else BoxLink.join(info, lost, hosted=hosting.get(info.outer_port))
    result = train(cfg, comm, link, back=info.life > 0)
    comm.leave()
    return result


def train(cfg: TrainConfig, comm: RankComm, link=None, back: bool = False) -> RankResult:
    """`back`: outer steps, a box whose ranks were started again after it was lost: it asks back in, and trains on from
    the step and the global weights box 0 hands it."""
    import deepspeed
    import torch
    from deepspeed.utils.timer import BACKWARD_REDUCE_GLOBAL_TIMER
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    from transformers.integrations import HfDeepSpeedConfig

    from workers import checkpoint, faults, job_records
    from workers.data import GlobalBatchSampler, collate, read_records, tokenize
    from workers.loss import ChunkedLoss, chunks_for
    from workers.memory_report import model_state_bytes
    from workers.outer_steps import OuterConfig, OuterSteps
    from workers.precision import runnable_ds_config
    from workers.rebalance import SplitTuner
    from workers.telemetry import RankGauges, card_memory_peaks, memory_in_use, reduce_step
    from workers.tracking import Trackers

    # rank: in this rank's DeepSpeed world (its box's, in outer-step mode); me: its index in the job's config
    rank, world, on_gpu, me = comm.rank, comm.world, comm.on_gpu, comm.me
    outer = OuterConfig.from_dict(cfg.outer) if cfg.outer else None
    ds_config, precision = runnable_ds_config(cfg.ds_configs[me], on_gpu)
    first_box = me == rank  # (outer steps: box 0 alone reads and writes checkpoints; the others follow it)
    torch.manual_seed(cfg.seed)  # same initial weights on every rank
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()

    # ----------------------------------------------------------------------------- data
    tokenizer = AutoTokenizer.from_pretrained(cfg.tokenizer_path)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    samples = tokenize(read_records(cfg.dataset), cfg.dataset, tokenizer, cfg.seq_len)
    sampler = GlobalBatchSampler(len(samples), cfg.micro_batches, cfg.grad_accum, cfg.seed)

    # ----------------------------------------------------------------------------- where to resume from
    # Decided before the engine exists: a checkpoint made on other ranks loads through DeepSpeed's universal
    # form, which the engine must be configured for (workers/checkpoint.py).
    out = Path(cfg.output_dir)
    checkpoints = out / CHECKPOINT_DIR
    layout = {"world_size": world, "micro_batches": list(cfg.micro_batches), "grad_accum": cfg.grad_accum,
              "zero_stage": ds_config["zero_optimization"]["stage"], "precision": precision, "trains": cfg.trains}
    nothing = (None, [], None)  # (other boxes, in outer-step mode, take box 0's state when they join it)
    tag, skipped, load_dir = comm.from_first((_resume_point(checkpoints, layout) if first_box else nothing) if rank == 0 else None)  # one rank reads the checksums
    universal = tag is not None and load_dir != str(checkpoints)
    for warning in skipped:
        _say(me, f"warning: {warning}")
    if universal:
        ds_config["checkpoint"] = {"load_universal": True}

    # ----------------------------------------------------------------------------- model
    # ZeRO-3 partitions weights as they are created; HfDeepSpeedConfig must exist before the model does.
    zero3 = HfDeepSpeedConfig(ds_config) if ds_config["zero_optimization"]["stage"] == 3 else None
    if cfg.method in ("lora", "qlora"):  # PEFT imports bitsandbytes, which would ask the Hub for a kernel (see there)
        import_bitsandbytes()
    if cfg.model_init == "scratch":
        model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(cfg.model_path))
    elif cfg.method == "qlora":
        model = load_four_bit(cfg.model_path, cfg.four_bit, precision, comm.device)
    else:
        model = AutoModelForCausalLM.from_pretrained(cfg.model_path)
    if cfg.activation_checkpointing[me]:
        model.gradient_checkpointing_enable()
    if cfg.method in ("lora", "qlora"):
        from peft import LoraConfig, get_peft_model

        if cfg.activation_checkpointing[me]:
            model.enable_input_require_grads()
        model = get_peft_model(model, LoraConfig(
            r=cfg.lora["r"], lora_alpha=cfg.lora["alpha"], lora_dropout=cfg.lora["dropout"],
            target_modules=list(cfg.lora["target_modules"]), task_type="CAUSAL_LM",
        ))
    trainable = [p for p in model.parameters() if p.requires_grad]
    engine, _, _, scheduler = deepspeed.initialize(model=model, model_parameters=trainable, config=ds_config)
    del zero3
    chunked_loss = ChunkedLoss(engine.module)  # the output head runs in the loss, a chunk of tokens at a time

    # ----------------------------------------------------------------------------- resume
    start_step = 0
    if tag:
        client_state = checkpoint.load(engine, load_dir, tag)
        start_step = int(client_state["step"])
        how = " through its universal form (it was saved on other ranks)" if universal else ""
        _say(me, f"resumed from {checkpoints / tag} at step {start_step}{how}")
    # test-only (workers/faults.py): this rank killed before a step, or before its box's exchange at an outer step
    die = functools.partial(faults.die, cfg.plan["job"], cfg.plan["ranks"][me]["card"]) if cfg.plan.get("ranks") else (lambda at: None)
    outer_steps = OuterSteps(outer, trainable, comm, link, rebalance=bool(cfg.micro_batch_caps),
                             lost=lambda: job_records.lost_boxes(cfg.attempt), fault=die) if outer else None  # from the weights just loaded
    stop_at_once = False  # a box let back in at the outer step where the job stops (the scheduler moves it)
    if outer_steps and back:
        if rank == 0:
            print(f"zeromix: rank {me}, its box's leader: the box was lost and started again; asking back in at the next outer step", flush=True)
        let_in = outer_steps.come_back()
        start_step, stop_at_once = let_in.step, let_in.stop
        sampler = dataclasses.replace(sampler, micro_batches=let_in.split)
        if rank == 0:
            then = ("the job stops there (the scheduler places it again), so the box trains no step here" if stop_at_once
                    else f"training on from step {start_step + 1}")
            print(f"zeromix: rank {me}, its box's leader: let back in with the global weights of step {start_step}, {then}", flush=True)
    elif outer_steps:
        start_step = outer_steps.join(start_step, checkpoint.load_extra(checkpoints, tag, OUTER_STATE) if tag and rank == 0 else None)

    def save(step: int) -> None:
        if first_box:  # (every box, in outer-step mode, is at the global weights: box 0 keeps them, with the momentum)
            extra = {OUTER_STATE: outer_steps.saved()} if outer_steps and rank == 0 else None
            checkpoint.save(engine, checkpoints, step, rank, comm.barrier, cfg.keep_last, layout, extra)

    # ----------------------------------------------------------------------------- loop
    result = RankResult(rank=me, steps=start_step, precision=precision, device=_device_name(on_gpu),
                        recomputes=_recomputes(engine.module), resumed_from=tag or "",
                        universal=universal, quantised_layers=sum(type(p).__name__ == "Params4bit" for p in engine.module.parameters()))
    extra_per_sample_s = cfg.emulated_seconds_per_sample[me] if cfg.emulated_seconds_per_sample else 0.0
    if cfg.emulated_seconds_per_sample:
        _say(me, f"SPEED EMULATION ON (benchmark only): ranks sleep {list(cfg.emulated_seconds_per_sample)} s per sample")
    _quiet_deepspeed_timer_log()
    gauges = RankGauges.for_rank(cfg.job_id, me, cfg.plan)
    progress = job_records.Progress.for_rank(cfg.attempt, me)
    trackers = Trackers(cfg.report_to, out, cfg.job_id, cfg.plan, world, start_step) if me == 0 and cfg.report_to else None
    # The split each step runs (the plan's until measured speeds correct it: rank 0's tuner decides, every rank
    # learns the change in the step's all-reduce and switches at the same step).
    # In outer-step mode each box is a world of its own: its figures are its ranks' (its slice of the split), and it
    # tunes its own slice, keeping its share of the global batch (the other boxes' slices do not move).
    box = slice(me - rank, me - rank + world)
    split, caps = sampler.micro_batches[box], cfg.micro_batch_caps[box]
    tuner = SplitTuner(split, caps, cfg.grad_accum) if rank == 0 and world > 1 and caps else None
    pending = None  # rank 0's change, on its way to every rank in the next all-reduce
    saved_at = start_step  # the last checkpoint's step
    result.stopped_early = stop_at_once
    for step in range(start_step, start_step if stop_at_once else cfg.total_steps):
        if cfg.plan.get("ranks"):  # test-only injection points (workers/faults.py): a card out of memory, a pause
            faults.out_of_memory(cfg.plan["job"], cfg.plan["ranks"][me]["card"], split[rank])
            die(step + 1)
            faults.hold(cfg.plan["job"], step + 1, me)
        t0 = time.perf_counter()
        batches = [collate([samples[i] for i in idx], pad_id) for idx in sampler.rank_micro_batches(step, me)]
        my_tokens = sum(int(b.attention_mask.sum()) for b in batches)
        global_loss_tokens = comm.sum(comm.tensor([sum(b.loss_tokens for b in batches)], torch.float64)).item()  # N, over the world's ranks
        loss_sum = comm.zeros((), torch.float64)  # beside the model's losses, on the rank's device
        chunks = chunks_for(split, cfg.seq_len, cfg.loss_chunk_tokens)  # (as many on every rank of this world)
        for batch in batches:
            chunked_loss.arm(batch.labels, chunks)  # the forward's loss: summed over the micro-batch's tokens, in fp32
            token_losses = engine(input_ids=batch.input_ids.to(engine.device), attention_mask=batch.attention_mask.to(engine.device)).loss
            if extra_per_sample_s and step >= cfg.emulated_from:  # before backward: the gradient collective waits for it
                time.sleep(extra_per_sample_s * batch.input_ids.shape[0])
            engine.backward(token_losses * world / global_loss_tokens, scale_wrt_gas=False)
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
            loss_sum += token_losses.detach().double()
        stop = progress is not None and progress.stop_requested()  # rank 0 reads the request; a collective tells the rest
        inner_s = time.perf_counter() - t0
        met = outer_steps.after_step(step + 1, global_loss_tokens, step + 1 == cfg.total_steps, stop, inner_s, sampler.micro_batches) \
            if outer_steps else None
        step_time = time.perf_counter() - t0
        if not result.model_state_bytes:  # optimizer states exist from the first step on
            result.model_state_bytes = model_state_bytes(engine)
        reduce_s = engine.get_wall_clock_timers().get(BACKWARD_REDUCE_GLOBAL_TIMER, 0.0) / 1000.0  # this step's, in ms
        stats = reduce_step(comm, step + 1, loss_sum.item(), global_loss_tokens, scheduler.get_last_lr()[0], my_tokens,
                            step_time, reduce_s, memory_in_use(on_gpu), split, pending.new if pending else (), stop and not outer_steps,
                            sum(len(samples[i].input_ids) for i in sampler.global_indices(step)) if outer_steps else 0)
        if tuner and not pending:
            pending = tuner.observe(step + 1, stats.compute_s, max(stats.step_time_s))
            pending = pending if pending and pending.step <= cfg.total_steps else None  # (none left to run with it)
        elif stats.next_split:  # every rank: the next step, and those after, take their samples by the new split
            split = stats.next_split
            sampler = dataclasses.replace(sampler, micro_batches=sampler.micro_batches[:box.start] + split + sampler.micro_batches[box.stop:])
            if outer_steps:
                outer_steps.split_changed(step + 2)
            if tuner:
                tuner.applied(split)
                result.rebalances.append(pending.record())
                _say(rank, f"split corrected from step {pending.step}: {list(pending.old)} -> {list(pending.new)}; {pending.why}")
                pending = None
        if met and met.left and me == 0:  # (before the sampler takes the new split: the lost boxes' share is the old one's)
            result.boxes_left.append(_box_left(met, step + 1, outer.boxes, sampler.micro_batches, cfg.grad_accum))
            _say(me, result.boxes_left[-1]["why"])
        if met and met.back and me == 0:
            result.boxes_back.append(_box_back(met, step + 1, outer.boxes, sampler.micro_batches))
            _say(me, result.boxes_back[-1]["why"])
        if met and met.split:  # every rank of every box: the boxes' shares of the batch, corrected at the outer step
            sampler = dataclasses.replace(sampler, micro_batches=met.split)
            split, pending = met.split[box], None
            tuner = SplitTuner(split, caps, cfg.grad_accum) if tuner else None  # the box's new split, measured afresh
            if me == 0 and met.shares:  # (a lost box's share is recorded above)
                result.rebalances.append(met.shares.record())
                _say(me, f"boxes' shares corrected from step {met.shares.step}: {list(met.shares.old)} -> {list(met.split)}; {met.shares.why}")
        result.history.append(stats.record())
        result.losses.append(stats.loss)
        result.step_times.append(step_time)
        result.first_loss = result.first_loss if result.first_loss is not None else stats.loss
        result.last_loss, result.steps = stats.loss, step + 1
        _progress(me, progress, step=step + 1, of=cfg.total_steps, loss=round(stats.loss, 5), lr=stats.lr,
                  step_time_s=round(step_time, 4), tokens_per_s=round(stats.tokens_per_s, 1))
        if gauges:
            gauges.record(stats, rank)
        if trackers:
            trackers.log(stats)
        if (stats.stop or (met and met.stop)) and step + 1 < cfg.total_steps:  # the scheduler moves the job: it goes on from here elsewhere
            result.stopped_early = True
            _say(me, f"stopping after step {step + 1} with a checkpoint: the scheduler places the job again")
            break
        due = cfg.checkpoint_every and (step + 1 - saved_at >= cfg.checkpoint_every if outer_steps else (step + 1) % cfg.checkpoint_every == 0)
        if cfg.write_outputs and due and (met or not outer_steps) and step + 1 < cfg.total_steps:  # outer steps: at one
            save(step + 1)
            saved_at = step + 1

    # ----------------------------------------------------------------------------- save
    result.card_memory = card_memory_peaks()
    if trackers:
        trackers.close()
    if outer_steps:  # every box ends on the global weights (its last step was an outer step)
        result.outer_steps, result.outer_bytes_sent = outer_steps.done, link.bytes_sent if link else 0
        result.outer_exchange_s, result.outer_peak_bytes = outer_steps.exchange_s, outer_steps.peak_bytes
    if cfg.write_outputs:
        save(result.steps)
        if not result.stopped_early and first_box:
            result.final_dir = str(_save_final(engine, tokenizer, out, rank, zero3_stage=ds_config["zero_optimization"]["stage"] == 3))
    if result.history:
        steps = result.history
        train_time = sum(max(h["step_time_s"]) for h in steps)
        result.tokens_per_s = sum(h["job_tokens"] or sum(h["tokens"]) for h in steps) / train_time if train_time else 0.0
        result.step_time_s = sum(sum(h["step_time_s"]) / world for h in steps) / len(steps)
        result.wait_s = [sum(h["wait_s"][r] for h in steps) / len(steps) for r in range(world)]
        result.busy_s = [sum(h["step_time_s"][r] - h["wait_s"][r] for h in steps) / len(steps) for r in range(world)]
    return result


def _recomputes(model) -> bool:
    """Whether activation checkpointing is on: what transformers' `is_activation_checkpointing` computes, read
    directly (transformers 5.0 has only `is_gradient_checkpointing`, which later 5.x deprecate with a warning in
    every rank's log)."""
    return any(getattr(module, "gradient_checkpointing", False) for module in model.modules())


def load_four_bit(model_path: str, four_bit: dict, precision: str, device):
    """QLoRA's base: every linear layer of the decoder stack quantised to 4 bits as it loads (bitsandbytes; packed
    in uint8, which DeepSpeed's cast to the compute dtype leaves alone; the output head, embeddings and norms in the
    compute dtype), frozen and made ready for adapters by PEFT."""
    import torch
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    compute = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[precision.split()[0]]  # ("fp32 (fp16 planned; ...)")
    quantise = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=four_bit["type"], bnb_4bit_use_double_quant=four_bit["double_quant"],
                                  bnb_4bit_compute_dtype=compute, bnb_4bit_quant_storage=torch.uint8)
    model = AutoModelForCausalLM.from_pretrained(model_path, quantization_config=quantise, dtype=compute, device_map={"": device})
    # Checkpointing, if any, is switched on as for LoRA (per card); PEFT freezes the base and upcasts its 16-bit
    # parts to fp32, which DeepSpeed casts back to the compute dtype under fp16/bf16.
    return prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)


def _resume_point(checkpoints: Path, layout: dict) -> tuple[str | None, list[str], str | None]:
    """Rank 0: the newest complete checkpoint, warnings for newer broken ones, and the directory to load it
    from (its own, or its universal form when it was saved on another world size or ZeRO stage)."""
    from workers import checkpoint

    foreign = checkpoint.made_for_another(checkpoints, layout["trains"])
    if foreign:
        raise RuntimeError(f"{checkpoints / foreign} was made for another model or method; nothing was loaded or overwritten: "
                           "give the job a new output_dir, or move those checkpoints away")
    tag, skipped = checkpoint.newest_complete(checkpoints)
    if tag is None:
        return None, skipped, None
    saved = checkpoint.layout(checkpoints, tag)
    if checkpoint.loads_directly(saved, layout):
        return tag, skipped, str(checkpoints)
    if why := checkpoint.across_zero3(saved, layout):
        raise RuntimeError(f"{checkpoints / tag} cannot be resumed here: {why}")
    return tag, skipped, str(checkpoint.universal(checkpoints, tag))


def _quiet_deepspeed_timer_log() -> None:
    """With wall_clock_breakdown on, DeepSpeed prints its timers on every micro-step whatever the log level.
    zeromix reads the same timers and reports them once per step, so only those prints are silenced."""
    import deepspeed.utils.timer

    deepspeed.utils.timer.print_dist = lambda *args, **kwargs: None


def _save_final(engine, tokenizer, out: Path, rank: int, zero3_stage: bool) -> Path:
    """A model (full) or adapter (LoRA) directory that `from_pretrained` loads."""
    final = out / FINAL_DIR
    # ZeRO-3 holds a shard of every weight on each rank: gather them (a collective, so every rank calls it).
    state_dict = engine._zero3_consolidated_16bit_state_dict() if zero3_stage else None
    if rank == 0:
        engine.module.save_pretrained(str(final), state_dict=state_dict, safe_serialization=True)
        tokenizer.save_pretrained(str(final))
    return final


def _box_left(met, step: int, boxes: tuple[int, ...], split: tuple[int, ...], grad_accum: int) -> dict:
    """What the job's result says of boxes lost before the outer step at `step`: the job went on without them, and
    their share of the steps since the last outer step went untrained with them (their deltas never came)."""
    ranks = _ranks_of(met.left, boxes)
    samples = sum(split[r] for r in ranks) * grad_accum
    return {"step": step, "boxes": list(met.left), "ranks": ranks, "untrained_steps": [met.since, step], "untrained_samples_a_step": samples,
            "new_split": list(met.split or ()),
            "why": (f"box(es) {list(met.left)} (ranks {ranks}) lost before the outer step at step {step}: their share of steps "
                    f"{met.since}-{step}, {samples} samples a step, went untrained with them; the split from step {step + 1}: "
                    f"{list(split)} -> {list(met.split or ())}")}


def _box_back(met, step: int, boxes: tuple[int, ...], split: tuple[int, ...]) -> dict:
    """What the job's result says of boxes let back in at the outer step at `step`."""
    ranks = _ranks_of(met.back, boxes)
    return {"step": step, "boxes": list(met.back), "ranks": ranks, "new_split": list(met.split or ()),
            "why": (f"box(es) {list(met.back)} (ranks {ranks}) back: let in at the outer step at step {step} with the global weights; "
                    f"the split from step {step + 1}: {list(split)} -> {list(met.split or ())}")}


def _ranks_of(which: tuple[int, ...], boxes: tuple[int, ...]) -> list[int]:
    """The job ranks of the boxes `which` (`boxes`: ranks per box, the job's ranks listed box by box)."""
    firsts = first_ranks(boxes)
    return [firsts[b] + r for b in which for r in range(boxes[b])]


def _device_name(on_gpu: bool) -> str:
    import torch

    return torch.cuda.get_device_name(0) if on_gpu else "cpu"


def _progress(rank: int, progress, **fields) -> None:
    """One line per step in the job's log, for a person; the same step posted where `--follow` reads it."""
    if rank == 0:
        print(f"zeromix: step {fields['step']}/{fields['of']}, loss {fields['loss']:.4f}, {fields['tokens_per_s']:,.0f} tokens/s, "
              f"{fields['step_time_s'] * 1000:.0f} ms/step", flush=True)
    if progress:
        progress.post(fields)


def _say(rank: int, text: str) -> None:
    if rank == 0:
        print(f"zeromix: {text}", flush=True)
