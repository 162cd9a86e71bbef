"""`zeromix`: the command line. It renders; the modules it calls decide."""

from __future__ import annotations

import dataclasses
import json
import sys
import time
from typing import Optional

import typer
from rich import box
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn
from rich.table import Table

from orchestrator import cluster_runtime, launch, registry
from orchestrator.cluster_config import LINK_GBIT_PER_S, load_cluster
from orchestrator.errors import InputError, ZeromixError
from orchestrator.inventory import snapshot_from_config
from orchestrator.jobspec import load_job, total_steps
from orchestrator.model_facts import facts_from_config, read_config
from orchestrator.planner import Plan, make_plan, step_time
from orchestrator.planner.filters import arch_span, cards_its_build_cannot_drive, sm, usability
from orchestrator.planner.memory import GIB
from orchestrator.queue import ACTIVE, LIVE, TERMINAL, OutputDirTaken, StaleTransition
from workers.train import PROGRESS_TAG

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune on a homelab of mixed NVIDIA cards with DeepSpeed ZeRO on Ray.")
console = Console()
POLL_S = 1.0
WIDE = 120  # below this many columns, tables drop columns and long text goes on its own lines


def narrow() -> bool:
    return console.width < WIDE


def short(gpu: str) -> str:
    """'GeForce RTX 3090' -> 'RTX 3090' where space is short: the family name says nothing a reader needs."""
    return gpu.removeprefix("GeForce ") if narrow() else gpu


# ------------------------------------------------------------------------------------------ cluster
LinkOption = typer.Option(None, "--link", help=f"This node's link to the others ({', '.join(LINK_GBIT_PER_S)}); default: its NIC's speed.")
SkipProbeOption = typer.Option(False, "--skip-rate-probe", help="Do not measure the cards' rates (a few seconds per card); "
                               "the planner then uses catalog rates. `zeromix probe` measures later.")


def _offload_dir(value: str | None) -> str:
    return value or str(cluster_runtime.home() / "offload")


@app.command()
def up(simulate: Optional[str] = typer.Option(None, "--simulate", metavar="CLUSTER_YAML",
                                              help="Run every node of CLUSTER_YAML as a Ray node on this machine (cards declared, maths on CPU)."),
       address: str = typer.Option("127.0.0.1", "--address", help="The IP other nodes reach this head on. Loopback (the default) "
                                   "makes a one-machine cluster; a LAN address lets `zeromix join` in, always with Ray's token auth."),
       name: Optional[str] = typer.Option(None, "--name", help="This node's name in zeromix (default: its hostname)."),
       port: int = typer.Option(6379, "--port", min=1024, max=65535),
       dashboard_port: int = typer.Option(8265, "--dashboard-port", min=1024, max=65535),
       offload_dir: Optional[str] = typer.Option(None, "--offload-dir", help="Where CPU offload may spill (default: ZEROMIX_HOME/offload)."),
       link: Optional[str] = LinkOption, skip_rate_probe: bool = SkipProbeOption):
    """Start the cluster: the head on this machine with its own cards (probed through NVML, their rates
    measured), or with --simulate the whole cluster.yaml homelab on this machine."""
    if simulate:
        result, snapshot = cluster_runtime.up_simulated(simulate)
        _print_notes(result)
        cards = sum(len(n.cards) for n in snapshot.nodes)
        verb = "already up: reusing" if result.reused else "registered"
        console.print(f"zeromix: {len(snapshot.nodes)} nodes and {cards} cards {verb} from {simulate}")
        start_scheduler(result.state)
        console.print(f"Ray dashboard: {result.state.dashboard_url}   (token auth on; `zeromix down` stops it)")
        return
    result, node = cluster_runtime.up(name or cluster_runtime.default_node_name(), address, port, dashboard_port,
                                      _offload_dir(offload_dir), _link(link), not skip_rate_probe)
    _print_notes(result)
    if node:
        _print_registered(node)
    else:
        console.print(f"zeromix: the head {result.state.node} at {result.state.gcs_address} is already up: reusing it")
    start_scheduler(result.state)
    console.print(f"Ray dashboard: {result.state.dashboard_url}   (token auth on; `zeromix down` stops it)")
    if address != "127.0.0.1":
        console.print(f"other nodes join with:  zeromix join --address {result.state.gcs_address} --token-file <copy of {cluster_runtime.token_file()}>\n"
                      "(copy the token file over a channel you trust, e.g. scp; it is the cluster's only credential)")


