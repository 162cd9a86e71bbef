"""`zeromix`: the command line. It renders; the modules it calls decide."""

from __future__ import annotations

import json
import sys
import time
from typing import Optional

import typer
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from orchestrator import cluster_runtime, launch, registry
from orchestrator.errors import ZeromixError
from orchestrator.jobspec import load_job, total_steps
from orchestrator.model_facts import facts_from_config, read_config
from orchestrator.planner import Plan, make_plan
from orchestrator.planner.memory import GIB
from workers.train import PROGRESS_TAG

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Fine-tune on a homelab of mixed NVIDIA cards with DeepSpeed ZeRO on Ray.")
console = Console()
POLL_S = 1.0


# ------------------------------------------------------------------------------------------ cluster
@app.command()
def up(simulate: str = typer.Option(..., "--simulate", metavar="CLUSTER_YAML",
                                    help="Run every node of CLUSTER_YAML as a Ray node on this machine (cards declared, maths on CPU).")):
    """Start the cluster. This release runs the simulated cluster only (`--simulate`); real nodes joining over the LAN are not built yet."""
    state, snapshot = cluster_runtime.up_simulated(simulate)
    cards = sum(len(n.cards) for n in snapshot.nodes)
    console.print(f"zeromix: {len(snapshot.nodes)} nodes and {cards} cards registered from {simulate}")
    console.print(f"Ray dashboard: {state.dashboard_url}   (token auth on; `zeromix down` stops it)")


@app.command()
def down():
    """Stop the cluster on this machine."""
    console.print("zeromix: cluster stopped" if cluster_runtime.down() else "zeromix: no cluster was up (stopped any Ray processes anyway)")


# ------------------------------------------------------------------------------------------ jobs
SetOption = typer.Option(None, "--set", metavar="KEY=VALUE", help="Override a field of the spec, e.g. --set output_dir=runs/try2")


def _plan(job_file: str, overrides: list[str]):
    job = load_job(job_file, overrides=overrides)  # schema and paths are checked before the cluster is touched
    facts = facts_from_config(read_config(job.model.path))
    state = cluster_runtime.connect()
    launch.reconcile(state)
    return job, make_plan(job, facts, registry.snapshot(), total_steps(job)), state


@app.command()
def plan(job_file: str, set_: Optional[list[str]] = SetOption, as_json: bool = typer.Option(False, "--json")):
    """Show the placement and per-card DeepSpeed settings a job would get, without reserving anything."""
    _, chosen, _ = _plan(job_file, set_ or [])
    if as_json:
        print(json.dumps(chosen.summary(), indent=2))
    else:
        render_plan(chosen)


@app.command()
def submit(job_file: str, set_: Optional[list[str]] = SetOption,
           wait: bool = typer.Option(True, "--wait/--no-wait", help="Follow the job with a progress bar until it ends.")):
    """Plan a job, reserve its cards and submit it to Ray."""
    submit_job(job_file, set_ or [], wait)


def submit_job(job_file: str, overrides: list[str], wait: bool = True) -> tuple[str, dict | None]:
    job, chosen, state = _plan(job_file, overrides)
    render_plan(chosen)
    job_id = launch.submit(state, job, chosen)
    console.print(f"submitted [bold]{job_id}[/]   dashboard: {state.dashboard_url}/#/jobs/{job_id}")
    if not wait:
        return job_id, None
    status, result = follow(state, job_id, chosen.total_steps)
    console.print(f"{job_id}: {status}")
    if status != "SUCCEEDED":
        console.print(f"see `zeromix logs {job_id}`")
        raise typer.Exit(1)
    render_result(result)
    return job_id, result


@app.command()
def status():
    """List zeromix jobs and the cards they hold."""
    state = cluster_runtime.connect()
    launch.reconcile(state)
    table = Table("JOB", "STATUS", "CARDS", "PRIORITY", "STARTED")
    for j in launch.list_jobs(state):
        cards = ", ".join(f"{r['card']} {r['model']}" for r in json.loads(j.metadata["zeromix_plan"])["ranks"])
        started = time.strftime("%H:%M:%S", time.localtime(j.start_time / 1000)) if j.start_time else "-"
        table.add_row(j.submission_id, str(j.status.value), cards, j.metadata.get("zeromix_priority", "0"), started)
    console.print(table)


@app.command()
def logs(job_id: str):
    """Print a job's logs."""
    state = cluster_runtime.load_state()
    cluster_runtime.connect(state)
    try:
        print(launch.jobs_client(state).get_job_logs(job_id), end="")
    except RuntimeError:
        raise ZeromixError(f"no job {job_id!r}; `zeromix status` lists them") from None


