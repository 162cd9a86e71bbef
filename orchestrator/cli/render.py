"""How zeromix draws what it is asked for: tables, progress bars and one-line notes. Values come from
`orchestrator.client` and the cluster modules; nothing here decides anything. Below WIDE columns, tables drop
columns and long text goes on its own lines."""

from __future__ import annotations

import dataclasses
import math
import time
from typing import Iterator

from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from orchestrator.client import Ended, QueueView, Step, Waiting
from orchestrator.job_states import ACTIVE
from orchestrator.planner import Plan, memory, outer, step_time
from orchestrator.planner.filters import arch_span, cards_its_build_cannot_drive, sm, usability
from orchestrator.planner.memory import GIB

console = Console()
WIDE = 120


def narrow() -> bool:
    return console.width < WIDE


def short(gpu: str) -> str:
    """'GeForce RTX 3090' -> 'RTX 3090' where space is short: the family name says nothing a reader needs."""
    return gpu.removeprefix("GeForce ") if narrow() else gpu


# ------------------------------------------------------------------------------------------ cluster
def notes(result) -> None:
    for note in result.notes:
        console.print(f"zeromix: {note}")


def registered(node) -> None:
    for warning in node.warnings:
        console.print(f"[yellow]warning:[/] {warning}")
    console.print(f"zeromix: node {node.name} ({node.address}) registered {len(node.cards)} card(s)"
                  + (f", {node.software.build}" if node.software else ""))
    if node.link_measured_gbit_per_s:
        console.print(f"  link to the head: {node.link_measured_gbit_per_s:.2f} Gbit/s (measured)")
    for card in node.cards:
        verdict = usability(card)
        console.print(f"  {card.card_id}  {card.short_name}  {card.vram_mib / 1024:.0f} GiB  sm_{card.compute_capability[0]}{card.compute_capability[1]}  "
                      + ("usable" if verdict.ok else f"[red]not usable[/]: {verdict.reason}"))
        if card.facts.measured:
            console.print(f"    measured: {measured_text(card.facts.measured)}")
        if card.warning:
            console.print(f"  [yellow]warning:[/] {card.warning}")


def measured_text(m) -> str:
    rates = ", ".join(f"{p} {t:g}" for p, t in m.matmul_tflops)
    h2d = f", host->card {m.host_to_device_gb_s:g} GB/s" if m.host_to_device_gb_s else ""
    return f"matmul TFLOPS {rates}; memory {m.memory_gb_s:g} GB/s{h2d} (in {m.probe_s:g} s)"


def nodes(snapshot) -> None:
    rows = [card_row(card) for card in snapshot.cards]
    builds = {n.name: n.software.build for n in snapshot.nodes if n.software}
    if narrow():
        table = Table("CARD", "GPU", "VRAM", "FREE", "CC", "BF16", "RATES", "USABLE", "HELD BY", box=box.SIMPLE_HEAD)
        for r in rows:
            table.add_row(r["card"], short(r["gpu"]) + ("*" if r["estimated"] else ""), f"{r['vram_gib']:g}G",
                          "-" if r["free_gib"] is None else f"{r['free_gib']:g}G", r["compute_capability"], "yes" if r["bf16"] else "no",
                          r["rates"], "yes" if r["usable"] else "no (below)", r["held_by"] or "-")
        console.print(table)
        for r in rows:
            if not r["usable"]:
                console.print(f"{r['card']} not usable: {r['why_not']}")
        if any(r["estimated"] for r in rows):
            console.print("* not in the catalog: rates estimated from NVML")
    else:
        table = Table("NODE", "CARD", "GPU", "VRAM", "FREE", "CC", "BF16", "BANDWIDTH", "RATES", "USABLE", "HELD BY")
        for r in rows:
            measured = r["measured"]
            table.add_row(r["node"], str(r["index"]), r["gpu"] + (" (estimated)" if r["estimated"] else ""), f"{r['vram_gib']:g} GiB",
                          "-" if r["free_gib"] is None else f"{r['free_gib']:g} GiB", r["compute_capability"], "yes" if r["bf16"] else "no",
                          f"{measured['memory_gb_s']:g} GB/s measured" if measured else f"{'~' if r['estimated'] else ''}{r['bandwidth_gbs']:g} GB/s",
                          r["rates"], "yes" if r["usable"] else f"no: {r['why_not']}", r["held_by"] or "-")
        console.print(table)
    if any(n.simulated for n in snapshot.nodes):
        console.print("simulated nodes: cards declared in cluster.yaml, not probed; the maths runs on this machine's CPU")
    if any(r["rates"] == "catalog" for r in rows):
        console.print("RATES catalog: the planner assumes the catalog's peak; `zeromix probe` on that node measures its cards")
    if any(r["training_speed"] for r in rows):
        console.print("RATES x<f>: jobs trained on that card f times as fast as the planner estimated; its plans are scaled by f")
    for node in snapshot.nodes:
        if node.software:
            console.print(box_build(node))
    if len(set(builds.values())) > 1:
        console.print("different software builds: a job runs one build, so cards on different builds never share a job")
    for node in snapshot.nodes:
        for warning in [*node.warnings, *(c.warning for c in node.cards if c.warning)]:
            console.print(f"[yellow]warning[/] ({node.name}): {warning}")


