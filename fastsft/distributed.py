"""One process or many: the few collective operations the driver needs, the same code either way.

Under `torchrun` (RANK, WORLD_SIZE, LOCAL_RANK set) the process group is NCCL on GPUs and gloo on the CPU; alone,
every helper here is the identity, so the driver has no `if distributed` branches beyond building DDP.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def init(device: str = "auto") -> Dist:
    """Pick the device and, under torchrun, join the process group (one GPU per local rank)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank, local_rank = int(os.environ.get("RANK", "0")), int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise RuntimeError("device = 'cuda' but no CUDA device is available")
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", device_id=dev if use_cuda else None)
    return Dist(rank, world, local_rank, dev)


def all_reduce_sum(t: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.active:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def sum_over_ranks(value: float, d: Dist) -> torch.Tensor:
    """A host number summed over the ranks, as a (1,) fp32 tensor on the device; never read back. It goes up from
    pinned memory: a pageable host tensor copied to the GPU makes the host wait for the stream, once per step."""
    host = torch.tensor([float(value)], pin_memory=d.device.type == "cuda")
    return all_reduce_sum(host.to(d.device, non_blocking=True), d)


def all_gather_objects(obj, d: Dist) -> list:
    if not d.active:
        return [obj]
    out = [None] * d.world
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj, d: Dist):
    if not d.active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def shutdown(d: Dist) -> None:
    """Leave the process group together, then free it with the GIL released. The caller frees its DDP wrapper
    first (run_training does): a Reducer that outlives the group would free it with the GIL held.

    All ranks meet at a barrier: a rank that tears down while rank 0 still writes its report can leave rank 0
    hanging in its own teardown (seen with gloo on torch 2.13).

    Why the group must die here, and the DDP wrapper before it (torch 2.13 sources):
    - ProcessGroupGloo's destructor joins its worker threads (ProcessGroupGloo.cpp, ~ProcessGroupGloo).
    - A worker may still hold the last reference to a finished collective: runLoop drops its `work` after
      execute() has marked it complete, so the caller's wait(), and the barrier's wait on prior work, can return
      before the worker lets go. Dropping that work's tensors takes the GIL: a C++ reference to a tensor that has
      a Python object going from 2 to 1 decrefs that object (c10/util/intrusive_ptr.h, reset_not_null_).
    - So whoever drops the group's last reference must not hold the GIL. Python's ProcessGroup does not: its
      pybind holder releases the GIL before destroying it (IntrusivePtrNoGilDestructor, c10d/init.cpp). DDP's
      Reducer does: a plain shared_ptr holder, destroyed with the GIL held. A Reducer that outlives
      destroy_process_group holds the last reference and joins a worker that waits for the GIL: the hang of
      test_ddp_two_processes_match_one (py-spy: main thread in ~Reducer -> ~ProcessGroupGloo -> join), made
      certain in test_ddp_exits_with_a_worker_still_freeing_a_tensor.
    With the Reducer gone, `group` keeps the group alive through destroy_process_group (whose registries drop
    their references in C++ calls that may hold the GIL) and drops the last reference itself, GIL released:
    a worker still letting go then gets the GIL, and the join returns, however late the worker runs."""
    if d.active and dist.is_initialized():
        group = dist.group.WORLD
        dist.barrier()
        dist.destroy_process_group()
        del group  # the group's last reference: ~ProcessGroupGloo joins its workers here, without the GIL