def _print_notes(result: cluster_runtime.UpResult) -> None:
    for note in result.notes:
        console.print(f"zeromix: {note}")


def start_scheduler(state) -> None:
    from orchestrator.scheduler.service import ensure_running

    cluster_runtime.connect(state)
    ensure_running(state)
    console.print("scheduler: running on the head; `zeromix submit JOB.yaml` queues a job, `zeromix queue` lists them")


@app.command()
def join(address: str = typer.Option(..., "--address", metavar="HEAD:PORT", help="The head, as `zeromix up` printed it."),
         name: Optional[str] = typer.Option(None, "--name", help="This node's name in zeromix (default: its hostname)."),
         token_file: Optional[str] = typer.Option(None, "--token-file", help="A copy of the head's auth_token (kept in ZEROMIX_HOME, mode 0600)."),
         offload_dir: Optional[str] = typer.Option(None, "--offload-dir", help="Where CPU offload may spill (default: ZEROMIX_HOME/offload)."),
         link: Optional[str] = LinkOption, skip_rate_probe: bool = SkipProbeOption):
    """Join this machine to a zeromix cluster: probe its cards and measure their rates and the link to the head,
    start Ray here and register every card."""
    result, node = cluster_runtime.join(address, name or cluster_runtime.default_node_name(), token_file, _offload_dir(offload_dir),
                                        _link(link), not skip_rate_probe)
    _print_notes(result)
    _print_registered(node)
    console.print(f"joined {address}; `zeromix nodes` on the head lists every card")


@app.command()
def probe():
    """Measure this machine's cards again (matmul TFLOPS, memory and PCIe bandwidth; on a joined node also the
    link to the head) and update its registration: after a driver upgrade, a new card, or a cooler fix."""
    _print_registered(cluster_runtime.reprobe())


def _link(value: str | None) -> float | None:
    if value is None:
        return None
    if value not in LINK_GBIT_PER_S:
        raise InputError("command line", "--link", value, f"one of {', '.join(LINK_GBIT_PER_S)}")
    return LINK_GBIT_PER_S[value]


def _print_registered(node) -> None:
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


@app.command()
def nodes(as_json: bool = typer.Option(False, "--json", help="The same rows as JSON.")):
    """One row per card: VRAM total/free, compute capability, bf16, bandwidth, usable or not and why, and the job holding it."""
    cluster_runtime.connect()
    snapshot = registry.snapshot(live_free_memory=True)
    rows = [card_row(card) for card in snapshot.cards]
    builds = {n.name: n.software.build for n in snapshot.nodes if n.software}
    if as_json:
        print(json.dumps({"cards": rows, "nodes": [node_row(n) for n in snapshot.nodes]}, indent=2))
        return
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


def measured_text(m) -> str:
    rates = ", ".join(f"{p} {t:g}" for p, t in m.matmul_tflops)
    h2d = f", host->card {m.host_to_device_gb_s:g} GB/s" if m.host_to_device_gb_s else ""
    return f"matmul TFLOPS {rates}; memory {m.memory_gb_s:g} GB/s{h2d} (in {m.probe_s:g} s)"


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


@app.command()
def down():
    """Stop the cluster zeromix started on this machine (only its processes: other Ray clusters are left alone)."""
    stopped = cluster_runtime.down()
    console.print("zeromix: no cluster was up" if stopped is None else f"zeromix: cluster stopped ({stopped} process(es))")