def card_row(card) -> dict:
    verdict = usability(card)
    spec = card.spec
    free_mib = card.facts.memory_free_mib
    return {"node": card.node, "index": card.index, "card": card.card_id, "gpu": spec.name, "nvml_name": card.model,
            "uuid": card.facts.uuid, "pci_bus_id": card.facts.pci_bus_id,
            "vram_gib": round(card.vram_mib / 1024, 1), "free_gib": None if free_mib is None else round(free_mib / 1024, 1),
            "compute_capability": f"{card.compute_capability[0]}.{card.compute_capability[1]}", "sm_count": spec.sm_count, "bf16": spec.bf16,
            "bandwidth_gbs": spec.mem_bandwidth_gbs, "estimated": spec.estimated, "unconfirmed": sorted(spec.unconfirmed),
            "usable": verdict.ok, "why_not": verdict.reason or None, "held_by": card.held_by,
            "rates": ("measured" if card.facts.measured else "catalog")
                     + (f" x{card.facts.training_speed:g}" if card.facts.training_speed else ""),
            "training_speed": card.facts.training_speed,
            "measured": dataclasses.asdict(card.facts.measured) if card.facts.measured else None}


def box_build(node) -> str:
    """Which torch build a box runs, the kernels it ships, and the cards of the box it cannot drive."""
    sw = node.software
    cuda = f"CUDA {sw.torch_cuda}, kernels {arch_span(sw.torch_archs)}" if sw.torch_cuda else "CPU-only"
    blind = cards_its_build_cannot_drive(node)
    if blind:
        verdict = "cannot drive " + ", ".join(f"{c.card_id} {c.short_name.removeprefix('GeForce ')} ({sm(c.compute_capability)})" for c in blind)
    else:
        verdict = f"drives all {len(node.cards)} card(s)" if node.cards else "no cards"
    return f"{node.name}: torch {sw.torch_version} ({cuda}), NCCL {sw.nccl_version or 'none'}; {verdict}"


def node_row(node) -> dict:
    return {"name": node.name, "address": node.address, "simulated": node.simulated, "cpus": node.cpus, "ram_gb": node.ram_gb,
            "link_gbit_per_s": node.link_gbit_per_s, "link_measured_gbit_per_s": node.link_measured_gbit_per_s, "nic": node.nic, "disk_free_gb": node.disk_free_gb,
            "p2p_pairs": node.p2p_pairs, "nvlink_pairs": node.nvlink_pairs,
            "software": dataclasses.asdict(node.software) if node.software else None,
            "cannot_drive": [c.card_id for c in cards_its_build_cannot_drive(node)], "warnings": list(node.warnings)}


