"""Measuring on a device: how long calls take, peak memory, host-device synchronisations, relative error.

Used by `minidiff bench` (minidiff/bench.py) and by the comparisons with other engines in benchmarks/.
"""

import platform
import time
import warnings

import torch


def synchronize(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


class CallTimer:
    """Wraps a function and records how long each call takes: CUDA events on a GPU (no sync inside the loop, the
    times are read after it), the wall clock on a CPU (where every operator runs synchronously)."""

    def __init__(self, function, device):
        self.function, self.cuda = function, torch.device(device).type == "cuda"
        self.records = []

    def __call__(self, *args):
        if not self.cuda:
            start = time.perf_counter()
            out = self.function(*args)
            self.records.append(1000 * (time.perf_counter() - start))
            return out
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        out = self.function(*args)
        end.record()
        self.records.append((start, end))
        return out

    def milliseconds(self) -> list:
        if not self.cuda:
            return list(self.records)
        torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in self.records]


def reset_peak_memory(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:  # Linux: writing 5 to clear_refs resets the process's peak resident set size (VmHWM)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass  # then the peak is the process's peak so far


def peak_memory_mb(device) -> float:
    """CUDA max allocated since the last reset_peak_memory, or the process's peak resident memory (VmHWM)."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):  # no /proc: the peak of the whole process (resource exists on Unix only)
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def relative_error(out, reference) -> float:
    """max |out - reference| / max |reference|, in float32."""
    return ((out.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def count_syncs(function) -> int:
    """How many host-device synchronisations `function()` makes on a GPU (torch.cuda.set_sync_debug_mode)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            function()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


def describe_device(device) -> str:
    """'NVIDIA H100 ... (CUDA 12.4)' or 'CPU <model name>, N threads'."""
    device = torch.device(device)
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {name}, {torch.get_num_threads()} threads"


def profile(function, device, label: str, rows: int = 25):
    """torch.profiler on one call of function() after a warm-up call: (the table of the top operators, the
    profiler, whose export_chrome_trace writes the timeline)."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.device(device).type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    function()
    synchronize(device)
    with torch.profiler.profile(activities=activities, record_shapes=True) as profiler:
        with torch.profiler.record_function(label):
            function()
            synchronize(device)
    sort = "self_device_time_total" if torch.device(device).type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort, row_limit=rows), profiler
