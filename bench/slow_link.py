"""Outer steps against synchronous data parallel across a link throttled to 1 Gbit/s: tokens/s, bytes across the
link, and the plan's figures beside what was measured.

Two network namespaces stand in for two homelab boxes: desk (RTX 3090 and RTX 4090: two ranks) and attic (GTX 1080 Ti:
one rank), joined by a veth pair whose ends `tc` limits to the link's rate (tbf, each direction). Each box's ranks run
in its own namespace (real DeepSpeed ZeRO-2, gloo, on this machine's CPU): a synchronous job is one DeepSpeed world
across the link; an outer-step job is one world per box, whose leaders meet across it. Traffic inside a box stays in
its namespace. First the link itself is measured (one TCP stream across it) and given to the planner as `zeromix join`
gives it the link it measured; then both modes train the same model on the same data and global batches.

Figures, all measured unless marked as the plan's estimate:
  tokens/s          the job's tokens over the timed steps (after WARMUP_STEPS) / their wall time (the slowest box's)
  bytes across      read off the veth's counters by the kernel (every protocol, headers included), both directions;
                    in outer-step mode also what the box leaders handed to their group (payload, counted there)
  exchange time     a leader's time sending its delta and receiving the other's (after the boxes met)
The model (4 layers of 512, 13.7 M parameters) and batch are chosen so that, as for a 1.5 B model on real cards behind
1 GbE, the synchronous step is dominated by gradients crossing the link; a CPU's compute is slower than a card's, so a
larger model would hide the link behind compute here though not on the cards. Needs root (CAP_NET_ADMIN), iproute2's
`ip` and `tc`; about 5 minutes on 2 cores.

Each rank stands in for a card, and a card computes alone: by default the job takes the homelab's 1080 Ti, 3090 and
4090 where this machine gives each rank a core of its own, and the 4090 (desk) and the 1080 Ti (attic) where it has
fewer than three. Three ranks on two cores slow each other's inner steps (a box's ranks run while the other box's run),
which the synchronous run hides behind the link and the outer-step run cannot: measured, the trio on two cores gave
2.76-3.26x over several days where one card a box gave 3.58-4.16x. `--cards` picks the cards whatever the cores.

    .venv/bin/python bench/slow_link.py [--steps 150] [--inner 50] [--wire fp32] [--rate 1gbit] [--global-batch 6]
                                        [--cards 'GTX 1080 Ti' 'RTX 3090' 'RTX 4090']
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from orchestrator.cluster_config import load_cluster
from orchestrator.inventory import snapshot_from_config
from orchestrator.launch import train_config
from orchestrator.model_facts import facts_from_config
from orchestrator.planner import make_plan
from orchestrator.planner.plan import Plan

from hetero_dp import BENCH_MODEL, TRIO, trio_job

REPO = Path(__file__).resolve().parents[1]
MODEL = {**BENCH_MODEL, "hidden_size": 512, "intermediate_size": 1536, "num_attention_heads": 8, "num_key_value_heads": 8}
SUBNET = "10.231.9"
WARMUP_STEPS = 5  # untimed: DeepSpeed's first steps build buffers, the first outer step's read allocates
RUN_TIMEOUT_S = 900
PAIR = ["GTX 1080 Ti", "RTX 4090"]  # one card in each box: the default where the trio's ranks would share cores
LINK_PROBE_BYTES = 128 * 2**20


@dataclasses.dataclass(frozen=True)
class Box:
    node: str  # the plan's node name
    namespace: str
    address: str
    device: str  # its end of the veth

    def run(self, *argv: str, **kwargs) -> subprocess.Popen:
        env = {**os.environ, "GLOO_SOCKET_IFNAME": self.device, "DS_ACCELERATOR": "cpu", "PYTHONPATH": str(REPO / "bench")}
        return subprocess.Popen(["ip", "netns", "exec", self.namespace, *argv], env=env, start_new_session=True, **kwargs)

    def bytes_sent(self) -> int:
        shown = subprocess.run(["ip", "-n", self.namespace, "-s", "-j", "link", "show", "dev", self.device],
                               capture_output=True, text=True, check=True)
        return json.loads(shown.stdout)[0]["stats64"]["tx"]["bytes"]


@contextlib.contextmanager
def throttled_boxes(nodes: list[str], rate: str):
    """One namespace per node, joined by a veth pair limited to `rate` each way; removed on exit."""
    assert len(nodes) == 2, "the bench joins two boxes"
    tag = secrets.token_hex(3)
    boxes = [Box(n, f"zm-{n}-{tag}", f"{SUBNET}.{i + 1}", f"zm{tag}{i}") for i, n in enumerate(nodes)]
    made = subprocess.run(["ip", "netns", "add", boxes[0].namespace], capture_output=True, text=True)
    if made.returncode:
        sys.exit(f"cannot create network namespaces here (`ip netns add` said: {made.stderr.strip()}); run as root, with iproute2")
    try:
        steps = [["netns", "add", boxes[1].namespace], ["link", "add", boxes[0].device, "type", "veth", "peer", "name", boxes[1].device]]
        for box in boxes:
            steps += [["link", "set", box.device, "netns", box.namespace], ["-n", box.namespace, "addr", "add", f"{box.address}/24", "dev", box.device],
                      ["-n", box.namespace, "link", "set", box.device, "up"], ["-n", box.namespace, "link", "set", "lo", "up"]]
        for step in steps:
            subprocess.run(["ip", *step], check=True, capture_output=True)
        for box in boxes:  # a token bucket at the line rate; a burst of a few full-size frames, as a switch port allows
            subprocess.run(["ip", "netns", "exec", box.namespace, "tc", "qdisc", "add", "dev", box.device, "root", "tbf",
                            "rate", rate, "burst", "256kb", "latency", "50ms"], check=True, capture_output=True)
        yield boxes
    finally:
        for box in boxes:
            subprocess.run(["ip", "netns", "del", box.namespace], capture_output=True)


PROBE = """
import socket, sys, time
side, host, size = sys.argv[1], sys.argv[2], int(sys.argv[3])
if side == "receive":
    server = socket.create_server((host, 29400))
    print("ready", flush=True)
    conn, _ = server.accept()
    got, first = 0, None
    while chunk := conn.recv(1 << 20):
        first = first or time.perf_counter()
        got += len(chunk)
    print(got * 8 / (time.perf_counter() - first) / 1e9)
