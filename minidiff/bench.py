"""`minidiff bench` and `minidiff profile`: how much faster each speed option makes the UNet, and at what accuracy.

The ladder switches the options of minidiff.speed on one rung at a time, on the same random weights and inputs:
    fp32 eager -> +fp16 (GPU) or +bf16 (CPU) -> +channels_last -> +compile -> +CUDA graphs (GPU only) -> +freeze
    (weights folded and pre-packed into the compiled graph) -> +reuse memory (CPU with glibc: freed tensors stay
    in the heap) -> +TAESD (decode) -> BK-SDM small, BK-SDM tiny (Kim et al. 2023: blocks removed by distillation);
    on a CPU, +int8 (+reuse memory in 8-bit weights and activations, calibrated scales: minidiff.speed.int8) ->
    +autotune (Inductor's max_autotune: C++ GEMM kernels tuned at compile, the graph called from C++); then, where
    the fast dtype is not fp32, fp32 +every option (channels_last to reuse memory in float32: beside an fp32 engine)
From +channels_last on, the rungs use the fast dtype (fp16 on a GPU, bf16 on a CPU with bf16 instructions,
else fp32) and keep the options of the rung before. The rungs up to +CUDA graphs (torch.compile's
"reduce-overhead" mode) use only options diffusers itself offers; +freeze and +reuse memory are minidiff's.

Peers: other engines timed on the same weights and inputs (benchmarks/vs_diffusers.py: diffusers; the library
imports none): a factory (config, state: fp32 tensors it must not change, dtype, device, rung: Rung) -> a callable
(x, t, context). A torch module runs behind the rung's options (FastUNet), as minidiff's UNet does; any other
callable (an engine with its own runtime: benchmarks/vs_engines.py) is called as it is, `t` an int, the inputs in
its `dtype` attribute if it has one (the dtype it computes in), else in the rung's.

Columns:
    ms/step, it/s -> one UNet call on the classifier-free-guidance batch (2 per image), median over steps x repeats
                     calls, taken in turns with the peers' (A B B A ...)
    e2e s         -> `steps` Euler steps with guidance plus the decode to pixels, median over the repeats (decoded
                     as the Pipeline does, minidiff.speed.vae_decode; random weights do not overflow in float16 as
                     SDXL's trained VAE does: an SDXL fp16 e2e is that of its fp16-fixed finetune)
    peak MB       -> CUDA max allocated, or the process's peak resident memory (VmHWM) on a CPU
    max dev       -> max |out - out_fp32_eager| / max |out_fp32_eager| on one UNet call; PASS if <= tol
    % peak        -> FLOPs of one step (measure.count_flops: convolutions, linear layers, attention's products) / its
                     time, as a share of the CPU's peak in the rung's dtype (measure.cpu_peak_flops; its basis is in
                     the header); none on a GPU
    call MB       -> the memory one warm UNet call takes above what was in use before it (measure.call_memory_mb)
    NAME ms       -> per peer: its median ms/step; ratio = minidiff ms / NAME ms; vs NAME = max |out_NAME - out| /
                     max |out| on the same call; NAME dev = its max dev from fp32 eager; NAME MB = its call MB
The summary sets minidiff's fastest rung of the full network against each torch peer's fastest with options it
offers itself (diffusers: torch.compile, and its CUDA graphs on a GPU) and behind minidiff's too (+freeze and
later); and against an engine's fastest in each dtype, beside minidiff's fastest rung in that dtype.
The weights are random: the timings are those of the real network, the images are noise.
"""

import dataclasses
import gc
import statistics
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from minidiff import measure
from minidiff.checkpoint import build, meta_model
from minidiff.errors import MinidiffError
from minidiff.pipeline import guided
from minidiff.samplers import sample
from minidiff.schedule import NoiseSchedule
from minidiff.sdxl import WithAddedConditioning
from minidiff.speed import FastUNet, cpu_defaults, reuse_freed_memory, reuse_memory_available, vae_decode
from minidiff.speed.fast_unet import timestep_tensor
from minidiff.speed.int8 import INT8_TOLERANCE, calibrate_int8, int8_available, quantize_int8
from minidiff.taesd import TAESD
from minidiff.tokenizer import MAX_LENGTH
from minidiff.unet import UNet, UNetConfig
from minidiff.vae import AutoencoderKL, VAEConfig