# ------------------------------------------------------------------------------------------ jobs
SetOption = typer.Option(None, "--set", metavar="KEY=VALUE", help="Override a field of the spec, e.g. --set output_dir=runs/try2")


def _job_and_facts(job_file: str, overrides: list[str]):
    job = load_job(job_file, overrides=overrides)  # schema and paths are checked before the cluster is touched
    facts = facts_from_config(read_config(job.model.path))
    facts.check_seq_len(job.seq_len, job_file)
    return job, facts


def _plan(job_file: str, overrides: list[str], pool: str | None = None):
    """Plan against the live cluster, or against a pool file (cluster.yaml format) without touching Ray."""
    job, facts = _job_and_facts(job_file, overrides)
    if pool:
        return job, make_plan(job, facts, snapshot_from_config(load_cluster(pool)), total_steps(job)), None
    state = cluster_runtime.connect()
    return job, make_plan(job, facts, registry.snapshot(live_free_memory=True), total_steps(job)), state


@app.command()
def plan(job_file: str, set_: Optional[list[str]] = SetOption, as_json: bool = typer.Option(False, "--json"),
         pool: Optional[str] = typer.Option(None, "--pool", metavar="CLUSTER_YAML",
                                            help="Plan against the cards this file describes (cluster.yaml format); no cluster needed.")):
    """Show the cards, per-card DeepSpeed settings and estimates a job would get, and why other cards are left out. Reserves nothing."""
    _, chosen, _ = _plan(job_file, set_ or [], pool)
    if as_json:
        print(json.dumps(chosen.summary(), indent=2))
    else:
        render_plan(chosen)


@app.command()
def advise(model: str = typer.Option(..., "--model", metavar="ID_OR_CONFIG_DIR", help="A directory with config.json, or a Hugging Face id in the local cache."),
           method: str = typer.Option("lora", "--method", help="lora or full"),
           seq_len: int = typer.Option(2048, "--seq-len", min=8),
           batch: int = typer.Option(32, "--batch", min=1, help="Global batch size (samples per optimizer step)."),
           cards: Optional[str] = typer.Option(None, "--cards", help='Only these cards, e.g. "RTX 3090,GTX 1080 Ti" (default: the whole catalog).'),
           host_ram: float = typer.Option(64, "--host-ram", metavar="GB", help="Host RAM of the box, for CPU offload."),
           top: int = typer.Option(25, "--top", min=1, help="Rows to show (--json gives all)."),
           as_json: bool = typer.Option(False, "--json")):
    """Which card, or pair of cards in one box, can run this job, in which DeepSpeed configuration, how fast
    and at how many tokens per joule (estimates), ranked."""
    from orchestrator.advice import advise as run_advice

    if method not in ("lora", "full"):
        raise InputError("command line", "--method", method, "lora or full")
    facts = facts_from_config(read_config(model))
    facts.check_seq_len(seq_len, "command line", "--seq-len")
    names = [n.strip() for n in cards.split(",") if n.strip()] if cards else None
    rows = run_advice(facts, method, seq_len, batch, host_ram, names)
    if as_json:
        print(json.dumps({"model": model, "model_type": facts.model_type, "params": facts.n_params, "method": method,
                          "seq_len": seq_len, "global_batch": batch, "host_ram_gb": host_ram,
                          "options": [a.summary() for a in rows]}, indent=2))
        return
    console.print(f"{model}: {facts.model_type}, {facts.n_params:,} parameters; {method}, seq_len {seq_len}, global batch {batch}, "
                  f"host RAM {host_ram:g} GB. Throughput and efficiency are estimates (TDP as power).")
    table = Table("#", "CARDS", "RUNS?", "CONFIG", "MICRO-BATCH", "TOKENS/S", "TOKENS/J")
    for i, a in enumerate(rows[:top], 1):
        d = a.summary()
        config = f"ZeRO-{d['zero_stage']}, offload {d['offload']}, {d['precision']}" + ("" if d["activation_checkpointing"] == "off" else ", ckpt " + d["activation_checkpointing"].removeprefix("on").strip()).rstrip() if a.plan else "-"
        micro = "+".join(map(str, d["micro_batches"])) + (f" x{d['grad_accum']}" if a.plan and d["grad_accum"] > 1 else "") if a.plan else "-"
        names = f"2 x {a.cards[0]}" if len(a.cards) == 2 and a.cards[0] == a.cards[1] else " + ".join(a.cards)
        table.add_row(str(i), names, "yes" if a.plan else f"no: {a.why_not[:160]}", config, micro,
                      f"{a.tokens_per_s:,.0f}" if a.plan else "-", f"{a.tokens_per_joule:.2f}" if a.plan else "-")
    console.print(table)


