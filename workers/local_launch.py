"""Run a job's ranks as local processes, without Ray: what the exactness tests and bench/hetero_dp.py use
to drive the real training loop on one machine's CPU.

Starting a rank used to cost more than most test runs train: each spawned process imported torch, DeepSpeed,
transformers and PEFT again (some 10 s per rank on two cores, three ranks at a time). On the CPU, ranks are
therefore forked from multiprocessing's fork server, which imports them once (`PRELOAD`) and then forks each
rank in milliseconds. Where a card is visible, ranks are spawned: a process must not fork once CUDA is
initialised, and importing DeepSpeed may initialise it.
"""

from __future__ import annotations

import functools
import multiprocessing
import os
import queue
import socket
import time
from collections.abc import Callable
from dataclasses import asdict

from workers.collectives import RankInfo, hosted_ports, rank_infos
from workers.ports import bound_socket
from workers.train import TrainConfig

DEATH_GRACE_S = 3
# Besides the libraries: what every rank imports later, at its engine's start (DeepSpeed's Muon optimizer, which
# torch.compile-s its kernels and so imports torch's inductor, whatever the job's optimizer) and its model's (the tiny
# Llama of the tests and benches): 2.0 s a three-rank launch with them, 2.8-3.5 s without (2026-12-07, 2 cores).
PRELOAD = ["torch", "deepspeed", "transformers", "peft", "safetensors.torch", "workers.train", "workers.data", "workers.checkpoint",
           "workers.telemetry", "workers.tracking", "workers.memory_report", "deepspeed.runtime.zero.muon.muon_optimizer",
           "transformers.models.llama.modeling_llama"]


@functools.cache
def _context():
    """The fork server's context on CPU (started at the first launch, then reused by every later one); spawn on a GPU box."""
    import torch

    if torch.cuda.is_available():
        return multiprocessing.get_context("spawn")
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read when DeepSpeed is imported, in the server
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(PRELOAD)
    return context


def _rank(work: Callable[[RankInfo, dict[int, socket.socket]], object], info: RankInfo, results, threads: int,
          environ: dict[str, str], hosting: dict[int, socket.socket]) -> None:
    # The fork server's environment is the one it started with: take the launcher's as it is now (a test's
    # fault injection, a tracker's offline mode, the card a GPU rank must see).
    os.environ.clear()
    os.environ.update(environ)
    import torch

    torch.set_num_threads(threads)
    results.put((info.job_rank, work(info, hosting)))
    results.close()
    results.join_thread()  # the result is handed over before the hard exit below
    # Done and saved. Skip interpreter teardown: a C++ thread left joinable by the gloo/DeepSpeed stack
    # sometimes aborts it ("terminate called without an active exception"). Ranks under Ray are actors
    # that are killed, never torn down this way.
    os._exit(0)


def _train(config_json: str, info: RankInfo, hosting: dict[int, socket.socket]) -> dict:
    from workers.train import main

    return asdict(main(TrainConfig.from_json(config_json), info, hosting))


def _death(rank: int, exitcode: int) -> str:
    """A killed rank apart from one that exited with an error (its peers, once it is gone, do the latter)."""
    return f"rank {rank} killed by signal {-exitcode}" if exitcode < 0 else f"rank {rank} exited with status {exitcode}"


def meeting_points(boxes: tuple[int, ...], outer: bool = False) -> tuple[list[RankInfo], dict[int, socket.socket]]:
    """Local ranks meet on loopback: one group over every rank, or one per box and the box leaders' link. Each
    meeting's socket, by port, bound here until the rank that hosts it listens on it."""
    sockets = [bound_socket("127.0.0.1") for _ in range(len(boxes) + outer)]
    meet = [("127.0.0.1", s.getsockname()[1]) for s in sockets]
    infos = rank_infos(boxes, meet[:len(boxes)], meet[-1] if outer else ("", 0))
    return infos, {port: s for (_, port), s in zip(meet, sockets)}


def run_local_ranks(config: TrainConfig, timeout_s: float = 600, threads_per_rank: int = 1,
                    ranks: list[RankInfo] | None = None) -> list[dict]:
    """Train on len(config.micro_batches) local ranks (gloo on the CPU; NCCL where a card is visible, as
    tests/test_gpu.py runs one rank); each rank's RankResult as a dict, by rank. One CPU thread per rank by
    default: several ranks share this machine's cores. `ranks`: only these, meeting where they say, the others
    running elsewhere (bench/slow_link.py runs each box's in a network namespace of its own)."""
    ranks, sockets = (ranks, {}) if ranks is not None else meeting_points(config.boxes, bool(config.outer))
    return run_local(functools.partial(_train, config.to_json()), ranks, sockets, timeout_s, threads_per_rank)


def run_local(work: Callable[[RankInfo, dict[int, socket.socket]], object], ranks: list[RankInfo], sockets: dict[int, socket.socket],
              timeout_s: float = 600, threads_per_rank: int = 1) -> list:
    """`work(info, hosting)` in one local process per rank (picklable: a module's function, or a partial of one),
    each given the sockets it hosts its meetings on; what each returned, by rank. A rank that dies, or no results
    within `timeout_s`, stops them all and raises, saying what each did."""
    world = len(ranks)
    ctx = _context()
    results = ctx.Queue()
    procs = [ctx.Process(target=_rank, args=(work, info, results, threads_per_rank, dict(os.environ),
                                             {port: sockets[port] for port in hosted_ports(info) if port in sockets}))
             for info in ranks]
    for p in procs:
        p.start()
    for s in sockets.values():  # (each hosting rank holds its own copy now)
        s.close()
    collected, deadline = [], time.monotonic() + timeout_s
    while len(collected) < world:
        try:
            collected.append(results.get(timeout=1))
        except queue.Empty:
            dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)]
            if dead or time.monotonic() > deadline:
                grace = time.monotonic() + DEATH_GRACE_S  # the others may be dying of it: say what each did
                for p in procs:
                    p.join(timeout=max(0.0, grace - time.monotonic()))
                dead = [r for r, p in enumerate(procs) if p.exitcode not in (None, 0)] if dead else dead
                for p in procs:
                    p.kill()
                why = "; ".join(_death(ranks[r].job_rank, procs[r].exitcode) for r in dead) if dead else f"no result within {timeout_s:.0f} s"
                raise RuntimeError(f"local ranks failed: {why}") from None
    for p in procs:
        p.join(timeout=60)
    codes = [p.exitcode for p in procs]
    if codes != [0] * world:
        raise RuntimeError(f"local ranks exited with {codes}")
    return [value for _, value in sorted(collected, key=lambda pair: pair[0])]
