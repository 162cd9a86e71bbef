"""Which processes belong to a zeromix cluster, and stopping exactly those.

`ray stop` kills every Ray process of the user on the machine: the demo's cluster, a real homelab head, a
colleague's notebook. zeromix starts each `ray start` with ZEROMIX_CLUSTER=<the cluster's id> in its
environment; Ray's raylet, GCS, dashboard, agents and workers inherit it, and nothing else carries it. So
`down` stops the processes that carry this cluster's id and leaves every other one alone.
"""

from __future__ import annotations

import os
import signal
import time

import psutil

MARKER = "ZEROMIX_CLUSTER"
GRACE_S = 10  # after SIGTERM, before SIGKILL; Ray's own `ray stop` waits about as long
POLL_S = 0.05


def cluster_processes(cluster_id: str) -> list[psutil.Process]:
    """This user's live processes started for the cluster `cluster_id`."""
    mine = []
    for proc in psutil.process_iter(["uids"]):
        try:
            if proc.info["uids"] and proc.info["uids"].real != os.getuid():
                continue
            if proc.environ().get(MARKER) == cluster_id and proc.status() != psutil.STATUS_ZOMBIE:
                mine.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return mine


def _bucket(proc: psutil.Process) -> int:
    """Ray's own order: raylets first (they would restart workers), then the rest, the GCS last."""
    try:
        name = " ".join(proc.cmdline()[:2])
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return 1
    return 0 if "raylet" in name else 2 if "gcs_server" in name else 1


def has_gcs(cluster_id: str) -> bool:
    """The cluster's GCS (its head) runs on this machine."""
    return any(_bucket(p) == 2 for p in cluster_processes(cluster_id))


def raylets_under(cluster_id: str, temp_dirs: list[str]) -> set[str]:
    """Of these node temp dirs (each simulated node runs under its own), those a live raylet of the cluster runs under."""
    running = set()
    for proc in cluster_processes(cluster_id):
        try:
            line = " ".join(proc.cmdline())
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
        if _bucket(proc) == 0:
            running |= {d for d in temp_dirs if f"{d}/" in line}
    return running


def _signal(procs: list[psutil.Process], signum: int) -> None:
    for proc in procs:
        try:
            proc.send_signal(signum)
        except psutil.NoSuchProcess:
            pass


def stop_cluster_processes(cluster_id: str) -> int:
    """SIGTERM, bucket by bucket, then SIGKILL what is left after GRACE_S. Returns how many were stopped."""
    found = cluster_processes(cluster_id)
    buckets = {proc: _bucket(proc) for proc in found}
    for bucket in (0, 1, 2):
        group = [p for p in found if buckets[p] == bucket]
        _signal(group, signal.SIGTERM)
        alive = still_running(group, GRACE_S)
        _signal(alive, signal.SIGKILL)
        still_running(alive, GRACE_S)
    # Workers the raylet forked after we listed: one more sweep.
    late = cluster_processes(cluster_id)
    _signal(late, signal.SIGKILL)
    still_running(late, GRACE_S)
    return len(found) + len(late)


def still_running(procs: list[psutil.Process], timeout_s: float) -> list[psutil.Process]:
    """Those of `procs` still running after waiting up to `timeout_s` for them to end. One that ended but that no
    parent has reaped yet (a zombie: Ray's daemons are orphans, and a container's init may reap them late) has
    ended: psutil's wait_procs counts it alive until it is reaped (about 2 s a bucket under this project's machines'
    init, the whole timeout where nothing reaps)."""
    deadline = time.monotonic() + timeout_s
    alive = list(procs)
    while alive := [p for p in alive if _running(p)]:
        if time.monotonic() >= deadline:
            break
        time.sleep(POLL_S)
    return alive


def _running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:  # (ZombieProcess is one)
        return False