JsonOption = typer.Option(False, "--json", help="The same as JSON.")


@app.command()
def submit(job_file: str, set_: Optional[list[str]] = SetOption,
           follow: bool = typer.Option(False, "--follow", "-f", help="Watch it: its place in the queue, then a progress bar until it ends."),
           as_json: bool = JsonOption):
    """Check a job, put it in the queue and print its id at once. The scheduler on the head starts it when
    cards for it are free, on the cards where it gains most."""
    job_id, preview = enqueue(job_file, set_ or [])
    if as_json:
        print(json.dumps({"job": job_id, "state": "queued", "plan_if_idle": preview.summary()}))
    else:
        console.print(f"submitted [bold]{job_id}[/]  (queued; `zeromix queue` shows its place, `zeromix logs -f {job_id}` follows it)")
        console.print(f"on an idle cluster it would run on {' + '.join(f'{r.card.card_id} {r.card.short_name}' for r in preview.ranks)}, "
                      f"about {preview.step.tokens_per_s:,.0f} tokens/s (estimate; the scheduler re-plans on the cards it gets)")
    if follow:
        _finish(job_id, watch(job_id))


def enqueue(job_file: str, overrides: list[str]) -> tuple[str, Plan]:
    """Validate against files and the cluster's cards (a job that fits nowhere is refused, nothing stored),
    then store it queued and wake the scheduler."""
    from orchestrator.scheduler import spec_record
    from orchestrator.scheduler.service import ensure_running

    job, facts = _job_and_facts(job_file, overrides)
    state = cluster_runtime.connect()
    steps = total_steps(job)
    preview = make_plan(job, facts, registry.snapshot().with_holders({}), steps)
    job_id = launch.new_job_id(job)
    try:
        _queue().submit(job_id, job.name, spec_record(job), steps, job.priority)
    except OutputDirTaken as clash:
        raise InputError(job_file, "output_dir", job.output_dir, f"{clash}; choose another") from None
    ensure_running(state).poke.remote()
    return job_id, preview


def submit_job(job_file: str, overrides: list[str]) -> tuple[str, dict]:
    """Queue a job and follow it to its end (the demo's path); exits 1 if it did not succeed."""
    job_id, preview = enqueue(job_file, overrides)
    console.print(f"submitted [bold]{job_id}[/]")
    render_plan(preview)
    return job_id, _finish(job_id, watch(job_id))


def _queue():
    from orchestrator.queue import QueueStore
    from orchestrator.scheduler.service import queue_path

    if not queue_path().exists():
        cluster_runtime.load_state()  # says "no cluster" when that is the reason
    return QueueStore(queue_path())


def _record(store, job_id: str):
    try:
        return store.find(job_id)
    except KeyError as err:
        raise ZeromixError(f"no job {err.args[0]!r} in the queue; `zeromix queue --all` lists them") from None


PLACING_TIMEOUT_S = 180


