"""The course checklist: DDIM at 50 steps, DPM++ at 20 as good, torch.compile, half precision, efficient
attention, benchmarking and the real-time demo.

The two sampler milestones take a student's sampler too, sampler(model, x_T, alphas_cumprod, steps, spacing,
steps_offset) -> x_0, judged call by call (sampling.judge_sampler); the others check minidiff itself. Those that
need a GPU say so and are skipped on a CPU. The sampler milestones run on the exact Gaussian model of
minidiff.course.gaussian, whose ODE solution is known in closed form, and the DPM++ one, when the bundled shapes
model is present, on it too. See core.py for the machinery.
"""

import copy
import time

import torch
import torch.nn.functional as F

from minidiff.course.milestones.core import (
    Mismatch,
    Skipped,
    Tolerance,
    call_candidate,
    compare,
    fixed_randn,
    milestone,
    randomized,
    signature,
)
from minidiff.course.milestones.sampling import judge_sampler
from minidiff.errors import MinidiffError
from minidiff.hub import bundled_path
from minidiff.schedule import NoiseSchedule

SHAPES_WEIGHTS = bundled_path("shapes")


def _library_sampler(name: str, schedule: NoiseSchedule | None = None, **options):
    """minidiff's sampler `name` on `schedule` (default SD's) with the course signature, sampler(model, x_T,
    alphas_cumprod, steps, spacing="leading", steps_offset=1); options go to minidiff.sample."""
    from minidiff.samplers import sample

    schedule = schedule or NoiseSchedule.sd()

    def run(model, x_T, alphas_cumprod, steps, spacing="leading", steps_offset=1):
        if not torch.equal(alphas_cumprod, schedule.alphas_cumprod):
            raise MinidiffError(f"{name}: alphas_cumprod is not the schedule this sampler was built for")
        return sample(model, x_T, name, steps, schedule=schedule, **{"spacing": spacing, "steps_offset": steps_offset,
                                                                     **options})

    return run


def _gaussian_problem():
    from minidiff.course.gaussian import GaussianEpsModel

    model = GaussianEpsModel()
    noise = fixed_randn(1, 4, 16, 16, seed=30)
    return model, noise, model.exact_x0(noise, float(model.schedule.sigmas[-1]))


@milestone("DDIM at 50 steps works", group="course", lesson=3, function="ddim_sample")
def check_ddim_50(candidate=None):
    """ddim_sample(model, x_T, alphas_cumprod, steps, spacing="leading", steps_offset=1) -> x_0; model(x_t, t) -> eps

    Run with 50 steps from x_T ~ N(0, I) (1, 4, 16, 16) on the exact eps-model of Gaussian data (course.gaussian,
    SD's schedule) on each grid of the course (only SD's, leading with steps_offset 1, when the sampler takes no
    spacing): every model call (the timestep asked, the x_t given) and x_0 must be minidiff's DDIM's on the same
    grid within 1e-5. The detail reports the mean |x_0 - the exact ODE solution| (DDIM 50: ~0.020).
    """
    model, noise, exact = _gaussian_problem()
    candidate = candidate or _library_sampler("ddim")
    detail = judge_sampler(candidate, signature(check_ddim_50), "ddim", 50, model, noise)
    x0 = candidate(model, noise.clone(), model.schedule.alphas_cumprod, 50)
    return f"{detail}; mean |x_0 - exact| {float((x0 - exact).abs().mean()):.4f} on SD's grid"


SHAPES_PROMPTS = 16  # held-out prompts of the shapes-model part of dpmpp_20


@milestone("DPM++ 2M at 20 steps, as good as DDIM at 50", group="course", lesson=4, function="dpmpp_2m_sample")
def check_dpmpp_20(candidate=None):
    """dpmpp_2m_sample(model, x_T, alphas_cumprod, steps, spacing="leading", steps_offset=1) -> x_0; model -> eps

    On the Gaussian model and noise of ddim_50, 20 steps on each grid of the course: every model call and x_0 must be
    minidiff's DPM++ 2M's on the same grid (lesson 03's grid or diffusers' multistep one) within 1e-5; the detail
    reports the mean distance to DDIM at 50 steps. With weights/shapes present, also on the shapes model (guidance
    5, 16 held-out prompts): 20 steps must draw as many of them right (by shapes.check) as DDIM at 50 steps does,
    give or take one.
    """
    model, noise, _ = _gaussian_problem()
    call = signature(check_dpmpp_20)
    candidate = candidate or _library_sampler("dpmpp_2m")
    detail = "Gaussian model: " + judge_sampler(candidate, call, "dpmpp_2m", 20, model, noise)
    ddim_50 = _library_sampler("ddim")(model, noise, model.schedule.alphas_cumprod, 50)
    x0 = candidate(model, noise.clone(), model.schedule.alphas_cumprod, 20)
    detail += f"; mean |20 steps - DDIM 50| {float((x0 - ddim_50).abs().mean()):.4f} on SD's grid"
    if (SHAPES_WEIGHTS / "model_index.json").is_file():
        detail += "; " + _shapes_dpmpp_20(candidate, call)
    return detail


