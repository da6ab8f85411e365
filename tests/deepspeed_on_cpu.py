"""`sdtune/train.py` under accelerate's DeepSpeed on CPU processes, for tests/test_deepspeed.py.

DeepSpeed runs on CPUs (``DS_ACCELERATOR=cpu``: gloo, and its CPU Adam for optimizer
offload), and accelerate (1.16) starts it there: DeepSpeed's ``init_distributed`` joins
the processes. But accelerate then finds no backend of its own for CPU processes that
were not asked to run as CPU ones (``ACCELERATE_USE_CPU`` would switch DeepSpeed off),
and counts every process as process 0 of 1, while DeepSpeed's engine sees them all.
This script, launched in place of sdtune/train.py, gives accelerate's state the
process group DeepSpeed joined (rank, world size, gloo, the device ``cpu``), then runs
sdtune's trainer unchanged.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the checkout's sdtune, not tests/

import torch  # noqa: E402
from accelerate import state  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

_init = state.PartialState.__init__


def _init_with_deepspeed_on_cpu(self, cpu: bool = False, **kwargs):
    _init(self, cpu, **kwargs)
    if self.distributed_type == DistributedType.DEEPSPEED and self.backend is None and torch.distributed.is_initialized():
        self.backend = torch.distributed.get_backend()
        self.num_processes = torch.distributed.get_world_size()
        self.process_index = torch.distributed.get_rank()
        self.local_process_index = int(os.environ.get("LOCAL_RANK", 0))
        self.device = torch.device("cpu")


state.PartialState.__init__ = _init_with_deepspeed_on_cpu

# DeepSpeed's ZeRO-1/2 allocates its gradient bucket (reduce_bucket_size, 5e8 elements by
# default) anew at every micro step, and under train.deterministic torch fills new memory
# with NaN: 2 GB written per step, 1 s on this CPU (a GPU does it in about a millisecond).
# The fill only marks memory nothing has written yet; no value the run reads comes from it.
torch.utils.deterministic.fill_uninitialized_memory = False

# DeepSpeed asks py-cpuinfo about the CPU when its CPU Adam is built and loaded (three times a
# process), and py-cpuinfo probes the CPU in a child process each time: about 1.2 s a call
# here, 7 s of CPU a two-process launch. tests/test_deepspeed.py asks once per test worker and
# hands the answer to every process it launches on the same machine.
if "SDTUNE_TEST_CPU_INFO" in os.environ:
    import cpuinfo  # noqa: E402

    _CPU_INFO = json.loads(os.environ["SDTUNE_TEST_CPU_INFO"])
    cpuinfo.get_cpu_info = lambda: dict(_CPU_INFO)

if __name__ == "__main__":
    from sdtune.errors import run_command
    from sdtune.train import main

    sys.exit(run_command(lambda: main(sys.argv[1:])))