else:
    with socket.create_connection((host, 29400)) as conn:
        conn.sendall(bytes(size))
"""


def measure_link(sender: Box, receiver: Box) -> float:
    """Gbit/s one TCP stream achieves from `sender` to `receiver` (payload bytes over the time they took)."""
    listening = receiver.run(sys.executable, "-c", PROBE, "receive", receiver.address, "0", stdout=subprocess.PIPE, text=True)
    assert listening.stdout.readline().strip() == "ready"
    sender.run(sys.executable, "-c", PROBE, "send", receiver.address, str(LINK_PROBE_BYTES)).wait(timeout=120)
    out, _ = listening.communicate(timeout=60)
    return float(out)


def run_mode(config, plan: Plan, boxes: list[Box], work: Path) -> dict:
    """Train `config` with each box's ranks in its namespace; every rank's result and the bytes each box sent."""
    from workers.collectives import rank_infos

    where = {b.node: b for b in boxes}
    nodes = [r.card.node for r in plan.ranks]
    if config.outer:  # a world per box at its own address, the leaders' link at box 0's
        infos = rank_infos(config.boxes, [(where[n].address, 29500) for n in dict.fromkeys(nodes)], (where[nodes[0]].address, 29501))
    else:  # one world across the link, rank 0's box hosting its rendezvous
        infos = rank_infos(config.boxes, [(where[nodes[0]].address, 29500)])
    (work / "config.json").write_text(config.to_json())
    before = {b.node: b.bytes_sent() for b in boxes}
    children = []
    for box in boxes:
        mine = [dataclasses.asdict(info) for info, node in zip(infos, nodes) if node == box.node]
        (work / f"{box.node}.ranks.json").write_text(json.dumps(mine))
        children.append(box.run(sys.executable, str(Path(__file__).resolve()), "--box-ranks", str(work / "config.json"),
                                str(work / f"{box.node}.ranks.json"), str(work / f"{box.node}.results.json")))
    deadline = time.monotonic() + RUN_TIMEOUT_S
    for child in children:
        try:
            code = child.wait(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            _stop(children)
            sys.exit(f"a box's ranks gave no result within {RUN_TIMEOUT_S} s; see their output above")
        if code:
            _stop(children)
            sys.exit(f"a box's ranks failed (exit {code}); see their output above")
    ranks = sorted((r for b in boxes for r in json.loads((work / f"{b.node}.results.json").read_text())), key=lambda r: r["rank"])
    return {"ranks": ranks, "sent": {b.node: b.bytes_sent() - before[b.node] for b in boxes}}


def _stop(children: list[subprocess.Popen]) -> None:
    """Each box's launcher with the ranks it forked (each child leads a session of its own: nothing else is touched)."""
    for child in children:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(child.pid, signal.SIGKILL)


