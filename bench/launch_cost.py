"""What starting a job costs before its first step: the figure the simulator charges as `start_s`
(orchestrator/data/sim_costs.yaml).

    .venv/bin/python bench/launch_cost.py [--runs 3]

Starts the shipped homelab as a simulated cluster on free ports in a ZEROMIX_HOME of its own (nothing else is
touched), submits the demo's tiny model for 3 steps `--runs` times one after another, and prints per run the
seconds from submit to `placing`, to `running` (placement group granted, Ray job submitted), and to the first
step posted by rank 0; then stops its cluster. On this CPU simulation the model is tiny: on cards, reading real
weights (the simulator's `load_gb_per_s`) and CUDA/NCCL set-up come on top.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
ZEROMIX = str(Path(sys.executable).with_name("zeromix"))
DEADLINE_S = 300


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=3)
    runs = parser.parse_args().runs
    work = Path(tempfile.mkdtemp(prefix="zeromix-launch-cost-"))
    os.environ["ZEROMIX_HOME"] = str(work / "home")  # before Ray is imported: its auth settings come from here
    config = yaml.safe_load((REPO / "cluster.yaml").read_text())
    config["head"].update(port=free_port(), dashboard_port=free_port())
    (work / "cluster.yaml").write_text(yaml.safe_dump(config))
    subprocess.run([ZEROMIX, "up", "--simulate", str(work / "cluster.yaml")], check=True, timeout=DEADLINE_S)
    try:
        from orchestrator import client
        from orchestrator.demo.task import write_demo_data
        from workers import job_records

        data = write_demo_data(work / "data")
        rows = []
        for i in range(runs):
            overrides = [f"output_dir={work / f'run{i}'}", "max_steps=3", "report_to=[]", f"dataset.path={data['pretrain']}"]
            t0 = time.monotonic()
            job_id = client.submit(str(REPO / "jobs/examples/tiny-llama-scratch.yaml"), overrides).job_id
            seen, deadline = {}, t0 + DEADLINE_S
            while "step" not in seen:
                if time.monotonic() > deadline:
                    raise SystemExit(f"{job_id} did not post a step within {DEADLINE_S} s; `zeromix queue --all` in {work}")
                record = client.job(job_id)
                for state in ("placing", "running"):
                    if state not in seen and (record.state == state or "running" in seen or record.state in ("succeeded", "failed")):
                        seen[state] = time.monotonic() - t0
                if record.attempts and job_records.get(record.ray_job_id, "progress"):
                    seen["step"] = time.monotonic() - t0
                time.sleep(0.1)
            rows.append(seen)
            while client.job(job_id).state not in ("succeeded", "failed") and time.monotonic() < deadline:
                time.sleep(0.5)
            print(f"run {i + 1}: placing after {seen['placing']:.1f} s, running after {seen['running']:.1f} s, "
                  f"first step after {seen['step']:.1f} s", flush=True)
        median = statistics.median(r["step"] - r["placing"] for r in rows)
        print(f"placing -> first step, median of {runs}: {median:.1f} s (measured; the simulator's start_s)")
    finally:
        subprocess.run([ZEROMIX, "down"], timeout=120)


if __name__ == "__main__":
    main()
