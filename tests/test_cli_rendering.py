"""What the terminal shows: tables readable at 80 columns (fewer columns, long text on its own lines, no
cell cut to '…'), and the wide layout with every figure where there is room."""

from tests.conftest import cli

SCRATCH = "jobs/examples/tiny-llama-scratch.yaml"


def plan_output(columns: int, demo_data) -> str:
    return cli("plan", SCRATCH, "--pool", "cluster.yaml", "--set", f"dataset.path={demo_data['pretrain']}", columns=columns).stdout


def test_a_plan_reads_at_80_columns(demo_data):
    out = plan_output(80, demo_data)
    assert max(len(line) for line in out.splitlines()) <= 80
    assert "…" not in out  # no cell cut short
    table_rows = [line.split() for line in out.splitlines() if line.strip().startswith(("0 ", "1 "))]
    assert [row[1:4] for row in table_rows] == [["desk/0", "RTX", "3090"], ["attic/0", "GTX", "1080"]]  # whole cells, one line each
    prose = " ".join(out.split())  # reasons are sentences: they may wrap like one
    assert "GiB / CARD" in prose and "left out: attic/1 RTX 2080 Ti: not in gpus.models" in prose
    assert "desk/1 RTX 4090: not in gpus.models (NVIDIA GeForce GTX 1080 Ti, NVIDIA GeForce RTX 3090)" in prose


def test_a_wide_terminal_gets_the_memory_breakdown(demo_data):
    out = plan_output(200, demo_data)
    assert max(len(line) for line in out.splitlines()) <= 200 and "…" not in out
    for header in ("CKPT", "WEIGHTS", "GRADS", "OPTIMIZER", "GATHERED", "ACTIVATIONS", "BUCKETS+CTX", "TOTAL / FREE", "TFLOPS",
                   "COMPUTE", "WAIT", "COMM", "OFFLOAD", "LEFT OUT"):
        assert header in out


def test_a_mistyped_command_line_gets_one_usage_error_and_no_traceback():
    """Under the copy of click that newer typers carry (0.29 here), a usage error is not click's own class, and an
    unknown option or a missing value printed a 60-line traceback."""
    for args, said in ((("plan", SCRATCH, "--cluster", "cluster.yaml"), "No such option: --cluster"),
                       (("up", "--simulate"), "Option '--simulate' requires an argument")):
        done = cli(*args, check=False)
        assert done.returncode == 2, done
        assert said in done.stderr and "Traceback" not in done.stderr + done.stdout, done.stderr


def test_plan_with_no_cluster_here_says_how_to_plan_without_one(demo_data, tmp_path, monkeypatch):
    """`zeromix plan JOB` asks the live cluster; on a machine in none (a laptop, before `up`) the one-line error
    says how to plan without one, and that command works."""
    monkeypatch.setenv("ZEROMIX_HOME", str(tmp_path / "no-cluster-here"))
    data = f"dataset.path={demo_data['pretrain']}"
    refused = cli("plan", SCRATCH, "--set", data, check=False)
    assert refused.returncode == 2 and len(refused.stderr.strip().splitlines()) == 1, refused.stderr
    assert refused.stderr.strip().endswith(f"; or plan against a file of cards, with no cluster: `zeromix plan {SCRATCH} --pool cluster.yaml`")
    assert "this machine is in no zeromix cluster" in refused.stderr
    assert "Plan for tiny-llama-scratch" in cli("plan", SCRATCH, "--pool", "cluster.yaml", "--set", data).stdout
