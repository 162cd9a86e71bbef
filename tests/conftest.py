import os
from pathlib import Path

import pytest

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[1]
TINY_LLAMA = REPO / "jobs" / "examples" / "tiny-llama"


@pytest.fixture(scope="session")
def demo_data(tmp_path_factory) -> dict[str, Path]:
    from orchestrator.demo.task import write_demo_data

    return write_demo_data(tmp_path_factory.mktemp("demo-data"), pretrain_lines=1200, reverse_train=800, reverse_eval=50)
