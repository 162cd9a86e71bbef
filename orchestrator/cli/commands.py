"""`zeromix`: the command line. It parses, asks `orchestrator.client` (jobs) or the cluster modules, and draws
the answer with `render`; it decides nothing."""

from __future__ import annotations

import dataclasses
import json
import sys
from typing import Optional

import typer
from rich.table import Table

from orchestrator import client, cluster_runtime, registry
from orchestrator.cli import render
from orchestrator.cluster_config import LINK_GBIT_PER_S, load_cluster
from orchestrator.errors import InputError, ZeromixError
from orchestrator.inventory import snapshot_from_config
from orchestrator.model_facts import facts_from_config, read_config

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune on a homelab of mixed NVIDIA cards with DeepSpeed ZeRO on Ray.")

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
       link: Optional[str] = LinkOption, skip_rate_probe: bool = SkipProbeOption,
       rotate_token: bool = typer.Option(False, "--rotate-token", help="Make a new auth token first (the cluster must be down; "
                                         "every other box then needs the new copy).")):
    """Start the cluster: the head on this machine with its own cards (probed through NVML, their rates
    measured), or with --simulate the whole cluster.yaml homelab on this machine."""
    if rotate_token:
        render.console.print(f"zeromix: a new auth token is in {cluster_runtime.rotate_token()} (mode 0600); other boxes need "
                             "this copy before they join again")
    if simulate:
        result, snapshot = cluster_runtime.up_simulated(simulate)
        render.notes(result)
        cards = sum(len(n.cards) for n in snapshot.nodes)
        verb = "already up: reusing" if result.reused else "registered"
        render.console.print(f"zeromix: {len(snapshot.nodes)} nodes and {cards} cards {verb} from {simulate}")
        start_scheduler(result.state)
        render.console.print(f"Ray dashboard: {result.state.dashboard_url}   (token auth on; `zeromix down` stops it)")
        return
    result, node = cluster_runtime.up(name or cluster_runtime.default_node_name(), address, port, dashboard_port,
                                      _offload_dir(offload_dir), _link(link), not skip_rate_probe)
    render.notes(result)
    if node:
        render.registered(node)
    else:
        render.console.print(f"zeromix: the head {result.state.node} at {result.state.gcs_address} is already up: reusing it")
    start_scheduler(result.state)
    render.console.print(f"Ray dashboard: {result.state.dashboard_url}   (token auth on; `zeromix down` stops it)")
    if address != "127.0.0.1":
        render.console.print(f"other nodes join with:  zeromix join --address {result.state.gcs_address} --token-file <copy of {cluster_runtime.token_file()}>\n"
                      "(copy the token file over a channel you trust, e.g. scp; it is the cluster's only credential)")


def start_scheduler(state) -> None:
    client.start_scheduler(state)
    render.console.print("scheduler: running on the head; `zeromix submit JOB.yaml` queues a job, `zeromix queue` lists them")


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
    render.notes(result)
    render.registered(node)
    render.console.print(f"joined {address}; `zeromix nodes` on the head lists every card")
    if token_file:
        render.console.print(f"zeromix: the token is now in {cluster_runtime.token_file()} (mode 0600); delete your copy at {token_file}")


@app.command()
def probe():
    """Measure this machine's cards again (matmul TFLOPS, memory and PCIe bandwidth; on a joined node also the
    link to the head) and update its registration: after a driver upgrade, a new card, or a cooler fix."""
    render.registered(cluster_runtime.reprobe())


def _link(value: str | None) -> float | None:
    if value is None:
        return None
    if value not in LINK_GBIT_PER_S:
        raise InputError("command line", "--link", value, f"one of {', '.join(LINK_GBIT_PER_S)}")
    return LINK_GBIT_PER_S[value]


@app.command()
def nodes(as_json: bool = typer.Option(False, "--json", help="The same rows as JSON.")):
    """One row per card: VRAM total/free, compute capability, bf16, bandwidth, usable or not and why, and the job holding it."""
    cluster_runtime.connect()
    snapshot = registry.snapshot(live_free_memory=True)
    if as_json:
        print(json.dumps({"cards": [render.card_row(c) for c in snapshot.cards], "nodes": [render.node_row(n) for n in snapshot.nodes]}, indent=2))
        return
    render.nodes(snapshot)


@app.command()
def down():
    """Stop the cluster zeromix started on this machine (only its processes: other Ray clusters are left alone)."""
    stopped = cluster_runtime.down()
    render.console.print("zeromix: no cluster was up" if stopped is None else f"zeromix: cluster stopped ({stopped} process(es))")


