"""`minidiff bench` and `minidiff profile`: how much faster each speed option makes the UNet, and at what accuracy.

The ladder switches the options of minidiff.speed on one rung at a time, on the same random weights and inputs:
    fp32 eager -> +fp16 (GPU) or +bf16 (CPU) -> +channels_last -> +compile -> +freeze (weights folded and
    pre-packed into the compiled graph) -> +CUDA graphs (GPU only) -> +reuse memory (CPU with glibc: freed tensors
    stay in the heap) -> +TAESD (decode) -> BK-SDM small, BK-SDM tiny (Kim et al. 2023: blocks removed by
    distillation)
From +channels_last on, the rungs use the fast dtype (fp16 on a GPU, bf16 on a CPU with bf16 instructions,
else fp32) and keep the options of the rung before. The rungs up to +compile (and +CUDA graphs, torch.compile's
"reduce-overhead" mode) use only options diffusers itself offers; +freeze and +reuse memory are minidiff's.

Columns:
    ms/step, it/s -> one UNet call on the classifier-free-guidance batch (2 per image), median over steps x repeats
                     calls, taken in turns with diffusers' (A B B A ...)
    e2e s         -> `steps` Euler steps with guidance plus the decode to pixels, median over the repeats
    peak MB       -> CUDA max allocated, or the process's peak resident memory (VmHWM) on a CPU
    max dev       -> max |out - out_fp32_eager| / max |out_fp32_eager| on one UNet call; PASS if <= tol
    diffusers     -> diffusers' UNet2DConditionModel with the same weights (the keys are the same), options and
                     inputs, called alternately with minidiff's; ratio = minidiff ms / diffusers ms
The summary under the table compares minidiff's fastest rung of the full network with diffusers' fastest rung
among those with diffusers' own options (torch.compile with default options, as diffusers documents it), and
with diffusers' UNet run behind minidiff's options too (the diffusers column of the +freeze and later rungs).
The weights are random: the timings are those of the real network, the images are noise.
"""

import dataclasses
import platform
import statistics
import time
from dataclasses import dataclass

import torch
from torch import nn

from minidiff.errors import MinidiffError
from minidiff.schedule import NoiseSchedule
from minidiff.speed import FastUNet, cpu_defaults, reuse_freed_memory, reuse_memory_available, timestep_tensor
from minidiff.taesd import TAESD
from minidiff.unet import UNet, UNetConfig
from minidiff.vae import AutoencoderKL, VAEConfig

TEXT_LENGTH = 77  # CLIP's context length
# max |out - out_fp32_eager| / max |out_fp32_eager| that a rung in this dtype must meet
TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 6e-2}
DTYPE_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


@dataclass
class Rung:
    key: str  # the name `--rungs` takes
    name: str
    dtype: torch.dtype = torch.float32
    channels_last: bool = False
    compile: bool = False
    freeze: bool = False  # with compile: Inductor freezing (minidiff.speed.FastUNet)
    cuda_graphs: bool = False
    reuse_memory: bool = False  # minidiff.speed.reuse_freed_memory (process-wide: diffusers' calls reuse it too)
    decoder: str = "vae"  # "vae" (AutoencoderKL) or "taesd"
    distilled: str | None = None  # None, "small" or "tiny": the BK-SDM version of the configuration
    tolerance: float | None = None  # bound on max dev; None: another network, nothing to compare with

    @property
    def minidiff_options(self) -> bool:
        """Options diffusers does not offer itself (its UNet runs behind minidiff's FastUNet for the comparison)."""
        return self.freeze or self.reuse_memory


@dataclass
class Result:
    rung: str
    dtype: str
    ms_per_step: float
    it_per_s: float
    e2e_s: float
    decode_ms: float
    peak_mb: float
    max_dev: float | None
    tolerance: float | None
    passed: bool
    diffusers_ms: float | None = None
    ratio: float | None = None
    dev_vs_diffusers: float | None = None
    syncs: int | None = None  # host-device synchronisations while sampling (GPU only)
    distilled: str | None = None  # the BK-SDM rungs run another (smaller) network
    minidiff_options: bool = False  # the rung uses options diffusers does not offer (freeze, reuse memory)


