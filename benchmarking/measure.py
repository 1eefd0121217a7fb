"""How benchmark.py measures a run: its seconds (the clock read once the device is done), its peak
memory, the rows of a table timed in turns, so that a machine whose speed drifts moves them
alike, and the matmul FLOPs of an evaluation."""

from __future__ import annotations

import ctypes
import gc
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _addmm_flops(self_shape, mat1_shape, mat2_shape, *args, out_shape=None, **kwargs) -> int:
    """self + mat1 @ mat2: a multiply and an add for each of m x k x n."""
    return 2 * mat1_shape[0] * mat1_shape[1] * mat2_shape[1]


def _attention_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    """softmax(q k^T) v, q [B, Hq, Nq, D]: both products for every query head, the key and value
    heads shared among them under grouped-query attention (which torch's own formula refuses)."""
    batch, heads, queries, dim = query_shape
    return 2 * batch * heads * queries * key_shape[-2] * (dim + value_shape[-1])


def flop_counter() -> FlopCounterMode:
    """torch's FlopCounterMode, counting what it leaves out by default: the in-place addmm_ (FLUX's
    single blocks accumulate linear2's attention columns with it) and the CPU's fused attention
    kernel (on meta tensors attention decomposes into two bmm, which torch counts already)."""
    attention_kernels = [aten._scaled_dot_product_flash_attention_for_cpu, aten._scaled_dot_product_flash_attention,
                         aten._scaled_dot_product_efficient_attention, aten._scaled_dot_product_cudnn_attention]
    return FlopCounterMode(display=False, custom_mapping={aten.addmm_: _addmm_flops,
                                                          **{op: _attention_flops for op in attention_kernels}})


class PeakMemory:
    """The peak memory of a block of code, the weights and everything else in it included: on CUDA
    the allocator's max_memory_allocated; on the CPU the process's resident anonymous memory
    (RssAnon of /proc/self/status), sampled every few milliseconds by a thread. `bytes` is that
    peak, `growth` its excess over the start (what the block itself held at most); both are None
    where neither can be read (a CPU without /proc)."""

    def __init__(self, device: str):
        self.cuda = device.startswith("cuda")

    @staticmethod
    def rss_anon() -> int | None:
        try:
            with open("/proc/self/status") as status:
                for line in status:
                    if line.startswith("RssAnon:"):
                        return int(line.split()[1]) * 1024
        except OSError:
            pass
        return None

    def __enter__(self):
        if self.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            self.start = torch.cuda.memory_allocated()
        else:
            release_free_memory()
            self.peak = self.start = self.rss_anon()
            self.running = self.peak is not None
            self.thread = threading.Thread(target=self._watch, daemon=True)
            self.thread.start()
        return self

    def _watch(self):
        while self.running:
            self.peak = max(self.peak, self.rss_anon())
            time.sleep(0.005)

    def __exit__(self, *exc):
        if self.cuda:
            torch.cuda.synchronize()
            self.bytes = torch.cuda.max_memory_allocated()
        else:
            self.running = False
            self.thread.join()
            self.bytes = None if self.peak is None else max(self.peak, self.rss_anon())
        self.growth = None if self.bytes is None else self.bytes - self.start


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's malloc_trim), so that a row's peak
    counts the memory it holds and not what an earlier row freed; a no-op without glibc."""
    gc.collect()
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass


def clock(device: str) -> float:
    """perf_counter once the device's queued work is done: CUDA runs asynchronously."""
    if device.startswith("cuda"):
        torch.cuda.synchronize()
    return time.perf_counter()


def peak_megabytes(memories: list[PeakMemory]) -> dict:
    """The largest of several runs' peaks and growths (PeakMemory), in MB (None where unknown)."""
    def largest(values):
        known = [value for value in values if value is not None]
        return max(known) / 2 ** 20 if known else None
    return {"peak_memory_mb": largest([m.bytes for m in memories]),
            "peak_growth_mb": largest([m.growth for m in memories])}


@dataclass
class TimedRow:
    """One row of the table before it is measured: an untimed warm-up (every code path once), a
    timed run, and what the row reports given its timed runs."""
    name: str
    warm_up: Callable[[], object]
    run: Callable[[], tuple]                 # -> (seconds, final latents, ..., its PeakMemory)
    summarize: Callable[[list[tuple]], dict]


def measure_interleaved(rows: list[TimedRow], repeats: int) -> list[dict]:
    """Every row warmed up, then timed `repeats` times round-robin (row 1, 2, 3, 1, 2, 3, ...): a
    machine whose speed drifts during the table (a shared CPU, a GPU's clocks) moves every row
    alike instead of the rows measured last.

    A summary reads the seconds and memory of every run, and the latents and state of the last:
    an earlier run keeps only its seconds and memory, and each row is summarized right after its
    last run, so no run's peak memory holds another run's latents or AccelAes caches. The first
    row (our dense one) is summarized first: it is the others' reference."""
    for row in rows:
        row.warm_up()
    earlier: dict[str, list[tuple]] = {row.name: [] for row in rows}
    results = []
    for repeat in range(repeats):
        for row in rows:
            run = row.run()
            print(f"  {row.name}: {run[0]:.2f} s", file=sys.stderr)
            if repeat < repeats - 1:
                earlier[row.name].append((run[0], *[None] * (len(run) - 2), run[-1]))
            else:
                results.append(row.summarize(earlier[row.name] + [run]))
    return results
