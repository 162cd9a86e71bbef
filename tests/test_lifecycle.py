"""A cluster that cannot be left half-alive: a stale record is replaced, `down` stops only what zeromix
started, no command waits without a deadline, and a zeromix cluster on the default ports (the user's
demo) is left alone by everything the tests do."""

import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest

from tests.conftest import REPO, free_port, submitted_id, zeromix
from tests.helpers import cluster_file

pytestmark = pytest.mark.cluster




def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=2):
            return True
    except OSError:
        return False


def test_a_stale_record_is_an_error_that_says_what_to_do_and_up_replaces_it(isolated_home, tmp_path):
    dead = free_port()
    (isolated_home / "cluster.json").write_text(json.dumps({
        "gcs_address": f"127.0.0.1:{dead}", "dashboard_url": f"http://127.0.0.1:{free_port()}", "cluster_file": str(tmp_path / "old.yaml"),
        "simulated": True, "node": None, "cluster_id": "0badf00d"}))
    started = time.monotonic()
    refused = zeromix("queue", check=False, timeout=60)
    assert refused.returncode == 2 and time.monotonic() - started < 30  # no wait on a GCS that is gone
    assert f"does not answer at 127.0.0.1:{dead}" in refused.stderr and "starts it again (replacing the stale record)" in refused.stderr

    up = zeromix("up", "--simulate", str(cluster_file(tmp_path)), timeout=240)
    assert f"(127.0.0.1:{dead}) no longer answers; replaced the stale record" in up.stdout
    assert "3 nodes and 5 cards registered" in up.stdout
    again = zeromix("up", "--simulate", str(tmp_path / "cluster.yaml"), timeout=120)  # idempotent: the live cluster is reused
    assert "already up: reusing" in again.stdout
    (tmp_path / "other").mkdir()
    refused = zeromix("up", "--simulate", str(cluster_file(tmp_path / "other")), check=False)
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
        _, alive = psutil.wait_procs(procs, timeout=10)
        for proc in alive:
            proc.kill()


def test_down_stops_only_what_zeromix_started(isolated_home, foreign_ray, tmp_path):
    port, mark = foreign_ray
    before = {p.pid for p in _foreign_processes(mark)}
    zeromix("up", "--simulate", str(cluster_file(tmp_path)), timeout=240)
    state = json.loads((isolated_home / "cluster.json").read_text())
    ours = [p for p in psutil.process_iter() if _env(p).get("ZEROMIX_CLUSTER") == state["cluster_id"]]
    assert len(ours) >= 6  # 3 raylets, the GCS, the dashboard, agents, the scheduler's worker ...
    import ray

    ray.shutdown()
    down = zeromix("down")
    assert "cluster stopped (" in down.stdout
    assert not [p for p in psutil.process_iter() if _env(p).get("ZEROMIX_CLUSTER") == state["cluster_id"]]
    assert not (isolated_home / "cluster.json").exists()
    assert {p.pid for p in _foreign_processes(mark)} == before and answers(port)  # the other Ray cluster never noticed
    assert "no cluster was up" in zeromix("down").stdout


def _env(proc: psutil.Process) -> dict:
    try:
        return proc.environ()
    except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
        return {}


def test_a_zeromix_cluster_on_the_default_ports_is_left_alone(cluster, zeromix_home, isolated_home, demo_data, tmp_path):
    """Whether or not the user's demo holds the default ports, a job on the test cluster leaves it running."""
    if answers(6379) or answers(8265):
        default_home = None  # something (the user's `make demo`) already listens there: it is the cluster to leave alone
    else:
        default_home = isolated_home
        zeromix("up", "--simulate", str(REPO / "cluster.yaml"), timeout=240)
        assert answers(6379) and answers(8265)
    session = {"ZEROMIX_HOME": str(zeromix_home)}
    done = zeromix("submit", "--follow", "jobs/examples/tiny-llama-scratch.yaml", "--set", f"output_dir={tmp_path / 'beside'}",
                   "--set", f"dataset.path={demo_data['pretrain']}", "--set", "max_steps=5", env=session)
    assert "succeeded" in done.stdout, done.stdout[-2000:]
    assert submitted_id(done.stdout)
    assert answers(6379) and answers(8265)  # the default-port cluster still answers
    if default_home:
        listing = json.loads(zeromix("nodes", "--json").stdout)  # and works: its cards, its scheduler
        assert len(listing["cards"]) == 5 and "0 queued" in zeromix("queue").stdout
