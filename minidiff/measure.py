"""Measuring on a device: how long calls take, peak memory, host-device synchronisations, relative error; the
bench's results as a table, its summary, and JSON or CSV.

Used by `minidiff bench` (minidiff/bench.py) and by the comparisons with other engines in benchmarks/.
"""

import csv
import dataclasses
import importlib.metadata
import json
import math
import platform
import time
import warnings

import torch

from minidiff.errors import MinidiffError
from minidiff.files import atomic_save


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


def resident_mb() -> float | None:
    """The process's resident memory now (VmRSS), or None where /proc is missing."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024
    except (OSError, StopIteration):
        return None


def call_memory_mb(function, device) -> float | None:
    """The memory one call of function() takes above what was in use before it: CUDA max allocated minus allocated,
    or on a CPU the process's peak resident memory during the call minus its resident memory before (None without
    /proc). Memory an engine's own allocator kept from earlier calls counts as in use before."""
    device = torch.device(device)
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        function()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    reset_peak_memory(device)
    before = resident_mb()
    function()
    return None if before is None else max(0.0, peak_memory_mb(device) - before)


def count_flops(module, *args) -> int:
    """FLOPs of module(*args), counted layer by layer: 2 per multiply-add of every convolution and linear layer, and of
    attention's two products (Q K^T, then the weights times V: 4 B N M inner for N queries, M keys and the inner
    width of the heads). Norms, activations and elementwise sums are left out (a few percent of a UNet's). Built on
    `meta` with meta inputs, the module computes nothing. Attention is any module with `to_q` and `to_k` called as
    (x (B, N, C), context (B, M, D) or None: x)."""
    total = 0

    def count(module, args, kwargs, out):
        nonlocal total
        if isinstance(module, torch.nn.Conv2d):
            total += 2 * out.numel() * module.in_channels // module.groups * math.prod(module.kernel_size)
        elif isinstance(module, torch.nn.Linear):
            total += 2 * out.numel() * module.in_features
        else:
            x = args[0]
            context = args[1] if len(args) > 1 else kwargs.get("context")
            keys = x.shape[1] if context is None else context.shape[1]
            total += 4 * x.shape[0] * x.shape[1] * keys * module.to_q.out_features

    hooks = [sub.register_forward_hook(count, with_kwargs=True) for sub in module.modules()
             if isinstance(sub, (torch.nn.Conv2d, torch.nn.Linear)) or (hasattr(sub, "to_q") and hasattr(sub, "to_k"))]
    try:
        with torch.no_grad():
            module(*args)
    finally:
        for hook in hooks:
            hook.remove()
    return total


# FLOPs per cycle per core, assumed: two FMA units at the widest vector width the flags name (2 FLOPs per lane per
# unit: AVX-512 16 fp32 lanes -> 64, AVX2 + FMA 8 lanes -> 32, else 8); bf16 with AVX512_BF16 (VDPBF16PS: two bf16
# products per fp32 lane) twice the fp32 rate, with AMX (AMX_BF16) 1024; no bf16 instructions: the fp32 rate. CPUs
# with one FMA unit (some Xeon Silver, Zen 4's AVX-512 split into two 256-bit halves) reach half of this.
def cpu_peak_flops(threads: int | None = None, cpuinfo: str | None = None) -> dict:
    """{"fp32": FLOP/s, "bf16": FLOP/s, "fp16": FLOP/s (the fp32 rate), "basis": how it was found}: threads (default
    torch's, each taken as a core) x the clock in /proc/cpuinfo ("cpu MHz": in a VM often the nominal clock; a
    boost clock above it gives shares over 100%) x FLOPs per cycle from the CPU's flags (see above). {} without
    /proc/cpuinfo (`cpuinfo`: its text, read from the file when None)."""
    threads = threads or torch.get_num_threads()
    if cpuinfo is None:
        try:
            with open("/proc/cpuinfo") as f:
                cpuinfo = f.read()
        except OSError:
            return {}
    flags, mhz = set(), []
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() == "flags" and not flags:
            flags = set(value.split())
        elif key.strip() == "cpu MHz":
            mhz.append(float(value))
    if not mhz:
        return {}  # not Linux: the clock is unknown
    fp32 = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 8
    bf16 = 1024 if "amx_bf16" in flags else 2 * fp32 if "avx512_bf16" in flags else fp32
    hz = max(mhz) * 1e6
    isa = "AMX" if "amx_bf16" in flags else "AVX512_BF16" if "avx512_bf16" in flags else "no bf16 instructions"
    return {"fp32": threads * hz * fp32, "bf16": threads * hz * bf16, "fp16": threads * hz * fp32,
            "basis": f"{threads} cores x {hz / 1e9:.2f} GHz x {fp32} fp32 / {bf16} bf16 FLOPs per cycle "
                     f"({'AVX-512' if fp32 == 64 else 'AVX2' if fp32 == 32 else 'SSE'}, {isa})"}


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


def engine_version(name: str) -> str:
    """'diffusers 0.32.1' when a package of that name is installed, else the name alone."""
    try:
        return f"{name} {importlib.metadata.version(name)}"
    except importlib.metadata.PackageNotFoundError:
        return name


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


def flat_row(result) -> dict:
    """A bench Result (minidiff.bench) as one flat row: its fields, then NAME_FIELD for each field of each peer."""
    row = dataclasses.asdict(result)
    for name, peer in row.pop("peers").items():
        row |= {f"{name}_{'ms' if key == 'ms_per_step' else key}": value for key, value in peer.items()}
    return row


