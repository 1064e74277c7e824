"""Measuring for the examples: interleaved timing of candidates, peak tensor memory, and what was measured on what."""

import gc
import os
import platform
import statistics
import subprocess
import time
from collections.abc import Callable
from itertools import accumulate
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile
from tqdm.auto import tqdm


def synchronize(device: torch.device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_interleaved(candidates: dict[str, Callable], repeats: int, device: torch.device, desc: str):
    """Seconds per call of every candidate over `repeats` interleaved rounds, after one warm-up round.

    A candidate that returns a float reports its own elapsed seconds (to leave setup such as a prefill out).
    """
    for fn in candidates.values():
        fn()
    times = {name: [] for name in candidates}
    for _ in tqdm(range(repeats), desc=desc, leave=False):
        for name, fn in candidates.items():
            synchronize(device)
            start = time.perf_counter()
            own = fn()
            synchronize(device)
            times[name].append(own if isinstance(own, float) else time.perf_counter() - start)
    return times


def summary(seconds: list[float]) -> dict:
    return {"min_s": min(seconds), "median_s": statistics.median(seconds), "spread": max(seconds) / min(seconds)}


def peak_memory(fn: Callable, device: torch.device) -> int:
    """Peak bytes of tensor memory allocated while `fn` runs, above what was live before it.

    CUDA: the caching allocator's peak statistics. CPU has no such statistics: with `profile_memory=True` torch's CPU
    allocator reports every allocation and free made during profiling to the profiler; the peak is the largest running
    total of those. Tensor memory only:
    neither counts the Python heap, BLAS scratch buffers or what the allocator caches.
    """
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        start = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - start
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # The profiler's "[memory]" events: bytes allocated (+) or freed (-), in time order; their running sum is the
    # memory allocated since profiling began.
    events = sorted(
        (e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
    )
    return max(accumulate(nbytes for _, nbytes in events)) if events else 0


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads"


def source_revision() -> str:
    """The git revision of the code measured (`-dirty` when the working tree has changes), or 'unknown'."""
    try:
        return subprocess.run(
            ["git", "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).resolve().parent,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def release(device: torch.device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
