"""Where one UNet step's time goes: minidiff's +int8 rung (minidiff bench) beside OpenVINO in bf16 (its CPU defaults,
as benchmarks/vs_engines.py runs it), SD 1.5's config, the same random weights and inputs, each read with its own
profiler and its operators put in four groups:

    python -m benchmarks.engine_profile [--size 512] [--json benchmarks/results/engine_profile_512.json]

    attention      minidiff: aten's flash-attention kernel (SDPA), or on a CPU without AMX the blockwise path's
                   batched matmuls and Inductor's softmax kernels; OpenVINO: the fused subgraphs of the export's
                   scaled_dot_product_attention nodes. Also per call for the self-attentions of the longest
                   sequence (minidiff: by the inputs' shapes, on the blockwise path its matmuls alone, as the
                   softmax kernels carry no shapes; OpenVINO: its slowest attention nodes, as many)
    convolutions   minidiff: oneDNN's int8 convolutions (and the first and last, kept in bf16); OpenVINO: its
                   Convolution nodes
    linear layers  minidiff: oneDNN's int8 matmuls (1x1 convolutions included); OpenVINO: FullyConnected
    the rest       minidiff: the profiled call's time less the three (norms, activations, quantizing, layout
                   changes, and the compiled graph's own time between its kernels); OpenVINO: its other nodes

minidiff's call is the frozen compiled one of the +int8 rung, under the rung's allocator setting (reuse memory on,
as `minidiff bench` and vs_engines time it, for both engines: it is the process's), profiled with
Inductor's kernel profile on (each fused kernel a row) before OpenVINO is in the process (after OpenVINO's
compile and calls, in one run at 512 px, the page faults of fresh memory put minidiff's int8 linear layers at
583 ms instead of about 190: they land in whichever kernel first writes a tensor);
OpenVINO's with its per-node performance counters (PERF_COUNT), whose times add up to about its call (more, where
nodes overlap). Profiling slows a call down: each engine's unprofiled call is timed too, in turns (medians).
"""

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

from benchmarks.records import save_json
from benchmarks.vs_engines import INSTALL, OpenVinoUNet, available, check_config, exported
from minidiff.bench import ladder, make_setup, resolve_config, unets
from minidiff.errors import MinidiffError
from minidiff.files import check_writable
from minidiff.measure import describe_device
from minidiff.speed import reuse_freed_memory, reuse_memory_available

RESULTS = Path(__file__).resolve().parent / "results"
GROUPS = ("attention", "convolutions", "linear layers", "the rest")


def torch_group(name: str) -> str:
    """The group of a torch.profiler row (Inductor's fused kernels, named graph_..._cpp_fused_..., are the rest, but
    for the blockwise attention's softmax kernels, which are attention)."""
    if "::_scaled_dot_product" in name:  # the kernel, not the dispatching aten::scaled_dot_product_attention
        return "attention"
    if name == "aten::bmm" or name.startswith("graph_") and ("softmax" in name or "amax_exp2" in name):
        return "attention"  # blockwise_attention (no AMX; base2_block's kernels are named by their ops): the int8
        # rung's other matmuls are oneDNN's
    if name.startswith("graph_"):
        return "the rest"
    if "qconv" in name or "convolution" in name:
        return "convolutions"
    if "qlinear" in name or name in ("aten::mm", "aten::addmm", "aten::linear"):
        return "linear layers"
    return "the rest"


def openvino_group(node_name: str, node_type: str) -> str:
    if "scaled_dot_product_attention" in node_name:
        return "attention"
    return {"Convolution": "convolutions", "FullyConnected": "linear layers"}.get(node_type, "the rest")


def grouped(rows, total_ms: float | None = None) -> dict:
    """rows: (group, ms) -> {group: ms}; with total_ms the rest is the total less the named groups."""
    groups = dict.fromkeys(GROUPS, 0.0)
    for group, ms in rows:
        groups[group] += ms
    if total_ms is not None:
        groups["the rest"] = total_ms - sum(groups[group] for group in GROUPS if group != "the rest")
    return groups