def watch(job_id: str) -> tuple[str, dict | None]:
    """Follow a job: each change of why it waits, then its progress bar, until the queue records its end; a
    job restarted after a lost card goes back to waiting and is followed again. Waiting in the queue has no
    deadline (Ctrl-C stops watching, not the job); being placed has one."""
    store, state = _queue(), cluster_runtime.connect()
    job_id = _record(store, job_id).id
    last_reason, placing_since, result = None, None, None
    while True:
        while (record := store.get(job_id)).state in ("queued", "placing"):
            if record.reason != last_reason:
                console.print(f"{record.id}: {record.state}: {record.reason}")
                last_reason = record.reason
            placing_since = (placing_since or time.monotonic()) if record.state == "placing" else None
            if placing_since and time.monotonic() - placing_since > PLACING_TIMEOUT_S:
                raise ZeromixError(f"{record.id} has been placing for {PLACING_TIMEOUT_S} s; `zeromix queue` says why, "
                                   "and the scheduler's log is in the Ray dashboard (actor zeromix-scheduler)")
            time.sleep(POLL_S)
        if record.state == "running":
            _, result = follow(state, record.ray_job_id, record.total_steps, record.id)
        deadline = time.monotonic() + 60
        while (record := store.get(record.id)).state == "running" and time.monotonic() < deadline:
            time.sleep(POLL_S)  # the scheduler records the end on its next round
        if record.state in TERMINAL:
            return record.state, result
        if record.state == "running":
            raise ZeromixError(f"Ray says {record.ray_job_id} ended but the scheduler has not recorded it within 60 s; "
                               "is it running? (`zeromix queue` restarts it)")


def _finish(job_id: str, outcome: tuple[str, dict | None]) -> dict:
    state, result = outcome
    console.print(f"{job_id}: {state}")
    if state != "succeeded" or result is None:
        console.print(f"see `zeromix logs {job_id}` and `zeromix queue --all`")
        raise typer.Exit(1)
    render_result(result)
    return result


@app.command("queue")
def queue_(show_all: bool = typer.Option(False, "--all", help="Finished jobs too."), as_json: bool = JsonOption):
    """Jobs in the queue (state, cards, position, why a queued job waits) and the cards, free or held.
    (`zeromix status` is the same.)"""
    from orchestrator.scheduler.service import health

    state = cluster_runtime.connect()
    scheduler = health(state)  # started if it is not running: a queue with no scheduler would never move
    store = _queue()
    records = store.jobs() if show_all else store.jobs(LIVE)
    waiting = sorted((r for r in records if r.state == "queued"), key=lambda r: (-r.priority, r.submitted_at))
    rows = [queue_row(r, waiting) for r in records]
    cards = [{"card": c.card_id, "gpu": c.short_name, "held_by": c.held_by} for c in registry.snapshot().cards]
    if as_json:
        print(json.dumps({"jobs": rows, "cards": cards, "scheduler": scheduler}, indent=2))
        return
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
    console.print(f"{len(waiting)} queued, {sum(r.state == 'running' for r in records)} running")
    console.print("cards free: " + (", ".join(f"{c['card']} {short(c['gpu'])}" for c in cards if not c["held_by"]) or "none"))
    console.print("cards held: " + (", ".join(f"{c['card']} by {c['held_by']}" for c in cards if c["held_by"]) or "none"))
    console.print(f"scheduler: policy {scheduler['policy']}, {scheduler['rounds']} rounds; "
                  + (f"the last one stopped: {scheduler['last_error']}" if scheduler["last_error"] else "the last one completed"))


app.command("status", help="The same as `zeromix queue`.")(queue_)


def queue_row(record, waiting: list) -> dict:
    position = next((i for i, r in enumerate(waiting, 1) if r.id == record.id), None)
    since = record.ended_at or record.started_at or record.submitted_at
    return {"job": record.id, "name": record.name, "state": record.state, "priority": record.priority, "position": position,
            "cards": list(record.cards) if record.state in ACTIVE else [], "submitted_at": record.submitted_at,
            "started_at": record.started_at, "ended_at": record.ended_at, "est_end": record.est_end, "since": since,
            "reason": record.reason, "attempts": record.attempts, "total_steps": record.total_steps}


