"""Process-group helpers that work on CPU (gloo) as well as GPU (nccl).

llm2vec's gather hardcodes `device="cuda"`; the autograd-aware all-gather here keeps gradients
flowing to every rank's own slice on either backend.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist


def world() -> tuple[int, int]:
    """(rank, world_size); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


_OWN_GROUP = False  # True when init_from_env created the group, so shutdown() may destroy it


def init_from_env() -> tuple[int, int]:
    """Join the process group torchrun / deepspeed set up through env vars; no-op when run alone."""
    global _OWN_GROUP
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend)
        _OWN_GROUP = True
    return world()


def init_for_deepspeed() -> tuple[int, int]:
    """DeepSpeed needs a process group. Under torchrun or its launcher the env names one; in a plain
    process DeepSpeed would look for MPI instead (mpi4py). Start a one-process group the way its
    launcher would: RANK=0, WORLD_SIZE=1, a free local port."""
    global _OWN_GROUP
    init_from_env()
    if not dist.is_initialized():
        import socket

        with socket.socket() as s:  # a free port for the one-member rendezvous
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("MASTER_ADDR", "127.0.0.1"),
                           ("MASTER_PORT", str(port))):
            os.environ.setdefault(key, value)
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
        dist.init_process_group(backend, rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]))
        _OWN_GROUP = True
    return world()


def shutdown() -> None:
    """Leave the group init_from_env created, together: a rank that exits while another still holds
    gloo connections can take that rank down with SIGABRT ("terminate called without an active
    exception"). Groups made by the caller are left alone."""
    global _OWN_GROUP
    if _OWN_GROUP and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
    _OWN_GROUP = False


class _AllGatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums every rank's gradient for this rank's slice (all_reduce + slice;
    gloo has no reduce_scatter). torch.distributed.nn's equivalent is deprecated."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        parts = [torch.empty_like(x) for _ in range(dist.get_world_size())]
        dist.all_gather(parts, x.contiguous())
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous().clone()
        dist.all_reduce(grad)
        b = grad.shape[0] // dist.get_world_size()
        return grad[dist.get_rank() * b:(dist.get_rank() + 1) * b]


def all_gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """[B, ...] per rank -> [world * B, ...], differentiable w.r.t. the local slice. Equal B on all ranks."""
    if world()[1] == 1:
        return x
    return _AllGatherWithGrad.apply(x)


def global_mean(x: torch.Tensor) -> torch.Tensor:
    """The mean of a scalar over ranks (detached): what one process would log for the whole batch."""
    x = x.detach().float().reshape(1).clone()
    if world()[1] > 1:
        dist.all_reduce(x)
        x /= world()[1]
    return x[0]