# ------------------------------------------------------------------------------------------ jobs
def queue(view: QueueView) -> None:
    rows = [queue_row(r, view.waiting) for r in view.jobs]
    cards, scheduler = view.cards, view.scheduler
    if narrow():  # one line per job, its reason on the next: no cell wraps
        for row in rows:
            console.print(f"{row['job']}  {row['state']}  pri {row['priority']}" + (f"  #{row['position']}" if row["position"] else "")
                          + (f"  {', '.join(row['cards'])}" if row["cards"] else "")
                          + f"  since {time.strftime('%H:%M:%S', time.localtime(row['since']))}")
            console.print(f"    {row['reason']}", style="dim")
    else:
        table = Table("JOB", "STATE", "PRI", "POS", "CARDS", "SINCE", "WHY", title="zeromix queue (times of day; ends are estimates)")
        for row in rows:
            table.add_row(row["job"], row["state"], str(row["priority"]), str(row["position"] or "-"), ", ".join(row["cards"]) or "-",
                          time.strftime("%H:%M:%S", time.localtime(row["since"])), row["reason"])
        console.print(table)
    console.print(f"{len(view.waiting)} queued, {sum(r.state == 'running' for r in view.jobs)} running")
    console.print("cards free: " + (", ".join(f"{c['card']} {short(c['gpu'])}" for c in cards if not c["held_by"]) or "none"))
    console.print("cards held: " + (", ".join(f"{c['card']} by {c['held_by']}" for c in cards if c["held_by"]) or "none"))
    console.print(f"scheduler: policy {scheduler['policy']}, {scheduler['rounds']} rounds; "
                  + (f"the last one stopped: {scheduler['last_error']}" if scheduler["last_error"] else "the last one completed"))


def queue_row(record, waiting: list) -> dict:
    position = next((i for i, r in enumerate(waiting, 1) if r.id == record.id), None)
    since = record.ended_at or record.started_at or record.submitted_at
    return {"job": record.id, "name": record.name, "state": record.state, "priority": record.priority, "position": position,
            "cards": list(record.cards) if record.state in ACTIVE else [], "submitted_at": record.submitted_at,
            "started_at": record.started_at, "ended_at": record.ended_at, "est_end": record.est_end, "since": since,
            "reason": record.reason, "attempts": record.attempts, "total_steps": record.total_steps}