@app.command()
def cancel(job_id: str):
    """Stop a job and release its cards."""
    state = cluster_runtime.connect()
    launch.cancel(state, job_id)
    console.print(f"zeromix: {job_id} cancelled; its cards are free")


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


# ------------------------------------------------------------------------------------------ rendering
def render_plan(p: Plan) -> None:
    t = p.first
    offload = "optimizer+params" if t.offload_params else ("optimizer" if t.offload_optimizer else "none")
    console.print(f"[bold]Plan for {p.job_name}[/]: ZeRO-{t.zero_stage}, {t.precision}, offload {offload}, "
                  f"activation checkpointing {'on' if p.activation_checkpointing else 'off'}, "
                  f"{p.grad_accum} accumulation step(s), global batch {p.global_batch}, {p.total_steps} steps, "
                  f"{p.trainable_params:,} of {p.n_params:,} parameters trained")
    table = Table("RANK", "CARD", "GPU", "VRAM", "MICRO-BATCH", "EST. MEMORY", "PEAK TFLOPS", "EST. COMPUTE")
    for i, (r, compute) in enumerate(zip(p.ranks, p.step.compute_s)):
        table.add_row(str(i), r.card.card_id, r.card.short_name, f"{r.card.vram_mib / 1024:.0f} GiB", str(r.tuning.micro_batch),
                      f"{r.memory.total / GIB:.2f} GiB", f"{r.rate_tflops:g}", f"{compute * 1000:.3g} ms")
    console.print(table)
    console.print(f"estimated step time {p.step.step_s * 1000:.3g} ms = slowest compute + {p.step.comm_s * 1000:.3g} ms communication "
                  "(estimates: memory and time are modelled, not measured)")
    if p.rejected:
        left_out = Table("LEFT OUT", "GPU", "WHY", title=None)
        for x in p.rejected:
            left_out.add_row(x.card_id, x.card, x.reason)
        console.print(left_out)


def render_result(result: dict) -> None:
    table = Table("RANK", "CARD", "GPU", "MICRO-BATCH", "ZeRO", "PRECISION", "RAN ON", "UTILISATION")
    for r in result["ranks"]:
        util = f"{r['utilisation']:.0%}" if r["utilisation"] is not None else "-"
        table.add_row(str(r["rank"]), r["card"], r["model"], str(r["micro_batch"]), str(r["zero_stage"]), r["precision"], r["device"], util)
    console.print(table)
    console.print(f"step time {result['step_time_s'] * 1000:.1f} ms measured on {result['ranks'][0]['device']}; "
                  f"the plan estimated {result['est_step_s'] * 1000:.3g} ms for the real cards")
    console.print(f"loss {result['first_loss']:.4f} -> {result['last_loss']:.4f} over {result['steps']} steps, "
                  f"{result['tokens_per_s']:.0f} tokens/s per rank (measured); saved to {result['final_dir']}")


def tagged_records(text: str, tag: str) -> list[dict]:
    """The JSON objects that follow `tag` in a log. Ray forwards worker output asynchronously, so a tagged
    record can share a line with another process's output: decode just the object after each tag."""
    decoder = json.JSONDecoder()
    records, start = [], text.find(tag)
    while start != -1:
        try:
            records.append(decoder.raw_decode(text, start + len(tag) + 1)[0])
        except json.JSONDecodeError:
            pass  # not one of ours: each record is written with a single write() and cannot be split
        start = text.find(tag, start + len(tag))
    return records


def follow(state, job_id: str, total: int) -> tuple[str, dict | None]:
    """Follow a job through its logs until it ends: a live progress bar, then (status, result)."""
    from orchestrator.job_driver import RESULT_TAG

    client = launch.jobs_client(state)
    seen, result = 0, None
    columns = (TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total} steps"),
               TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task(job_id, total=total, loss="-")
        while True:
            status = client.get_job_status(job_id)
            text = client.get_job_logs(job_id)  # read after the status, so a finished job's last lines are in it
            end = text.rfind("\n") + 1  # complete lines only
            for step in tagged_records(text[seen:end], PROGRESS_TAG):
                bar.update(task, completed=step["step"], loss=f"{step['loss']:.4f}")
            result = next(iter(tagged_records(text[seen:end], RESULT_TAG)), result)
            seen = end
            if status.is_terminal():
                return status.value, result
            time.sleep(POLL_S)


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
