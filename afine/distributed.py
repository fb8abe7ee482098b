"""Process group from torchrun's environment (single or multi node), and the few collectives training needs.

    torchrun --nproc_per_node=4 train_stage2.py --config configs/s2.json            # one node
    torchrun --nnodes=2 --node_rank=R --master_addr=HOST --master_port=29500 \
             --nproc_per_node=8 train_stage1.py --config configs/s1.json           # several nodes

NCCL on GPU, Gloo on CPU. Without torchrun's variables the run is a single process and every
collective here is a no-op. Rank 0 logs and writes; out_dir must be a folder every node can read
(a shared file system) for resuming.

A process waits for the others in a collective at most AFINE_DIST_TIMEOUT seconds (default: torch's, 30 minutes
on Gloo); past that, one that stopped or hangs is an error line, not a traceback (the tests set a short wait,
so that a hang ends in seconds).
"""

from __future__ import annotations

import contextlib
import datetime
import os
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import AfineError


@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def pick_device(name: str, local_rank: int = 0) -> torch.device:
    """'auto' | 'cpu' | 'cuda' -> the device of this process (cuda:LOCAL_RANK under torchrun)."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise AfineError("device 'cuda' asked for but no CUDA device is available (use --device=cpu)")
        if local_rank >= torch.cuda.device_count():
            raise AfineError(f"LOCAL_RANK {local_rank} but only {torch.cuda.device_count()} CUDA devices")
        return torch.device("cuda", local_rank)
    return torch.device("cpu")


TIMEOUT = "AFINE_DIST_TIMEOUT"  # seconds a process waits for the others in a collective


def timeout() -> datetime.timedelta | None:
    """The wait AFINE_DIST_TIMEOUT asks for (None: torch's default)."""
    text = os.environ.get(TIMEOUT, "").strip()
    if not text:
        return None
    try:
        seconds = float(text)
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise AfineError(f"{TIMEOUT}={text!r}: expected a number of seconds above 0")
    return datetime.timedelta(seconds=seconds)


@contextlib.contextmanager
def waiting(what: str) -> Iterator[None]:
    """Around a collective: its time-out (a process stopped or hangs) becomes one AfineError line."""
    try:
        yield
    except RuntimeError as e:  # Gloo: "Timed out waiting 30000ms for recv operation to complete"; the store alike
        if "timed out" not in str(e).lower() and "timeout" not in str(e).lower():
            raise
        wait = timeout()
        waited = f"{wait.total_seconds():g} s" if wait else "torch's time-out"
        raise AfineError(f"waited {waited} for the other processes {what}: one of them stopped or hangs (set the "
                         f"wait with {TIMEOUT}=SECONDS)") from None


def setup(device: str = "auto") -> Dist:
    """Join torchrun's process group if its variables are set (WORLD_SIZE > 1), else a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = pick_device(device, local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if world > 1 and not dist.is_initialized():
        wait = timeout()
        with waiting("to join the process group"):
            dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo", init_method="env://",
                                    rank=rank, world_size=world, **({"timeout": wait} if wait else {}))
    return Dist(rank=rank, world_size=world, local_rank=local_rank, device=dev)


def close(d: Dist) -> None:
    if d.active and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(d: Dist, tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (no-op for one process)."""
    if d.active:
        with waiting("in a sum over processes"):
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(d: Dist, obj):
    """rank 0's Python object on every rank."""
    if not d.active:
        return obj
    box = [obj]
    with waiting("in a broadcast from rank 0"):
        dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_objects(d: Dist, obj) -> list:
    """Every rank's object, in rank order, on every rank."""
    if not d.active:
        return [obj]
    out = [None] * d.world_size
    with waiting("in a gathering of results"):
        dist.all_gather_object(out, obj)
    return out


def agree(d: Dist, work: Callable, *args):
    """work(*args) on every rank. An AfineError on any rank is raised on every rank (the lowest such rank's) once
    all have finished, so no rank waits in a later collective for one that stopped (one process: plain call)."""
    if not d.active:
        return work(*args)
    try:
        value, error = work(*args), None
    except AfineError as e:
        value, error = None, str(e)
    errors = [e for e in gather_objects(d, error) if e is not None]
    if errors:
        raise AfineError(errors[0])
    return value


def broadcast_parameters(d: Dist, params: list[torch.Tensor]) -> None:
    """Make every rank start from rank 0's values (one flat broadcast)."""
    if not d.active or not params:
        return
    flat = torch.cat([p.detach().reshape(-1) for p in params])
    with waiting("in a broadcast from rank 0"):
        dist.broadcast(flat, src=0)
    for p, chunk in zip(params, flat.split([p.numel() for p in params])):
        p.data.copy_(chunk.view_as(p))


def barrier(d: Dist) -> None:
    if d.active:
        with waiting("at a barrier"):
            dist.barrier()
