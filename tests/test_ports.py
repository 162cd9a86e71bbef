"""The ports zeromix listens on (Ray's agents, the ranks' rendezvous), chosen where no outgoing connection takes them."""

import socket

import pytest

from workers import ports


def test_ports_are_chosen_free_distinct_and_below_the_range_outgoing_connections_use():
    """bind(0) hands out a port from ip_local_port_range, where any process's outgoing connection may take it between
    the choice and the listen: a rank's rendezvous once failed so (EADDRINUSE) beside a Ray cluster."""
    start = ports._ephemeral_start()
    assert start == int(ports.EPHEMERAL_RANGE.read_text().split()[0])
    chosen = ports.free_ports(8, "127.0.0.1")
    assert len(set(chosen)) == 8 and all(ports.LOWEST <= port < start for port in chosen)
    listening = [socket.socket() for _ in chosen]
    try:
        for s, port in zip(listening, chosen):
            s.bind(("127.0.0.1", port))
            s.listen()
        # every one taken now: what is chosen next is none of them
        assert not set(ports.free_ports(8, "127.0.0.1")) & set(chosen)
    finally:
        for s in listening:
            s.close()


def test_where_the_range_leaves_no_room_below_it_the_kernel_chooses(tmp_path, monkeypatch):
    """A machine whose ip_local_port_range starts below LOWEST (a tuned box) still gets free ports."""
    kernel = tmp_path / "ip_local_port_range"
    kernel.write_text("1024\t65535\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", kernel)
    chosen = ports.free_ports(3, "127.0.0.1")
    assert len(set(chosen)) == 3
    for port in chosen:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))


def test_a_rendezvous_port_stays_bound_from_its_choice_until_its_host_listens_on_it():
    """A box's leader chooses its group's rendezvous port (RankWorker.rendezvous) and listens on it only once the rank
    runs, seconds later: another process's bind in between failed a job in CI (EADDRINUSE, 2026-12-06). The port
    stays bound from its choice, and the store listens on that very socket."""
    from workers.collectives import rendezvous_store
    from workers.rank import RankWorker

    leader = RankWorker({"card": "desk/0"})
    _, port = leader.rendezvous()
    with socket.socket() as other, pytest.raises(OSError):
        other.bind(("127.0.0.1", port))
    store = rendezvous_store("127.0.0.1", port, 2, 10, host=True, hosted=leader.hosting[port])
    assert leader.hosting[port].fileno() == -1  # the store owns the socket now: Python will not close it under it
    peer = rendezvous_store("127.0.0.1", port, 2, 10, host=False)
    peer.set("joined/1", "yes")
    assert store.get("joined/1") == b"yes"


def test_nodes_started_together_get_distinct_agent_ports_and_none_promised_to_the_head(tmp_path, monkeypatch):
    """`zeromix up` starts a homelab's nodes side by side, and no agent listens before its node's `ray start`: the ports
    of every node are chosen in one go, none twice, and none of the head's GCS and dashboard ports (the user's, or
    the tests' free ones, not listened on yet either). A range of 12 ports holds exactly two nodes' agents and those two."""
    from workers.registration import AGENT_PORTS, agent_ports

    kernel = tmp_path / "ip_local_port_range"
    kernel.write_text(f"{ports.LOWEST + 2 * AGENT_PORTS + 2}\t65535\n")
    monkeypatch.setattr(ports, "EPHEMERAL_RANGE", kernel)
    head = (ports.LOWEST + 3, ports.LOWEST + 7)
    chosen = agent_ports(2, avoid=head)
    every = [port for node in chosen for port in node]
    assert [len(node) for node in chosen] == [AGENT_PORTS, AGENT_PORTS]
    assert len(set(every)) == 2 * AGENT_PORTS and not set(every) & set(head)


def test_a_rendezvous_socket_takes_ipv6_and_ipv4_peers_and_is_ipv4_where_the_machine_has_no_ipv6(monkeypatch):
    """torch's store, binding its own port, listens for IPv6 and IPv4 peers alike; the socket bound for it does the
    same, and falls back to IPv4 where the kernel refuses IPv6 (a container with IPv6 switched off)."""
    with ports.bound_socket() as both:
        if socket.has_ipv6:  # (this machine: a dual-stack socket, which an IPv4 bind of its port conflicts with)
            assert both.family == socket.AF_INET6 and both.getsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY) == 0
        with socket.socket() as other, pytest.raises(OSError):
            other.bind(("127.0.0.1", both.getsockname()[1]))
    real = socket.socket

    def without_ipv6(family=socket.AF_INET, *args, **kwargs):
        if family == socket.AF_INET6:
            raise OSError(97, "Address family not supported by protocol")
        return real(family, *args, **kwargs)

    monkeypatch.setattr(socket, "socket", without_ipv6)
    with ports.bound_socket() as ipv4:
        assert ipv4.family == socket.AF_INET and ipv4.getsockname()[0] == "0.0.0.0"


def test_up_on_a_port_another_program_listens_on_is_refused_at_once_naming_it(tmp_path, monkeypatch):
    """The head's GCS and dashboard ports, from cluster.yaml or `--port`/`--dashboard-port`: one another program
    listens on (another Ray cluster on the machine) made `ray start` fail some 40 s later with "Failed to start GCS"
    and no word of the port. Refused before anything starts or is written: no token, no cluster record. A port a
    stopped server left in TIME_WAIT is free (what a restarted head binds again)."""
    from tests.conftest import cli
    from tests.helpers import cluster_file

    home = tmp_path / "home"
    monkeypatch.setenv("ZEROMIX_HOME", str(home))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = cluster_file(tmp_path, dashboard_port=port)
        refused = cli("up", "--simulate", str(config), check=False)
        assert refused.returncode == 2 and refused.stderr.strip().splitlines() == [
            f"zeromix: error: {config}: head.dashboard_port={port} is not allowed; another program on this machine listens on it "
            "(another Ray cluster?); choose a free port"], refused.stderr
        refused = cli("up", "--port", str(port), "--dashboard-port", str(ports.free_port()), "--skip-rate-probe", check=False)
        assert refused.returncode == 2 and f"--port={port} is not allowed; another program" in refused.stderr, refused.stderr
    assert not home.exists() or not any(home.iterdir()), sorted(home.iterdir())

    with socket.socket() as server:  # a server that had a connection and stopped: its port sits in TIME_WAIT
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        client = socket.create_connection(("127.0.0.1", port))
        accepted, _ = server.accept()
        accepted.close()  # (the server's side closes first: its end of the connection waits in TIME_WAIT)
        client.close()
    assert not ports.listened_on(port)
