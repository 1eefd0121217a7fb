"""The floor of a dense evaluation (benchmark.py --floor): the matrix products and attention calls
of our dense forward, recorded once and then replayed alone, with the same tensors (so the same
shapes, strides and dtypes) and the same torch kernels.

An implementation of the model runs these calls and more: norms, activations, RoPE, copies, the
Python between them. So an implementation that does these products (these FLOPs) with torch's
kernels on this device cannot run faster than the floor, and the distance from a row to it is
all that engineering around the kernels can still win. It is the yardstick for `--peers`: two
implementations of the same products compare through how far each is above it.

Which calls count: torch's matrix products (addmm, mm, bmm, their in-place forms, and the
convolution of a patch embedding) and its fused attention kernels (every
aten._scaled_dot_product_* op: flash, memory-efficient, cuDNN, and the CPU's flash). Where torch
runs attention on its composite math path instead, that path's matrix products are recorded and
its softmax is not, so the floor stays a lower bound.
"""

from __future__ import annotations

import statistics
from typing import Callable

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarking.measure import TimedRow

NAME = "floor: matmuls + attention alone"
MATRIX_PRODUCTS = {"aten.addmm", "aten.addmm_", "aten.mm", "aten.bmm", "aten.baddbmm", "aten.baddbmm_",
                   "aten.convolution"}     # a patch embedding (SD3's) is a convolution


def is_kernel(op) -> bool:
    """Whether an aten op is one of the calls the floor replays."""
    name = str(op.overloadpacket)
    return name in MATRIX_PRODUCTS or name.startswith("aten._scaled_dot_product")


class KernelCalls(TorchDispatchMode):
    """While active, records every matrix product and attention kernel torch runs, holding their
    arguments (the activations stay alive as long as this object: one forward's worth)."""

    def __init__(self):
        super().__init__()
        self.calls: list[tuple] = []

    def __torch_dispatch__(self, op, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if is_kernel(op):
            self.calls.append((op, args, kwargs))
        return op(*args, **kwargs)

    def replay(self) -> None:
        """Every recorded call again, in order. In-place ones (addmm_) add into their tensor once
        more: the values drift, the work does not."""
        for op, args, kwargs in self.calls:
            op(*args, **kwargs)


def record(forward: Callable[[], object]) -> KernelCalls:
    """The kernel calls one run of forward() makes."""
    with torch.no_grad(), KernelCalls() as calls:
        forward()
    return calls


def row(evaluation: Callable[[], object], steps: int, reference) -> TimedRow:
    """The floor as a row of benchmark.py's table: the kernel calls of one dense `evaluation`,
    replayed `steps` times, as many as the dense row evaluates the model (every dense evaluation
    has the same shapes), timed by benchmark.py's `reference`. Each run records its calls afresh,
    untimed, and lets them go at its end, so that between runs the floor holds no activations in
    the other rows' memory."""
    counts = []

    def run():
        calls = record(evaluation)
        counts.append(len(calls.calls))
        seconds, _, memory = reference.timed(lambda: [calls.replay() for _ in range(steps)])
        return seconds, memory

    def summarize(runs: list[tuple]) -> dict:
        seconds = statistics.median(r[0] for r in runs)
        return {"row": NAME, "kind": "floor", "seconds": seconds, "all_seconds": [r[0] for r in runs],
                "speedup": reference.seconds / seconds, "theoretical": None,
                "evaluations": f"{steps} x {counts[-1]} calls", "kernel_calls": counts[-1], "mask_seconds": 0.0,
                "peak_memory_mb": None, "peak_growth_mb": None}
    return TimedRow(NAME, run, run, summarize)