def plan(p: Plan) -> None:
    console.print(f"[bold]Plan for {p.job_name}[/]: {p.settings}, {p.precision}, activation checkpointing "
                  f"{p.checkpointing}, {p.grad_accum} accumulation step(s), global batch "
                  f"{p.global_batch}, {p.total_steps} steps, {p.trainable:,} of {p.n_params:,} parameters trained")
    s = p.step
    time_parts = [(duration(c), duration(w), duration(s.comm_s), duration(o)) for c, w, o in zip(s.compute_s, s.wait_s, s.offload_s)]
    if narrow():
        table = Table("RANK", "CARD", "GPU", "MICRO", "CKPT", "GiB / CARD", "TFLOPS", "COMPUTE", box=box.SIMPLE_HEAD,
                      title="per card (estimates; the memory breakdown is in `--json` or a wider terminal)")
    else:
        table = Table("RANK", "CARD", "GPU", "MICRO-BATCH", "CKPT", "WEIGHTS", "GRADS", "OPTIMIZER", "GATHERED", "ACTIVATIONS",
                      "BUCKETS+CTX", "TOTAL / FREE", "TFLOPS", "COMPUTE", "WAIT", "COMM", "OFFLOAD",
                      title="per card: memory in GiB, time per optimizer step (estimates)")
    for i, (r, times) in enumerate(zip(p.ranks, time_parts)):
        m = r.memory
        breakdown = [] if narrow() else [f"{v / GIB:.2f}" for v in (m.weights, m.gradients, m.optimizer, m.gathered, m.activations, m.buckets + m.overhead)]
        table.add_row(str(i), r.card.card_id, short(r.card.short_name), str(r.tuning.micro_batch), "on" if r.tuning.activation_checkpointing else "off",
                      *breakdown, f"{m.total / GIB:.1f}/{r.capacity_bytes / GIB:.0f}" if narrow() else f"{m.total / GIB:.2f} / {r.capacity_bytes / GIB:.1f}",
                      f"{r.rate_tflops:.3g}{r.rate_source[0]}" if narrow() else f"{r.rate_tflops:.3g} {r.rate_source}",
                      *(times[:1] if narrow() else times))
    console.print(table)
    console.print("TFLOPS: what each card is assumed to reach in training, from its measured matmul rate"
                  f"{' (m)' if narrow() else ''} x{step_time.MEASURED_RATE_EFFICIENCY:g} or the catalog's peak{' (c)' if narrow() else ''} "
                  f"x{step_time.ASSUMED_EFFICIENCY:g}.{'' if narrow() else ' WAIT: idle until the slowest card is done.'}")
    slowest = max(range(len(p.ranks)), key=lambda i: s.busy_s[i])
    console.print(f"estimated step {duration(s.step_s)} = compute {duration(s.compute_s[slowest])} + offload {duration(s.offload_s[slowest])} "
                  f"(the slowest card, {p.ranks[slowest].card.card_id}) + communication {duration(s.comm_s)}; "
                  f"about {s.tokens_per_s:,.0f} tokens/s (estimate)")
    console.print("host RAM for model states (estimate): " + ", ".join(f"{n} {b / GIB:.1f} GiB" for n, b in p.host_bytes_per_node.items()))
    if p.four_bit:
        console.print(f"{p.four_bit.describe()}: {p.four_bit.why}")
    if p.loss_chunked:
        console.print(f"the loss takes the logits {p.loss_chunk_tokens:,} tokens at a time (about {memory.LOSS_CHUNK_BYTES / 2**20:.0f} MiB "
                      "at the loss's peak), not a micro-batch's all at once; backward runs the output head again")
    if p.outer:
        console.print("\n".join(outer.describe(p.outer)) + "\n  (communication above: each box's own, plus the exchange spread over its steps)")
    if p.no_outer:
        console.print(f"synchronous, not outer steps as the job asks: {p.no_outer}")
    if any(r.env for r in p.ranks):
        console.print("environment: " + rank_env(p))
    if p.rejected and narrow():
        console.print("left out:")
        for x in p.rejected:
            console.print(f"  {x.card_id} {short(x.card)}: {x.reason}")
    elif p.rejected:
        left_out = Table("LEFT OUT", "GPU", "WHY")
        for x in p.rejected:
            left_out.add_row(x.card_id, x.card, x.reason)
        console.print(left_out)


def as_lora(qlora: Plan, lora: Plan | str) -> None:
    """Beside a QLoRA plan: what the same job with a 16-bit base would need on the same cards."""
    if isinstance(lora, str):
        console.print(f"LoRA with a 16-bit base on the same cards: does not fit: {lora}; the 4-bit base is "
                      f"{qlora.ranks[0].memory.weights / GIB:.1f} GiB a card here (estimates)")
        return
    most = max(r.memory.total for r in lora.ranks) / GIB
    console.print(f"LoRA with a 16-bit base on the same cards: {lora.settings}, {lora.precision}, on {len(lora.ranks)} card(s), "
                  f"up to {most:.1f} GiB a card, about {lora.step.tokens_per_s:,.0f} tokens/s vs {qlora.step.tokens_per_s:,.0f} "
                  "for QLoRA (estimates)")


def duration(seconds: float) -> str:
    """Three significant figures, in ms below a second and µs below a millisecond: estimates span
    microseconds to minutes."""
    if seconds >= 1 or seconds == 0:
        return f"{seconds:.3g} s"
    return f"{seconds * 1000:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} µs"


