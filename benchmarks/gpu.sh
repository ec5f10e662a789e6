#!/usr/bin/env bash
# The whole GPU speed ladder against diffusers, in one command, for when a GPU is lent: every rung timed in turns
# with diffusers' UNet2DConditionModel on the same random weights (of full size) and inputs, CFG batch 2
# (benchmarks/vs_diffusers.py, the ladder of minidiff/bench.py), in two parts:
#     SDXL base at 1024x1024 px: fp32 eager -> +fp16 -> +channels_last
#     SD 1.5 at 512x512 px:      fp32 eager -> +fp16 -> +channels_last -> +compile -> +CUDA graphs -> +freeze -> +TAESD
# Attention is PyTorch's SDPA (flash / memory-efficient kernels) on every rung, in minidiff and in diffusers alike:
# it is the one attention function (minidiff/attention.py), not an option.
#
#     benchmarks/gpu.sh [--out DIR]    # on the GPU: DIR/gpu_ladder.txt (both tables), gpu_ladder.json (SD 1.5) and
#                                      # gpu_ladder_sdxl.json
#     benchmarks/gpu.sh --dry-run      # the same code path on the CPU: the tiny configs at 64 px, in a minute or two
#
# It installs nothing: it uses $PYTHON (default .venv/bin/python, else python3), which needs torch (a CUDA build
# on the GPU) and diffusers (pip install -e ".[parity]"). The GPU run is held to 8 minutes: SDXL first, stopped at
# 150 s, then SD 1.5 with the rest of the 480 s. The table file holds each part's log too: a line of numbers
# per finished rung, so a part stopped at its limit keeps the rungs it finished. The dry run
# drops the +CUDA graphs rung, which exists on a GPU only; on the CPU "+fp16" is "+bf16".
#
# The time, measured on an NVIDIA H200 (2026-12-04, torch 2.11.0+cu130, 16 CPU cores; benchmarks/results/
# gpu_ladder.txt): 467 s in all, within the 8 minutes.
# - SDXL, 56 s: the weights are drawn on the GPU (on one CPU core 2.6e9 draws take ~40 s); one UNet step on the CFG
#   batch at 1024 px is 13.5 TFLOP (measure.count_flops): 288 ms in fp32 (PyTorch computes fp32 matmuls without
#   TF32 by default), 49 ms in fp16. SDXL's compiled rungs are left out: its UNet has 1680 weight tensors to
#   SD 1.5's 686, and Inductor compiling it for minidiff and for diffusers would take minutes by itself.
# - SD 1.5, 411 s, nearly all of it Inductor compiling: 6 UNet compiles (minidiff and diffusers on +compile,
#   +CUDA graphs and +freeze), the VAE decoder and TAESD; its ~100 UNet calls per rung take seconds. (That run had
#   +freeze before +CUDA graphs; `--rungs cuda_graphs` alone, two UNet compiles and the VAE's, took 148 s.)
# The fp16 rungs decode with the VAE as minidiff's Pipeline does (a float16 decode that overflows is redone in
# float32); the random weights do not overflow as SDXL's trained VAE does, so SDXL's fp16 e2e column is that of a
# VAE that stays finite in fp16 (its fp16-fixed finetune).
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
out=benchmarks/results
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --out) [ $# -ge 2 ] || { echo "gpu.sh: --out needs a folder" >&2; exit 2; }; out="$2"; shift ;;
        -h|--help) sed -n '2,18p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu.sh: unknown argument '$1': use --dry-run and/or --out DIR" >&2; exit 2 ;;
    esac
    shift
done

python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
mkdir -p "$out"

if [ "$dry_run" = 1 ]; then
    device=cpu
    sdxl_args=(--config sdxl_tiny --size 64 --steps 1 --repeats 1 --rungs fp32,half,channels_last)
    sd15_args=(--config tiny --size 64 --steps 1 --repeats 1 --compile-backend eager
               --rungs fp32,half,channels_last,compile,freeze,taesd)
else
    device=cuda
    sdxl_args=(--config sdxl --size 1024 --steps 6 --repeats 2 --rungs fp32,half,channels_last)
    sd15_args=(--config sd15 --size 512 --steps 10 --repeats 3
               --rungs fp32,half,channels_last,compile,freeze,cuda_graphs,taesd)
fi
total_limit=480  # seconds, both parts together
sdxl_limit=150

# what the run needs, checked before it starts (one line each, no traceback)
"$python" - "$device" <<'PY'
import importlib.util, sys
import torch
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit(f"gpu.sh: torch {torch.__version__} sees no CUDA GPU: install a CUDA build of torch, or use --dry-run")
if importlib.util.find_spec("diffusers") is None:
    sys.exit('gpu.sh: diffusers is not installed: pip install -e ".[parity]"')
PY

table="$out/gpu_ladder.txt"
{
    echo "# benchmarks/gpu.sh$([ "$dry_run" = 1 ] && echo " --dry-run"), $(date -u '+%Y-%m-%d %H:%M UTC')"
    if [ "$device" = cuda ] && command -v nvidia-smi > /dev/null; then
        echo "# $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"
    fi
} > "$table.partial"

status=0
start_all=$SECONDS
# one part: its command line, what it prints, its time and exit status, appended to the table
run_part() {  # NAME LIMIT_S JSON ARGS...
    local name="$1" limit="$2" json="$3" part_status=0 start=$SECONDS
    shift 3
    local command=("$python" -m benchmarks.vs_diffusers --device "$device" "$@" --json "$json")
    { echo; echo "# $name: ${command[*]}"; } >> "$table.partial"
    # its table to the file; its log (a line per finished rung) to the file and the terminal
    set +e
    PYTHONUNBUFFERED=1 timeout "$limit" "${command[@]}" 2>&1 >> "$table.partial" | tee -a "$table.partial" >&2
    part_status=${PIPESTATUS[0]}
    set -e
    echo "# $name: $((SECONDS - start)) s, exit status $part_status" >> "$table.partial"
    if [ "$part_status" = 124 ]; then
        echo "gpu.sh: the $name ladder ran past $limit s and was stopped: $table has what it printed" >&2
    fi
    [ "$status" != 0 ] || status=$part_status
}
run_part SDXL "$sdxl_limit" "$out/gpu_ladder_sdxl.json" "${sdxl_args[@]}"
run_part "SD 1.5" "$((total_limit - (SECONDS - start_all)))" "$out/gpu_ladder.json" "${sd15_args[@]}"
echo "# $((SECONDS - start_all)) s in all, exit status $status" >> "$table.partial"
mv "$table.partial" "$table"
cat "$table"
exit "$status"
