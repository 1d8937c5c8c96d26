"""Where training data lives and how data-parallel ranks share the work.

    resolve_device   'auto' | 'cpu' | 'cuda[:N]' -> torch.device (a clear error without a GPU)
    memory_budget    bytes the resident training matrices may take on a device
    Rows             row access to a (sparse) matrix on a device: the whole matrix is resident
                     on the device when it fits the memory budget, else rows are densified
                     per batch
    distributed      (world size, rank) when a torch.distributed process group is up (Ray
                     Train workers), else (1, 0)
    allreduce_grads  average the gradients over the ranks
"""

from __future__ import annotations

import numpy as np
import scipy.sparse as sp
import torch

from .errors import ConfigError


def resolve_device(device: str | torch.device | None = None) -> torch.device:
    if device in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device", "CUDA was requested but no GPU is available")
    return dev


def memory_budget(device: torch.device) -> int:
    """Bytes the resident training matrices may take: half the free GPU memory, 6 GiB on the CPU."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free * 0.5)
    return 6 << 30


class Rows:
    """Row access to a (sparse) matrix on a device: the whole matrix lives on the device
    when it fits the memory budget, else rows are densified per batch."""

    def __init__(self, X, device: torch.device, dtype: torch.dtype, budget_bytes: int | None = None):
        self.device, self.dtype = device, dtype
        self.shape = X.shape
        nbytes = X.shape[0] * X.shape[1] * torch.tensor([], dtype=dtype).element_size()
        if budget_bytes is None:
            budget_bytes = memory_budget(device)
        self.resident = nbytes <= budget_bytes
        if self.resident:
            dense = X.toarray() if sp.issparse(X) else np.asarray(X)
            self.full = torch.tensor(dense, dtype=torch.float32).to(device, dtype)
            self.host = None
        else:
            self.full = None
            self.host = sp.csr_matrix(X, dtype=np.float32)

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getitem__(self, idx: torch.Tensor) -> torch.Tensor:
        if self.resident:
            return self.full.index_select(0, idx)
        rows = self.host[idx.cpu().numpy()].toarray()
        t = torch.from_numpy(rows)
        if self.device.type == "cuda":
            t = t.pin_memory()
        return t.to(self.device, self.dtype, non_blocking=True)


def distributed() -> tuple[int, int]:
    """(world size, rank) when a torch.distributed process group is up, else (1, 0)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size(), dist.get_rank()
    return 1, 0


def allreduce_grads(model: torch.nn.Module, world: int) -> None:
    """Average gradients over ranks (every rank starts from the same seeded weights and
    applies the same averaged update, so the replicas stay identical)."""
    import torch.distributed as dist
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world
    offset = 0
    for g in grads:
        n = g.numel()
        g.copy_(flat[offset:offset + n].view_as(g))
        offset += n
