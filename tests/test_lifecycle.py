"""A cluster that cannot be left half-alive: a stale record is replaced, `down` stops only what zeromix
started, no command waits without a deadline, and a zeromix cluster on the default ports (the user's
demo) is left alone by everything the tests do."""

import contextlib
import fcntl
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import psutil
import pytest
import yaml

from orchestrator.processes import still_running
from tests.conftest import REPO, free_port, submitted_id, zeromix
from tests.helpers import cluster_file

pytestmark = pytest.mark.cluster




def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


DEFAULT_PORTS_LOCK = Path("/tmp/zeromix-tests-default-ports.lock")  # shared by every checkout's suite on this machine
DEFAULT_PORTS_WAIT_S = 600


@contextlib.contextmanager
def default_ports_turn():
    """Two suites run at once (two checkouts) must not both start a cluster on the default ports, nor stop one
    while the other checks that it is left alone: each takes its turn with this module under an flock, which the
    kernel releases with the process, so a killed suite leaves no stale lock behind."""
    with DEFAULT_PORTS_LOCK.open("a") as lock:
        deadline = time.monotonic() + DEFAULT_PORTS_WAIT_S
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise AssertionError(f"another test suite held {DEFAULT_PORTS_LOCK} for {DEFAULT_PORTS_WAIT_S} s: is one stuck?") from None
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


@pytest.fixture(scope="module")
def second_cluster(tmp_path_factory, zeromix_home, cluster):
    """The one cluster this module starts beside the session's (which must be up first: it is started in the
    session's ZEROMIX_HOME, which this fixture swaps while it starts its own), in a ZEROMIX_HOME of its own. It takes the default
    ports when they are free (as the user's demo would); when something holds them (the user's `make demo`), it
    goes on free ones and the demo is the default-port cluster to leave alone. Before it starts, its home holds a
    stale record (a cluster that died): what `queue` and `up` said then is kept for the first test."""
    import shutil

    import ray

    from orchestrator import cluster_runtime

    work = tmp_path_factory.mktemp("lifecycle")
    home = work / "home"
    home.mkdir()
    shutil.copy2(cluster_runtime.token_file(), home / "auth_token")  # Ray reads the token once per process
    saved = os.environ["ZEROMIX_HOME"]
    os.environ["ZEROMIX_HOME"] = str(home)
    ray.shutdown()
    with default_ports_turn():
        try:
            dead = free_port()
            (home / "cluster.json").write_text(json.dumps({
                "gcs_address": f"127.0.0.1:{dead}", "dashboard_url": f"http://127.0.0.1:{free_port()}", "cluster_file": str(work / "old.yaml"),
                "simulated": True, "node": None, "cluster_id": "0badf00d"}))
            refused = zeromix("queue", check=False, timeout=60)  # the deadline: it must not wait on a GCS that is gone
            on_default_ports = not (answers(6379) or answers(8265))
            config = cluster_file(work, 6379, 8265) if on_default_ports else cluster_file(work)
            up = zeromix("up", "--simulate", str(config), timeout=240)
            yield SimpleNamespace(home=home, work=work, config=config, dead=dead, refused=refused, up=up, on_default_ports=on_default_ports)
        finally:
            ray.shutdown()
            zeromix("down", check=False)
            os.environ["ZEROMIX_HOME"] = saved


def test_a_stale_record_is_an_error_that_says_what_to_do_and_up_replaces_it(second_cluster):
    refused, dead = second_cluster.refused, second_cluster.dead
    assert refused.returncode == 2
    assert f"does not answer at 127.0.0.1:{dead}" in refused.stderr and "starts it again (replacing the stale record)" in refused.stderr
    assert f"(127.0.0.1:{dead}) no longer answers; replaced the stale record" in second_cluster.up.stdout
    assert "3 nodes and 5 cards registered" in second_cluster.up.stdout
    again = zeromix("up", "--simulate", str(second_cluster.config), timeout=120)  # idempotent: the live cluster is reused
    assert "already up: reusing" in again.stdout
    (second_cluster.work / "other").mkdir()
    refused = zeromix("up", "--simulate", str(cluster_file(second_cluster.work / "other")), check=False)
    assert refused.returncode == 2 and "already part of a zeromix cluster" in refused.stderr and "run `zeromix down` first" in refused.stderr


def _foreign_processes(mark: str) -> list[psutil.Process]:
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("FOREIGN_RAY_TEST") == mark:
                found.append(proc)
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            pass
    return found


@pytest.fixture
def foreign_ray():
    """A plain Ray cluster that is not zeromix's (as a user's own would be): no token, no zeromix marker.
    Its processes carry FOREIGN_RAY_TEST=<mark> so that this fixture stops exactly what it started."""
    mark, port = secrets.token_hex(4), free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_AUTH", "ZEROMIX"))}
    env.update(FOREIGN_RAY_TEST=mark, RAY_USAGE_STATS_ENABLED="0")
    started = subprocess.run([str(Path(sys.executable).with_name("ray")), "start", "--head", f"--port={port}", "--num-cpus=1",
                              "--include-dashboard=false", f"--temp-dir=/tmp/zm-foreign-{mark}", f"--ray-client-server-port={free_port()}",
                              f"--dashboard-agent-listen-port={free_port()}"], env=env, capture_output=True, text=True, timeout=120)
    assert started.returncode == 0, started.stderr[-2000:]
    try:
        yield port, mark
    finally:
        procs = _foreign_processes(mark)
        for proc in procs:
            proc.terminate()
        for proc in still_running(procs, 10):
            proc.kill()


def _env(proc: psutil.Process) -> dict:
    try:
        return proc.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return {}


