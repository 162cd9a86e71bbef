"""The whole path with real parts: `zeromix up --simulate` starts a 3-node Ray cluster on this machine,
jobs go through the CLI, DeepSpeed trains on CPU ranks, and transformers loads what was saved."""

import json
import os
import re
import subprocess
import sys

import pytest
import torch

from tests.browser import Browser, chromium_path
from tests.conftest import REPO, TINY_LLAMA, job_status, queue_store, running, submitted_id, zeromix
from tests.helpers import mean_token_loss

pytestmark = pytest.mark.cluster


def assert_released(*job_ids: str):
    """These jobs hold no card, in Ray's placement groups, the queue or the registry; and every card still held is
    held for a job the queue has running (the session's long job), so nothing else leaked either."""
    from orchestrator import cluster_runtime, registry

    cluster_runtime.connect()
    store = queue_store()
    running = {r.id for r in store.jobs(("running",))}
    holders = {"placement groups": set(registry.live_placement_groups()), "queue": set(store.holds().values()),
               "registry": {c.held_by for c in registry.snapshot().cards if c.held_by}}
    for where, jobs in holders.items():
        assert not jobs & set(job_ids), (where, jobs)
        assert jobs <= running, (where, jobs, running)


def test_nodes_lists_every_card_of_cluster_yaml(connected):
    rows = json.loads(zeromix("nodes", "--json").stdout)["cards"]
    got = {r["card"]: (r["gpu"], r["vram_gib"], r["compute_capability"], r["bf16"], r["bandwidth_gbs"], r["usable"], r["held_by"]) for r in rows}
    assert got == {
        "attic/0": ("GeForce GTX 1080 Ti", 11.0, "6.1", False, 484.0, True, None),
        "attic/1": ("GeForce RTX 2080 Ti", 11.0, "7.5", False, 616.0, True, None),
        "desk/0": ("GeForce RTX 3090", 24.0, "8.6", True, 936.0, True, None),
        "desk/1": ("GeForce RTX 4090", 24.0, "8.9", True, 1008.0, True, None),
        "closet/0": ("GeForce RTX 3060 12GB", 12.0, "8.6", True, 360.0, True, None),
    }
    assert all(r["free_gib"] is None for r in rows)  # declared cards: nothing measured their free memory
    table = zeromix("nodes").stdout
    for header in ("NODE", "CARD", "GPU", "VRAM", "FREE", "CC", "BF16", "BANDWIDTH", "USABLE", "HELD BY"):
        assert header in table
    assert "GeForce RTX 3060 12GB" in table and "1008 GB/s" in table
    narrow = zeromix("nodes", env={"COLUMNS": "80"}).stdout  # fewer columns, no cell cut or wrapped
    assert max(len(line) for line in narrow.splitlines()) <= 80 and "…" not in narrow
    assert [line.split()[:3] for line in narrow.splitlines() if line.strip().startswith("desk/1")] == [["desk/1", "RTX", "4090"]]


def test_the_commands_find_the_clusters_token_from_a_shell_with_no_ray_settings(connected):
    """A user's shell after `zeromix up` has no Ray variable: each command sets Ray's token auth before Ray is imported.
    (The suite's own environment carries Ray's auth variables, which hid `zeromix queue`, `logs`, `cancel`, `move` and
    `report` failing without them: 22 s, then a ConnectionError.)"""
    shell = {name: value for name, value in os.environ.items() if not name.startswith("RAY_")}
    for args in (("queue", "--all"), ("nodes",)):
        done = subprocess.run([sys.executable, "-m", "orchestrator.cli", *args], capture_output=True, text=True, cwd=REPO, env=shell, timeout=120)
        assert done.returncode == 0, (args, done.stderr[-2000:])


