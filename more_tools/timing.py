"""Measuring for the examples: interleaved timing of candidates, peak tensor memory, and what was measured on what."""

import gc
import os
import platform
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch._C._profiler import _EventType
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
    median = sorted(seconds)[len(seconds) // 2]
    return {"min_s": min(seconds), "median_s": median, "spread": max(seconds) / min(seconds)}


def peak_memory(fn: Callable, device: torch.device) -> int:
    """Peak bytes of tensor memory allocated while `fn` runs, above what was live before it.

    CUDA: the caching allocator's peak statistics. CPU has no such statistics: with `profile_memory=True` torch's CPU
    allocator reports every allocation and free made during profiling to the profiler, with the running total of the
    bytes it allocated since profiling began still live; the peak is the largest running total. Tensor memory only:
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
    events = []  # (time, running total after the event, bytes allocated (+) or freed (-))
    nodes = list(prof.profiler.kineto_results.experimental_event_tree())
    while nodes:
        node = nodes.pop()
        if node.tag == _EventType.Allocation:
            events.append((node.start_time_ns, node.extra_fields.total_allocated, node.extra_fields.alloc_size))
        nodes.extend(node.children)
    if not events:
        return 0
    events.sort()
    start = events[0][1] - events[0][2]
    return max(total for _, total, _ in events) - start


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
