"""cluster.yaml: the shipped homelab loads, and a bad file names the key that is wrong."""

import pytest
import yaml

from orchestrator.cluster_config import load_cluster
from orchestrator.errors import InputError
from orchestrator.inventory import snapshot_from_config
from tests.conftest import REPO


def test_shipped_homelab():
    snapshot = snapshot_from_config(load_cluster(REPO / "cluster.yaml"))
    cards = {c.card_id: (c.short_name, c.vram_mib, c.compute_capability) for c in snapshot.cards}
    assert cards == {
        "attic/0": ("GeForce GTX 1080 Ti", 11264, (6, 1)),
        "attic/1": ("GeForce RTX 2080 Ti", 11264, (7, 5)),
        "desk/0": ("GeForce RTX 3090", 24576, (8, 6)),
        "desk/1": ("GeForce RTX 4090", 24576, (8, 9)),
        "closet/0": ("GeForce RTX 3060 12GB", 12288, (8, 6)),
    }
    assert {n.name: n.link_gbit_per_s for n in snapshot.nodes} == {"attic": 1.0, "desk": 1.0, "closet": 1.0}


def base() -> dict:
    return {
        "head": {"address": "10.0.0.1"},
        "nodes": [
            {"name": "a", "address": "10.0.0.1", "ram_gb": 32, "gpus": [{"model": "NVIDIA GeForce RTX 3090"}]},
            {"name": "b", "address": "10.0.0.2", "ram_gb": 16, "gpus": [{"model": "GeForce GTX 1080 Ti", "count": 2}]},
        ],
    }


def error_for(tmp_path, data) -> str:
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(InputError) as err:
        load_cluster(path)
    return str(err.value).replace(str(path), "cluster.yaml")


def with_(change) -> dict:
    data = base()
    change(data)
    return data


@pytest.mark.parametrize("change, expected", [
    (lambda d: d.pop("head"), "cluster.yaml: head is missing; it is required"),
    (lambda d: d["head"].update(address="10.0.0.9"),
     "cluster.yaml: head.address='10.0.0.9' is not allowed; it must be the address of one of the nodes: 10.0.0.1, 10.0.0.2"),
    (lambda d: d["nodes"][1].update(address="10.0.0.300"),
     "cluster.yaml: nodes[1].address='10.0.0.300' is not allowed; '10.0.0.300' does not appear to be an IPv4 or IPv6 address"),
    (lambda d: d["nodes"][0]["gpus"][0].update(model="RTX 3090 Super"),
     "cluster.yaml: nodes[0].gpus[0].model='RTX 3090 Super' is not allowed; not a card in the catalog; did you mean 'GeForce RTX 3090 Ti', 'GeForce RTX 3090'?"),
    (lambda d: d["nodes"][0]["gpus"][0].update(model="NVIDIA GeForce RTX 3080"),
     "cluster.yaml: nodes[0].gpus[0].model='NVIDIA GeForce RTX 3080' is not allowed; several cards share this name; add vram_gb (one of 10, 12) to say which"),
    (lambda d: d["nodes"][1]["gpus"][0].update(count=0),
     "cluster.yaml: nodes[1].gpus[0].count=0 is not allowed; input should be greater than or equal to 1"),
    (lambda d: d["nodes"][1].update(name="a"),
     "cluster.yaml: nodes[1].name='a' is not allowed; node names must be unique; nodes[0] is already 'a'"),
    (lambda d: d.update(network={"link": "1Gb"}),
     "cluster.yaml: network.link='1Gb' is not allowed; input should be '1GbE', '2.5GbE', '5GbE', '10GbE', '25GbE', '40GbE' or '100GbE'"),
    (lambda d: d["nodes"][0].update(ram=32),
     "cluster.yaml: nodes[0].ram=32 is not allowed; unknown key; allowed keys here: address, cpus, gpus, link, name, nic, ram_gb"),
    (lambda d: d["nodes"].clear(), "cluster.yaml: nodes=[] is not allowed; list should have at least 1 item after validation, not 0"),
])
def test_bad_cluster_yaml_names_the_key(tmp_path, change, expected):
    assert error_for(tmp_path, with_(change)) == expected


def test_same_name_variant_resolved_by_vram(tmp_path):
    data = with_(lambda d: d["nodes"][0]["gpus"][0].update(model="NVIDIA GeForce RTX 3080", vram_gb=10))
    path = tmp_path / "cluster.yaml"
    path.write_text(yaml.safe_dump(data))
    card = snapshot_from_config(load_cluster(path)).cards[0]
    assert (card.short_name, card.vram_mib) == ("GeForce RTX 3080 10GB", 10240)
