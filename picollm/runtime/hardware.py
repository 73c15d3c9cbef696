"""Device selection and the matmul peak used for model-FLOPs utilisation."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

import torch

from picollm.errors import PicollmError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise PicollmError("train.device is cuda, but no CUDA device is available (use auto or cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise PicollmError("train.device is mps, but MPS is not available (use auto or cpu)")
    return torch.device(name)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()
    elif device.type == "mps":
        torch.mps.synchronize()


def measure_matmul_peak(device: torch.device, size: int = 2048, seconds: float = 0.4) -> float:
    """Best fp32 matmul throughput (FLOP/s) over a short burst: the denominator of MFU.

    The best of many repeats, so a briefly busy machine still reads close to its real peak; on a
    machine that stays loaded, set train.peak_flops instead."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    a @ b
    _sync(device)
    best = 0.0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        t0 = time.perf_counter()
        for _ in range(2):
            a @ b
        _sync(device)
        best = max(best, 2 * 2 * size**3 / (time.perf_counter() - t0))
    return best


@contextmanager
def torch_threads(n: int | None) -> Iterator[None]:
    """Run a block on `n` torch CPU threads (None: unchanged), then restore the previous count."""
    before = torch.get_num_threads()
    if n:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)