@app.command()
def logs(job_id: str, follow_: bool = typer.Option(False, "--follow", "-f", help="Watch it to its end with a progress bar.")):
    """Print a job's logs (or, for a job still queued, why it waits)."""
    store = _queue()
    record = _record(store, job_id)
    if follow_:
        _finish(record.id, watch(record.id))
        return
    if record.state == "queued" and not record.attempts:
        console.print(f"{record.id} is queued and has no logs yet: {record.reason}")
        return
    state = cluster_runtime.connect()
    try:
        print(launch.jobs_client(state).get_job_logs(record.ray_job_id), end="")
    except RuntimeError:
        raise ZeromixError(f"Ray has no logs for {record.id} (it ended before the head restarted?)") from None


@app.command()
def cancel(job_id: str):
    """Cancel a job in any state: a queued one leaves the queue, a running one is stopped and its cards freed."""
    from orchestrator.scheduler.service import ensure_running

    store = _queue()
    record = _record(store, job_id)
    if record.state in TERMINAL:
        console.print(f"zeromix: {record.id} had already ended ({record.state}); nothing to cancel")
        return
    try:
        store.transition(record.id, LIVE, "cancelled", "cancelled by the user")
    except StaleTransition:
        console.print(f"zeromix: {record.id} ended meanwhile ({store.get(record.id).state}); nothing to cancel")
        return
    state = cluster_runtime.connect()
    launch.stop(state, record.id)  # idempotent; a job the scheduler is placing right now is stopped by it as well
    ensure_running(state).poke.remote()
    console.print(f"zeromix: {record.id} cancelled (was {record.state})" + ("; its cards are free" if record.state != "queued" else ""))


@app.command()
def report(job_id: str, out: Optional[str] = typer.Option(None, "--out", "-o", help="Where to write it; default: <output_dir>/report.html.")):
    """Write a finished job's report: one HTML file (plan, loss, tokens/s per card, where each card's step goes,
    estimates beside measurements) that opens offline."""
    from pathlib import Path

    from orchestrator import report as job_report

    record = _record(_queue(), job_id)
    output_dir = Path(record.spec["output_dir"])
    path = job_report.write(job_report.load_result(output_dir, record.id), Path(out) if out else output_dir / job_report.REPORT_FILE)
    console.print(f"report: {path}")


@app.command()
def monitoring(out: Optional[str] = typer.Option(None, "--out", "-o", help="Default: $ZEROMIX_HOME/monitoring.")):
    """Write a Prometheus scrape config for this cluster and zeromix's Grafana dashboard, and say how to start them."""
    from pathlib import Path

    from orchestrator import monitoring as files

    state = cluster_runtime.load_state()
    written = files.write(state, Path(out) if out else cluster_runtime.home() / "monitoring")
    console.print(f"prometheus config: {written['prometheus']} (follows Ray's list of every node's metrics port)")
    console.print(f"grafana dashboard: {written['dashboard']} (one row per card)")
    console.print(f"start Prometheus:  prometheus --config.file={written['prometheus']} --web.listen-address=127.0.0.1:9090 "
                  f"--storage.tsdb.path={written['prometheus'].parent / 'data'}")
    console.print("in Grafana: add the data source http://127.0.0.1:9090 (Prometheus), then Dashboards > New > Import the file above")


@app.command("make-demo-data")
def make_demo_data(directory: str = "data/demo"):
    """Write the demo's synthetic datasets (no download)."""
    from pathlib import Path

    from orchestrator.demo.task import write_demo_data

    for name, path in write_demo_data(Path(directory)).items():
        console.print(f"{name}: {path}")


@app.command()
def demo(cluster: str = "cluster.yaml"):
    """The whole flow on the embedded cluster: train a tiny Llama from scratch, then LoRA-fine-tune it."""
    from orchestrator.demo import run_demo

    run_demo(cluster)