GUIDANCE_SCALE = 7.5  # of the end-to-end runs
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
    reuse_memory: bool = False  # minidiff.speed.reuse_freed_memory (process-wide: the peers' calls reuse it too)
    decoder: str = "vae"  # "vae" (AutoencoderKL) or "taesd"
    distilled: str | None = None  # None, "small" or "tiny": the BK-SDM version of the configuration
    int8: bool = False  # minidiff.speed.quantize_int8 before the options (a CPU with oneDNN)
    autotune: bool = False  # with compile: Inductor's max_autotune (minidiff.speed.fast_unet.AUTOTUNE_OPTIONS)
    tolerance: float | None = None  # bound on max dev; None: another network, nothing to compare with

    @property
    def minidiff_options(self) -> bool:
        """Options diffusers does not offer itself (its UNet runs behind minidiff's FastUNet for the comparison)."""
        return self.freeze or self.reuse_memory or self.int8


@dataclass
class PeerResult:
    ms_per_step: float
    ratio: float  # minidiff's ms / the peer's ms
    max_dev: float | None  # max |out_peer - out| / max |out|, against minidiff's output on the same rung
    fp32_dev: float | None = None  # max |out_peer - out_fp32_eager| / max |out_fp32_eager|
    call_mb: float | None = None  # the memory one warm call of the peer takes (measure.call_memory_mb)
    dtype: str = "fp32"  # what the peer computes in
    own_runtime: bool = False  # an engine called as it is, not a torch module behind the rung's options


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
    syncs: int | None = None  # host-device synchronisations while sampling (GPU only)
    distilled: str | None = None  # the BK-SDM rungs run another (smaller) network
    minidiff_options: bool = False  # the rung uses options diffusers does not offer (freeze, reuse memory)
    peers: dict = field(default_factory=dict)  # name -> PeerResult
    call_mb: float | None = None  # the memory one warm UNet call takes (measure.call_memory_mb)
    gflop: float | None = None  # FLOPs of one UNet step on the CFG batch / 1e9 (measure.count_flops)
    peak_share: float | None = None  # gflop / the step's time / the CPU's peak in the rung's dtype


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
    if cuda:  # before +freeze: torch.compile's "reduce-overhead" mode, which diffusers offers too
        rungs.append(best := dataclasses.replace(best, key="cuda_graphs", name="+CUDA graphs", cuda_graphs=True))
    rungs.append(best := dataclasses.replace(best, key="freeze", name="+freeze", freeze=True))
    if not cuda and reuse_memory_available():  # the CUDA caching allocator already keeps freed GPU memory
        rungs.append(best := dataclasses.replace(best, key="reuse_memory", name="+reuse memory", reuse_memory=True))
    if not cuda and int8_available():
        quantized = dataclasses.replace(best, key="int8", name="+int8", int8=True, tolerance=INT8_TOLERANCE)
        rungs += [quantized, dataclasses.replace(quantized, key="autotune", name="+autotune", autotune=True)]
    rungs.append(dataclasses.replace(best, key="taesd", name="+TAESD (decode)", decoder="taesd"))
    for kind in ("small", "tiny"):
        rungs.append(dataclasses.replace(best, key=f"bk_{kind}", name=f"BK-SDM {kind}", decoder="taesd",
                                         distilled=kind, tolerance=None))
    if fast != torch.float32:  # every option in float32: what to set beside an engine that computes in float32
        rungs.append(dataclasses.replace(best, key="fp32_fast", name="fp32 +every option", dtype=torch.float32,
                                         tolerance=TOLERANCE[torch.float32]))
    return rungs


