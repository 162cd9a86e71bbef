"""Bringing the Ray cluster up and down, and connecting to it. Side effects live here.

Ray's internal gRPC ports listen on every interface and Ray has no setting to change that, so zeromix
always runs Ray with token authentication: the token is made at `up`, kept in $ZEROMIX_HOME/auth_token
(mode 0600), and never printed. The dashboard and Jobs API listen on 127.0.0.1 only.

A cluster is never left half-alive: each one has an id, every Ray process started for it carries that id
(processes.py), `down` stops exactly those, `up` reuses a recorded cluster only after it has answered and
replaces a stale record, and every wait has a deadline. Each node gets its own temp dir and free ports for
Ray's agents, so a second cluster on the same machine (the demo beside the tests) collides with nothing.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

from orchestrator.cluster_config import load_cluster
from orchestrator.errors import InputError, ZeromixError
from orchestrator.inventory import ClusterSnapshot, Node, snapshot_from_config
from orchestrator.processes import MARKER, has_gcs, raylets_under, stop_cluster_processes

RAY_NAMESPACE = "zeromix"
GCS_ANSWER_TIMEOUT_S = 3.0
RAY_START_TIMEOUT_S = 120


@dataclass(frozen=True)
class ClusterState:
    gcs_address: str
    dashboard_url: str | None  # None on a joined node: the dashboard listens on the head's loopback only
    cluster_file: str | None  # the cluster.yaml of a simulated cluster
    simulated: bool
    node: str | None = None  # on a real node: this machine's zeromix name
    cluster_id: str = ""  # every Ray process zeromix started for this cluster on this machine carries it
    config_digest: str | None = None  # of a simulated cluster's cluster.yaml, as loaded: the same homelab from another checkout

    @property
    def is_head(self) -> bool:
        return self.dashboard_url is not None

    @property
    def temp_dir(self) -> str:
        """Ray's logs and sockets for this cluster on this machine."""
        return temp_root(self.cluster_id)


@dataclass
class UpResult:
    state: ClusterState
    reused: bool  # True: the recorded cluster answered and was kept
    notes: list[str] = field(default_factory=list)  # one line each, for the user


def home() -> Path:
    return Path(os.environ.get("ZEROMIX_HOME", "~/.zeromix")).expanduser()


def _state_file() -> Path:
    return home() / "cluster.json"


def token_file() -> Path:
    return home() / "auth_token"


def auth_env() -> dict[str, str]:
    """What any process needs to talk to the cluster. The token's path, never the token itself."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN_PATH": str(token_file()), "RAY_USAGE_STATS_ENABLED": "0"}


def _ensure_token() -> None:
    """The cluster's token, made once; a token file found readable by others (copied in by hand) is made 0600."""
    path = token_file()
    if path.exists():
        os.chmod(path, 0o600)
        return
    _write_secret(path, secrets.token_hex(32))