def run_box_ranks(config_path: str, ranks_path: str, out_path: str) -> None:
    """In a box's namespace: its ranks, through the launcher the tests use."""
    from workers.collectives import RankInfo
    from workers.local_launch import run_local_ranks
    from workers.train import TrainConfig

    config = TrainConfig.from_json(Path(config_path).read_text())
    ranks = [RankInfo(**r) for r in json.loads(Path(ranks_path).read_text())]
    Path(out_path).write_text(json.dumps(run_local_ranks(config, timeout_s=RUN_TIMEOUT_S, ranks=ranks)))


def throughput(ranks: list[dict], config) -> tuple[float, float]:
    """(tokens/s, mean step s) over the steps after WARMUP_STEPS: every box's tokens over the slowest box's wall time
    (the boxes meet at every outer step, so their walls agree over the run)."""
    from workers.collectives import first_ranks

    leaders = [ranks[r] for r in first_ranks(config.boxes)]
    timed = [[h for h in leader["history"] if h["step"] > WARMUP_STEPS] for leader in leaders]
    wall = max(sum(max(h["step_time_s"]) for h in steps) for steps in timed)
    tokens = sum(sum(sum(h["tokens"]) for h in steps) for steps in timed)
    return tokens / wall, wall / len(timed[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--inner", type=int, default=50, help="inner steps per outer step (H)")
    parser.add_argument("--wire", choices=["fp32", "bf16", "int8"], default="fp32")
    parser.add_argument("--rate", default="1gbit", help="the link's rate, as tc writes it")
    parser.add_argument("--global-batch", type=int, default=6)
    parser.add_argument("--cards", nargs="+", help="the homelab's cards the job takes (on two of its boxes); by default the "
                        "1080 Ti, 3090 and 4090 where each rank has a core of its own, else the 1080 Ti and 4090")
    parser.add_argument("--box-ranks", nargs=3, metavar=("CONFIG", "RANKS", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.box_ranks:
        return run_box_ranks(*args.box_ranks)

    cores = len(os.sched_getaffinity(0))
    cards = args.cards or (TRIO if cores >= len(TRIO) else PAIR)
    work = Path(tempfile.mkdtemp(prefix="zeromix-slow-link-"))
    job = trio_job(work, MODEL, args.steps, args.global_batch, pretrain_lines=2000, rebalance=False,
                   gpus={"count": len(cards), "models": cards})
    homelab = snapshot_from_config(load_cluster(REPO / "cluster.yaml"))
    probe = make_plan(job, facts_from_config(MODEL), homelab, args.steps)
    nodes = list(dict.fromkeys(r.card.node for r in probe.ranks))
    with throttled_boxes(nodes, args.rate) as boxes:
        gbit = min(measure_link(boxes[0], boxes[1]), measure_link(boxes[1], boxes[0]))
        # The planner sees the link as `zeromix join` measured it.
        measured = dataclasses.replace(homelab, nodes=tuple(dataclasses.replace(n, link_measured_gbit_per_s=gbit) for n in homelab.nodes))
        outer_job = job.model_copy(update={"sync": job.sync.model_copy(update={"mode": "outer", "inner_steps": args.inner, "wire": args.wire})})
        plans = {"synchronous": make_plan(job, facts_from_config(MODEL), measured, args.steps),
                 f"outer H={args.inner} ({args.wire})": make_plan(outer_job, facts_from_config(MODEL), measured, args.steps)}
        sync_plan = plans["synchronous"]
        print(f"link: tc tbf {args.rate} each way between namespaces {boxes[0].node} and {boxes[1].node}; one TCP stream measured "
              f"{gbit:.3f} Gbit/s (the slower direction), given to the planner as measured at join")
        print(f"{len(sync_plan.ranks)} ranks: " + ", ".join(f"{r.card.node}/{r.card.short_name} micro {r.tuning.micro_batch}" for r in sync_plan.ranks)
              + f", x{sync_plan.grad_accum} accumulation; {args.steps} steps of {sync_plan.global_batch} sequences of {job.seq_len}; "
                f"{sync_plan.n_params / 1e6:.1f}M parameters; ZeRO-{sync_plan.zero.stage}, {sync_plan.precision} on CPU; "
                f"first {WARMUP_STEPS} steps untimed; {cores} cores here" + ("" if args.cards or cards == TRIO else
                f" (so one card a box: three ranks would share {cores} cores; `--cards` to choose)") + "\n")
        runs = {}
        for name, plan in plans.items():
            out = work / name.split()[0]
            config = dataclasses.replace(train_config(job, plan, out.name), output_dir=str(out), checkpoint_every=0)
            (out / "run").mkdir(parents=True)
            runs[name] = (config, run_mode(config, plan, boxes, out / "run"))
    report(plans, runs)
    shutil.rmtree(work, ignore_errors=True)


def report(plans: dict[str, Plan], runs: dict) -> None:
    (sync_name, outer_name), measured = list(runs), {}
    planned = plans[outer_name].outer
    planned_bytes = {sync_name: planned.sync_bytes_per_step, outer_name: len(planned.boxes) * planned.exchange_bytes / planned.inner_steps}
    print(f"{'mode':<22} {'tokens/s':>9} {'step (s)':>9} {'MB across the link a step':>26} {'plan (estimate)':>16}")
    for name, (config, run) in runs.items():
        tokens_s, step_s = throughput(run["ranks"], config)
        across = sum(run["sent"].values()) / run["ranks"][0]["steps"]  # both directions, the kernel's count
        measured[name] = tokens_s, across
        print(f"{name:<22} {tokens_s:>9.0f} {step_s:>9.3f} {across / 1e6:>26.3f} {planned_bytes[name] / 1e6:>16.3f}")
    (sync_tokens, sync_bytes), (outer_tokens, outer_bytes) = measured.values()
    print(f"\nouter steps against synchronous: {outer_tokens / sync_tokens:.2f}x the tokens/s (goal: at least 3x), "
          f"{sync_bytes / outer_bytes:.0f}x fewer bytes across the link (goal: at least 20x at H = 50)")
    sync_est, outer_est = plans[sync_name].step.step_s, plans[outer_name].step.step_s
    print(f"on the real cards the plan estimates {sync_est:.3g} s a step synchronous, {outer_est:.3g} s with outer steps "
          f"({sync_est / outer_est:.0f}x; estimates): their inner step is a fraction of this CPU's")

    outer_run = runs[outer_name][1]
    leaders = [r for r in outer_run["ranks"] if r["outer_bytes_sent"]]
    taken = leaders[0]["outer_steps"]
    counted = statistics.fmean((r["outer_bytes_sent"] - 16) / taken for r in leaders)  # (less the start's 16 bytes)
    exchange_s = statistics.fmean(r["outer_exchange_s"] for r in leaders) / taken
    wire = statistics.fmean(outer_run["sent"].values()) / taken
    print(f"\none outer step ({taken} taken), per box leader     plan (estimate)     measured")
    print(f"  bytes it sends across the link       {planned.exchange_bytes:>15,} {counted:>12,.0f}  counted on the leaders' group "
          f"({counted / planned.exchange_bytes - 1:+.1%})")
    print(f"  ... on the wire, all traffic                         {wire:>12,.0f}  the kernel's veth counter, per box")
    print(f"  its delta across the link (s)        {planned.link_s:>15.3g} {exchange_s:>12.3g}  ({exchange_s / planned.link_s - 1:+.1%})")
    print(f"\nsynchronous: {sync_bytes / planned.sync_bytes_per_step - 1:+.1%} bytes across the link against the plan's estimate")


if __name__ == "__main__":
    main()
