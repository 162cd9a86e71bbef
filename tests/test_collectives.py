"""NCCL's rule, checked on a CPU machine: every tensor a collective sees lives on the rank's card.

gloo accepts CPU tensors, so no CPU training run can show a collective on the wrong device; the first step on
a real card does ("No backend type associated with device type cpu"). So the rule is held where a CPU
machine can hold it: in the source (every collective goes through workers/collectives.py, which refuses a
tensor off its device; every tensor made in workers/ says where it lives) and at that one door, with a device
the test chooses. Both source checks failed on the loop as it was (it all-reduced CPU tensors made with
`torch.tensor(...)` through `torch.distributed` directly).
"""

import ast
from pathlib import Path

import pytest
import torch

from workers.collectives import CollectiveOffDevice, RankComm

REPO = Path(__file__).resolve().parents[1]
THE_DOOR = REPO / "workers" / "collectives.py"
DISTRIBUTED = ("torch.distributed", "deepspeed.comm")
# torch functions that make a tensor from nothing: without device= it lands on the CPU (or wherever the default is)
FACTORIES = {"tensor", "as_tensor", "zeros", "ones", "empty", "full", "arange", "rand", "randn", "randint", "linspace", "eye"}


def product_modules():
    return sorted(p for top in ("workers", "orchestrator") for p in (REPO / top).rglob("*.py"))


def dotted(node: ast.AST) -> str:
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if isinstance(node, ast.Name):
        parts.append(node.id)
    return ".".join(reversed(parts))


def distributed_uses(path: Path, root: Path = REPO) -> list[str]:
    """Where a module reaches torch.distributed or deepspeed.comm (an import, or an attribute path through
    torch, deepspeed or an alias of either module), or starts a process group itself."""
    tree = ast.parse(path.read_text(), str(path))
    aliases = {a.asname: a.name for node in ast.walk(tree) if isinstance(node, ast.Import) for a in node.names if a.asname}
    found = []
    for node in ast.walk(tree):
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Attribute) and not isinstance(node.ctx, ast.Store):
            head, _, rest = dotted(node).partition(".")
            names = [f"{aliases.get(head, head)}.{rest}"]
        if any(n == d or n.startswith(d + ".") for n in names for d in DISTRIBUTED) or "deepspeed.init_distributed" in names:
            found.append(f"{path.relative_to(root)}:{node.lineno}")
    return sorted(set(found), key=lambda w: int(w.rsplit(":", 1)[1]))


def test_only_the_collectives_module_talks_to_the_process_group():
    offences = [where for path in product_modules() if path != THE_DOOR for where in distributed_uses(path)]
    assert not offences, ("these reach torch.distributed / deepspeed.comm directly; go through workers/collectives.RankComm, "
                          f"which keeps every collective's tensor on the rank's device: {offences}")
    assert distributed_uses(THE_DOOR), "the check must see the one module that does use the process group"


def tensors_made_without_a_device(path: Path, root: Path = REPO) -> list[str]:
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in FACTORIES
                and dotted(node.func.value) == "torch" and not any(k.arg == "device" for k in node.keywords)):
            found.append(f"{path.relative_to(root)}:{node.lineno} torch.{node.func.attr}(...)")
    return found


def test_every_tensor_a_rank_makes_says_which_device_it_lives_on():
    """A tensor made without device= lands on the CPU: on a card that is a host tensor meeting the model's
    (or NCCL). Host tensors are fine where meant (a batch built before it is moved): they say device="cpu"."""
    offences = [where for path in sorted((REPO / "workers").rglob("*.py")) for where in tensors_made_without_a_device(path)]
    assert not offences, f"say device= (the rank's device, or \"cpu\" for host data): {offences}"


def test_the_source_checks_see_what_they_look_for(tmp_path):
    """Both checks, on the two lines that broke the first step on a card."""
    broken = tmp_path / "loop.py"
    broken.write_text("import torch\nimport torch.distributed as dist\n"
                      "def step(n):\n    counts = torch.tensor([n, 2 * n], dtype=torch.float64)\n    dist.all_reduce(counts)\n")
    assert distributed_uses(broken, tmp_path) == ["loop.py:2", "loop.py:5"]
    assert tensors_made_without_a_device(broken, tmp_path) == ["loop.py:4 torch.tensor(...)"]


def test_a_tensor_off_the_rank_device_is_refused_with_the_rule():
    """The door itself, with a device the test chooses (meta: anything but the CPU tensors the old loop made).
    The check runs before any process group is touched, so none is needed."""
    comm = RankComm(rank=0, world=1, device=torch.device("meta"))
    with pytest.raises(CollectiveOffDevice, match=r"sum: a \(2,\) torch.float64 tensor on cpu, but this rank's collectives run on meta; NCCL has no CPU collectives"):
        comm.sum(torch.tensor([3.0, 4.0], dtype=torch.float64, device="cpu"))
    made = comm.tensor([3.0, 4.0], torch.float64)
    assert made.device.type == "meta" and comm.zeros(5, torch.float64).device.type == "meta"