def _write_secret(path: Path, text: str) -> None:
    """Readable by this user only, whatever mode a file already there had (O_CREAT's mode applies only to a new one)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


def rotate_token() -> Path:
    """A new token for the next `up`. Ray reads the token when its processes start, so a running cluster keeps
    its own: rotating needs the cluster down, and every other box needs the new copy before it joins again."""
    current, _ = _stale_record_check()
    if current:
        raise ZeromixError(f"a zeromix cluster is up here ({current.gcs_address}); `zeromix down` first, then `zeromix up --rotate-token`")
    _write_secret(token_file(), secrets.token_hex(32))
    return token_file()


HEAD_CONNECT_TIMEOUT_S = 5  # `join`: the head's GCS port must accept a connection within this

NOT_IN_A_CLUSTER = ("this machine is in no zeromix cluster; start one with `zeromix up` (or `zeromix up --simulate "
                    "cluster.yaml`), or join one with `zeromix join --address HEAD:PORT`")


def load_state() -> ClusterState:
    try:
        return ClusterState(**json.loads(_state_file().read_text()))
    except FileNotFoundError:
        raise ZeromixError(NOT_IN_A_CLUSTER) from None


def _save_state(state: ClusterState) -> None:
    """Written whole or not at all: a temp file, then rename."""
    path = _state_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(asdict(state)))
    os.replace(tmp, path)


def answers(state: ClusterState) -> bool:
    """The recorded cluster is alive: its GCS port accepts a connection within a deadline and, for a
    cluster whose head runs here, that head's GCS process (carrying the cluster's id) is running."""
    host, _, port = state.gcs_address.rpartition(":")
    try:
        with socket.create_connection((host, int(port)), timeout=GCS_ANSWER_TIMEOUT_S):
            pass
    except OSError:
        return False
    return has_gcs(state.cluster_id) if state.is_head and state.cluster_id else True


def _stale_record_check() -> tuple[ClusterState | None, list[str]]:
    """The recorded cluster if it answers; otherwise the record (and any process left of it) is removed."""
    try:
        state = load_state()
    except ZeromixError:
        return None, []
    except (ValueError, TypeError):
        _state_file().unlink(missing_ok=True)
        return None, [f"the record {_state_file()} was unreadable; replaced it"]
    if answers(state):
        return state, []
    left = stop_cluster_processes(state.cluster_id) if state.cluster_id else 0
    _state_file().unlink(missing_ok=True)
    return None, [f"the cluster recorded in {_state_file()} ({state.gcs_address}) no longer answers; replaced the stale record"
                  + (f" and stopped {left} process(es) left of it" if left else "")]


def _new_cluster_id() -> str:
    return secrets.token_hex(4)


def temp_root(cluster_id: str) -> str:
    """One subdirectory per node under it. Short on purpose: Ray puts Unix sockets there, and a socket path
    may hold at most 107 bytes."""
    return f"/tmp/zm-{cluster_id}"


def _ray_clis(commands: list[list[str]], cluster_id: str | None = None,
              timeout_s: float = RAY_START_TIMEOUT_S) -> list[subprocess.CompletedProcess]:
    """Run `ray` commands of this interpreter's environment side by side (nodes start together), with the cluster's
    auth settings; with `cluster_id`, every process they start carries that id. Each one's output goes to a file of
    its own (a pipe waiting to be read could stall one while another is waited for). Whatever ends the wait early (a
    timeout, Ctrl-C, SIGTERM) kills the commands still running before it goes on."""
    ray_bin = Path(sys.executable).with_name("ray")
    env = {**os.environ, **auth_env(), **({MARKER: cluster_id} if cluster_id else {})}
    with contextlib.ExitStack() as files:
        outputs = [(files.enter_context(tempfile.TemporaryFile("w+")), files.enter_context(tempfile.TemporaryFile("w+"))) for _ in commands]
        running = [subprocess.Popen([str(ray_bin), *args[1:]], env=env, stdout=out, stderr=err, text=True)
                   for args, (out, err) in zip(commands, outputs)]
        deadline = time.monotonic() + timeout_s
        try:
            for args, proc in zip(commands, running):
                try:
                    proc.wait(timeout=max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    raise ZeromixError(f"`{' '.join(args[:2])}` did not finish within {timeout_s:.0f} s; see the logs under "
                                       f"{temp_root(cluster_id or '?')}, then `zeromix down` and try again") from None
        finally:
            for proc in running:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        return [subprocess.CompletedProcess(proc.args, proc.returncode, _read(out), _read(err)) for proc, (out, err) in zip(running, outputs)]


def _read(file) -> str:
    file.seek(0)
    return file.read()


def _start_and_register(nodes: list[Node], ports: list[tuple[int, ...]], head_address: str | None, port: int,
                        dashboard_port: int, gcs_address: str, cluster_id: str) -> None:
    """`ray start` for these nodes side by side, each joining `head_address` (None: the one node given starts the
    head), its agents on its `ports`; then each one's record in the registry. The one path every node takes."""
    from orchestrator import registry
    from workers.registration import ray_start_command

    os.environ.update(auth_env())  # Ray reads its auth settings when it is first imported
    commands = [ray_start_command(node, head_address, port, dashboard_port, _node_dir(cluster_id, node), node_ports)
                for node, node_ports in zip(nodes, ports)]
    for node, done in zip(nodes, _ray_clis(commands, cluster_id)):
        if done.returncode != 0:
            lines = (done.stderr or done.stdout).strip().splitlines() or ["no output"]
            cause = next((line for line in reversed(lines) if "Error:" in line), lines[-1])
            raise ZeromixError(f"`ray start` failed for node {node.name}: {cause.strip()}")
    for node in nodes:
        registry.publish(gcs_address, node)


def _node_dir(cluster_id: str, node: Node) -> str:
    return f"{temp_root(cluster_id)}/{node.name[:12]}"