def _shapes_dpmpp_20(candidate, call: str) -> str:
    """The bundled shapes model: 20 steps draw held-out prompts right as often as DDIM at 50 does (one slack).

    Judged by the checker, not by the distance to DDIM 50's latents: DDIM (diffusers' set_alpha_to_one=False)
    stops at t = 0, sigma ~0.03, not at sigma = 0 as DPM++ does, so the DDIMs agree with each other more closely
    than any sampler that finishes the job (measured: DDIM 20 0.024 from DDIM 500, DPM++ 2M 20 0.042).
    """
    from minidiff.course.evaluate import held_out_prompts
    from minidiff.course.shapes import adherence
    from minidiff.pipeline import load_pipeline

    pipe = load_pipeline(str(SHAPES_WEIGHTS), dtype=torch.float32, device="cpu")
    if pipe.prediction_type != "epsilon":
        return f"shapes model skipped (it predicts {pipe.prediction_type}, the course samplers take eps)"
    pairs = held_out_prompts(SHAPES_PROMPTS, seed=2)
    prompts, specs = [prompt for prompt, _ in pairs], [spec for _, spec in pairs]
    model = pipe.guided_model(pipe.encode_prompt(prompts), pipe.encode_prompt([""] * len(prompts)), 5.0)
    size = pipe.unet.config.sample_size
    noise = fixed_randn(len(prompts), pipe.latent_channels(), size, size, seed=31)
    options = {"spacing": pipe.spacing, "steps_offset": pipe.steps_offset}
    alphas_cumprod = pipe.schedule.alphas_cumprod
    sampler = candidate or _library_sampler("dpmpp_2m", pipe.schedule, **options)
    with torch.no_grad():
        reference = _library_sampler("ddim", pipe.schedule, **options)(model, noise, alphas_cumprod, 50)
        fast = call_candidate(sampler, call, model, noise.clone(), alphas_cumprod, 20)
        scores = [adherence(list(pipe.decode(latents)), specs)["all"] for latents in (fast, reference)]
    ours, ddim = (round(score * len(prompts)) for score in scores)
    if ours < ddim - 1:
        raise Mismatch(f"shapes model: 20 steps drew {ours} of {len(prompts)} held-out prompts right, DDIM 50 {ddim}")
    return f"shapes model: {ours}/{len(prompts)} held-out prompts right at 20 steps, DDIM 50 {ddim}/{len(prompts)}"


@milestone("torch.compile compiles and matches eager", group="course", takes_candidate=False)
def check_compile(candidate=None):
    """(no candidate) a UNet ResnetBlock compiled with torch.compile (TorchInductor) equals eager within 1e-5, fp32"""
    from minidiff.unet import ResnetBlock, UNetConfig

    with torch.random.fork_rng():
        torch.manual_seed(40)
        block = randomized(ResnetBlock(32, 32, 64, UNetConfig(norm_num_groups=8)), 41)
    x, emb = fixed_randn(1, 32, 8, 8, seed=42), fixed_randn(1, 64, seed=43)
    try:
        with torch.no_grad():
            compiled = torch.compile(block)(x, emb)
    except Exception as error:  # no C++ compiler, an unsupported Python: torch.compile's own message
        raise Mismatch(f"torch.compile failed: {type(error).__name__}: {str(error).splitlines()[0]}") from None
    with torch.no_grad():
        error = compare(compiled, block(x, emb), Tolerance(1e-5, 1e-5), "compiled output")
    return f"largest |compiled - eager| {error:.1e} <= 1e-5 (fp32)"


HALF_PRECISION_MAX_ERROR = {torch.float16: 5e-3, torch.bfloat16: 3e-2}  # max |diff| / max |fp32 output|


