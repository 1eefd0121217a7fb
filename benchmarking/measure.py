"""How benchmark.py measures a run: its seconds (the clock read once the device is done), its peak
memory, and the rows of a table timed in turns, so that a machine whose speed drifts moves them
alike."""

from __future__ import annotations

import ctypes
import gc
import sys
import threading
import time
from dataclasses import dataclass
from typing import Callable

import torch


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
