"""`zeromix demo`: the seeds' flow, develop from zero then fine-tune, on the embedded cluster."""

from __future__ import annotations

import time
from pathlib import Path

from orchestrator import client, cluster_runtime
from orchestrator import report as job_report
from orchestrator.cli import render
from orchestrator.cli.render import console
from orchestrator.errors import ZeromixError
from orchestrator.demo.task import exact_match, write_demo_data

SCRATCH_JOB = "jobs/examples/tiny-llama-scratch.yaml"
LORA_JOB = "jobs/examples/tiny-llama-lora-reverse.yaml"


def _ensure_cluster(cluster_file: str) -> cluster_runtime.ClusterState:
    """The embedded cluster: reused if it is up and answers, else started (a stale record is replaced)."""
    console.print(f"embedded cluster from {cluster_file} ...")
    result, snapshot = cluster_runtime.up_simulated(cluster_file)
    for note in result.notes:
        console.print(f"  {note}")
    console.print("  already up: reusing it" if result.reused else "  started")
    for node in snapshot.nodes:
        console.print(f"  {node.name}: " + ", ".join(c.short_name for c in node.cards))
    client.start_scheduler(result.state)
    return result.state


def _accuracies(model_dir: Path, adapter_dir: Path, eval_path: Path) -> tuple[float, float]:
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from workers.bitsandbytes_import import import_bitsandbytes

    import_bitsandbytes()  # before PEFT does, which would ask the Hub for a kernel no job uses (see there)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    base = AutoModelForCausalLM.from_pretrained(str(model_dir))
    before = exact_match(base, tokenizer, eval_path)
    tuned = PeftModel.from_pretrained(base, str(adapter_dir))
    return before, exact_match(tuned, tokenizer, eval_path)


def submit_and_follow(job_file: str, overrides: list[str]) -> tuple[str, dict]:
    """Queue a job, show its plan and follow it to its end; stops the demo if it did not succeed."""
    done = client.submit(job_file, overrides)
    console.print(f"submitted [bold]{done.job_id}[/]")
    render.plan(done.preview)
    end = render.follow(client.watch(done.job_id))
    if end.state != "succeeded" or end.result is None:
        raise ZeromixError(f"the demo's job {done.job_id} ended {end.state}; `zeromix logs {done.job_id}` says why")
    render.job_result(end.result)
    return done.job_id, end.result


def run_demo(cluster_file: str) -> None:
    started = time.perf_counter()
    data = write_demo_data(Path("data/demo"))
    state = _ensure_cluster(cluster_file)
    root = Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")

    console.rule("1/2  train a tiny Llama from scratch (full, ZeRO-2)")
    scratch_id, scratch = submit_and_follow(SCRATCH_JOB, [f"output_dir={root}/scratch"])
    console.rule("2/2  LoRA-fine-tune it on a new instruction (ZeRO-3)")
    lora_id, lora = submit_and_follow(LORA_JOB, [f"output_dir={root}/lora", f"model.path={root}/scratch/final"])

    before, after = _accuracies(Path(scratch["final_dir"]), Path(lora["final_dir"]), data["reverse-eval"])
    console.rule("summary")
    for name, result in (("scratch", scratch), ("lora", lora)):
        cards = "; ".join(f"{r['card']} {r['model']}: micro-batch {r['micro_batch']}, ZeRO-{r['zero_stage']}, {r['precision']}" for r in result["ranks"])
        console.print(f"{name:8s} cards   {cards}")
        console.print(f"{name:8s} loss    {result['first_loss']:.4f} -> {result['last_loss']:.4f} ({result['steps']} steps)")
    console.print(f"'rev' exact match on {sum(1 for _ in open(data['reverse-eval']))} held-out words: {before:.0%} before LoRA -> {after:.0%} after (measured)")
    console.print(f"model:    {scratch['final_dir']}")
    console.print(f"adapter:  {lora['final_dir']}")
    for name, job_id in (("scratch", scratch_id), ("lora", lora_id)):
        output_dir = (root / name).resolve()
        console.print(f"report:   {job_report.write(job_report.load_result(output_dir, job_id), output_dir / job_report.REPORT_FILE)}")
    console.print(f"dashboard: {state.dashboard_url}   (the cluster stays up; `zeromix down` stops it)")
    console.print(f"demo took {time.perf_counter() - started:.0f} s")