def profile_minidiff(unet, x, context) -> dict:
    from torch.profiler import ProfilerActivity, profile

    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as profiler:
        start = time.perf_counter()
        unet(x, 500, context)
        total = 1000 * (time.perf_counter() - start)
    events = profiler.events()
    groups = grouped([(torch_group(e.name), e.self_cpu_time_total / 1000) for e in events], total)
    sdpa = [e for e in events if "::_scaled_dot_product" in e.name]
    if sdpa:
        lengths = [(e.input_shapes[0][2], e.input_shapes[1][2]) for e in sdpa]  # (queries, keys) a call
        longest = max(queries for queries, keys in lengths if queries == keys)  # the top level's self-attentions
        selfs = [e.self_cpu_time_total / 1000 for e, shape in zip(sdpa, lengths) if shape == (longest, longest)]
        self_ms, calls = sum(selfs), len(selfs)
    else:
        products = [(e.input_shapes, e.self_cpu_time_total / 1000) for e in events if e.name == "aten::bmm"]
        pairs = x.shape[0] * unet.config.num_attention_heads[0]  # (batch entry, head) pairs at the top level
        self_ms, calls, longest = blockwise_self_attention(products, context.shape[1], pairs)
    return {"profiled_ms": total, "groups_ms": groups, "longest_sequence": longest,
            "self_attention_ms": self_ms / calls, "self_attention_calls": calls}


def blockwise_self_attention(products, text_tokens: int, pairs: int) -> tuple[float, int, int]:
    """(ms of the self-attentions of the longest sequence, how many, the length) from blockwise_attention's batched
    matmuls, (input shapes, ms) each: per block of n (batch entry, head) pairs and r queries, the scores
    (n, r, d) @ (n, d, keys), then (n, r, keys) @ (n, keys, d'); `pairs` of them in one attention, and text_tokens
    the cross-attentions' keys."""
    scores = [shapes for shapes, ms in products if shapes[1][2] > shapes[1][1] and shapes[1][2] != text_tokens]
    longest = max(shapes[1][2] for shapes in scores)  # the top level's self-attentions
    score_rows = sum(shapes[0][0] * shapes[0][1] for shapes in scores if shapes[1][2] == longest)
    calls = round(score_rows / (pairs * longest))
    return sum(ms for shapes, ms in products if longest in shapes[1][1:]), calls, longest


def profile_openvino(peer, x, context, calls: int) -> dict:
    (request,) = peer.compiled.values()  # the one input shape's
    start = time.perf_counter()
    peer(x, 500, context)
    total = 1000 * (time.perf_counter() - start)
    nodes = [(p.node_name, p.node_type, p.real_time.total_seconds() * 1000) for p in request.profiling_info]
    groups = grouped([(openvino_group(name, kind), ms) for name, kind, ms in nodes])
    attention = sorted((ms for name, kind, ms in nodes if openvino_group(name, kind) == "attention"), reverse=True)
    return {"profiled_ms": total, "nodes_ms": sum(groups.values()), "groups_ms": groups,
            "self_attention_ms": statistics.mean(attention[:calls]),
            "self_attention_calls": calls}


def timed_in_turns(calls: dict, repeats: int, warm_up: bool = False) -> dict:
    """{name: median ms} of `repeats` calls of each, in turns (after one untimed call each with warm_up)."""
    for call in calls.values() if warm_up else ():
        call()
    times = {name: [] for name in calls}
    for _ in range(repeats):
        for name, call in calls.items():
            start = time.perf_counter()
            call()
            times[name].append(1000 * (time.perf_counter() - start))
    return {name: statistics.median(values) for name, values in times.items()}


