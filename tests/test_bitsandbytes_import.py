"""A LoRA rank's import of bitsandbytes asks nothing of the Hugging Face Hub (workers/bitsandbytes_import.py).

Each check runs in a fresh interpreter (bitsandbytes asks, or not, once per process, at its import) where the Hub's
one endpoint that kernels calls first, the publisher check, is a double that records the call and fails as it
does on a box with no route to the Hub.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

PROBE = """
import json, logging, sys
import huggingface_hub
from huggingface_hub import constants

asked = []
def publisher_check(self, name, *args, **kwargs):  # what an offline box's HfApi does, recorded
    asked.append(name)
    raise ConnectionError("no route to huggingface.co")
huggingface_hub.HfApi.get_organization_overview = publisher_check

logged = []
class Keep(logging.Handler):
    def emit(self, record):
        logged.append(record.getMessage())
logging.getLogger().addHandler(Keep())

if sys.argv[1] == "helper":
    from workers.bitsandbytes_import import import_bitsandbytes
    import_bitsandbytes()
else:
    import bitsandbytes
print(json.dumps({"asked": asked, "logged": logged, "offline_after": constants.HF_HUB_OFFLINE,
                  "imported": "bitsandbytes" in sys.modules}))
"""


def _import(how: str) -> dict:
    done = subprocess.run([sys.executable, "-c", PROBE, how], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def _asks_the_hub_here() -> bool:
    """bitsandbytes asks for its CPU kernel only where the CPU has AVX-512 BF16."""
    cpuinfo = Path("/proc/cpuinfo")
    return cpuinfo.exists() and "avx512_bf16" in cpuinfo.read_text()


@pytest.mark.skipif(not _asks_the_hub_here(), reason="this CPU has no AVX-512 BF16, where bitsandbytes asks the Hub for nothing")
def test_bitsandbytes_is_imported_without_a_request_to_the_hub_or_a_warning_about_its_kernel():
    plain = _import("plain")
    assert plain["asked"] == ["kernels-community"], plain  # the double sees what a rank did before
    assert any("Failed to load CPU gemm_4bit_forward" in line for line in plain["logged"]), plain

    helper = _import("helper")
    assert helper["imported"] and helper["asked"] == [], helper
    assert not [line for line in helper["logged"] if "kernels-community" in line or "gemm_4bit" in line], helper
    assert helper["offline_after"] is False  # the Hub's offline mode was for that import only
