"""Data parallelism under torchrun: every process runs its own copy of the model on its own share
of the images, and the processes meet only twice, at barriers (runs/runner.py).

    torchrun --nproc_per_node 8 sample.py --prompts prompts.jsonl --output-dir out/

torchrun starts the processes and tells each its place through the environment (RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); started without it, a run is one process
and no process group is created.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Mapping

import torch
import torch.distributed as dist

# The end barrier waits for the slowest rank of a run that may last days; torchrun itself stops
# every rank when one fails, so a long wait never hides a crash.
BARRIER_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Process:
    """This process's place in the run, and the device it generates on."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0        # its index on its machine: which GPU it takes
    device: str = "cpu"

    @property
    def main(self) -> bool:
        """Rank 0: the one that tidies the output folder."""
        return self.rank == 0

    def barrier(self) -> None:
        """Wait until every rank is here (nothing to wait for in a single process)."""
        if self.world > 1:
            dist.barrier()


def torchrun_ranks(environment: Mapping[str, str] = os.environ) -> tuple[int, int, int] | None:
    """(rank, world size, local rank) as torchrun sets them, or None when not under torchrun."""
    names = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
    if not any(name in environment for name in names):
        return None
    try:
        rank, world, local_rank = (int(environment[name]) for name in names)
    except (KeyError, ValueError):
        raise ValueError(f"RANK, WORLD_SIZE and LOCAL_RANK must all be whole numbers under torchrun, not "
                         f"{', '.join(f'{n}={environment.get(n)!r}' for n in names)}: start with torchrun, or "
                         "unset them") from None
    if not (0 <= rank < world and local_rank >= 0):
        raise ValueError(f"RANK {rank}, WORLD_SIZE {world}, LOCAL_RANK {local_rank} are inconsistent: start with "
                         "torchrun, or unset them")
    return rank, world, local_rank


@contextmanager
def data_parallel(device: str = "cpu") -> Iterator[Process]:
    """This process's place in the run, inside torchrun's process group when there is one.

    Under torchrun with several processes, each takes the GPU of its LOCAL_RANK (cuda:N) when
    CUDA is there and `device` is not "cpu", else the CPU; alone, it runs on `device`. The group
    only synchronises (barriers), it moves no tensor: the gloo backend does that on the CPU on
    any machine, and a rank that waits holds no GPU stream."""
    ranks = torchrun_ranks()
    if ranks is None or ranks[1] == 1:
        yield Process(device=device)
        return
    rank, world, local_rank = ranks
    if torch.cuda.is_available() and torch.device(device).type != "cpu":
        device = f"cuda:{local_rank}"
        torch.cuda.set_device(local_rank)     # so that "cuda" and empty_cache() mean this rank's GPU
    else:
        device = "cpu"
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=BARRIER_TIMEOUT)
    try:
        yield Process(rank, world, local_rank, device)
    finally:
        dist.destroy_process_group()