@app.command("make-trace")
def make_trace(out: str = typer.Option("trace.csv", "--out", "-o"), jobs: int = typer.Option(200, "--jobs", min=1, max=100000),
               rate: float = typer.Option(6.0, "--rate", min=0.01, help="Arrivals per hour (Poisson)."),
               seed: int = typer.Option(1, "--seed")):
    """Write a job trace for `zeromix simulate`: Poisson arrivals, heavy-tailed lengths, a homelab's job mix."""
    from orchestrator.scheduler import trace

    trace.write(trace.generate(jobs, rate, seed), out)
    console.print(f"{jobs} jobs, about {rate:g} per hour, seed {seed}: {out}")


@app.command()
def simulate(cluster: str = typer.Option("cluster.yaml", "--cluster", metavar="CLUSTER_YAML"),
             trace_file: str = typer.Option(..., "--trace", metavar="TRACE_CSV", help="From `zeromix make-trace`, or your own."),
             policy_names: Optional[list[str]] = typer.Option(None, "--policy", help="gain, fifo-first-fit, max-min-fairness (repeat; default all)."),
             png: Optional[str] = typer.Option(None, "--png", help="Write the queue and each card's occupancy over time here."),
             as_json: bool = JsonOption):
    """Replay a job trace through the real queue, scheduler, policy and planner in virtual time (job
    lengths are the planner's step-time estimates), and compare policies."""
    from orchestrator.scheduler import trace
    from orchestrator.scheduler.policies import POLICY_NAMES, policy
    from orchestrator.scheduler.simulate import render_png, simulate as run

    names = policy_names or list(POLICY_NAMES)
    chosen = [policy(n) for n in names]  # an unknown name fails before any work
    snapshot = snapshot_from_config(load_cluster(cluster))
    jobs = trace.read(trace_file)
    results = [run(snapshot, jobs, p) for p in chosen]
    rows = [sim_row(r) for r in results]
    if as_json:
        print(json.dumps({"cluster": cluster, "trace": trace_file, "jobs": len(jobs), "results": rows}, indent=2))
    else:
        render_simulation(rows, len(jobs), cluster)
    if png:
        render_png(results, png)
        console.print(f"plot: {png}")


def sim_row(result) -> dict:
    return {"policy": result.policy, "jobs_run": len(result.jct_s), "rejected": len(result.rejected),
            "avg_jct_h": round(result.avg_jct_s / 3600, 2), "p95_jct_h": round(result.p95_jct_s / 3600, 2),
            "makespan_h": round(result.makespan_s / 3600, 2),
            "utilisation": {card: round(u, 3) for card, u in result.utilisation().items()}}


def render_simulation(rows: list[dict], n_jobs: int, cluster: str) -> None:
    fifo = next((r for r in rows if r["policy"] == "fifo-first-fit"), None)
    table = Table("POLICY", "AVG JCT", "P95 JCT", "MAKESPAN", "VS FIFO (AVG / MAKESPAN)",
                  title=f"{n_jobs} jobs on {cluster} (simulated: job lengths are the planner's estimates)")
    for r in rows:
        ratio = f"{r['avg_jct_h'] / fifo['avg_jct_h']:.2f}x / {r['makespan_h'] / fifo['makespan_h']:.2f}x" if fifo else "-"
        table.add_row(r["policy"], f"{r['avg_jct_h']:.2f} h", f"{r['p95_jct_h']:.2f} h", f"{r['makespan_h']:.1f} h", ratio)
    console.print(table)
    cards = Table("CARD", *(r["policy"] for r in rows), title="utilisation (busy share of the makespan)")
    for card in rows[0]["utilisation"]:
        cards.add_row(card, *(f"{r['utilisation'][card]:.0%}" for r in rows))
    console.print(cards)
    rejected = rows[0]["rejected"]
    if rejected:
        console.print(f"{rejected} job(s) of the trace fit nowhere in this cluster and were refused at submit")