def test_a_zeromix_cluster_on_the_default_ports_is_left_alone(cluster, zeromix_home, second_cluster, demo_data, tmp_path):
    """Whether the default ports hold this module's cluster or the user's demo, a job on the test cluster leaves
    that cluster running and working."""
    assert answers(6379) and answers(8265)
    session = {"ZEROMIX_HOME": str(zeromix_home)}
    done = zeromix("submit", "--follow", "jobs/examples/tiny-llama-scratch.yaml", "--set", f"output_dir={tmp_path / 'beside'}", "--set", "report_to=[]",
                   "--set", f"dataset.path={demo_data['pretrain']}", "--set", "max_steps=5", env=session)
    assert "succeeded" in done.stdout, done.stdout[-2000:]
    assert submitted_id(done.stdout)
    assert answers(6379) and answers(8265)  # the default-port cluster still answers
    if second_cluster.on_default_ports:
        listing = json.loads(zeromix("nodes", "--json").stdout)  # and works: its cards, its scheduler
        assert len(listing["cards"]) == 5 and "0 queued" in zeromix("queue").stdout


def _gcs_cluster_id(port: int) -> str | None:
    """The zeromix cluster id of the GCS serving `port`, once it runs."""
    for proc in psutil.process_iter():
        try:
            if f"--gcs_server_port={port}" in proc.cmdline():
                return _env(proc).get("ZEROMIX_CLUSTER")
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return None


def test_an_up_stopped_while_its_nodes_start_leaves_nothing_running(isolated_home, tmp_path):
    """`zeromix up` stopped with SIGTERM (`kill`) once its head runs, before the cluster is recorded (that comes when
    every node is up): it stops what it started, as on Ctrl-C. Left running, `down` could not find those processes."""
    from orchestrator.processes import cluster_processes, stop_cluster_processes

    config = cluster_file(tmp_path)
    port = yaml.safe_load(config.read_text())["head"]["port"]
    up = subprocess.Popen([sys.executable, "-m", "orchestrator.cli", "up", "--simulate", str(config)], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline, cluster_id = time.monotonic() + 120, None
    while not cluster_id:
        assert up.poll() is None, f"`zeromix up` ended before its head's GCS ran: {up.communicate()}"
        assert time.monotonic() < deadline, f"no GCS on port {port} within 120 s of `zeromix up`; its log is under /tmp/zm-*"
        cluster_id = _gcs_cluster_id(port)
        time.sleep(0.1)
    try:
        up.send_signal(signal.SIGTERM)
        _, err = up.communicate(timeout=120)
        assert up.returncode != 0 and not (isolated_home / "cluster.json").exists(), err[-2000:]
        assert not cluster_processes(cluster_id)  # (its cleanup waits for them to end before `up` exits: no wait here)
    finally:  # (where the test fails, what that `up` left is stopped here: only this cluster's processes)
        up.kill()
        stop_cluster_processes(cluster_id)


def test_down_stops_only_what_zeromix_started(second_cluster, foreign_ray):
    """(This module's cluster, taken down by this last test of the module.)"""
    port, mark = foreign_ray
    before = {p.pid for p in _foreign_processes(mark)}
    state = json.loads((second_cluster.home / "cluster.json").read_text())
    ours = [p for p in psutil.process_iter() if _env(p).get("ZEROMIX_CLUSTER") == state["cluster_id"]]
    assert len(ours) >= 6  # 3 raylets, the GCS, the dashboard, agents, the scheduler's worker ...
    import ray

    ray.shutdown()
    down = zeromix("down")
    assert "cluster stopped (" in down.stdout
    assert not [p for p in psutil.process_iter() if _env(p).get("ZEROMIX_CLUSTER") == state["cluster_id"]]
    assert not (second_cluster.home / "cluster.json").exists()
    assert {p.pid for p in _foreign_processes(mark)} == before and answers(port)  # the other Ray cluster never noticed
    assert "no cluster was up" in zeromix("down").stdout


def test_a_process_that_ended_but_is_not_reaped_yet_counts_as_stopped():
    """Ray's daemons are orphans, and an init that reaps late (a container's) leaves an ended one a zombie for a while:
    `down` waited on each such process (psutil's wait_procs counts a zombie alive), some 2 s a bucket here and the
    whole grace period where nothing reaps. A zombie has ended; a process still running has not."""
    from tests.conftest import wait_until

    parent = subprocess.Popen(["sh", "-c", "sleep 0 & exec sleep 60"])  # (sleep never reaps the child it inherits)
    try:
        [ended] = wait_until(lambda: psutil.Process(parent.pid).children(), 10, "the shell's child")
        wait_until(lambda: ended.status() == psutil.STATUS_ZOMBIE, 10, "the child to end")
        running = psutil.Process(parent.pid)
        assert still_running([ended, running], 1) == [running]
    finally:
        parent.kill()
        parent.wait()


def test_ray_commands_run_side_by_side_each_with_its_own_output():
    """`up` starts its nodes' `ray start`s together and reports each one's failure from its own output: a command
    that fails beside one that succeeds is told apart, and its error is the line `up` shows (here Ray's CLI refusing
    an option, as it refuses a bad flag a cluster.yaml produced)."""
    from orchestrator import cluster_runtime

    ok, bad = cluster_runtime._ray_clis([["ray", "--version"], ["ray", "start", "--no-such-option"]], timeout_s=120)
    assert ok.returncode == 0 and "ray, version" in ok.stdout
    assert bad.returncode != 0 and "--no-such-option" in bad.stderr and "--no-such-option" not in ok.stdout + ok.stderr