def job_result(result: dict) -> None:
    columns = (["RANK", "CARD", "GPU", "MICRO", "ZeRO", "PREC.", "UTIL.", "MiB MEAS./EST."] if narrow() else
               ["RANK", "CARD", "GPU", "MICRO-BATCH", "ZeRO", "PRECISION", "RAN ON", "UTILISATION", "MODEL STATES MiB (MEASURED / EST.)"])
    table = Table(*columns, box=box.SIMPLE_HEAD if narrow() else box.HEAVY_HEAD)
    for r in result["ranks"]:
        util = f"{r['utilisation']:.0%}" if r["utilisation"] is not None else "-"
        states = f"{r['model_state_mib']:g} / {r['est_model_state_mib']:g}"
        table.add_row(str(r["rank"]), r["card"], short(r["model"]), str(r["micro_batch"]), str(r["zero_stage"]), r["precision"],
                      *([] if narrow() else [r["device"]]), util, states)
    console.print(table)
    if result["first_loss"] is None:
        console.print(f"resumed from {result['resumed_from']} at its last step ({result['steps']}): nothing left to train; "
                      f"saved to {result['final_dir']}")
        return
    console.print(f"step time {duration(result['step_time_s'])} measured on {result['ranks'][0]['device']}; "
                  f"the plan estimated {duration(result['est_step_s'])} for the real cards")
    if result.get("method") == "qlora":
        console.print(f"base: {result['base']}; the adapter alone was saved")
    console.print(f"loss {result['first_loss']:.4f} -> {result['last_loss']:.4f} over {result['steps']} steps, "
                  f"{result['tokens_per_s']:.0f} tokens/s (measured); saved to {result['final_dir']}")
    for change in result.get("rebalances") or []:
        ranks = change.get("ranks", [])  # (the box's, with outer steps; older results have none)
        within = f" on ranks {', '.join(map(str, ranks))}" if 0 < len(ranks) < len(result["ranks"]) else ""
        console.print(f"split corrected from step {change['step']}{within}: {change['old']} -> {change['new']} (measured speeds)")
    outer = result.get("outer") or {}
    for change in sorted(outer.get("boxes_left", []) + outer.get("boxes_back", []), key=lambda c: c["step"]):
        console.print(change["why"])