def fast_dtype(device) -> torch.dtype:
    """The half-precision dtype this device computes fastest: fp16 on CUDA, bf16 on CPUs with bf16 instructions."""
    if torch.device(device).type == "cuda":
        return torch.float16
    return torch.bfloat16 if torch.ops.mkldnn._is_mkldnn_bf16_supported() else torch.float32


def ladder(device) -> list:
    """The rungs for this device (CUDA graphs only on a GPU)."""
    cuda = torch.device(device).type == "cuda"
    half, fast = (torch.float16 if cuda else torch.bfloat16), fast_dtype(device)
    rungs = [Rung("fp32", "fp32 eager", torch.float32, tolerance=TOLERANCE[torch.float32]),
             Rung("half", f"+{DTYPE_NAMES[half]}", half, tolerance=TOLERANCE[half])]
    best = Rung("channels_last", "+channels_last", fast, channels_last=True, tolerance=TOLERANCE[fast])
    rungs.append(best)
    rungs.append(best := dataclasses.replace(best, key="compile", name="+compile", compile=True))
    rungs.append(best := dataclasses.replace(best, key="freeze", name="+freeze", freeze=True))
    if cuda:
        rungs.append(best := dataclasses.replace(best, key="cuda_graphs", name="+CUDA graphs", cuda_graphs=True))
    elif reuse_memory_available():  # the CUDA caching allocator already keeps freed GPU memory
        rungs.append(best := dataclasses.replace(best, key="reuse_memory", name="+reuse memory", reuse_memory=True))
    rungs.append(dataclasses.replace(best, key="taesd", name="+TAESD (decode)", decoder="taesd"))
    for kind in ("small", "tiny"):
        rungs.append(dataclasses.replace(best, key=f"bk_{kind}", name=f"BK-SDM {kind}", decoder="taesd",
                                         distilled=kind, tolerance=None))
    return rungs


def distilled_config(config: UNetConfig, kind: str) -> UNetConfig:
    """BK-SDM's block removal applied to any config: small = one layer per block and no mid-block; tiny = small
    without the innermost stage. From sd15 these are UNetConfig.bk_sdm_small() and .bk_sdm_tiny()."""
    small = dataclasses.replace(config, layers_per_block=1, mid_block=False)
    if kind == "small":
        return small
    return dataclasses.replace(small, block_out_channels=config.block_out_channels[:-1],
                               cross_attention=config.cross_attention[:-1],
                               num_attention_heads=config.num_attention_heads[:-1])


@torch.no_grad()
def random_weights(module: nn.Module, generator: torch.Generator) -> dict:
    """A state dict of random weights for `module` (which may live on meta), drawn fast: N(0, 1 / (3 fan_in)) for
    conv and linear weights and biases (the scale of PyTorch's default init), norm weights near 1, biases near 0."""
    state = {}
    for name, sub in module.named_modules():
        for key, param in sub.named_parameters(recurse=False):
            noise = torch.randn(param.shape, generator=generator)
            if isinstance(sub, (nn.GroupNorm, nn.LayerNorm)):
                value = (1.0 if key == "weight" else 0.0) + 0.1 * noise
            else:
                value = noise * (3 * sub.weight[0].numel()) ** -0.5
            state[f"{name}.{key}" if name else key] = value
    return state


def build(model_class, config, state: dict, dtype, device) -> nn.Module:
    """`model_class(config)` on meta, then given `state` in `dtype` (the same tensors when nothing changes)."""
    with torch.device("meta"):
        model = model_class(config)
    model.load_state_dict({k: v.to(device, dtype) for k, v in state.items()}, strict=True, assign=True)
    return cpu_defaults(model.eval())  # as the loaders do