# ------------------------------------------------------------------------------------------ jobs
SetOption = typer.Option(None, "--set", metavar="KEY=VALUE", help="Override a field of the spec, e.g. --set output_dir=runs/try2")
JsonOption = typer.Option(False, "--json", help="The same as JSON.")


@app.command()
def plan(job_file: str, set_: Optional[list[str]] = SetOption, as_json: bool = typer.Option(False, "--json"),
         pool: Optional[str] = typer.Option(None, "--pool", metavar="CLUSTER_YAML",
                                            help="Plan against the cards this file describes (cluster.yaml format); no cluster needed.")):
    """Show the cards, per-card DeepSpeed settings and estimates a job would get, and why other cards are left out. Reserves nothing."""
    planned = client.plan(job_file, set_ or [], pool)
    if as_json:
        beside = planned.as_lora
        print(json.dumps({**planned.plan.summary(), **({"as_lora": beside.summary() if not isinstance(beside, str) else {"fits": False, "why": beside}}
                                                         if beside is not None else {})}, indent=2))
    else:
        render.plan(planned.plan)
        if planned.as_lora is not None:
            render.as_lora(planned.plan, planned.as_lora)


@app.command()
def advise(model: str = typer.Option(..., "--model", metavar="ID_OR_CONFIG_DIR", help="A directory with config.json, or a Hugging Face id in the local cache."),
           method: str = typer.Option("all", "--method", help="qlora, lora, full, or all (each of them on each card set)"),
           seq_len: int = typer.Option(2048, "--seq-len", min=8),
           batch: int = typer.Option(32, "--batch", min=1, help="Global batch size (samples per optimizer step)."),
           cards: Optional[str] = typer.Option(None, "--cards", help='Only these cards, e.g. "RTX 3090,GTX 1080 Ti" (default: the whole catalog).'),
           host_ram: float = typer.Option(64, "--host-ram", metavar="GB", help="Host RAM of the box, for CPU offload."),
           top: int = typer.Option(25, "--top", min=1, help="Rows to show (--json gives all)."),
           as_json: bool = typer.Option(False, "--json")):
    """Which card, or pair of cards in one box, can run this job, in which DeepSpeed configuration, how fast
    and at how many tokens per joule (estimates), ranked."""
    from orchestrator.advice import advise as run_advice

    if method not in ("qlora", "lora", "full", "all"):
        raise InputError("command line", "--method", method, "qlora, lora, full or all")
    facts = facts_from_config(read_config(model))
    facts.check_seq_len(seq_len, "command line", "--seq-len")
    names = [n.strip() for n in cards.split(",") if n.strip()] if cards else None
    rows = run_advice(facts, method, seq_len, batch, host_ram, names)
    if as_json:
        print(json.dumps({"model": model, "model_type": facts.model_type, "params": facts.n_params, "method": method,
                          "seq_len": seq_len, "global_batch": batch, "host_ram_gb": host_ram,
                          "options": [a.summary() for a in rows]}, indent=2))
        return
    render.console.print(f"{model}: {facts.model_type}, {facts.n_params:,} parameters; {method}, seq_len {seq_len}, global batch {batch}, "
                  f"host RAM {host_ram:g} GB. Throughput and efficiency are estimates (TDP as power).")
    table = Table("#", "CARDS", "METHOD", "RUNS?", "CONFIG", "MICRO-BATCH", "TOKENS/S", "TOKENS/J")
    for i, a in enumerate(rows[:top], 1):
        d = a.summary()
        config = f"ZeRO-{d['zero_stage']}, offload {d['offload']}, {d['precision']}" + ("" if d["activation_checkpointing"] == "off" else ", ckpt " + d["activation_checkpointing"].removeprefix("on").strip()).rstrip() if a.plan else "-"
        micro = "+".join(map(str, d["micro_batches"])) + (f" x{d['grad_accum']}" if a.plan and d["grad_accum"] > 1 else "") if a.plan else "-"
        names = f"2 x {a.cards[0]}" if len(a.cards) == 2 and a.cards[0] == a.cards[1] else " + ".join(a.cards)
        table.add_row(str(i), names, a.method, "yes" if a.plan else f"no: {a.why_not[:160]}", config, micro,
                      f"{a.tokens_per_s:,.0f}" if a.plan else "-", f"{a.tokens_per_joule:.2f}" if a.plan else "-")
    render.console.print(table)