def distilled_config(config: UNetConfig, kind: str) -> UNetConfig:
    """BK-SDM's block removal applied to any config: small = one layer per block and no mid-block; tiny = small
    without the innermost stage. From sd15 these are UNetConfig.bk_sdm_small() and .bk_sdm_tiny()."""
    small = dataclasses.replace(config, layers_per_block=1, mid_block=False)
    return small if kind == "small" else dataclasses.replace(
        small, block_out_channels=config.block_out_channels[:-1], cross_attention=config.cross_attention[:-1],
        num_attention_heads=config.num_attention_heads[:-1])


@torch.no_grad()
def random_weights(module: nn.Module, generator: torch.Generator) -> dict:
    """A state dict of random weights for `module` (which may live on meta), drawn fast on the generator's device:
    N(0, 1 / (3 fan_in)) for conv and linear weights and biases (the scale of PyTorch's default init), norm weights
    near 1, biases near 0."""
    state = {}
    for name, sub in module.named_modules():
        for key, param in sub.named_parameters(recurse=False):
            noise = torch.randn(param.shape, generator=generator, device=generator.device)
            if isinstance(sub, (nn.GroupNorm, nn.LayerNorm)):
                value = (1.0 if key == "weight" else 0.0) + 0.1 * noise
            else:
                value = noise * (3 * sub.weight[0].numel()) ** -0.5
            state[f"{name}.{key}" if name else key] = value
    return state


def with_weights(model_class, config, state: dict, dtype, device) -> nn.Module:
    """model_class(config) given `state` in `dtype` (a copy: `state` is kept), with the loaders' CPU defaults."""
    return cpu_defaults(build(meta_model(model_class, config), dict(state), "random weights", dtype, device))


# --- the ladder ----------------------------------------------------------------------------------------


def resolve_config(config) -> UNetConfig:
    if isinstance(config, UNetConfig):
        return config
    presets = [name for name, value in vars(UNetConfig).items() if isinstance(value, classmethod)]
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
    added: dict | None = None  # SDXL: {"text_embeds": (2 images, pooled), "time_ids": (2 images, 6)}


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
    # a GPU draws the weights where they will live: SDXL's 2.6e9 draws take ~40 s on one CPU core
    weights = generator if device.type == "cpu" else torch.Generator(device).manual_seed(seed)
    state = {k: v.to(device) for k, v in random_weights(meta_model(UNet, config), weights).items()}
    h = size // 8
    randn = lambda *shape: torch.randn(shape, generator=generator).to(device)
    added = None
    if config.addition_embed_type == "text_time":  # SDXL: a pooled text embedding and the size/crop ids of the image
        pooled = config.projection_class_embeddings_input_dim - 6 * config.addition_time_embed_dim
        added = {"text_embeds": randn(2 * images, pooled),
                 "time_ids": torch.tensor([size, size, 0, 0, size, size], device=device).repeat(2 * images, 1)}
    return Setup(config, device, h, images, steps, repeats, state, randn(2 * images, config.in_channels, h, h),
                 randn(2 * images, MAX_LENGTH, config.cross_attention_dim), randn(images, config.in_channels, h, h),
                 added)


def with_added(unet: nn.Module, setup: Setup) -> nn.Module:
    """The UNet as the bench calls it: SDXL's added conditioning bound when its config has one."""
    return unet if setup.added is None else WithAddedConditioning(unet, setup.added)


def vae_config(config: UNetConfig) -> VAEConfig:
    """The VAE the UNet's latents are decoded with: SDXL's (the same network, its own latent scale) for a UNet with
    SDXL's conditioning, SD's for the others, and a tiny one for the tiny UNets."""
    if config.block_out_channels[0] < 320:
        return VAEConfig.tiny()
    return VAEConfig.sdxl() if config.addition_embed_type == "text_time" else VAEConfig.sd()


def build_decoders(setup: Setup, dtype, rung: Rung, compile_options):
    """The rung's decoder (the UNet's VAE, vae_config; or TAESD) in its dtype and layout."""
    config, model_class = (None, TAESD) if rung.decoder == "taesd" else (vae_config(setup.config), AutoencoderKL)
    state = random_weights(meta_model(model_class, config), torch.Generator().manual_seed(1))
    decoder = with_weights(model_class, config, state, dtype, setup.device)
    if rung.channels_last:
        decoder.to(memory_format=torch.channels_last)
    if rung.compile:
        decoder.decoder.compile(**compile_options)
    return decoder


