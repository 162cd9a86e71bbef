"""Prometheus and Grafana for a running cluster: a scrape config that follows Ray's own list of metrics
endpoints, and zeromix's Grafana dashboard (one row per card).

Ray's head keeps a Prometheus file-discovery list of every node's metrics export port up to date as nodes
join and leave (`prom_metrics_service_discovery.json` in its session dir); the scrape config points at it.
`ray metrics launch-prometheus` would read a config under /tmp/ray, which a zeromix cluster (with a temp dir
of its own) does not use, so zeromix writes the config and says how to start Prometheus with it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import yaml

from orchestrator.cluster_runtime import ClusterState
from orchestrator.errors import ZeromixError

DASHBOARD = Path(__file__).parent / "data" / "grafana-dashboard.json"
DISCOVERY_FILE = "prom_metrics_service_discovery.json"  # ray._private.ray_constants.PROMETHEUS_SERVICE_DISCOVERY_FILE
SCRAPE_INTERVAL_S = 10  # Ray exports every 10 s


def discovery_file(state: ClusterState) -> Path:
    """The head's list of metrics endpoints, through `session_latest` so that it survives a Ray restart."""
    found = sorted(Path(state.temp_dir).glob(f"*/session_latest/{DISCOVERY_FILE}"))
    if not found:
        raise ZeromixError(f"no {DISCOVERY_FILE} under {state.temp_dir}: the head writes it once its dashboard runs; "
                           "run this on the head of a cluster that is up (`zeromix status`)")
    return found[0]


def prometheus_config(discovery: Path) -> dict:
    return {"global": {"scrape_interval": f"{SCRAPE_INTERVAL_S}s", "evaluation_interval": f"{SCRAPE_INTERVAL_S}s"},
            "scrape_configs": [{"job_name": "zeromix", "file_sd_configs": [{"files": [str(discovery)]}]}]}


def write(state: ClusterState, out: Path) -> dict[str, Path]:
    """prometheus.yml and the Grafana dashboard in `out`; what was written, by name."""
    out.mkdir(parents=True, exist_ok=True)
    written = {"prometheus": out / "prometheus.yml", "dashboard": out / "grafana-dashboard.json"}
    written["prometheus"].write_text(yaml.safe_dump(prometheus_config(discovery_file(state)), sort_keys=False))
    shutil.copyfile(DASHBOARD, written["dashboard"])
    return written

