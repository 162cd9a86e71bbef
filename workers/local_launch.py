"""Run a job's ranks as local processes, without Ray: what the exactness tests and bench/hetero_dp.py use
to drive the real training loop on one machine's CPU."""

from __future__ import annotations

import multiprocessing
import os
import queue
import socket
import time
from dataclasses import asdict

from workers.collectives import RankInfo
from workers.train import TrainConfig


def _rank(rank: int, world: int, config_json: str, port: int, results, threads: int) -> None:
    import torch

    torch.set_num_threads(threads)
    from workers.train import main

    results.put(asdict(main(TrainConfig.from_json(config_json), RankInfo(rank, world, "127.0.0.1", port))))
    results.close()
    results.join_thread()  # the result is handed over before the hard exit below
    # Done and saved. Skip interpreter teardown: a C++ thread left joinable by the gloo/DeepSpeed stack
    # sometimes aborts it ("terminate called without an active exception"). Ranks under Ray are actors
    # that are killed, never torn down this way.
    os._exit(0)


def run_local_ranks(config: TrainConfig, timeout_s: float = 600, threads_per_rank: int = 1) -> list[dict]:
    """Train on len(config.micro_batches) local ranks (gloo on the CPU; NCCL where a card is visible, as
    tests/test_gpu.py runs one rank); each rank's RankResult as a dict, by rank. One CPU thread per rank by
    default: several ranks share this machine's cores."""
    world = len(config.micro_batches)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(r, world, config.to_json(), port, results, threads_per_rank)) for r in range(world)]
    for p in procs:
        p.start()
    collected, deadline = [], time.monotonic() + timeout_s
    while len(collected) < world:
        try:
            collected.append(results.get(timeout=1))
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                for p in procs:
                    p.kill()
                why = f"rank(s) {dead} died (exit {[procs[r].exitcode for r in dead]})" if dead else f"no result within {timeout_s:.0f} s"
                raise RuntimeError(f"local ranks failed: {why}") from None
    for p in procs:
        p.join(timeout=60)
    codes = [p.exitcode for p in procs]
    if codes != [0] * world:
        raise RuntimeError(f"local ranks exited with {codes}")
    return sorted(collected, key=lambda r: r["rank"])