def measure(setup, repeats: int) -> dict:
    """The record of minidiff.bench's `setup` (its weights and inputs): both engines' groups, calls and
    self-attention times (see the module docstring)."""
    rung = next(rung for rung in ladder("cpu") if rung.key == "int8")  # quantized, calibrated, frozen
    if reuse_memory_available():  # as run_rung sets it (without it every call would pay for fresh pages, which the
        # timed rung does not)
        reuse_freed_memory(rung.reuse_memory)
    try:
        return measure_rung(setup, rung, repeats)
    finally:
        if reuse_memory_available():
            reuse_freed_memory(False)  # the process's allocator as it was


def measure_rung(setup, rung, repeats: int) -> dict:
    """measure's record, under the allocator setting measure chose."""
    from torch._inductor import config as inductor_config

    ours, _ = unets(setup, rung, {}, {})  # as the bench builds it
    x, context = setup.x.to(rung.dtype), setup.context.to(rung.dtype)
    with torch.no_grad(), inductor_config.patch({"cpp.enable_kernel_profile": True}):
        ours(x, 500, context)  # compiles, with each fused kernel named in the profile
        ours(x, 500, context)
        # profiled before OpenVINO is in the process (see the docstring); the calls in turns are timed below
        record = {"minidiff": profile_minidiff(ours, x, context)}
    path = exported(setup.config, setup.state)
    counted = OpenVinoUNet(path, "bf16")
    counted.config["PERF_COUNT"] = True  # its counters slow every call: the timed calls are another compile's
    counted(x, 500, context)  # compiles
    record["openvino"] = profile_openvino(counted, x, context, record["minidiff"]["self_attention_calls"])
    counted.compiled.clear()  # its memory, before the second compile
    peer = OpenVinoUNet(path, "bf16")  # as vs_engines runs it
    with torch.no_grad():
        call_ms = timed_in_turns({"minidiff": lambda: ours(x, 500, context),
                                  "openvino": lambda: peer(x, 500, context)}, repeats, warm_up=True)
    for name in ("minidiff", "openvino"):
        record[name]["call_ms"] = call_ms[name]
    return record | {"batch": x.shape[0],
                     "openvino_dtype": str(peer.dtype).removeprefix("torch."), "device": describe_device("cpu"),
                     "torch": torch.__version__}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.engine_profile")
    parser.add_argument("--size", type=int, default=512, help="pixels (the latent is size / 8)")
    parser.add_argument("--config", default="sd15")
    parser.add_argument("--repeats", type=int, default=3, help="unprofiled calls of each engine, in turns")
    parser.add_argument("--json", help="the record's file (default benchmarks/results/engine_profile_SIZE.json)")
    args = parser.parse_args(argv)
    path = Path(args.json or RESULTS / f"engine_profile_{args.size}.json")
    try:  # before minutes of compiling: the engine, the inputs (make_setup checks the size first), the record's file
        if not available("openvino"):
            raise MinidiffError(f"OpenVINO is not installed: {INSTALL}")
        check_config(resolve_config(args.config))
        if args.repeats < 1:
            raise MinidiffError(f"--repeats {args.repeats}: time at least 1 call of each engine")
        check_writable(path)
        setup = make_setup(args.config, args.size, 1, 1, 1, "cpu", 0)
    except MinidiffError as e:
        print(f"engine_profile: error: {e}", file=sys.stderr)
        return 2
    record = measure(setup, args.repeats) | {"config": args.config, "size": args.size}
    save_json(path, record)
    ours, theirs = record["minidiff"], record["openvino"]
    print(f"{args.config} at {args.size} px, CFG batch {record['batch']}, ms (profiled call; unprofiled call below)")
    print(f"{'':16}{'minidiff +int8':>16}{'OpenVINO ' + record['openvino_dtype']:>18}")
    for group in GROUPS:
        print(f"{group:16}{ours['groups_ms'][group]:16.1f}{theirs['groups_ms'][group]:18.1f}")
    print(f"{'nodes':16}{'':16}{theirs['nodes_ms']:18.1f}")
    for key, label in (("profiled_ms", "profiled call"), ("call_ms", "unprofiled call"),
                       ("self_attention_ms", "one self-attn.")):
        print(f"{label:16}{ours[key]:16.1f}{theirs[key]:18.1f}")
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
