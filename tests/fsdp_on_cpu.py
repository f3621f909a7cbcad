"""Run a script under `accelerate launch` with its FSDP config honoured on the CPU (test helper, not a test).

accelerate only turns FSDP on for accelerator devices: on a CPU-only machine a `distributed_type: FSDP` config
silently becomes plain multi-CPU data parallelism (DistributedType.MULTI_CPU). torch's FSDP2 (`fully_shard`)
itself runs on the CPU with gloo, so this shim sets the distributed type back to FSDP once accelerate has made
its state, and everything after that (`prepare`, `save_state`, `load_state`, `get_state_dict`) takes accelerate's
real FSDP2 code paths. Usage:

    accelerate launch --config_file examples/accelerate/fsdp.yaml --num_processes 2 tests/fsdp_on_cpu.py \\
        train_pogdiff.py --pretrained_model_name_or_path ...
"""

import os
import runpy
import sys

import accelerate.state as state
from accelerate.utils import DistributedType

_init = state.AcceleratorState.__init__


def _init_with_fsdp_on_cpu(self, *args, fsdp_plugin=None, **kwargs):
    _init(self, *args, fsdp_plugin=fsdp_plugin, **kwargs)
    if fsdp_plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
        # Both shared states: every later AcceleratorState() copies PartialState's distributed type again.
        state.PartialState._shared_state["distributed_type"] = DistributedType.FSDP
        self.distributed_type = DistributedType.FSDP
        self.fsdp_plugin = fsdp_plugin


if __name__ == "__main__":
    state.AcceleratorState.__init__ = _init_with_fsdp_on_cpu
    script = sys.argv[1]
    sys.argv = sys.argv[1:]
    sys.path.insert(0, os.path.dirname(os.path.abspath(script)))
    runpy.run_path(script, run_name="__main__")
