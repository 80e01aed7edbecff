"""Run a training script under accelerate's FSDP2 or DeepSpeed in CPU processes (gloo).

accelerate turns these engines on only for GPU-like backends. With CPU processes its state stays
MULTI_CPU: `prepare` never shards, and DeepSpeed, which accelerate starts on CPU only in a single
process, never spans several. Both engines run on CPU with gloo, though (torch's `fully_shard`;
DeepSpeed's ZeRO-2 over torch's process group). So this lifts that one gate and nothing else:
once accelerate has built its state with the plugin that the launcher's configuration asks for,
the state names the engine, with the same plugin set-up accelerate does on GPUs. From there on,
sharding, partitioning, gathering, saving and loading are accelerate's, torch's and DeepSpeed's
own code. (FSDP1 cannot run so: accelerate's FSDP1 wrapper asks for a GPU device.)

Used by test_fsdp.py and test_deepspeed.py, under `accelerate launch` with ACCELERATE_USE_CPU=true:
engines_on_cpu.py SCRIPT [ARGS...]
"""

from __future__ import annotations

import runpy
import sys

from accelerate.state import AcceleratorState, PartialState
from accelerate.utils import DistributedType


def lift_the_gpu_gate() -> None:
    build_state = AcceleratorState.__init__

    def build_state_on_cpu(self, *args, fsdp_plugin=None, deepspeed_plugin=None, **kwargs):
        build_state(self, *args, fsdp_plugin=fsdp_plugin, deepspeed_plugin=deepspeed_plugin, **kwargs)
        if self.distributed_type != DistributedType.MULTI_CPU:
            return
        if fsdp_plugin is not None:
            if self._mixed_precision != "no":
                fsdp_plugin.set_mixed_precision(self._mixed_precision)
            self.fsdp_plugin = fsdp_plugin
            engine = DistributedType.FSDP
        elif deepspeed_plugin is not None:
            import deepspeed.comm

            # Over the gloo group accelerate has started, as it would over NCCL on GPUs.
            deepspeed.comm.init_distributed(dist_backend="gloo", auto_mpi_discovery=False)
            deepspeed_plugin.set_mixed_precision(self._mixed_precision)
            deepspeed_plugin.select(_from_accelerator_state=True)
            self.deepspeed_plugins = deepspeed_plugin
            engine = DistributedType.DEEPSPEED
        else:
            return
        self.distributed_type = engine
        # Later AcceleratorState() calls copy the process state over their own.
        PartialState._shared_state["distributed_type"] = engine

    AcceleratorState.__init__ = build_state_on_cpu


if __name__ == "__main__":
    lift_the_gpu_gate()
    sys.argv = sys.argv[1:]
    runpy.run_path(sys.argv[0], run_name="__main__")