class DiffusersUNet(nn.Module):
    """diffusers' UNet2DConditionModel, called like minidiff's UNet: (x, t, context) -> tensor."""

    def __init__(self, config: UNetConfig, state: dict, dtype, device):
        super().__init__()
        from diffusers import UNet2DConditionModel

        with torch.device("meta"):
            self.model = UNet2DConditionModel.from_config(config.to_diffusers())
        self.model.load_state_dict({k: v.to(device, dtype) for k, v in state.items()}, strict=True, assign=True)
        self.model.eval()
        self.config = config

    def forward(self, x, t, context):
        return self.model(x, t, context, return_dict=False)[0]


def diffusers_available() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


# --- measuring -----------------------------------------------------------------------------------------


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
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def guided(unet_call, context, guidance_scale: float = 7.5):
    """(x_t, t) -> eps with classifier-free guidance, one batched call on [uncond, cond] (context holds both)."""

    def model(x, t):
        pred_uncond, pred_cond = unet_call(torch.cat([x, x]), t, context).chunk(2)
        return pred_uncond + guidance_scale * (pred_cond - pred_uncond)

    return model


def relative_error(out, reference) -> float:
    """max |out - reference| / max |reference|, in float32."""
    return ((out.float() - reference.float()).abs().max() / reference.float().abs().max()).item()


def count_syncs(function) -> int:
    """How many host-device synchronisations `function()` makes on a GPU (torch.cuda.set_sync_debug_mode)."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            function()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    return sum("synchroniz" in str(w.message) for w in caught)


# --- the ladder ----------------------------------------------------------------------------------------


def resolve_config(config) -> UNetConfig:
    if isinstance(config, UNetConfig):
        return config
    presets = [name for name, value in vars(UNetConfig).items() if isinstance(value, classmethod)
               and name not in ("from_diffusers",)]
    if config not in presets:
        raise MinidiffError(f"unknown UNet config {config!r}: use one of {', '.join(presets)}")
    return getattr(UNetConfig, config)()


@dataclass
class Setup:
    """What every rung shares: configuration, weights and inputs."""

    config: UNetConfig
    device: torch.device
    latent_size: int
    images: int
    steps: int
    repeats: int
    state: dict  # fp32 random UNet weights
    x: torch.Tensor  # (2 images, C, h, w): the CFG batch
    context: torch.Tensor  # (2 images, 77, D): [uncond, cond]
    noise: torch.Tensor  # (images, C, h, w): the sampler's x_T


def make_setup(config, size: int, images: int, steps: int, repeats: int, device, seed: int) -> Setup:
    config = resolve_config(config)
    factor = 8 * config.downsample_factor
    if size < factor or size % factor:
        raise MinidiffError(f"--size {size} must be a positive multiple of {factor} px for this UNet")
    if images < 1 or steps < 1 or repeats < 1:
        raise MinidiffError(f"images, steps and repeats must be at least 1, got {images}, {steps}, {repeats}")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda" and not torch.cuda.is_available():
        raise MinidiffError("device cuda was asked for, but PyTorch sees no CUDA GPU: use --device cpu")
    generator = torch.Generator().manual_seed(seed)
    with torch.device("meta"):
        skeleton = UNet(config)
    state = {k: v.to(device) for k, v in random_weights(skeleton, generator).items()}
    h = size // 8
    randn = lambda *shape: torch.randn(shape, generator=generator).to(device)
    return Setup(config, device, h, images, steps, repeats, state, randn(2 * images, config.in_channels, h, h),
                 randn(2 * images, TEXT_LENGTH, config.cross_attention_dim), randn(images, config.in_channels, h, h))


def build_decoders(setup: Setup, dtype, rung: Rung, compile_options):
    """The rung's decoder (the SD VAE, or a tiny one for the tiny UNet; or TAESD) in its dtype and layout."""
    generator = torch.Generator().manual_seed(1)
    if rung.decoder == "taesd":
        config, model_class = None, TAESD
    else:
        config = VAEConfig.tiny() if setup.config.block_out_channels[0] < 320 else VAEConfig.sd()
        model_class = AutoencoderKL
    with torch.device("meta"):
        skeleton = model_class(config)
    decoder = build(model_class, config, random_weights(skeleton, generator), dtype, setup.device)
    if rung.channels_last:
        decoder.to(memory_format=torch.channels_last)
    if rung.compile:
        decoder.decoder.compile(**compile_options)
    return decoder