def _start_nodes(nodes: list[Node], head_address: str | None, port: int, dashboard_port: int, gcs_address: str,
                 cluster_id: str) -> None:
    """Start and register each node (with no `head_address`, the first one starts the head, then the others join it
    together); if any fails, or the command is stopped (Ctrl-C, or `kill`: SIGTERM), stop every process started here
    for this cluster, so nothing is left half-alive. (Its record is written only once every node is up: `down` could
    not find them.)"""
    from workers.registration import agent_ports

    ports = agent_ports(len(nodes), avoid=(port, dashboard_port))  # (all at once: the head's are not listened on yet)
    with _terminate_raises():
        try:
            if head_address is None:
                _start_and_register(nodes[:1], ports[:1], None, port, dashboard_port, gcs_address, cluster_id)
                nodes, ports, head_address = nodes[1:], ports[1:], gcs_address
            _start_and_register(nodes, ports, head_address, port, dashboard_port, gcs_address, cluster_id)
        except BaseException:
            stop_cluster_processes(cluster_id)
            raise


@contextlib.contextmanager
def _terminate_raises():
    """SIGTERM raises SystemExit here (in the main thread), as Ctrl-C raises KeyboardInterrupt, so cleanup runs."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum, frame):
        raise SystemExit(128 + signum)

    before = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, before)


def _refuse_ports_in_use(source: str, ports: dict[str, int]) -> None:
    """The head's own ports must be free before anything starts: on a port another program listens on, Ray's GCS
    could not start and `ray start` failed some 40 s later with "Failed to start GCS" and no word of the port."""
    from workers.ports import listened_on

    for name, port in ports.items():
        if listened_on(port):
            raise InputError(source, name, port, "another program on this machine listens on it (another Ray cluster?); "
                                                  "choose a free port")


def _already_up(state: ClusterState) -> ZeromixError:
    return ZeromixError(f"this machine is already part of a zeromix cluster ({state.gcs_address}"
                        f"{', from ' + state.cluster_file if state.cluster_file else ''}); run `zeromix down` first")


def up_simulated(cluster_file: str) -> tuple[UpResult, ClusterSnapshot]:
    """Every node of cluster.yaml becomes a Ray node on this machine, its cards declared, not probed.
    Idempotent: the same homelab (the same cluster.yaml content, from any checkout), already up and answering,
    is reused, and a node of it that is not running (its processes killed: "unplugged") is started again and
    joins, as a real box does when it is plugged back in."""
    config = load_cluster(cluster_file)
    snapshot = snapshot_from_config(config, simulated=True)
    resolved = str(Path(cluster_file).resolve())
    digest = hashlib.sha256(config.model_dump_json().encode()).hexdigest()[:16]
    current, notes = _stale_record_check()
    if current:
        if current.simulated and current.config_digest == digest:
            return UpResult(current, True, notes + _start_stopped_nodes(current, snapshot, config.head.port, config.head.dashboard_port)), snapshot
        raise _already_up(current)
    _refuse_ports_in_use(cluster_file, {"head.port": config.head.port, "head.dashboard_port": config.head.dashboard_port})
    _ensure_token()
    head = snapshot.node(config.head_node.name)
    gcs_address = f"127.0.0.1:{config.head.port}"
    cluster_id = _new_cluster_id()
    _start_nodes([head, *(n for n in snapshot.nodes if n is not head)], None, config.head.port, config.head.dashboard_port,
                 gcs_address, cluster_id)
    state = ClusterState(gcs_address, f"http://127.0.0.1:{config.head.dashboard_port}", resolved, True,
                         cluster_id=cluster_id, config_digest=digest)
    _save_state(state)
    return UpResult(state, False, notes), snapshot


def _start_stopped_nodes(state: ClusterState, snapshot: ClusterSnapshot, port: int, dashboard_port: int) -> list[str]:
    """A simulated homelab's nodes with no raylet running, started again (its head runs: the cluster answered)."""
    from workers.registration import agent_ports

    dirs = {_node_dir(state.cluster_id, node): node for node in snapshot.nodes}
    stopped = [node for d, node in dirs.items() if d not in raylets_under(state.cluster_id, list(dirs))]
    with _terminate_raises():
        _start_and_register(stopped, agent_ports(len(stopped)), state.gcs_address, port, dashboard_port, state.gcs_address,
                            state.cluster_id)
    return [f"node {node.name} was not running (its processes are gone): started it again" for node in stopped]