def decode(decoder, latents):
    """The rung's decoder on the sampler's latents: the VAE as the Pipeline decodes (float16 overflow redone)."""
    z = latents / decoder.scaling_factor
    return vae_decode(decoder, z) if isinstance(decoder, AutoencoderKL) else decoder.decode(z)


def int8(unet: nn.Module, setup: Setup, dtype) -> nn.Module:
    """The +int8 rung's UNet: quantized, its activation scales calibrated on 4 calls at other timesteps and noise."""
    noise, context = torch.Generator().manual_seed(7), setup.context.to(dtype)
    calls = [(torch.randn(setup.x.shape, generator=noise).to(setup.device, dtype), t) for t in (900, 600, 300, 100)]
    return calibrate_int8(quantize_int8(unet), lambda model: [
        with_added(model, setup)(x, timestep_tensor(t, x), context) for x, t in calls])


def unets(setup: Setup, rung: Rung, peers: dict, compile_options: dict):
    """(minidiff's UNet, {name: the peer's}) for the rung; minidiff's and the peers' modules behind its options."""
    config = setup.config if rung.distilled is None else distilled_config(setup.config, rung.distilled)
    state = setup.state
    if rung.distilled is not None:
        skeleton = meta_model(UNet, config)
        state = {k: v.to(setup.device) for k, v in random_weights(skeleton, torch.Generator().manual_seed(2)).items()}
    options = dict(channels_last=rung.channels_last, compile=rung.compile, freeze=rung.freeze,
                   cuda_graphs=rung.cuda_graphs, compile_options=compile_options, autotune=rung.autotune)
    plain = with_weights(UNet, config, state, rung.dtype, setup.device)
    ours = FastUNet(with_added(int8(plain, setup, rung.dtype) if rung.int8 else plain, setup), **options)
    theirs = {}
    for name, factory in peers.items():
        peer = factory(config, state, rung.dtype, setup.device, rung)
        peer = int8(peer, setup, rung.dtype) if rung.int8 and isinstance(peer, nn.Module) else peer  # as freeze is
        theirs[name] = FastUNet(with_added(peer, setup), **options) if isinstance(peer, nn.Module) else peer
    return ours, theirs


def step_flops(setup: Setup, config: UNetConfig) -> int:
    """FLOPs of one UNet call on the bench's inputs, counted on `meta` (nothing is computed)."""
    meta = lambda tensor: tensor.to("meta")
    unet = meta_model(UNet, config)
    if setup.added is not None:
        unet = WithAddedConditioning(unet, {k: meta(v) for k, v in setup.added.items()})
    return measure.count_flops(unet, meta(setup.x), 500, meta(setup.context))


def cached(cache: dict, key, make):
    """make() once per key; only the latest key is kept (the models of earlier rungs are freed, and so are the
    compiled graphs TorchDynamo keeps: a frozen one holds its own copy of the weights)."""
    if key not in cache:
        if cache:
            cache.clear()
            torch._dynamo.reset()
            gc.collect()
        cache[key] = make()
    return cache[key]