@milestone("fp16 / bf16 without quality loss", group="course", takes_candidate=False)
def check_half_precision(candidate=None):
    """(no candidate) the tiny UNet in fp16 and bf16 against fp32: max|diff| / max|fp32| under 5e-3 and 3e-2

    On a CPU this checks the numerics only; the speed-up needs a GPU (see `minidiff bench`).
    """
    from minidiff.course.milestones.networks import reference_network, unet_inputs

    device = "cuda" if torch.cuda.is_available() else "cpu"
    reference = copy.deepcopy(reference_network("unet")).to(device)
    x, t, context = (value.to(device) for value in unet_inputs())
    with torch.no_grad():
        expected = reference(x, t, context)
        found = []
        for dtype, limit in HALF_PRECISION_MAX_ERROR.items():
            output = copy.deepcopy(reference).to(dtype)(x.to(dtype), t, context.to(dtype)).float()
            relative = float((output - expected).abs().max() / expected.abs().max())
            name = str(dtype).removeprefix("torch.")
            if not relative <= limit:  # NaN fails too
                raise Mismatch(f"{name} UNet output differs from fp32 by {relative:.1e} of its range, over {limit:g}")
            found.append(f"{name} {relative:.1e} <= {limit:g}")
    speed = "" if device == "cuda" else "; speed needs a GPU"
    return f"max|diff| / max|fp32| on {device}: " + ", ".join(found) + speed


@milestone("efficient attention: SDPA and sliced attention equal the formula", group="course", takes_candidate=False)
def check_attention_kernels(candidate=None):
    """(no candidate) SDPA equals the naive softmax(Q K^T / sqrt(d)) V within 1e-5; sliced equals plain within 1e-6"""
    from minidiff.attention import attention, naive_attention

    q, k, v = fixed_randn(2, 4, 64, 16, seed=50), fixed_randn(2, 4, 77, 16, seed=51), fixed_randn(2, 4, 77, 16, seed=52)
    causal = torch.ones(64, 77, dtype=torch.bool).tril()
    for mask, where in ((None, "SDPA vs naive"), (causal, "SDPA vs naive, with a mask")):
        compare(F.scaled_dot_product_attention(q, k, v, mask), naive_attention(q, k, v, mask), Tolerance(1e-5, 1e-5),
                where)
    # (B, heads, L, d) -> (B, L, heads * d), the layout of minidiff.attention
    q, k, v = (x.transpose(1, 2).flatten(2) for x in (q, k, v))
    for mask, where in ((None, "sliced (13 queries) vs plain"), (causal, "sliced vs plain, with a mask")):
        compare(attention(q, k, v, 4, mask, slice_size=13), attention(q, k, v, 4, mask), Tolerance(1e-6, 1e-6), where)
    return "SDPA = naive within 1e-5, sliced = plain within 1e-6 (fp32, with and without a mask)"


@milestone("benchmarking: `minidiff bench` runs and prints its table", group="course", takes_candidate=False)
def check_bench(candidate=None):
    """(no candidate) minidiff.bench's fp32 and half-precision rungs on the tiny UNet: a table, every rung PASS"""
    try:
        from minidiff import bench, measure
    except ImportError as error:
        raise Skipped(f"minidiff.bench cannot be imported ({error})") from None
    _, results = bench.bench("tiny", size=64, steps=2, repeats=1, rungs=["fp32", "half"], log=lambda *_: None)
    table = measure.format_table(results)
    failed = [result.rung for result in results if not result.passed]
    if failed or not results:
        raise Mismatch(f"bench rung(s) {', '.join(failed) or '(none ran)'} failed their tolerance:\n{table}")
    return f"tiny UNet, 64 px, 2 Euler steps:\n{table}"


@milestone("real-time demo: one image in under 1 s", group="course", takes_candidate=False)
def check_realtime(candidate=None):
    """(no candidate) on a GPU: the shapes model in fp16, 20 DPM++ 2M steps with guidance, one image in under 1 s"""
    if not torch.cuda.is_available():
        raise Skipped("needs a GPU (none found): the real-time demo is timed on CUDA")
    if not (SHAPES_WEIGHTS / "model_index.json").is_file():
        raise Skipped(f"needs the shapes weights in {SHAPES_WEIGHTS} (python -m minidiff.course.train shapes)")
    from minidiff.pipeline import load_pipeline

    pipe = load_pipeline(str(SHAPES_WEIGHTS), dtype=torch.float16, device="cuda")
    generate = lambda: pipe("a big red circle at the top left", steps=20, seed=0, progress=False)  # noqa: E731
    generate()  # warm-up: cuDNN autotuning, lazy initialisation
    torch.cuda.synchronize()
    start = time.perf_counter()
    generate()
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    if not seconds < 1.0:
        raise Mismatch(f"one image took {seconds:.2f} s, not under 1 s: try minidiff.speed.optimize(pipe, "
                       "compile=True)")
    return f"one image in {1000 * seconds:.0f} ms on {torch.cuda.get_device_name()}"