def default_node_name() -> str:
    name = re.sub(r"[^a-z0-9-]+", "-", socket.gethostname().lower()).strip("-")[:32]
    return name or "node"


def _check_name(name: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]{0,31}", name):
        raise InputError("command line", "--name", name, "lower-case letters, digits and '-', at most 32, starting with a letter or digit")
    return name


def _check_own_address(address: str) -> str:
    import psutil

    mine = sorted({a.address for addrs in psutil.net_if_addrs().values() for a in addrs if a.family == socket.AF_INET})
    if address not in mine:
        raise InputError("command line", "--address", address, f"an IPv4 address of this machine: {', '.join(mine)}")
    return address


def up(name: str, address: str, port: int, dashboard_port: int, offload_dir: str, link_gbit_per_s: float | None,
       measure_rates: bool = True) -> tuple[UpResult, Node | None]:
    """Start the head on this machine and register its own cards, probed through NVML and (`measure_rates`)
    measured by workers/rate_probe.py.

    Idempotent: this same head, up and answering, is reused (no node is returned then).
    The default address is loopback: a one-machine cluster. Giving a LAN address lets other nodes join;
    Ray's token auth is on either way (its gRPC ports listen on every interface regardless).
    """
    from workers.gpu_probe import probe
    from workers.rate_probe import with_measured_rates
    from workers.registration import node_from_probe

    current, notes = _stale_record_check()
    if current and not current.simulated and current.is_head and (current.gcs_address, current.node) == (f"{address}:{port}", name):
        return UpResult(current, True, notes), None  # idempotent: this head is up and answers
    if current:
        raise _already_up(current)
    _refuse_ports_in_use("command line", {"--port": port, "--dashboard-port": dashboard_port})
    found = probe(offload_dir, head_ip=address)
    node = node_from_probe(with_measured_rates(found) if measure_rates else found, _check_name(name), _check_own_address(address), link_gbit_per_s)
    _ensure_token()
    gcs_address = f"{address}:{port}"
    cluster_id = _new_cluster_id()
    _start_nodes([node], None, port, dashboard_port, gcs_address, cluster_id)
    state = ClusterState(gcs_address, f"http://127.0.0.1:{dashboard_port}", None, False, node.name, cluster_id)
    _save_state(state)
    return UpResult(state, False, notes), node


def join(head: str, name: str, token_path: str | None, offload_dir: str, link_gbit_per_s: float | None,
         measure_rates: bool = True) -> tuple[UpResult, Node]:
    """Probe this machine, start Ray here as a worker of `head` (HOST:PORT), and register every card; with
    `measure_rates`, each card's rates and this node's link to the head are measured and registered too."""
    from orchestrator import registry
    from workers.gpu_probe import probe
    from workers.rate_probe import with_measured_rates
    from workers.registration import node_from_probe

    current, notes = _stale_record_check()
    if current:
        raise _already_up(current)
    head_ip, _, port = head.rpartition(":")
    if not head_ip or not port.isdigit():
        raise InputError("command line", "--address", head, "the head's HOST:PORT, e.g. 192.168.1.10:6379 (as `zeromix up` printed it)")
    candidate = _stage_token(token_path)
    found = probe(offload_dir, head_ip=head_ip)
    node = node_from_probe(with_measured_rates(found) if measure_rates else found, _check_name(name), found.host.address, link_gbit_per_s)
    os.environ.update({**auth_env(), "RAY_AUTH_TOKEN_PATH": str(candidate)})  # before this process first imports Ray
    try:
        with socket.create_connection((head_ip, int(port)), timeout=HEAD_CONNECT_TIMEOUT_S):
            pass  # Ray's own client waits about 40 s for a GCS that is not there
        taken = registry.live_node_names(head)
    except Exception as err:  # unreachable head, wrong token: a token that worked before stays
        if candidate != token_file():
            candidate.unlink(missing_ok=True)
        raise ZeromixError(f"cannot reach the zeromix head at {head}: {err}. Is `zeromix up --address` running there, "
                           "and is the token the head's ZEROMIX_HOME/auth_token?") from None
    if candidate != token_file():
        os.replace(candidate, token_file())  # it works: it becomes this box's token
        os.environ.update(auth_env())
    if node.name in taken:
        raise InputError("command line", "--name", node.name, f"a different node already uses this name (taken: {', '.join(sorted(taken))})")
    cluster_id = _new_cluster_id()
    _start_nodes([node], head, 0, 0, head, cluster_id)
    state = ClusterState(head, None, None, False, node.name, cluster_id)
    _save_state(state)
    if measure_rates:
        node = _with_measured_link(state, node)
    return UpResult(state, False, notes), node