def unets(setup: Setup, rung: Rung, with_diffusers: bool, compile_options: dict):
    """(minidiff's, diffusers' or None) UNets for the rung, behind its speed options."""
    config = setup.config if rung.distilled is None else distilled_config(setup.config, rung.distilled)
    state = setup.state
    if rung.distilled is not None:
        with torch.device("meta"):
            skeleton = UNet(config)
        state = {k: v.to(setup.device) for k, v in random_weights(skeleton, torch.Generator().manual_seed(2)).items()}
    options = dict(channels_last=rung.channels_last, compile=rung.compile, freeze=rung.freeze,
                   cuda_graphs=rung.cuda_graphs, compile_options=compile_options)
    ours = FastUNet(build(UNet, config, state, rung.dtype, setup.device), **options)
    theirs = FastUNet(DiffusersUNet(config, state, rung.dtype, setup.device), **options) if with_diffusers else None
    return ours, theirs


def cached(cache: dict, key, make):
    """make() once per key; only the latest key is kept (the models of earlier rungs are freed)."""
    if key not in cache:
        cache.clear()
        cache[key] = make()
    return cache[key]


def run_rung(setup: Setup, rung: Rung, reference_out, with_diffusers: bool, compile_options: dict, log,
             caches=None) -> Result:
    """Measure one rung; `caches` (two dicts) let consecutive rungs with the same options share models."""
    unet_cache, decoder_cache = caches or ({}, {})
    if reuse_memory_available():
        reuse_freed_memory(rung.reuse_memory)
    options = (rung.dtype, rung.channels_last, rung.compile)
    ours, theirs = cached(unet_cache, (rung.distilled, rung.freeze, rung.cuda_graphs, *options),
                          lambda: unets(setup, rung, with_diffusers, compile_options))
    decoder = cached(decoder_cache, (rung.decoder, *options),
                     lambda: build_decoders(setup, rung.dtype, rung, compile_options))
    x, context, t = setup.x.to(rung.dtype), setup.context.to(rung.dtype), 500

    with torch.no_grad():
        out = ours(x, t, context)  # the first call also compiles / captures
        dev = None if rung.tolerance is None else relative_error(out, reference_out)
        dev_theirs = relative_error(theirs(x, t, context), out) if theirs is not None else None
        if rung.cuda_graphs:
            out = ours(x, t, context)  # a replay of the captured graph
            dev = None if rung.tolerance is None else relative_error(out, reference_out)
        ours(x, t, context)  # warm-up: the first calls after compiling are slow
        if theirs is not None:
            theirs(x, t, context)
        decoder.decode(setup.noise[:1].to(rung.dtype) / decoder.scaling_factor)  # warm-up (and compile)

    # UNet ms/step: single calls on the same inputs, minidiff and diffusers taking turns and turns going first
    # (A B B A ...), so that each sees the machine, its caches and the allocator's state as the other does
    timers = [CallTimer(ours, setup.device)] + ([CallTimer(theirs, setup.device)] if theirs is not None else [])
    with torch.no_grad():
        for call in range(setup.steps * setup.repeats):
            for timer in timers if call % 2 == 0 else timers[::-1]:
                timer(x, t, context)
    medians = [statistics.median(timer.milliseconds()) for timer in timers]
    log(f"  {rung.name}: {setup.steps * setup.repeats} UNet calls timed, median ms minidiff {medians[0]:.1f}"
        + (f", diffusers {medians[1]:.1f}" if theirs is not None else ""))

    # end to end: minidiff's sampling loop with guidance, then the decode
    noise = setup.noise.to(rung.dtype)
    schedule = NoiseSchedule.sd()
    e2e, decode_ms, peaks = [], [], []
    from minidiff.samplers import sample

    for repeat in range(setup.repeats):
        reset_peak_memory(setup.device)
        synchronize(setup.device)
        start = time.perf_counter()
        latents = sample(guided(ours, context), noise, "euler", setup.steps, schedule=schedule)
        decode_start = time.perf_counter()
        with torch.no_grad():
            decoder.decode(latents / decoder.scaling_factor)
        synchronize(setup.device)
        end = time.perf_counter()
        e2e.append(end - start)
        decode_ms.append(1000 * (end - decode_start))
        peaks.append(peak_memory_mb(setup.device))
        log(f"  {rung.name}: end-to-end run {repeat + 1}/{setup.repeats} done")

    syncs = None
    if setup.device.type == "cuda":  # the one expected: the NaN check after the loop (Denoiser.check_finite)
        syncs = count_syncs(lambda: sample(guided(ours, context), noise, "euler", setup.steps, schedule=schedule))
    ms, theirs_ms = medians[0], medians[1] if theirs is not None else None
    passed = bool(torch.isfinite(out).all()) and (dev is None or dev <= rung.tolerance)
    return Result(rung.name, DTYPE_NAMES[rung.dtype], ms, 1000 / ms, statistics.median(e2e),
                  statistics.median(decode_ms), max(peaks), dev, rung.tolerance, passed, theirs_ms,
                  ms / theirs_ms if theirs_ms else None, dev_theirs, syncs, rung.distilled, rung.minidiff_options)