def run_rung(setup: Setup, rung: Rung, reference_out, peers: dict, compile_options: dict, log,
             caches=None) -> Result:
    """Measure one rung, with the peers ({name: factory}); `caches` (two dicts) let consecutive rungs with the
    same options share models."""
    unet_cache, decoder_cache = caches or ({}, {})
    if reuse_memory_available():
        reuse_freed_memory(rung.reuse_memory)
    network = dataclasses.astuple(dataclasses.replace(  # how the UNet runs; reuse memory is the process's
        rung, key="", name="", decoder="", tolerance=None, reuse_memory=False))
    ours, theirs = cached(unet_cache, network, lambda: unets(setup, rung, peers, compile_options))
    decoder = cached(decoder_cache, (rung.decoder, rung.dtype, rung.channels_last, rung.compile),
                     lambda: build_decoders(setup, rung.dtype, rung, compile_options))
    x, context, t = setup.x.to(rung.dtype), setup.context.to(rung.dtype), 500
    # each peer gets the inputs in the dtype it computes in (an fp32 engine on a bf16 rung: the fp32 inputs)
    inputs = [(x, t, context)] + [(setup.x.to(getattr(peer, "dtype", rung.dtype)), t,
                                   setup.context.to(getattr(peer, "dtype", rung.dtype))) for peer in theirs.values()]

    with torch.no_grad():
        out = ours(x, t, context)  # the first call also compiles / captures
        dev = None if rung.tolerance is None else measure.relative_error(out, reference_out)
        peer_outs = {name: peer(*args) for (name, peer), args in zip(theirs.items(), inputs[1:])}
        peer_devs = {name: (measure.relative_error(peer_out, out), None if rung.distilled else
                            measure.relative_error(peer_out, reference_out)) for name, peer_out in peer_outs.items()}
        del peer_outs
        if rung.cuda_graphs:
            out = ours(x, t, context)  # a replay of the captured graph
            dev = None if rung.tolerance is None else measure.relative_error(out, reference_out)
        ours(x, t, context)  # warm-up: the first calls after compiling are slow
        for peer, args in zip(theirs.values(), inputs[1:]):
            peer(*args)
        decode(decoder, setup.noise[:1].to(rung.dtype))  # warm-up (and compile)

    # UNet ms/step: single calls on the same inputs, minidiff and the peers taking turns and turns going first
    # (A B B A ...), so that each sees the machine, its caches and the allocator's state as the others do
    timers = [(measure.CallTimer(call, setup.device), args) for call, args in zip((ours, *theirs.values()), inputs)]
    with torch.no_grad():
        for call in range(setup.steps * setup.repeats):
            for timer, args in timers if call % 2 == 0 else timers[::-1]:
                timer(*args)
    ms, *peer_ms = [statistics.median(timer.milliseconds()) for timer, _ in timers]
    with torch.no_grad():
        call_mb, *peer_mb = [measure.call_memory_mb(lambda call=call, args=args: call(*args), setup.device)
                             for call, args in zip((ours, *theirs.values()), inputs)]
    log(f"  {rung.name}: {setup.steps * setup.repeats} UNet calls timed, median ms minidiff {ms:.1f}"
        + "".join(f", {name} {value:.1f}" for name, value in zip(theirs, peer_ms)))

    # end to end: minidiff's sampling loop with guidance, then the decode
    noise, schedule = setup.noise.to(rung.dtype), NoiseSchedule.sd()
    sampling = lambda: sample(guided(ours, context, GUIDANCE_SCALE), noise, "euler", setup.steps, schedule=schedule)
    e2e, decode_ms, peaks = [], [], []
    for repeat in range(setup.repeats):
        measure.reset_peak_memory(setup.device)
        measure.synchronize(setup.device)
        start = time.perf_counter()
        latents = sampling()
        decode_start = time.perf_counter()
        with torch.no_grad():
            decode(decoder, latents)
        measure.synchronize(setup.device)
        end = time.perf_counter()
        e2e.append(end - start)
        decode_ms.append(1000 * (end - decode_start))
        peaks.append(measure.peak_memory_mb(setup.device))
        log(f"  {rung.name}: end-to-end run {repeat + 1}/{setup.repeats} done")

    syncs = None
    if setup.device.type == "cuda":  # the one expected: the NaN check after the loop (Denoiser.check_finite)
        syncs = measure.count_syncs(sampling)
    passed = bool(torch.isfinite(out).all()) and (dev is None or dev <= rung.tolerance)
    peer_results = {name: PeerResult(value, ms / value, *peer_devs[name], mb,
                                     DTYPE_NAMES[getattr(peer, "dtype", rung.dtype)], not isinstance(peer, nn.Module))
                    for (name, peer), value, mb in zip(theirs.items(), peer_ms, peer_mb)}
    gflop = step_flops(setup, setup.config if rung.distilled is None else distilled_config(setup.config,
                                                                                            rung.distilled)) / 1e9
    peak = measure.cpu_peak_flops().get(DTYPE_NAMES[rung.dtype]) if setup.device.type == "cpu" else None
    return Result(rung.name, DTYPE_NAMES[rung.dtype], ms, 1000 / ms, statistics.median(e2e),
                  statistics.median(decode_ms), max(peaks), dev, rung.tolerance, passed, syncs, rung.distilled,
                  rung.minidiff_options, peer_results, call_mb, gflop, peak and gflop * 1e9 / (ms / 1000) / peak)