def test_full_fine_tune_zero2_on_two_different_cards(scratch_run, demo_data):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    state, job_id, out, stdout = scratch_run
    assert job_status(state, job_id) == "SUCCEEDED"
    # not a terminal: plain progress lines at every tenth of the run instead of a live bar
    assert f"{job_id}: step 6/60, loss" in stdout and "60/60 steps" not in stdout
    assert re.search(rf"{job_id}: step 60/60, loss [0-9.]+, [0-9,]+ tokens/s, ETA 0:00:00\n", stdout)
    log = zeromix("logs", job_id).stdout  # the Ray job's log: a readable line per step, once (not once per node)
    assert [len(re.findall(rf"zeromix: step {k}/60, loss [0-9.]+, [0-9,]+ tokens/s, [0-9]+ ms/step", log)) for k in (1, 30, 60)] == [1, 1, 1]
    result = json.loads((out / "zeromix-result.json").read_text())
    assert {r["model"] for r in result["ranks"]} == {"GeForce GTX 1080 Ti", "GeForce RTX 3090"}
    assert {(r["zero_stage"], r["precision"]) for r in result["ranks"]} == {(2, "fp32")}
    assert sum(r["micro_batch"] for r in result["ranks"]) == 32 and result["steps"] == 60
    for r in result["ranks"]:  # each rank's engine-measured model states beside the plan's estimate
        assert r["model_state_mib"] == pytest.approx(r["est_model_state_mib"], rel=0.05)

    # The saved model loads with transformers and does better on its training data than where it started.
    tokenizer = AutoTokenizer.from_pretrained(out / "final")
    trained = AutoModelForCausalLM.from_pretrained(out / "final")
    torch.manual_seed(0)  # the job's seed: the same initial weights every rank started from
    initial = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(TINY_LLAMA))
    records = [json.loads(line) for line in demo_data["pretrain"].read_text().splitlines()[:256]]
    dataset = {"format": "jsonl", "text_field": "text"}
    before, after = mean_token_loss(initial, records, dataset, tokenizer), mean_token_loss(trained, records, dataset, tokenizer)
    assert after < before - 1.0, (before, after)
    assert_released(job_id)


def test_plan_is_in_the_ray_job_metadata(scratch_run):
    from orchestrator.launch import jobs_client

    state, job_id, _, _ = scratch_run
    metadata = jobs_client(state).get_job_info(job_id).metadata
    plan = json.loads(metadata["zeromix_plan"])
    # the dashboard's Name column: cards with their micro-batches, settings, the estimated speed
    micro = {r["card"]: r["micro_batch"] for r in plan["ranks"]}
    assert metadata["job_name"].startswith(f"tiny-llama-scratch: desk/0 RTX 3090 x{micro['desk/0']} + attic/0 GTX 1080 Ti x{micro['attic/0']}; ZeRO-2")
    assert metadata["job_name"].endswith("tokens/s (estimate)")
    assert plan["zero_stage"] == 2 and sorted(r["card"] for r in plan["ranks"]) == ["attic/0", "desk/0"]
    assert {(r["card"], r["activation_checkpointing"], r["offload_optimizer"], r["rate_source"]) for r in plan["ranks"]} == {
        ("attic/0", False, False, "catalog"), ("desk/0", False, False, "catalog")}  # per-card settings, for the dashboard
    from ray.util.state import list_actors

    names = {a.name for a in list_actors(address=state.dashboard_url, filters=[("class_name", "=", "RankWorker")], limit=10_000,
                                         raise_on_missing_output=False)}
    ranks = {r["card"]: i for i, r in enumerate(plan["ranks"])}
    assert {f"zm-{job_id}-r{ranks['desk/0']}-rtx3090@desk", f"zm-{job_id}-r{ranks['attic/0']}-gtx1080ti@attic"} <= names
    from orchestrator.cluster_runtime import token_file

    metadata = json.dumps(jobs_client(state).get_job_info(job_id).metadata)
    assert token_file().read_text().strip() not in metadata and "auth_token" not in metadata  # no secret, not even its path
    assert all("est_mem_breakdown_gib" in r for r in plan["ranks"]) and plan["est_tokens_per_s"] > 0


def test_tensorboard_holds_every_step_and_the_report_has_every_plot(scratch_run):
    """The job spec's default report_to (tensorboard) on a real cluster run, read back with TensorBoard's own
    reader; `zeromix report` writes one HTML file with the plan and five embedded plots."""
    import base64
    import io

    from PIL import Image
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    state, job_id, out, _ = scratch_run
    result = json.loads((out / "zeromix-result.json").read_text())
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    loss = events.Scalars("train/loss")
    assert [e.step for e in loss] == list(range(1, 61))
    assert [e.value for e in loss] == pytest.approx(result["losses"], rel=1e-6)
    assert {f"step_time_s/{r['card']}" for r in result["ranks"]} <= set(events.Tags()["scalars"])

    report = zeromix("report", job_id).stdout.split("report:", 1)[1].strip()
    assert report == str(out / "report.html")
    page = (out / "report.html").read_text()
    assert job_id in page and "ZeRO-2" in page and "attic/0" in page and "desk/0" in page
    images = re.findall(r'src="data:image/png;base64,([^"]+)"', page)
    assert len(images) == 5
    for data in images:
        width, height = Image.open(io.BytesIO(base64.b64decode(data))).size
        assert width > 300 and height > 150


