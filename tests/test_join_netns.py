"""`zeromix join` over a real network stack: two network namespaces joined by a veth pair stand in for
two homelab hosts. The head runs `zeromix up --address` in one, a node runs `zeromix join` in the other,
and the NVML double gives each "host" its own cards."""

import json
import secrets
import subprocess

import pytest

from tests.conftest import free_port, nvml_box_env, zeromix

pytestmark = pytest.mark.cluster

SUBNET = "10.231.7"
HEAD_IP, NODE_IP = f"{SUBNET}.1", f"{SUBNET}.2"


def _ip(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["ip", *args], capture_output=True, text=True)


@pytest.fixture
def two_hosts():
    """Two namespaces, `head` and `node`, with HEAD_IP and NODE_IP on a veth pair between them."""
    tag = secrets.token_hex(3)
    head, node, veth = f"zm-head-{tag}", f"zm-node-{tag}", f"zmv{tag}"
    made = _ip("netns", "add", head)
    if made.returncode != 0:
        pytest.skip(f"cannot create network namespaces here (`ip netns add` said: {made.stderr.strip() or made.returncode}); "
                    "this test needs root or CAP_NET_ADMIN and iproute2")
    try:
        steps = [("netns", "add", node), ("link", "add", f"{veth}a", "type", "veth", "peer", "name", f"{veth}b"),
                 ("link", "set", f"{veth}a", "netns", head), ("link", "set", f"{veth}b", "netns", node)]
        for ns, end, ip in ((head, f"{veth}a", HEAD_IP), (node, f"{veth}b", NODE_IP)):
            steps += [("-n", ns, "addr", "add", f"{ip}/24", "dev", end), ("-n", ns, "link", "set", end, "up"),
                      ("-n", ns, "link", "set", "lo", "up")]
        for step in steps:
            done = _ip(*step)
            assert done.returncode == 0, f"ip {' '.join(step)}: {done.stderr}"
        yield head, node
    finally:
        for ns in (head, node):
            _ip("netns", "del", ns)


@pytest.fixture
def homes(tmp_path):
    """The two hosts' ZEROMIX_HOMEs; each host's `zeromix down` stops only what zeromix started there."""
    yield tmp_path / "head-home", tmp_path / "node-home"
    for home in (tmp_path / "node-home", tmp_path / "head-home"):
        zeromix("down", env={"ZEROMIX_HOME": str(home)}, check=False)


def test_the_head_sees_the_cards_of_a_node_that_joined_over_the_network(two_hosts, homes, tmp_path):
    head_ns, node_ns = two_hosts
    port, dashboard = free_port(), free_port()
    in_head = ("ip", "netns", "exec", head_ns)
    in_node = ("ip", "netns", "exec", node_ns)
    head_env = {**nvml_box_env("attic_1080ti_3090"), "ZEROMIX_HOME": str(tmp_path / "head-home")}
    node_env = {**nvml_box_env("desk_3090_4090"), "ZEROMIX_HOME": str(tmp_path / "node-home")}

    up = zeromix("up", "--address", HEAD_IP, "--name", "attic", "--port", str(port), "--dashboard-port", str(dashboard),
                 prefix=in_head, env=head_env, timeout=180)
    assert f"zeromix join --address {HEAD_IP}:{port}" in up.stdout
    token = tmp_path / "head-home" / "auth_token"
    assert oct(token.stat().st_mode & 0o777) == "0o600"

    # A wrong token is refused before anything starts on the node.
    (tmp_path / "wrong").write_text("0" * 64)
    refused = zeromix("join", "--address", f"{HEAD_IP}:{port}", "--name", "desk", "--token-file", str(tmp_path / "wrong"),
                      prefix=in_node, env=node_env, check=False, timeout=120)
    assert refused.returncode == 2 and f"cannot reach the zeromix head at {HEAD_IP}:{port}" in refused.stderr
    assert not (tmp_path / "node-home" / "cluster.json").exists()

    joined = zeromix("join", "--address", f"{HEAD_IP}:{port}", "--name", "desk", "--token-file", str(token),
                     prefix=in_node, env=node_env, timeout=180)
    assert "node desk (10.231.7.2) registered 2 card(s)" in joined.stdout

    listing = json.loads(zeromix("nodes", "--json", prefix=in_head, env=head_env, timeout=120).stdout)
    cards = {r["card"]: r for r in listing["cards"]}
    assert {k: v["nvml_name"] for k, v in cards.items()} == {
        "attic/0": "NVIDIA GeForce GTX 1080 Ti", "attic/1": "NVIDIA GeForce RTX 3090",
        "desk/0": "NVIDIA GeForce RTX 3090", "desk/1": "NVIDIA GeForce RTX 4090"}
    assert cards["desk/1"]["uuid"] == "GPU-9e8d7c6b-5a49-4837-a261-504f3e2d1c0b"
    assert cards["desk/1"]["free_gib"] == round(24080 / 1024, 1)  # asked of the desk node's NVML, across the veth
    nodes = {n["name"]: n for n in listing["nodes"]}
    assert (nodes["attic"]["address"], nodes["desk"]["address"]) == (HEAD_IP, NODE_IP)
    assert nodes["desk"]["software"]["driver_version"] == "570.133.07" and not nodes["desk"]["simulated"]
    # This machine's torch is a CPU build: every real card is registered but marked unusable, with the fix.
    assert all(not r["usable"] and "CPU-only build" in r["why_not"] for r in cards.values())
    assert "cu126" in cards["attic/0"]["why_not"]  # the 1080 Ti needs the last build with Pascal
    # The link to the head was measured across the veth at join; the cards could not be (no CUDA torch here).
    assert nodes["desk"]["link_measured_gbit_per_s"] > 0.1 and nodes["attic"]["link_measured_gbit_per_s"] is None
    assert {r["rates"] for r in cards.values()} == {"catalog"}
    reprobed = zeromix("probe", prefix=in_node, env=node_env, timeout=120)
    assert "link to the head:" in reprobed.stdout and "Gbit/s (measured)" in reprobed.stdout
    assert reprobed.stdout.count("cannot use the cards") == 1  # the old warning replaced, not repeated