def _with_measured_link(state: ClusterState, node: Node) -> Node:
    """Measure this node's link to the head and register it (the planner prefers it to the NIC's speed)."""
    from orchestrator import registry
    from workers.rate_probe import link_gbit_per_s

    connect(state)
    try:
        node = replace(node, link_measured_gbit_per_s=round(link_gbit_per_s(registry.head_node_name()), 3))
    except TimeoutError as err:  # the node is up and registered: keep it, with the NIC's speed and a warning
        node = replace(node, warnings=(*node.warnings, str(err)))
    registry.publish(state.gcs_address, node)
    return node


def reprobe() -> Node:
    """`zeromix probe`: measure this machine's cards again (and, on a joined node, its link to the head) and
    update its registration. A card a job holds keeps its earlier figures: probing it would slow the job and
    measure the job, not the card."""
    from orchestrator import registry
    from workers.rate_probe import UNMEASURED, measure_cards

    state = connect()
    if state.simulated:
        raise ZeromixError("a simulated cluster's cards are declared in cluster.yaml, not real: nothing to measure "
                           "(the planner uses catalog rates for them)")
    node = registry.snapshot().node(state.node)
    measured, warnings = measure_cards(tuple(c.facts for c in node.cards if c.held_by is None))
    held = [c.card_id for c in node.cards if c.held_by]
    warnings += [f"{card} is held by a job: kept its earlier figures ({UNMEASURED} if it had none)" for card in held]
    cards = tuple(replace(c, facts=replace(c.facts, measured=measured.get(c.index, c.facts.measured))) for c in node.cards)
    node = replace(node, cards=cards, warnings=tuple(w for w in node.warnings if not w.endswith(UNMEASURED)) + tuple(warnings))
    registry.publish(state.gcs_address, node)
    return node if state.is_head else _with_measured_link(state, node)


def _stage_token(token_path: str | None) -> Path:
    """The token to join with: a copy of --token-file beside this box's own (mode 0600), which replaces it only once
    the head accepted it; else the one already in ZEROMIX_HOME."""
    if token_path:
        try:
            token = Path(token_path).expanduser().read_text().strip()
        except OSError as err:
            raise InputError("command line", "--token-file", token_path, f"a readable copy of the head's auth_token ({err.strerror})") from None
        candidate = token_file().with_name("auth_token.candidate")
        _write_secret(candidate, token)
        return candidate
    if not token_file().exists():
        raise ZeromixError(f"no auth token at {token_file()}: copy the head's ZEROMIX_HOME/auth_token here (mode 0600), or pass --token-file PATH")
    os.chmod(token_file(), 0o600)
    return token_file()


def down() -> int | None:
    """Stop the Ray processes zeromix started for this machine's cluster, and no other, then forget it.
    Returns how many processes were stopped, or None when no cluster was recorded."""
    try:
        state = load_state()
    except ZeromixError:
        return None
    except (ValueError, TypeError):  # an unreadable record: nothing to identify processes by
        _state_file().unlink(missing_ok=True)
        return 0
    stopped = stop_cluster_processes(state.cluster_id) if state.cluster_id else 0
    _state_file().unlink(missing_ok=True)
    return stopped


def connect(state: ClusterState | None = None) -> ClusterState:
    """Join the cluster as a Ray driver (idempotent). A recorded cluster that does not answer is an error
    that says what to do, not a wait: ray.init would retry a dead GCS for a long time."""
    state = state or load_state()
    os.environ.update(auth_env())  # Ray reads its auth settings when it is first imported
    import ray

    if not ray.is_initialized():
        if not answers(state):
            raise ZeromixError(f"the zeromix cluster recorded in {_state_file()} does not answer at {state.gcs_address} "
                               f"(stopped, or this machine restarted); `zeromix up{' --simulate ' + state.cluster_file if state.cluster_file else ''}` "
                               "starts it again (replacing the stale record), `zeromix down` forgets it")
        ray.init(address=state.gcs_address, namespace=RAY_NAMESPACE, log_to_driver=False, logging_level="WARNING")
    return state