@app.command()
def submit(job_file: str, set_: Optional[list[str]] = SetOption,
           follow: bool = typer.Option(False, "--follow", "-f", help="Watch it: its place in the queue, then a progress bar until it ends."),
           as_json: bool = JsonOption):
    """Check a job, put it in the queue and print its id at once. The scheduler on the head starts it when
    cards for it are free, on the cards where it gains most."""
    done = client.submit(job_file, set_ or [])
    preview = done.preview
    if as_json:
        print(json.dumps({"job": done.job_id, "state": "queued", "plan_if_idle": preview.summary()}))
    else:
        render.console.print(f"submitted [bold]{done.job_id}[/]  (queued; `zeromix queue` shows its place, `zeromix logs -f {done.job_id}` follows it)")
        render.console.print(f"on an idle cluster it would run on {' + '.join(f'{r.card.card_id} {r.card.short_name}' for r in preview.ranks)}, "
                             f"about {preview.step.tokens_per_s:,.0f} tokens/s (estimate; the scheduler re-plans on the cards it gets)")
    if follow:
        follow_to_the_end(done.job_id)


def follow_to_the_end(job_id: str) -> dict:
    """Draw the job until it ends, then its result; exits 1 unless it succeeded."""
    end = render.follow(client.watch(job_id))
    if end.state != "succeeded" or end.result is None:
        render.console.print(f"see `zeromix logs {job_id}` and `zeromix queue --all`")
        raise typer.Exit(1)
    render.job_result(end.result)
    return end.result


@app.command("queue")
def queue_(show_all: bool = typer.Option(False, "--all", help="Finished jobs too."), as_json: bool = JsonOption):
    """Jobs in the queue (state, cards, position, why a queued job waits), the cards, free or held, and the
    scheduler's rounds. (`zeromix status` is the same.)"""
    view = client.queue(show_all)
    if as_json:
        print(json.dumps({"jobs": [render.queue_row(r, view.waiting) for r in view.jobs], "cards": view.cards, "scheduler": view.scheduler}, indent=2))
        return
    render.queue(view)


app.command("status", help="The same as `zeromix queue`.")(queue_)


@app.command()
def logs(job_id: str, follow_: bool = typer.Option(False, "--follow", "-f", help="Watch it to its end with a progress bar.")):
    """Print a job's logs (or, for a job still queued, why it waits)."""
    if follow_:
        follow_to_the_end(client.job(job_id).id)
        return
    text = client.logs(job_id)
    if not text:
        record = client.job(job_id)
        render.console.print(f"{record.id} is {record.state} and has no logs yet: {record.reason}")
        return
    print(text, end="")


@app.command()
def cancel(job_id: str):
    """Cancel a job in any state: a queued one leaves the queue, a running one is stopped and its cards freed."""
    done = client.cancel(job_id)
    if not done.cancelled:
        render.console.print(f"zeromix: {done.job_id} had already ended ({done.was}); nothing to cancel")
        return
    render.console.print(f"zeromix: {done.job_id} cancelled (was {done.was})" + ("; its cards are free" if done.was != "queued" else ""))


@app.command()
def move(job_id: str):
    """Stop a running job at its next step with a checkpoint and place it again (on the cards the policy picks
    then); it resumes from that checkpoint, every step done once. The scheduler does the same to move a job to
    faster cards."""
    job, state, asked = client.move(job_id)
    if not asked:
        render.console.print(f"zeromix: {job} is {state}, not running; nothing to move")
        raise typer.Exit(1)
    render.console.print(f"zeromix: {job} stops at its next step with a checkpoint and is placed again "
                         "(`zeromix queue` shows where it goes)")


@app.command()
def report(job_id: str, out: Optional[str] = typer.Option(None, "--out", "-o", help="Where to write it; default: <output_dir>/report.html.")):
    """Write a finished job's report: one HTML file (plan, loss, tokens/s per card, where each card's step goes,
    estimates beside measurements) that opens offline."""
    render.console.print(f"report: {client.write_report(job_id, out)}")


@app.command()
def monitoring(out: Optional[str] = typer.Option(None, "--out", "-o", help="Default: $ZEROMIX_HOME/monitoring.")):
    """Write a Prometheus scrape config for this cluster and zeromix's Grafana dashboard, and say how to start them."""
    from pathlib import Path

    from orchestrator import monitoring as files

    state = cluster_runtime.load_state()
    written = files.write(state, Path(out) if out else cluster_runtime.home() / "monitoring")
    render.console.print(f"prometheus config: {written['prometheus']} (follows Ray's list of every node's metrics port)")
    render.console.print(f"grafana dashboard: {written['dashboard']} (one row per card)")
    render.console.print(f"start Prometheus:  prometheus --config.file={written['prometheus']} --web.listen-address=127.0.0.1:9090 "
                  f"--storage.tsdb.path={written['prometheus'].parent / 'data'}")
    render.console.print("in Grafana: add the data source http://127.0.0.1:9090 (Prometheus), then Dashboards > New > Import the file above")


