"""torchrun support: which share of the work this process does, and small reductions.

Under ``torchrun`` (WORLD_SIZE, RANK, LOCAL_RANK set) a process group is
started; alone, every method is a no-op over the whole work.
"""
from __future__ import annotations

import os
from typing import List, Sequence

import torch


class Ranks:
    """This process's share of the work under torchrun (WORLD_SIZE, RANK, LOCAL_RANK), else everything."""

    def __init__(self, backend: str = "gloo"):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        # nccl reduces CUDA tensors only; gloo CPU ones
        self.device = torch.device("cuda", self.local_rank) if backend == "nccl" else torch.device("cpu")
        if self.world > 1 and not torch.distributed.is_initialized():
            if self.device.type == "cuda":
                torch.cuda.set_device(self.device)
            torch.distributed.init_process_group(backend)

    def share(self, items: Sequence) -> list:
        return list(items[self.rank::self.world])

    def total(self, counts) -> List[float]:
        """Element-wise sum over the ranks of numbers (a sequence or a 1-D tensor, on any device)."""
        t = torch.as_tensor(counts, dtype=torch.float64)
        if self.world > 1:
            t = t.to(self.device)
            torch.distributed.all_reduce(t)
        return t.tolist()

    def gather(self, rows: list) -> list:
        if self.world == 1:
            return rows
        everything = [None] * self.world
        torch.distributed.all_gather_object(everything, rows)
        return [r for part in everything for r in part]

    def close(self) -> None:
        if self.world > 1:
            torch.distributed.destroy_process_group()