@pytest.mark.skipif(chromium_path() is None, reason="Chromium is not installed: `apt-get install chromium` (Debian) runs this test")
def test_the_ray_dashboard_and_the_report_in_headless_chromium(scratch_run, tmp_path):
    """Real Chromium, a fresh profile: the dashboard's jobs page lists the job under its plan's title, its page
    shows the plan in the metadata; the report's plots all load. Screenshots go to test-artifacts/."""
    from orchestrator.cluster_runtime import token_file

    state, job_id, out, _ = scratch_run
    if not (out / "report.html").exists():
        zeromix("report", job_id)
    artifacts = REPO / "test-artifacts"
    artifacts.mkdir(exist_ok=True)
    browser = Browser(tmp_path / "profile")
    try:
        # the dashboard answers only with Ray's token: its UI reads it from this cookie
        browser.send("Network.setCookie", name="ray-authentication-token", value=token_file().read_text().strip(), url=state.dashboard_url)
        browser.open(f"{state.dashboard_url}/#/jobs")
        text = browser.wait_for(f"document.body.innerText.includes({json.dumps(job_id)}) && document.body.innerText", 90, "the job in the jobs list")
        assert "tiny-llama-scratch: " in text and "ZeRO-2" in text  # the Name column: the plan's one-line title
        browser.screenshot(artifacts / "dashboard-jobs.png")
        browser.open(f"{state.dashboard_url}/#/jobs/{job_id}")
        text = browser.wait_for("document.body.innerText.includes('zeromix_plan') && document.body.innerText", 90, "the job's metadata")
        assert "SUCCEEDED" in text and '\\"micro_batch\\"' in text and "desk/0" in text
        browser.screenshot(artifacts / "dashboard-job.png")

        browser.open((out / "report.html").as_uri())
        sizes = browser.wait_for("document.readyState === 'complete' && Array.from(document.images).every(i => i.complete) && "
                                 "Array.from(document.images).map(i => [i.naturalWidth, i.naturalHeight])", 30, "the report's plots")
        assert len(sizes) == 5 and all(w > 0 and h > 0 for w, h in sizes)
        browser.screenshot(artifacts / "report.png")
    finally:
        browser.close()
    assert all((artifacts / name).stat().st_size > 10_000 for name in ("dashboard-jobs.png", "dashboard-job.png", "report.png"))


def test_lora_zero3_fine_tune_of_the_scratch_model(scratch_run, demo_data):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    state, _, scratch_out, _ = scratch_run
    out = scratch_out.parent / "lora"
    done = zeromix("submit", "--follow", "jobs/examples/tiny-llama-lora-reverse.yaml", "--set", f"output_dir={out}", "--set", "report_to=[]",
                   "--set", f"model.path={scratch_out / 'final'}", "--set", f"dataset.path={demo_data['reverse-train']}",
                   "--set", "max_steps=40")
    job_id = submitted_id(done.stdout)
    assert job_status(state, job_id) == "SUCCEEDED"
    result = json.loads((out / "zeromix-result.json").read_text())
    assert {(r["model"], r["zero_stage"], r["precision"]) for r in result["ranks"]} == {
        ("GeForce RTX 3090", 3, "bf16"), ("GeForce RTX 4090", 3, "bf16")}
    assert (out / "final" / "adapter_config.json").is_file()

    tokenizer = AutoTokenizer.from_pretrained(scratch_out / "final")
    base = AutoModelForCausalLM.from_pretrained(scratch_out / "final")
    records = [json.loads(line) for line in demo_data["reverse-train"].read_text().splitlines()[:256]]
    dataset = {"format": "jsonl", "prompt_field": "prompt", "completion_field": "completion"}
    before = mean_token_loss(base, records, dataset, tokenizer)
    tuned = PeftModel.from_pretrained(base, str(out / "final"))
    assert mean_token_loss(tuned, records, dataset, tokenizer) < before - 0.1  # measured: 1.76 -> 1.53
    assert_released(job_id)


def test_qlora_of_the_scratch_model_through_the_cluster(scratch_run, demo_data):
    """The LoRA example as QLoRA, through `zeromix submit` and Ray: each rank quantises the base as it loads (the
    bitsandbytes CPU backend here), trains the adapters at ZeRO-1/2 in bf16, and only the adapter is saved."""
    state, _, scratch_out, _ = scratch_run
    out = scratch_out.parent / "qlora"
    done = zeromix("submit", "--follow", "jobs/examples/tiny-llama-lora-reverse.yaml", "--set", "method=qlora", "--set", "deepspeed.zero_stage=auto",
                   "--set", f"output_dir={out}", "--set", "report_to=[]", "--set", f"model.path={scratch_out / 'final'}",
                   "--set", f"dataset.path={demo_data['reverse-train']}", "--set", "max_steps=12")
    job_id = submitted_id(done.stdout)
    assert job_status(state, job_id) == "SUCCEEDED"
    result = json.loads((out / "zeromix-result.json").read_text())
    assert result["method"] == "qlora" and result["base"].startswith("4-bit nf4, double-quantised: 14 linear layers quantised")
    assert {(r["model"], r["precision"]) for r in result["ranks"]} == {("GeForce RTX 3090", "bf16"), ("GeForce RTX 4090", "bf16")}
    assert {r["zero_stage"] for r in result["ranks"]} <= {1, 2} and result["plan"]["four_bit"]["type"] == "nf4"
    assert (out / "final" / "adapter_config.json").is_file() and not (out / "final" / "model.safetensors").exists()
    assert result["last_loss"] < result["first_loss"]
    assert_released(job_id)