def write_results(path, results: list) -> None:
    """Write the bench's results as JSON or CSV (by the file's extension), atomically."""
    rows = [flat_row(r) for r in results]
    if str(path).endswith(".json"):
        atomic_save(path, lambda tmp: open(tmp, "w").write(json.dumps(rows, indent=2)))
    elif str(path).endswith(".csv"):
        def save(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
                writer.writeheader(), writer.writerows(rows)
        atomic_save(path, save)
    else:
        raise MinidiffError(f"cannot tell the format of {path}: name it .json or .csv")


# --- the bench's results (minidiff.bench.Result): a table, the summary, a file -------------------------------


def peer_names(results: list) -> list:
    """The peers of the results, in the order they ran."""
    return list(dict.fromkeys(name for r in results for name in r.peers))


def rung_line(r) -> str:
    """One line of a finished rung's numbers (a minidiff.bench.Result), logged as the rung ends: the table is printed
    after the last one."""
    dev = "" if r.max_dev is None else f", max dev {r.max_dev:.1e}"
    return (f"  {r.rung}: {r.ms_per_step:.1f} ms/step, e2e {r.e2e_s:.2f} s, peak {r.peak_mb:.0f} MB{dev}, "
            + ("PASS" if r.passed else "FAIL")
            + "".join(f"; {name} {p.ms_per_step:.1f} ms (ratio {p.ratio:.2f})" for name, p in r.peers.items()))


def format_table(results: list) -> str:
    """The results as a fixed-width table: five columns per peer (its ms, the ratio, the deviation from minidiff's
    output, its deviation from fp32 eager, the memory of its call)."""
    number = lambda value, spec: "-" if value is None else format(value, spec)
    names = peer_names(results)
    width = lambda name: max(12, len(name) + 4)
    lines = [f"{'rung':18s} {'dtype':5s} {'ms/step':>9s} {'% peak':>6s} {'it/s':>7s} {'e2e s':>8s} {'decode ms':>9s} "
             f"{'peak MB':>8s} {'call MB':>8s} {'max dev':>8s} {'tol':>7s} {'ok':4s} "
             + "".join(f"{name + ' ms':>{width(name)}s} {'ratio':>6s} {'vs ' + name:>{width(name)}s} "
                       f"{name + ' dev':>{width(name)}s} {name + ' MB':>{width(name)}s} " for name in names)
             + f"{'syncs':>5s}"]
    for r in results:
        peers = {name: r.peers.get(name) for name in names}
        share = None if r.peak_share is None else 100 * r.peak_share
        lines.append(f"{r.rung:18s} {r.dtype:5s} {r.ms_per_step:9.1f} {number(share, '6.1f')} "
                     f"{r.it_per_s:7.2f} {r.e2e_s:8.2f} "
                     f"{r.decode_ms:9.1f} {r.peak_mb:8.0f} {number(r.call_mb, '8.0f')} {number(r.max_dev, '8.1e')} "
                     f"{number(r.tolerance, '7.0e')} {'PASS' if r.passed else 'FAIL'} "
                     + "".join(f"{number(p and p.ms_per_step, f'{width(name)}.1f')} {number(p and p.ratio, '6.2f')} "
                               f"{number(p and p.max_dev, f'{width(name)}.1e')} "
                               f"{number(p and p.fp32_dev, f'{width(name)}.1e')} "
                               f"{number(p and p.call_mb, f'{width(name)}.0f')} " for name, p in peers.items())
                     + number(r.syncs, "5d"))
    return "\n".join(lines)


def summary(results: list) -> str:
    """minidiff's fastest rung of the full network against each torch peer's fastest with its own options, and
    against the peer's fastest behind minidiff's options too; an engine (its own runtime, no rung's options) by
    the dtype it computes in, also against minidiff's fastest rung in that dtype."""
    full = [r for r in results if r.distilled is None]
    ours, lines = min(full, key=lambda r: r.ms_per_step, default=None), []
    for name in peer_names(full):
        theirs = [r for r in full if name in r.peers]
        if any(r.peers[name].own_runtime for r in theirs):
            for dtype in dict.fromkeys(r.peers[name].dtype for r in theirs):
                best = min((r for r in theirs if r.peers[name].dtype == dtype), key=lambda r: r.peers[name].ms_per_step)
                ms, same = best.peers[name].ms_per_step, [r for r in full if r.dtype == dtype]
                mine = min(same, key=lambda r: r.ms_per_step, default=None)
                lines.append(f"  {name} {dtype} (its own runtime, fastest on the {best.rung} rung) {ms:.1f}; ratio "
                             f"{ours.ms_per_step / ms:.2f}" + (f"; minidiff's fastest {dtype} rung {mine.rung} "
                             f"{mine.ms_per_step:.1f}: ratio {mine.ms_per_step / ms:.2f}" if mine else ""))
            continue
        for label, rows in ((f"{name} with its own options", [r for r in theirs if not r.minidiff_options]),
                            (f"{name} behind minidiff's options too", [r for r in theirs if r.minidiff_options])):
            if rows:
                best = min(rows, key=lambda r: r.peers[name].ms_per_step)
                lines.append(f"  {label}: {best.rung} {best.peers[name].ms_per_step:.1f}; ratio "
                             f"{ours.ms_per_step / best.peers[name].ms_per_step:.2f}")
    if not lines:
        return ""  # no peer: nothing to compare
    return "\n".join([f"fastest (full network, UNet ms/step): minidiff {ours.rung} {ours.ms_per_step:.1f}", *lines])