# ------------------------------------------------------------------------------------------ rendering
def render_plan(p: Plan) -> None:
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
    env = {k: v for r in p.ranks for k, v in r.env.items()}
    if env:
        console.print("NCCL: " + " ".join(f"{k}={v}" for k, v in sorted(env.items())))
    if p.rejected and narrow():
        console.print("left out:")
        for x in p.rejected:
            console.print(f"  {x.card_id} {short(x.card)}: {x.reason}")
    elif p.rejected:
        left_out = Table("LEFT OUT", "GPU", "WHY")
        for x in p.rejected:
            left_out.add_row(x.card_id, x.card, x.reason)
        console.print(left_out)


def duration(seconds: float) -> str:
    """Three significant figures, in ms below a second and µs below a millisecond: estimates span
    microseconds to minutes."""
    if seconds >= 1 or seconds == 0:
        return f"{seconds:.3g} s"
    return f"{seconds * 1000:.3g} ms" if seconds >= 1e-3 else f"{seconds * 1e6:.3g} µs"


def render_result(result: dict) -> None:
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
    console.print(f"loss {result['first_loss']:.4f} -> {result['last_loss']:.4f} over {result['steps']} steps, "
                  f"{result['tokens_per_s']:.0f} tokens/s per rank (measured); saved to {result['final_dir']}")
    for change in result.get("rebalances") or []:
        console.print(f"split corrected from step {change['step']}: {change['old']} -> {change['new']} (measured speeds)")


def follow(state, ray_job_id: str, total: int, job_id: str) -> tuple[str, dict | None]:
    """Follow a Ray job through its logs until it ends: a live progress bar on a terminal (step, loss,
    tokens/s, time left), plain lines at every tenth of the run elsewhere (CI, a pipe), then (status, result)."""
    from orchestrator.log_records import RESULT_TAG, tagged_records

    client = launch.jobs_client(state)
    seen, result, step_times = 0, None, []
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
               TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[speed]} tokens/s"), TextColumn("ETA {task.fields[eta]}"))
    with Progress(*columns, console=console, transient=False, disable=not console.is_terminal) as bar:
        task = bar.add_task(job_id, total=total, loss="-", speed="-", eta="-")
        while True:
            status = client.get_job_status(ray_job_id)
            text = client.get_job_logs(ray_job_id)  # read after the status, so a finished job's last lines are in it
            end = text.rfind("\n") + 1  # complete lines only
            for step in tagged_records(text[seen:end], PROGRESS_TAG):
                step_times.append(step["step_time_s"])
                eta = clock_duration((total - step["step"]) * sum(step_times) / len(step_times))
                bar.update(task, completed=step["step"], loss=f"{step['loss']:.4f}", speed=f"{step['tokens_per_s']:,.0f}", eta=eta)
                if not console.is_terminal and (step["step"] % max(1, total // 10) == 0 or step["step"] == total):
                    console.print(f"{job_id}: step {step['step']}/{total}, loss {step['loss']:.4f}, "
                                  f"{step['tokens_per_s']:,.0f} tokens/s, ETA {eta}")
            result = next(iter(tagged_records(text[seen:end], RESULT_TAG)), result)
            seen = end
            if status.is_terminal():
                return status.value, result
            time.sleep(POLL_S)


def clock_duration(seconds: float) -> str:
    """h:mm:ss, from the mean step time so far (a running estimate)."""
    seconds = round(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


def main() -> None:
    try:
        app(standalone_mode=False)
    except ZeromixError as err:
        print(f"zeromix: error: {err}", file=sys.stderr)
        sys.exit(2)
    except (typer.Exit, SystemExit) as done:
        sys.exit(getattr(done, "exit_code", getattr(done, "code", 0)))
    except Exception as err:  # click's usage errors
        import click

        if isinstance(err, click.ClickException):
            err.show()
            sys.exit(2)
        raise


if __name__ == "__main__":
    main()
