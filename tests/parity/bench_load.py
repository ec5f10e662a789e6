"""Benchmark (not a test): minidiff's load_unet against diffusers' UNet2DConditionModel.from_pretrained.

    .venv/bin/python tests/parity/bench_load.py [FOLDER] [--fp16]

Without FOLDER, a full-size SD 1.5 UNet with random weights is written in the diffusers layout to a temporary
folder first (3.4 GB in float32, 1.7 GB with --fp16). Each loader runs in a fresh process, after the file has been
read once (warm page cache for both); reported: the load time, the time until every weight has been read once
(minidiff maps the file and reads on first use), the process's peak resident memory (VmHWM), and at the end its
private memory (RssAnon) and the file pages it maps (RssFile: shared with the page cache, not a copy).
Lives next to the parity tests because it imports diffusers.
"""

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RUN = """
import json, time, torch
start = time.perf_counter()
if {minidiff!r}:
    from minidiff.load import load_unet
    unet = load_unet({folder!r}, dtype=torch.float32)
else:
    from diffusers import UNet2DConditionModel
    unet = UNet2DConditionModel.from_pretrained({folder!r}, torch_dtype=torch.float32)
loaded = time.perf_counter()
touched = sum(float(p.view(-1)[::1024].sum()) for p in unet.parameters())  # one value per 4 KiB page
done = time.perf_counter()
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
gb = lambda field: int(status[field].split()[0]) / 2**20  # kB -> GiB
print(json.dumps({{"load_s": loaded - start, "load_and_read_s": done - start, "peak_rss_gb": gb("VmHWM"),
                  "private_gb": gb("RssAnon"), "file_mapped_gb": gb("RssFile")}}))
"""


def write_random_sd15_unet(folder: Path, fp16: bool) -> Path:
    """A full-size SD 1.5 UNet with random weights, saved by diffusers in its own layout."""
    import torch
    from diffusers import UNet2DConditionModel

    from minidiff.config import to_diffusers
    from minidiff.unet import UNetConfig

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(to_diffusers(UNetConfig.sd15()))
    unet = unet.to_empty(device="cpu")
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.normal_(0, 0.02)
    unet.to(torch.float16 if fp16 else torch.float32).save_pretrained(folder)
    return folder


def benchmark_load(path=None, fp16: bool = False, repeats: int = 2) -> dict:
    """{loader: [one dict per run]} for minidiff and diffusers loading the same unet/ folder."""
    with tempfile.TemporaryDirectory(dir="/tmp") as scratch:
        folder = Path(path) if path else write_random_sd15_unet(Path(scratch) / "unet", fp16)
        for file in folder.glob("*.safetensors"):  # warm the page cache, so that neither loader pays the disk
            with open(file, "rb") as handle:
                while handle.read(1 << 24):
                    pass
        results = {"minidiff": [], "diffusers": []}
        for _ in range(repeats):
            for name in results:
                code = RUN.format(minidiff=name == "minidiff", folder=str(folder))
                started = time.perf_counter()
                output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
                run = json.loads(output.stdout.strip().splitlines()[-1])
                results[name].append(run | {"process_s": time.perf_counter() - started})
        return results


if __name__ == "__main__":
    arguments = [a for a in sys.argv[1:] if not a.startswith("--")]
    print(json.dumps(benchmark_load(arguments[0] if arguments else None, fp16="--fp16" in sys.argv), indent=1))
