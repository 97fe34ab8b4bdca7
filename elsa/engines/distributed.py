"""Process groups and FSDP2 sharding for the global methods (ELSA, ELSA-L).

Launch with ``torchrun --nproc_per_node N run.py hardware=fsdp ...`` (or ``accelerate launch``): every rank
runs the same Hydra job in the same output dir; only rank 0 evaluates, writes files and logs.
On CPU (tests) the backend is gloo; on GPUs nccl.
"""
from __future__ import annotations

import logging
import os

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


def enabled() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if enabled() else 0


def world_size() -> int:
    return dist.get_world_size() if enabled() else 1


def is_main() -> bool:
    return rank() == 0


def init(backend: str | None, device: str) -> str:
    """Join the process group torchrun (or SLURM via submitit) describes; return this rank's device."""
    if "RANK" not in os.environ and int(os.environ.get("SLURM_NTASKS", "1")) > 1:
        # hardware=slurm_fsdp: one SLURM task per GPU; submitit turns SLURM's variables into torch's
        from submitit.helpers import TorchDistributedEnvironment

        TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        from elsa.errors import config_error

        raise config_error("hardware", "fsdp", "a launch through torchrun or accelerate launch "
                           "(e.g. torchrun --nproc_per_node 2 run.py hardware=fsdp ...)")
    local = int(os.environ.get("LOCAL_RANK", 0))
    if device.startswith("cuda"):
        torch.cuda.set_device(local)
        device = f"cuda:{local}"
    if not enabled():
        dist.init_process_group(backend or ("nccl" if device.startswith("cuda") else "gloo"))
    log.info("rank %d of %d on %s", rank(), world_size(), device)
    return device


def barrier() -> None:
    if enabled():
        dist.barrier()


def shard(model: torch.nn.Module, blocks) -> torch.nn.Module:
    """FSDP2: one shard group per decoder block, then the root (embeddings, norm, head)."""
    from torch.distributed.fsdp import fully_shard

    for block in blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def is_dtensor(t) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(t, DTensor)


def local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard (a view that shares storage) of a DTensor, or the tensor itself."""
    return t.to_local() if is_dtensor(t) else t


def gather(param, local_tensor: torch.Tensor) -> torch.Tensor:
    """The full tensor of a local shard laid out like ``param`` (identity when not sharded)."""
    if not is_dtensor(param):
        return local_tensor
    from torch.distributed.tensor import DTensor

    return DTensor.from_local(local_tensor, param.device_mesh, param.placements, shape=param.shape,
                              stride=param.stride()).full_tensor()


def scatter(param, full: torch.Tensor) -> torch.Tensor:
    """This rank's rows of a full tensor laid out like ``param`` (FSDP2 shards dim 0 as torch.chunk)."""
    if not is_dtensor(param):
        return full
    chunks = torch.chunk(full, param.device_mesh.size(), dim=0)
    r = param.device_mesh.get_local_rank()
    return chunks[r] if r < len(chunks) else full[:0]


def full_state_dict(model: torch.nn.Module) -> dict:
    """Every rank calls; returns the unsharded state dict (on CPU)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True,
                                                                broadcast_from_rank0=False))
