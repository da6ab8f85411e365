"""`sdtune/train.py` under accelerate's FSDP on CPU processes, for tests/test_fsdp.py.

accelerate (1.16) builds its FSDP state only for GPU-like devices: on CPU processes
(``ACCELERATE_USE_CPU=1``) it keeps MULTI_CPU and the run is plain DDP. torch's
FullyShardedDataParallel itself runs on CPU processes over gloo. This script, launched
in place of sdtune/train.py, lets accelerate's state switch to FSDP on CPU processes,
as its own code does for GPUs (the plugin it built from the config, and the device
``cpu`` rather than ``cpu:<rank>``, which FSDP would find inconsistent with the
modules' ``cpu``), then runs sdtune's trainer unchanged.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parent.parent)  # the checkout's sdtune, not tests/

import torch  # noqa: E402
from accelerate import state  # noqa: E402
from accelerate.utils import DistributedType  # noqa: E402

_init = state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, mixed_precision=None, cpu=False, dynamo_plugin=None, deepspeed_plugin=None,
                           fsdp_plugin=None, *args, **kwargs):
    _init(self, mixed_precision, cpu, dynamo_plugin, deepspeed_plugin, fsdp_plugin, *args, **kwargs)
    if self.distributed_type == DistributedType.MULTI_CPU and fsdp_plugin is not None:
        self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, fsdp_plugin
        if self._mixed_precision != "no":
            fsdp_plugin.set_mixed_precision(self._mixed_precision)
        state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        state.PartialState._shared_state["device"] = torch.device("cpu")


state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu

if __name__ == "__main__":
    from sdtune.errors import run_command
    from sdtune.train import main

    sys.exit(run_command(lambda: main(sys.argv[1:])))