def follow(events: Iterator[Waiting | Step | Ended]) -> Ended:
    """Draw a job's life as `client.watch` yields it: each reason it waits, then a live progress bar on a
    terminal (step, loss, tokens/s, rich's own time remaining), plain lines at every tenth of the run elsewhere
    (CI, a pipe); a restarted job gets a new bar. Returns its end."""
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
               TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tokens/s"), TextColumn("ETA"), TimeRemainingColumn())
    bar, task, tenths = None, None, 0
    try:
        for event in events:
            if isinstance(event, Step):
                if bar is None:
                    bar = Progress(*columns, console=console, transient=False, disable=not console.is_terminal)
                    bar.start()
                    task, tenths = bar.add_task(event.job_id, total=event.of, completed=event.step - 1, loss="-", speed="-"), (event.step - 1) * 10 // event.of
                bar.update(task, completed=event.step, loss=f"{event.loss:.4f}", speed=f"{event.tokens_per_s:,.0f}")
                if not console.is_terminal and (event.step * 10 // event.of > tenths or event.step == event.of):
                    tenths = event.step * 10 // event.of
                    left = bar.tasks[0].time_remaining
                    console.print(f"{event.job_id}: step {event.step}/{event.of}, loss {event.loss:.4f}, "
                                  f"{event.tokens_per_s:,.0f} tokens/s, ETA {clock_duration(left) if left is not None else '-'}")
                continue
            if bar is not None:
                bar.stop()
                bar = None
            if isinstance(event, Waiting):
                console.print(f"{event.job_id}: {event.state}: {event.reason}")
            else:
                console.print(f"{event.job_id}: {event.state}")
                return event
    finally:
        if bar is not None:
            bar.stop()
    raise AssertionError("client.watch ended without an Ended")


def clock_duration(seconds: float) -> str:
    """h:mm:ss, from the mean step time so far (a running estimate)."""
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


# ------------------------------------------------------------------------------------------ simulation
def sim_row(result) -> dict:
    """One policy's figures; None where no job finished."""
    def hours(seconds: float) -> float | None:
        return None if math.isnan(seconds) else round(seconds / 3600, 2)

    return {"policy": result.policy, "jobs_run": len(result.jct_s), "rejected": len(result.rejected),
            "avg_jct_h": hours(result.avg_jct_s), "p95_jct_h": hours(result.p95_jct_s), "makespan_h": hours(result.makespan_s),
            "max_slowdown": round(max(result.slowdowns), 1) if result.slowdowns else None,
            "idle_while_waiting_card_h": round(result.idle_while_waiting_s / 3600, 1), "moves": result.moves, "never_ran": result.never_ran,
            "utilisation": {card: None if math.isnan(u) else round(u, 3) for card, u in result.utilisation().items()}}


def simulation(rows: list[dict], n_jobs: int, cluster: str, costs) -> None:
    fifo = next((r for r in rows if r["policy"] == "fifo-first-fit"), None)
    charged = ("steps x the planner's step time only" if not costs.start_s else
               f"start {costs.start_s:g} s, weights at {costs.load_gb_per_s:g} GB/s, checkpoints at {costs.checkpoint_gb_per_s:g} GB/s, "
               f"estimate error sigma {costs.estimate_sigma:g}")
    table = Table("POLICY", "AVG JCT", "P95 JCT", "MAKESPAN", "MAX SLOWDOWN", "IDLE WHILE WAITING", "MOVES", "VS FIFO (AVG / MAKESPAN)",
                  title=f"{n_jobs} jobs on {cluster} (simulated; charged: {charged})")
    def shown(value, form: str) -> str:
        return "-" if value is None else form.format(value)

    for r in rows:
        ratio = "-"
        if fifo and r["avg_jct_h"] and fifo["avg_jct_h"]:
            ratio = f"{r['avg_jct_h'] / fifo['avg_jct_h']:.2f}x / {r['makespan_h'] / fifo['makespan_h']:.2f}x"
        table.add_row(r["policy"], shown(r["avg_jct_h"], "{:.2f} h"), shown(r["p95_jct_h"], "{:.2f} h"), shown(r["makespan_h"], "{:.1f} h"),
                      shown(r["max_slowdown"], "{:.1f}x"), f"{r['idle_while_waiting_card_h']:.1f} card-h", str(r["moves"]), ratio)
    console.print(table)
    cards = Table("CARD", *(r["policy"] for r in rows), title="utilisation (busy share of the makespan)")
    for card in rows[0]["utilisation"]:
        cards.add_row(card, *(shown(r["utilisation"][card], "{:.0%}") for r in rows))
    console.print(cards)
    for r in rows:
        for job_id, why in r["never_ran"].items():
            console.print(f"{r['policy']}: {job_id} never ran: {why}")
    rejected = rows[0]["rejected"]
    if rejected:
        console.print(f"{rejected} job(s) of the trace fit nowhere in this cluster and were refused at submit")


def rank_env(p: Plan) -> str:
    """The ranks' environment (NCCL's settings, the box link's interface), once for what every rank shares and per node
    for what differs by node (each node's own interface)."""
    per_node: dict[str, dict[str, str]] = {}
    for r in p.ranks:
        per_node.setdefault(r.card.node, {}).update(r.env)
    shared = {}
    for key in {k for env in per_node.values() for k in env}:
        values = {env.get(key) for env in per_node.values()}
        if len(values) == 1 and None not in values:
            shared[key] = values.pop()
    parts = [" ".join(f"{k}={v}" for k, v in sorted(shared.items()))] if shared else []
    parts += [f"{node}: " + " ".join(f"{k}={v}" for k, v in sorted(env.items()) if k not in shared)
              for node, env in per_node.items() if set(env) - set(shared)]
    return "; ".join(parts)
