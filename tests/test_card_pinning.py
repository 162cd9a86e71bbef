"""Two jobs on one mixed node each get their own card, and each worker runs on the card it was promised; a worker
that dies before it answers fails its placement as lost.

A two-node simulated cluster (a CPU-only head, and "attic" with a GTX 1080 Ti at index 0 and an RTX 3090 at
index 1) runs with the NVML double answering as that box, so a worker can report what NVML shows at the
device index zeromix made visible to it.
"""

import json

import pytest
import yaml

from tests.conftest import free_port, nvml_box_env, submitted_id, wait_for_state, zeromix

pytestmark = pytest.mark.cluster


def test_two_jobs_get_the_two_cards_of_one_mixed_node(tmp_path, demo_data, isolated_home):
    cluster = {
        "head": {"address": "10.0.0.1", "port": free_port(), "dashboard_port": free_port()},
        "nodes": [{"name": "head", "address": "10.0.0.1", "ram_gb": 8, "cpus": 1},
                  {"name": "attic", "address": "10.0.0.2", "ram_gb": 32, "cpus": 4,
                   "gpus": [{"model": "NVIDIA GeForce GTX 1080 Ti"}, {"model": "NVIDIA GeForce RTX 3090"}]}],
    }
    (tmp_path / "cluster.yaml").write_text(yaml.safe_dump(cluster))
    env = nvml_box_env("attic_1080ti_3090")
    zeromix("up", "--simulate", str(tmp_path / "cluster.yaml"), env=env, timeout=180)
    try:
        common = ["--set", f"dataset.path={demo_data['pretrain']}", "--set", "max_steps=3", "--set", "gpus.count=1", "--set", "report_to=[]"]
        first = submitted_id(zeromix("submit", "jobs/examples/tiny-llama-scratch.yaml", *common, "--set", f"output_dir={tmp_path / 'a'}",
                                     "--set", "gpus.models=[RTX 3090]", env=env).stdout)
        second = submitted_id(zeromix("submit", "jobs/examples/tiny-llama-scratch.yaml", *common, "--set", f"output_dir={tmp_path / 'b'}",
                                      "--set", "gpus.models=[GTX 1080 Ti]", env=env).stdout)
        assert (wait_for_state(first, ("succeeded", "failed")), wait_for_state(second, ("succeeded", "failed"))) == ("succeeded", "succeeded")
        (a,), (b,) = (json.loads((tmp_path / d / "zeromix-result.json").read_text())["ranks"] for d in ("a", "b"))
        assert (a["card"], a["cuda_visible_devices"], a["nvml_name"], a["pci_bus_id"]) == (
            "attic/1", "1", "NVIDIA GeForce RTX 3090", "00000000:02:00.0")
        assert (b["card"], b["cuda_visible_devices"], b["nvml_name"], b["pci_bus_id"]) == (
            "attic/0", "0", "NVIDIA GeForce GTX 1080 Ti", "00000000:01:00.0")
        assert (a["precision"], b["precision"]) == ("bf16", "fp32")  # each card's own tuning
        _a_rank_that_dies_before_it_answers_is_lost(tmp_path)
    finally:
        zeromix("down", env=env)


def _a_rank_that_dies_before_it_answers_is_lost(tmp_path):
    """(On the same cluster, now idle.) A rank's actor that dies before it says where it runs, as when its node is
    unplugged while the job starts, fails the placement as lost, which the scheduler places again from the job's
    last checkpoint; Ray's bare RayActorError would read as a bug and fail the job for good. Its group is stopped."""
    import ray
    from ray.util.placement_group import remove_placement_group

    from orchestrator import cluster_runtime, registry
    from orchestrator.launch import reserve
    from orchestrator.model_facts import facts_from_config, read_config
    from orchestrator.planner import make_plan
    from orchestrator.worker_group import RankFailed, WorkerGroup
    from tests.conftest import TINY_LLAMA
    from tests.helpers import spec

    cluster_runtime.connect()
    plan = make_plan(spec(name="dies-first", gpus={"count": 1, "models": ["RTX 3090"]}, output_dir=str(tmp_path / "c")),
                     facts_from_config(read_config(str(TINY_LLAMA))), registry.snapshot(), 10)
    promised = plan.summary()["ranks"][0]
    group = reserve("dies-first", plan)
    workers = WorkerGroup(group, [promised], "dies-first")
    try:
        ray.kill(workers.actors[0])
        with pytest.raises(RankFailed) as failed:
            workers.where()
        assert (failed.value.kind, failed.value.rank, promised["card"]) == ("lost", 0, "attic/1"), failed.value
        assert str(failed.value).startswith("rank 0 on attic/1 failed: ") and workers.actors == []
    finally:
        workers.shutdown()
        remove_placement_group(group)
