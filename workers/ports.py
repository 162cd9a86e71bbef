"""Free TCP ports for what zeromix starts: Ray's agents on each node, and the ranks' rendezvous.

A port is chosen, closed, and listened on a moment later by another process. The usual way to choose one, bind
to port 0, takes it from the kernel's range for outgoing connections (ip_local_port_range), and in that moment
any process's outgoing connection may take it: seen once as EADDRINUSE on a rank's rendezvous, with a Ray
cluster beside it opening connections, and the job failed. Ports below that range are given to no outgoing
connection, so only another explicit bind can take one; and above Ray's worker ports (10002-19999 by default).

Another explicit bind still can: a rank's rendezvous once failed so in CI (EADDRINUSE, 2026-12-06, a port chosen by
the rank's leader and listened on seconds later, after the rank had started). A rendezvous zeromix hosts is therefore
handed the socket itself (`bound_socket`), bound from the moment its port is chosen; only Ray's agents, which bind
their ports in processes of Ray's, are given bare port numbers.
"""

from __future__ import annotations

import random
import socket
from collections.abc import Collection
from pathlib import Path

LOWEST = 20000  # above Ray's default worker ports (--min-worker-port 10002 .. --max-worker-port 19999)
EPHEMERAL_RANGE = Path("/proc/sys/net/ipv4/ip_local_port_range")
TRIES = 200  # random ports tried before the kernel chooses
LINUX_EPHEMERAL_START = 32768  # the kernel's default, where the file cannot be read (macOS starts at 49152)


def free_ports(n: int, host: str = "", avoid: Collection[int] = ()) -> list[int]:
    """n distinct ports free on `host` now, below the kernel's range for outgoing connections (all held open
    together while chosen, so none repeats), and none of `avoid` (ports promised elsewhere, not yet listened on).
    Falls back to the kernel's choice where that range leaves no room."""
    sockets = _bound(n, host, avoid)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def free_port(host: str = "") -> int:
    return free_ports(1, host)[0]


def listened_on(port: int) -> bool:
    """Whether a process on this machine listens on `port` (on any interface), so a server cannot bind it there.
    SO_REUSEADDR: a port left only in TIME_WAIT by a server that stopped is free to bind again, as Ray's does."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("", port))
        except OSError:
            return True
    return False


def bound_socket(host: str = "") -> socket.socket:
    """A socket bound to a port chosen as `free_ports` does, and kept bound: no other process can take the port
    before the owner listens on it (workers/collectives.py hands it to the rendezvous store). On every interface
    (no `host`) it takes IPv6 and IPv4 peers alike, as torch's store listens when it binds its own port; IPv4 only
    where the machine has no IPv6."""
    if not host and socket.has_ipv6:
        try:
            return _bound(1, "::", (), socket.AF_INET6)[0]
        except OSError:  # (IPv6 switched off here)
            pass
    return _bound(1, host, ())[0]


def _bound(n: int, host: str, avoid: Collection[int], family: socket.AddressFamily = socket.AF_INET) -> list[socket.socket]:
    below = range(LOWEST, _ephemeral_start())
    sockets: list[socket.socket] = []
    try:
        for port in (random.choice(below) for _ in range(TRIES)) if below else ():
            if len(sockets) == n:
                break
            if port in avoid:
                continue
            s = _socket(family)
            try:
                s.bind((host, port))  # (fails for one in use, ours included)
                sockets.append(s)
            except OSError:
                s.close()
        while len(sockets) < n:
            s = _socket(family)
            s.bind((host, 0))
            if s.getsockname()[1] in avoid:
                s.close()
            else:
                sockets.append(s)
        return sockets
    except BaseException:
        for s in sockets:
            s.close()
        raise


def _socket(family: socket.AddressFamily) -> socket.socket:
    s = socket.socket(family)
    if family == socket.AF_INET6:
        s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)  # (IPv4 peers too, and IPv4 holders of the port conflict)
    return s


def _ephemeral_start() -> int:
    try:
        return int(EPHEMERAL_RANGE.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return LINUX_EPHEMERAL_START
