"""DeepSpeed's CPU ops, built when zeromix is installed (`make`) rather than when a job first needs them.

DeepSpeed compiles them just in time into TORCH_EXTENSIONS_DIR, under a lock: a job that offloads its optimizer
waited about 40 s at its start for CPU Adam (measured on 2 cores; every box, the first time), and on the CPU
simulation the first DeepSpeed world waited about 25 s for its shared-memory collectives. Built here, once; a box
without a compiler is told so at install, and a job needing the op still builds it (or fails) at its start.

    .venv/bin/python -m workers.deepspeed_ops
"""

from __future__ import annotations

import sys
import time


def main() -> int:
    from deepspeed.accelerator import get_accelerator
    from deepspeed.ops.op_builder.cpu import CPUAdamBuilder

    builders = [CPUAdamBuilder()]  # (the CUDA accelerator takes its host-side Adam from the CPU builders too)
    if get_accelerator().device_name() == "cpu":  # NCCL on cards; these only where the ranks are CPU processes
        builders.append(get_accelerator().create_op_builder("ShareMemCommBuilder"))
    for builder in builders:
        if not builder.is_compatible():
            print(f"zeromix: DeepSpeed's {builder.NAME} op cannot be built on this machine; left out", file=sys.stderr)
            continue
        started = time.monotonic()
        try:
            builder.load(verbose=False)
        except Exception as err:  # (a missing compiler or header: several kinds)
            print(f"zeromix: DeepSpeed's {builder.NAME} op could not be built now ({type(err).__name__}: {err}); a job that "
                  "needs it builds it at its start", file=sys.stderr)
            continue
        print(f"zeromix: DeepSpeed's {builder.NAME} op is built ({time.monotonic() - started:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
