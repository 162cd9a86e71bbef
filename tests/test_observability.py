"""A running job as Prometheus sees it: every rank's series on its node's metrics export port, labelled by
job, rank, node and card; the scheduler's cluster series; and the scrape config and Grafana dashboard that
`zeromix monitoring` writes, checked against what is really exported."""

import json
import re
import time
import urllib.request

import pytest
import yaml

from tests.conftest import queue_store, running, zeromix
from workers.telemetry import RANK_METRICS, RANK_TAGS

pytestmark = pytest.mark.cluster
METRICS_DEADLINE_S = 90  # Ray exports every 10 s; a rank needs its first steps done


def scrape(targets: list[str]) -> list:
    """Every sample of every target, parsed by Prometheus's own client."""
    from prometheus_client.parser import text_string_to_metric_families

    samples = []
    for target in targets:
        text = urllib.request.urlopen(f"http://{target}/metrics", timeout=10).read().decode()
        samples += [s for family in text_string_to_metric_families(text) for s in family.samples if s.name.startswith("ray_zeromix_")]
    return samples


def test_a_running_jobs_ranks_and_the_cluster_are_exported_with_card_labels(connected, long_job, tmp_path):
    """The session's long job (tests/conftest.py), while it runs."""
    job_id = running(long_job)
    plan = queue_store().get(job_id).plan
    zeromix("monitoring", "--out", str(tmp_path / "monitoring"))
    config = yaml.safe_load((tmp_path / "monitoring" / "prometheus.yml").read_text())
    discovery = config["scrape_configs"][0]["file_sd_configs"][0]["files"][0]
    targets = json.loads(open(discovery).read())[0]["targets"]

    wanted = {(f"ray_{name}", str(rank)) for name in RANK_METRICS for rank in range(len(plan["ranks"]))}
    deadline = time.monotonic() + METRICS_DEADLINE_S
    while True:
        samples = scrape(targets)
        mine = [s for s in samples if s.labels.get("job_id") == job_id]
        if wanted <= {(s.name, s.labels["rank"]) for s in mine} or time.monotonic() > deadline:
            break
        time.sleep(2)
    assert wanted <= {(s.name, s.labels["rank"]) for s in mine}, f"missing: {wanted - {(s.name, s.labels['rank']) for s in mine}}"
    for s in mine:  # labels say which card: the plan's card, node and model for the rank
        card = plan["ranks"][int(s.labels["rank"])]
        assert (s.labels["card"], s.labels["node"], s.labels["model"]) == (card["card"], card["node"], card["model"])
        assert set(RANK_TAGS) <= set(s.labels)
    by_name = {(s.name, s.labels["rank"]): s.value for s in mine}
    for rank in range(len(plan["ranks"])):
        assert by_name[("ray_zeromix_step", str(rank))] >= 1 and by_name[("ray_zeromix_step_time_s", str(rank))] > 0
        assert by_name[("ray_zeromix_memory_bytes", str(rank))] > 10 * 2**20  # a process's RSS on CPU
        assert by_name[("ray_zeromix_predicted_step_time_s", str(rank))] == pytest.approx(plan["est_step_s"])
    cluster = {(s.name, s.labels.get("state")): s.value for s in samples if s.name in ("ray_zeromix_cards", "ray_zeromix_jobs")}
    assert cluster[("ray_zeromix_cards", "held")] == len(plan["ranks"]) and cluster[("ray_zeromix_cards", "free")] == 5 - len(plan["ranks"])
    assert cluster[("ray_zeromix_jobs", "running")] == 1

    # every series the Grafana dashboard queries is one that is exported
    dashboard = json.loads((tmp_path / "monitoring" / "grafana-dashboard.json").read_text())
    queried = {name for panel in dashboard["panels"] for t in panel.get("targets", []) for name in re.findall(r"\bray_zeromix_[a-z_]+", t["expr"])}
    assert queried and queried <= {s.name for s in samples}
    assert any(p.get("repeat") == "card" for p in dashboard["panels"])  # one row per card