def describe_device(device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            name = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"CPU {name}, {torch.get_num_threads()} threads"


def bench(config="sd15", size: int = 256, images: int = 1, steps: int = 4, repeats: int = 3, device=None,
          rungs=None, diffusers: bool = True, compile_options: dict | None = None, seed: int = 0, log=print):
    """Run the ladder; returns (a header describing the run, [Result per rung])."""
    all_rungs = ladder(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if rungs is not None:
        unknown = [key for key in rungs if key not in {r.key for r in all_rungs}]
        if unknown:
            raise MinidiffError(f"unknown rung(s) {', '.join(unknown)}: choose from "
                                f"{', '.join(r.key for r in all_rungs)}")
        all_rungs = [r for r in all_rungs if r.key in rungs]
    with_diffusers = diffusers and diffusers_available()
    setup = make_setup(config, size, images, steps, repeats, device, seed)
    compile_options = compile_options or {}
    with torch.no_grad():
        reference_out = build(UNet, setup.config, setup.state, torch.float32, setup.device)(
            setup.x, timestep_tensor(500, setup.x), setup.context)
    header = (f"minidiff bench: UNet {config if isinstance(config, str) else 'custom'} with RANDOM weights (the "
              f"timings are real, the images noise); {size}x{size} px = {setup.latent_size}x{setup.latent_size} "
              f"latent, CFG batch {2 * images}, {steps} Euler steps + decode, {repeats} repeat(s), medians\n"
              f"device: {describe_device(setup.device)}; torch {torch.__version__}"
              + (f"; compile {compile_options}" if compile_options else "")
              + ("; diffusers " + __import__("diffusers").__version__ + " interleaved" if with_diffusers
                 else "; diffusers: not compared"))
    results, caches = [], ({}, {})
    try:
        for rung in all_rungs:
            log(f"rung {rung.name} ...")
            results.append(run_rung(setup, rung, reference_out, with_diffusers, compile_options, log, caches))
    finally:
        if reuse_memory_available():
            reuse_freed_memory(False)  # the process's allocator as it was
    return header, results


def format_table(results: list) -> str:
    """The results as a fixed-width table."""
    number = lambda value, spec: "-" if value is None else format(value, spec)
    lines = [f"{'rung':18s} {'dtype':5s} {'ms/step':>9s} {'it/s':>7s} {'e2e s':>8s} {'decode ms':>9s} "
             f"{'peak MB':>8s} {'max dev':>8s} {'tol':>7s} {'ok':4s} {'diffusers ms':>12s} {'ratio':>6s} "
             f"{'vs diffusers':>12s} {'syncs':>5s}"]
    for r in results:
        lines.append(f"{r.rung:18s} {r.dtype:5s} {r.ms_per_step:9.1f} {r.it_per_s:7.2f} {r.e2e_s:8.2f} "
                     f"{r.decode_ms:9.1f} {r.peak_mb:8.0f} {number(r.max_dev, '8.1e')} "
                     f"{number(r.tolerance, '7.0e')} {'PASS' if r.passed else 'FAIL'} "
                     f"{number(r.diffusers_ms, '12.1f')} {number(r.ratio, '6.2f')} "
                     f"{number(r.dev_vs_diffusers, '12.1e')} {number(r.syncs, '5d')}")
    return "\n".join(lines)


def summary(results: list) -> str:
    """minidiff's fastest rung of the full network against diffusers' fastest with its own options, and against
    diffusers' fastest behind minidiff's options too."""
    full = [r for r in results if r.distilled is None]
    theirs = [r for r in full if r.diffusers_ms is not None]
    if not theirs:
        return ""
    ours = min(full, key=lambda r: r.ms_per_step)
    lines = [f"fastest (full network, UNet ms/step): minidiff {ours.rung} {ours.ms_per_step:.1f}"]
    for label, rows in (("diffusers with its own options", [r for r in theirs if not r.minidiff_options]),
                        ("diffusers behind minidiff's options too", [r for r in theirs if r.minidiff_options])):
        if rows:
            best = min(rows, key=lambda r: r.diffusers_ms)
            lines.append(f"  {label}: {best.rung} {best.diffusers_ms:.1f}; ratio "
                         f"{ours.ms_per_step / best.diffusers_ms:.2f}")
    return "\n".join(lines)


def write_results(path, results: list) -> None:
    """Write the results as JSON or CSV (by the file's extension), atomically."""
    import csv
    import json

    from minidiff.cli import atomic_save

    rows = [dataclasses.asdict(r) for r in results]
    if str(path).endswith(".json"):
        atomic_save(path, lambda tmp: open(tmp, "w").write(json.dumps(rows, indent=2)))
    elif str(path).endswith(".csv"):
        def save(tmp):
            with open(tmp, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]) if rows else [])
                writer.writeheader()
                writer.writerows(rows)
        atomic_save(path, save)
    else:
        raise MinidiffError(f"cannot tell the format of {path}: name it .json or .csv")


# --- the profile ---------------------------------------------------------------------------------------


def profile_unet(config="sd15", size: int = 256, images: int = 1, device=None, dtype=torch.float32,
                 channels_last: bool = False, rows: int = 25, seed: int = 0):
    """torch.profiler on one UNet step (after a warm-up call): (the table of the top operators, the profiler)."""
    setup = make_setup(config, size, images, 1, 1, device, seed)
    unet = FastUNet(build(UNet, setup.config, setup.state, dtype, setup.device), channels_last=channels_last)
    x, context = setup.x.to(dtype), setup.context.to(dtype)
    activities = [torch.profiler.ProfilerActivity.CPU]
    if setup.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.no_grad():
        unet(x, 500, context)
        synchronize(setup.device)
        with torch.profiler.profile(activities=activities, record_shapes=True) as profiler:
            with torch.profiler.record_function("unet step"):
                unet(x, 500, context)
                synchronize(setup.device)
    sort = "self_device_time_total" if setup.device.type == "cuda" else "self_cpu_time_total"
    return profiler.key_averages().table(sort_by=sort, row_limit=rows), profiler
