#!/usr/bin/env bash
# The whole GPU speed ladder against diffusers, in one command, for when a GPU is lent: SD 1.5's UNet config (random
# weights of full size) at 512x512 px, CFG batch 2, every rung timed in turns with diffusers' UNet on the same
# weights and inputs (benchmarks/vs_diffusers.py, the ladder of minidiff/bench.py):
#     fp32 eager -> +fp16 -> +channels_last -> +compile -> +freeze -> +CUDA graphs -> +TAESD (decode)
# Attention is PyTorch's SDPA (flash / memory-efficient kernels) on every rung, in minidiff and in diffusers alike:
# it is the one attention function (minidiff/attention.py), not an option.
#
#     benchmarks/gpu.sh [--out DIR]    # on the GPU: DIR/gpu_ladder.txt (the table) and DIR/gpu_ladder.json
#     benchmarks/gpu.sh --dry-run      # the same code path on the CPU: the tiny config at 64 px, in seconds
#
# It installs nothing: it uses $PYTHON (default .venv/bin/python, else python3), which needs torch (a CUDA build
# on the GPU) and diffusers (pip install -e ".[parity]"). The GPU run is held to 8 minutes (timeout 480 s); the
# table is written when the ladder finishes. The dry run drops the +CUDA graphs rung, which exists on a GPU only.
set -euo pipefail
cd "$(dirname "$0")/.."

dry_run=0
out=benchmarks/results
while [ $# -gt 0 ]; do
    case "$1" in
        --dry-run) dry_run=1 ;;
        --out) [ $# -ge 2 ] || { echo "gpu.sh: --out needs a folder" >&2; exit 2; }; out="$2"; shift ;;
        -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu.sh: unknown argument '$1': use --dry-run and/or --out DIR" >&2; exit 2 ;;
    esac
    shift
done

python="${PYTHON:-.venv/bin/python}"
[ -x "$python" ] || python=python3
mkdir -p "$out"

if [ "$dry_run" = 1 ]; then
    device=cpu
    args=(--config tiny --size 64 --steps 1 --repeats 1 --compile-backend eager
          --rungs fp32,half,channels_last,compile,freeze,taesd)
    limit=300
else
    device=cuda
    args=(--config sd15 --size 512 --steps 10 --repeats 3
          --rungs fp32,half,channels_last,compile,freeze,cuda_graphs,taesd)
    limit=480
fi

# what the run needs, checked before it starts (one line each, no traceback)
"$python" - "$device" <<'EOF'
import importlib.util, sys
import torch
if sys.argv[1] == "cuda" and not torch.cuda.is_available():
    sys.exit(f"gpu.sh: torch {torch.__version__} sees no CUDA GPU: install a CUDA build of torch, or use --dry-run")
if importlib.util.find_spec("diffusers") is None:
    sys.exit('gpu.sh: diffusers is not installed: pip install -e ".[parity]"')
EOF

table="$out/gpu_ladder.txt"
command=("$python" -m benchmarks.vs_diffusers --device "$device" "${args[@]}" --json "$out/gpu_ladder.json")
{
    echo "# benchmarks/gpu.sh$([ "$dry_run" = 1 ] && echo " --dry-run"), $(date -u '+%Y-%m-%d %H:%M UTC')"
    echo "# ${command[*]}"
    if [ "$device" = cuda ] && command -v nvidia-smi > /dev/null; then
        echo "# $(nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | head -1)"
    fi
} > "$table.partial"
start=$SECONDS
status=0
PYTHONUNBUFFERED=1 timeout "$limit" "${command[@]}" >> "$table.partial" || status=$?
echo "# $((SECONDS - start)) s, exit status $status" >> "$table.partial"
mv "$table.partial" "$table"
cat "$table"
if [ "$status" = 124 ]; then
    echo "gpu.sh: the ladder ran past $limit s and was stopped: $table has what it printed" >&2
fi
exit "$status"