def bench(config="sd15", size: int = 256, images: int = 1, steps: int = 4, repeats: int = 3, device=None,
          rungs=None, peers: dict | None = None, compile_options: dict | None = None, seed: int = 0, log=print):
    """Run the ladder, with the peers ({name: factory}, see above) timed in turns on every rung; returns
    (a header describing the run, [Result per rung])."""
    all_rungs = ladder(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if rungs is not None:
        unknown = [key for key in rungs if key not in {r.key for r in all_rungs}]
        if unknown:
            raise MinidiffError(f"unknown rung(s) {', '.join(unknown)}: choose from "
                                f"{', '.join(r.key for r in all_rungs)}")
        all_rungs = [r for r in all_rungs if r.key in rungs]
    peers = peers or {}
    setup = make_setup(config, size, images, steps, repeats, device, seed)
    compile_options = compile_options or {}
    with torch.no_grad():
        reference_out = with_added(with_weights(UNet, setup.config, setup.state, torch.float32, setup.device), setup)(
            setup.x, timestep_tensor(500, setup.x), setup.context)
    header = (f"minidiff bench: UNet {config if isinstance(config, str) else 'custom'} with RANDOM weights (the "
              f"timings are real, the images noise); {size}x{size} px = {setup.latent_size}x{setup.latent_size} "
              f"latent, CFG batch {2 * images}, {steps} Euler steps + decode, {repeats} repeat(s), medians\n"
              f"device: {measure.describe_device(setup.device)}; torch {torch.__version__}"
              + (f"; compile {compile_options}" if compile_options else "")
              + (f"; interleaved with {', '.join(measure.engine_version(name) for name in peers)}" if peers
                 else "; minidiff alone (python -m benchmarks.vs_diffusers: the same ladder against diffusers)")
              + f"\none UNet step: {step_flops(setup, setup.config) / 1e9:.1f} GFLOP"
              + (f"; CPU peak {peak['fp32'] / 1e9:.0f} GFLOP/s fp32, {peak['bf16'] / 1e9:.0f} bf16 = {peak['basis']}"
                 if (peak := measure.cpu_peak_flops()) and setup.device.type == "cpu" else ""))
    results, caches = [], ({}, {})
    try:
        for rung in all_rungs:
            log(f"rung {rung.name} ...")
            results.append(result := run_rung(setup, rung, reference_out, peers, compile_options, log, caches))
            log(measure.rung_line(result))  # its numbers now: a run stopped later keeps them in its log
    finally:
        if reuse_memory_available():
            reuse_freed_memory(False)  # the process's allocator as it was
    return header, results


def profile_unet(config="sd15", size: int = 256, images: int = 1, device=None, dtype=torch.float32,
                 channels_last: bool = False, rows: int = 25, seed: int = 0):
    """torch.profiler on one UNet step (after a warm-up call): (the table of the top operators, the profiler)."""
    setup = make_setup(config, size, images, 1, 1, device, seed)
    unet = FastUNet(with_added(with_weights(UNet, setup.config, setup.state, dtype, setup.device), setup),
                    channels_last=channels_last)
    x, context = setup.x.to(dtype), setup.context.to(dtype)
    with torch.no_grad():
        return measure.profile(lambda: unet(x, 500, context), setup.device, "unet step", rows)
