"""Measuring the machine for ``make bench``: wall time, peak memory and matrix-multiply throughput.

* **time**: :func:`timed` runs a function once and takes its wall seconds (``time.perf_counter``);
* **peak memory**: the largest growth of the process's resident set while the function ran (:class:`PeakMemory`,
  sampled every few milliseconds in a thread; the model and the cached runs that existed before are not counted). So
  that freed memory goes back to the system and the resident set follows what is live, the bench first pins glibc's
  ``mmap`` threshold at 64 KiB (:func:`pin_malloc_to_mmap`; no effect elsewhere than glibc Linux);
* **throughput**: float32 FLOP/s of a matrix product with the model's own sizes (:func:`matmul_throughput`), which
  turns a FLOP floor (:mod:`mechfin_utils.tooling.bench.flop_floor`) into seconds;
* :func:`machine_line`: the sentence under the tables naming the machine, torch's threads and those throughputs.
"""

from __future__ import annotations

import ctypes
import os
import platform
import threading
import time
from collections.abc import Callable
from typing import TypeVar

import torch

T = TypeVar("T")


def _rss_bytes() -> int | None:
    try:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class PeakMemory:
    """Context manager: the largest growth of resident memory (bytes) while the block ran, sampled in a thread.

    ``peak`` is None where the resident set cannot be read (no ``/proc``).
    """

    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.peak: int | None = None
        self._stop = threading.Event()

    def __enter__(self) -> PeakMemory:
        self._start = _rss_bytes()
        self._max = self._start or 0
        if self._start is not None:
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            value = _rss_bytes()
            if value is not None and value > self._max:
                self._max = value
            time.sleep(self.interval_s)

    def __exit__(self, *exc) -> None:
        start = self._start
        if start is None:
            return
        self._stop.set()
        self._thread.join()
        final = _rss_bytes() or self._max
        self.peak = max(self._max, final) - start


def pin_malloc_to_mmap(threshold: int = 64 * 1024) -> bool:
    """Make glibc serve every allocation of ``threshold`` bytes or more with its own ``mmap`` (and give it back
    on free), so that the resident set tracks the live tensors. Returns False where that is not possible."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(libc.mallopt(m_mmap_threshold, threshold)) and bool(libc.mallopt(m_trim_threshold, threshold))


def timed(fn: Callable[[], T]) -> tuple[T, float, int | None]:
    """Run ``fn`` once: its result, wall seconds, peak extra resident bytes."""
    with PeakMemory() as memory:
        start = time.perf_counter()
        result = fn()
        seconds = time.perf_counter() - start
    return result, seconds, memory.peak


def matmul_throughput(d_model: int, d_mlp: int, rows: int = 4096, repeats: int = 5) -> float:
    """FLOP/s of this machine on ``[rows, d_model] @ [d_model, d_mlp]`` float32 (best of ``repeats``)."""
    x, w = torch.randn(rows, d_model), torch.randn(d_model, d_mlp)
    x @ w  # warm-up
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        x @ w
        best = min(best, time.perf_counter() - start)
    return 2 * rows * d_model * d_mlp / best


def machine_line(throughput: dict[str, float]) -> str:
    """The machine, torch's version and threads, and the measured throughput per model, in one sentence."""
    rates = ", ".join(f"{name} {rate / 1e9:,.0f} GFLOP/s" for name, rate in throughput.items())
    return (
        f"{platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__} with {torch.get_num_threads()} "
        f"threads; float32 matmul throughput: {rates}"
    )