def test_outer_steps_across_boxes_through_the_cluster(scratch_run, demo_data):
    """The demo's full fine-tune with sync mode outer, through `zeromix submit` and Ray: the 1080 Ti (attic) and the
    3090 (desk) each run their own DeepSpeed world, and their leaders meet every 4 steps across the boxes' link."""
    state, _, scratch_out, _ = scratch_run
    out = scratch_out.parent / "outer"
    done = zeromix("submit", "--follow", "jobs/examples/tiny-llama-scratch.yaml", "--set", "sync.mode=outer", "--set", "sync.inner_steps=4",
                   "--set", f"output_dir={out}", "--set", "report_to=[]", "--set", f"dataset.path={demo_data['pretrain']}",
                   "--set", "max_steps=12", "--set", "checkpoint_every=8")
    job_id = submitted_id(done.stdout)
    assert job_status(state, job_id) == "SUCCEEDED"
    result = json.loads((out / "zeromix-result.json").read_text())
    assert [b["node"] for b in result["plan"]["outer"]["boxes"]] == ["desk", "attic"] and result["plan"]["outer"]["inner_steps"] == 4
    # 12 steps, an outer step every 4: the link carried 3 exchanges of the model's fp32 delta, each with its 40-byte
    # header (5 float64: a box of one card), and box 0's step at the start (16 bytes)
    trained = result["plan"]["trainable_params"]
    assert result["outer"] == {"outer_steps": 3, "bytes_across_boxes": 2 * (3 * (4 * trained + 40) + 16), "boxes_left": [], "boxes_back": []}
    assert all(h["job_tokens"] == sum(h["tokens"]) for h in result["history"])  # the job's tokens/s counts both boxes'
    # what an outer step held on each rank, measured there, beside the plan's estimate (bench/outer_memory.py compares them)
    assert all(r["outer_step_peak_mib"] is not None and r["est_outer_step_mib"] == pytest.approx(4 * trained / 2**20, abs=0.05)
               for r in result["ranks"])
    assert sorted((out / "checkpoints").glob("step-*")) == [out / "checkpoints" / "step-12", out / "checkpoints" / "step-8"]
    assert (out / "final" / "model.safetensors").is_file() and result["last_loss"] < result["first_loss"]
    assert "report:" in zeromix("report", job_id).stdout
    assert_released(job_id)


def test_a_running_jobs_cards_show_as_held_everywhere(connected, long_job):
    """Ray's placement groups, `zeromix nodes`, `queue` and `status` (within 80 columns) all say which card the
    running job holds. (Cancelling it, and how soon its cards are free: tests/test_scheduler_cluster.py.)"""
    from orchestrator import registry

    job_id = running(long_job)
    held = {c.card_id for c in registry.snapshot().cards if c.held_by == job_id}
    assert held == {"attic/1"}
    rows = json.loads(zeromix("nodes", "--json").stdout)["cards"]
    assert {r["card"] for r in rows if r["held_by"] == job_id} == held
    assert job_id in zeromix("queue").stdout
    status = zeromix("status", env={"COLUMNS": "80"}).stdout  # jobs and cards, within 80 columns
    words = " ".join(status.split())  # long lines are wrapped at 80 columns
    assert f"attic/1 by {job_id}" in words and "desk/0 RTX 3090" in words.split("cards free:")[1]
    assert max(len(line) for line in status.splitlines()) <= 80
    assert {c["card"]: c["held_by"] for c in json.loads(zeromix("status", "--json").stdout)["cards"]}["attic/1"] == job_id


def test_a_job_that_fits_nowhere_reserves_nothing(connected, demo_data):
    from orchestrator.launch import list_jobs

    state, work = connected
    before, queued_before = len(list_jobs(state)), len(queue_store().jobs())
    done = zeromix("submit", "jobs/examples/tiny-llama-scratch.yaml", "--set", f"output_dir={work / 'never'}",
                   "--set", f"dataset.path={demo_data['pretrain']}", "--set", "gpus.count=3", check=False)
    assert done.returncode == 2
    assert done.stderr.startswith("zeromix: error: no placement for job 'tiny-llama-scratch': ")
    assert "To fix: lower gpus.count (needs 3, 2 eligible) or free more cards" in done.stderr
    assert len(list_jobs(state)) == before and len(queue_store().jobs()) == queued_before  # nothing queued
    assert_released()
    assert not (work / "never").exists()