@app.command("make-demo-data")
def make_demo_data(directory: str = "data/demo"):
    """Write the demo's synthetic datasets (no download)."""
    from pathlib import Path

    from orchestrator.demo.task import write_demo_data

    for name, path in write_demo_data(Path(directory)).items():
        render.console.print(f"{name}: {path}")


@app.command()
def demo(cluster: str = "cluster.yaml"):
    """The whole flow on the embedded cluster: train a tiny Llama from scratch, then LoRA-fine-tune it."""
    from orchestrator.demo import run_demo

    run_demo(cluster)


@app.command("make-trace")
def make_trace(out: str = typer.Option("trace.csv", "--out", "-o"), jobs: int = typer.Option(200, "--jobs", min=1, max=100000),
               rate: float = typer.Option(6.0, "--rate", min=0.01, help="Arrivals per hour (poisson-mix only)."),
               family: str = typer.Option("poisson-mix", "--family", help="poisson-mix, bursts, long-then-short, vram-heavy, priority-mix."),
               scale: float = typer.Option(1.0, "--scale", min=0.01, help="Arrivals this many times as often (a pool this many times the homelab)."),
               seed: int = typer.Option(1, "--seed")):
    """Write a job trace for `zeromix simulate`: one of the trace families (orchestrator/scheduler/trace.py)."""
    from orchestrator.scheduler import trace

    made = trace.generate(jobs, rate * scale, seed) if family == "poisson-mix" else trace.family(family, jobs, seed, scale)
    trace.write(made, out)
    render.console.print(f"{jobs} jobs, {family}, seed {seed}, over {made[-1].arrival_s / 3600:.1f} h: {out}")


@app.command()
def simulate(cluster: str = typer.Option("cluster.yaml", "--cluster", metavar="CLUSTER_YAML"),
             trace_file: str = typer.Option(..., "--trace", metavar="TRACE_CSV", help="From `zeromix make-trace`, or your own."),
             policy_names: Optional[list[str]] = typer.Option(None, "--policy", help="gain, fifo-first-fit, max-min-fairness (repeat; default all)."),
             exact: bool = typer.Option(False, "--exact", help="Charge only steps x the planner's step time: no start, load, checkpoint or estimate error."),
             error: Optional[float] = typer.Option(None, "--error", min=0.0, max=2.0, help="Sigma of the log-normal estimate error (default: sim_costs.yaml's)."),
             seed: int = typer.Option(0, "--seed", help="Draws each job's estimate error."),
             png: Optional[str] = typer.Option(None, "--png", help="Write the queue and each card's occupancy over time here."),
             as_json: bool = JsonOption):
    """Replay a job trace through the real queue, scheduler, policy and planner in virtual time, charging what a
    real cluster charges (orchestrator/data/sim_costs.yaml), and compare policies."""
    from orchestrator.scheduler import trace
    from orchestrator.scheduler.policies import POLICY_NAMES, policy
    from orchestrator.scheduler.costs import Costs
    from orchestrator.scheduler.simulate import render_png, simulate as run

    names = policy_names or list(POLICY_NAMES)
    chosen = [policy(n) for n in names]  # an unknown name fails before any work
    snapshot = snapshot_from_config(load_cluster(cluster))
    jobs = trace.read(trace_file)
    costs = Costs.NONE if exact else Costs.measured(seed=seed, estimate_sigma=error)
    results = [run(snapshot, jobs, p, costs) for p in chosen]
    rows = [render.sim_row(r) for r in results]
    if as_json:
        print(json.dumps({"cluster": cluster, "trace": trace_file, "jobs": len(jobs), "costs": dataclasses.asdict(costs), "results": rows}, indent=2))
    else:
        render.simulation(rows, len(jobs), cluster, costs)
    if png:
        render_png(results, png)
        render.console.print(f"plot: {png}")


def main() -> None:
    try:
        code = app(standalone_mode=False)  # without standalone mode, click returns typer.Exit's code instead of exiting
        if isinstance(code, int) and code:
            sys.exit(code)
    except ZeromixError as err:
        print(f"zeromix: error: {err}", file=sys.stderr)
        sys.exit(2)
    except (typer.Exit, SystemExit) as done:
        sys.exit(getattr(done, "exit_code", getattr(done, "code", 0)))
    except Exception as err:
        if _usage_error(err):
            err.show()  # click's one-line usage error, e.g. "No such option: --cluster", not a traceback
            sys.exit(err.exit_code)
        raise


def _usage_error(err: Exception) -> bool:
    """Whether `err` is one of click's errors (a usage error: an unknown option, a missing value), whichever click
    raised it: the copy of click that newer typers carry (0.29 here), or click itself, which older ones use."""
    return any(cls.__name__ == "ClickException" for cls in type(err).__mro__)
