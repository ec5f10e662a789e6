"""The lessons' exercises whose answer is a number (or a list, or a key): each is a workbook function
`exercise_NN_K()` that returns it, checked against the value the library computes, with the usual wrong answers
named.

    exercise(lesson, k, title, reference, mistakes, rtol)    registers milestone exercise_NN_K
    minidiff milestones --workbook DIR                        checks them with the lesson's other milestones

A failed exercise does not print the answer: it says whether yours is too large or too small, by about how much,
and, when yours is a known wrong answer, which mistake gives it. The answers to each lesson's question to think
about are in course/solutions.md, outside the workbook. The exercises of lessons 07 to 13 are in
exercises_late.py.
"""

import math

import torch

from minidiff.course.milestones.core import MILESTONES, Milestone, Mismatch, call_candidate
from minidiff.schedule import NoiseSchedule


def _value(answer):
    """An answer as a str, or a float64 tensor (a number, a 0-dim tensor, a list of numbers)."""
    if isinstance(answer, str):
        return answer
    if torch.is_tensor(answer):
        return answer.detach().double().cpu()
    return torch.as_tensor(answer, dtype=torch.float64)


def _same(yours, reference, rtol: float) -> bool:
    if isinstance(reference, str) or isinstance(yours, str):
        return yours == reference
    if yours.shape != reference.shape:
        return False
    return bool(((yours - reference).abs() <= rtol * reference.abs() + 1e-12).all())


def _how_far(yours, reference) -> str:
    """Where yours misses, without giving the answer away: too large or small, and by about how much."""
    if isinstance(reference, str) or isinstance(yours, str):
        return f"yours {yours!r} is not the key asked for"
    if yours.shape != reference.shape:
        return f"yours has {yours.numel()} value(s) (shape {tuple(yours.shape)}), the answer {reference.numel()}"
    if yours.numel() > 1:
        bad = (yours - reference).abs() > 1e-9 + 1e-6 * reference.abs()
        index = int(bad.nonzero()[0][0])
        return (f"{int(bad.sum())} of {yours.numel()} values differ, the first at position {index} (yours "
                f"{float(yours[index]):.6g}, {'too large' if yours[index] > reference[index] else 'too small'})")
    mine, answer = float(yours), float(reference)
    if not math.isfinite(mine):
        return f"yours is {mine}"
    if answer != 0 and mine != 0 and (mine > 0) != (answer > 0):
        return f"yours {mine:.6g} has the wrong sign"
    ratio = abs(mine / answer) if answer else math.inf
    ratio = max(ratio, 1 / ratio) if ratio else math.inf
    # a range, not the factor itself, which would give the answer away
    size = ("within 1%" if ratio < 1.01 else "within a factor of 2" if ratio <= 2 else
            "off by a factor of 2 to 10" if ratio <= 10 else "off by a factor of 10 to 100" if ratio <= 100 else
            "off by a factor of 100 to 1000" if ratio <= 1000 else "off by a factor of over 1000")
    return f"yours {mine:.6g} is too {'large' if abs(mine) > abs(answer) else 'small'} ({size})"


def exercise(lesson: int, k: int, title: str, reference, mistakes=(), rtol: float = 1e-4, kind: str = "a number"):
    """Register milestone exercise_NN_K: the workbook's exercise_NN_K() -> `kind`, equal to reference() (computed
    by the library) within rtol (exactly for a str); mistakes: (hint, the wrong answer's function) pairs."""
    name = f"exercise_{lesson:02d}_{k}"

    def run(candidate=None):
        call = f"{name}() -> {kind}"
        expected = _value(reference())
        yours = call_candidate(candidate or reference, call)
        try:
            yours = _value(yours)
        except (TypeError, ValueError, RuntimeError):
            raise Mismatch(f"yours returned a {type(yours).__name__}; {call}") from None
        if _same(yours, expected, rtol):
            return "right" + ("" if isinstance(expected, str) else f" (within {rtol:g} relative)")
        for hint, wrong in mistakes:
            if _same(yours, _value(wrong()), rtol):
                raise Mismatch(f"{_how_far(yours, expected)}\n  hint: {hint}")
        raise Mismatch(_how_far(yours, expected))

    run.__name__, run.__doc__ = f"check_{name}", f"{name}() -> {kind}: {title}"
    run.reference = reference  # for the tests: a failure must not print it
    MILESTONES[name] = Milestone(name, f"exercise {lesson:02d}.{k}: {title}", run, "module", True, lesson, name)
    return run


def _alpha_bar(t: int, schedule: NoiseSchedule | None = None) -> float:
    return float((schedule or NoiseSchedule.sd()).alphas_cumprod[t])


def _linear_alpha_bar() -> torch.Tensor:
    return NoiseSchedule(1000, 0.00085, 0.012, "linear").alphas_cumprod


# --- lesson 00: the tour -------------------------------------------------------------------------------------------


def _latent_size() -> int:
    from minidiff.vae import VAEConfig

    config = VAEConfig.sd()
    side = 512 // 2 ** (len(config.block_out_channels) - 1)
    return config.latent_channels * side * side


exercise(0, 1, "the numbers in SD 1.5's latent of a 512x512 picture", _latent_size, [
    ("that is one channel of it: the latent has 4 channels (B, 4, 64, 64)", lambda: 64 * 64),
    ("that is the RGB picture, the VAE's input: the sampler works on its latent", lambda: 3 * 512 * 512),
    ("the VAE shrinks each side 8 times (three downsamplers), not 4", lambda: 4 * 128 * 128),
], kind="an int")
exercise(0, 2, "how many times fewer numbers the latent has than the RGB picture",
         lambda: 3 * 512 * 512 / _latent_size(), [
             ("each side shrinks 8 times (64 in area), but the channels go from 3 to 4: 3 * 64 / 4", lambda: 64),
             ("the channels go from 3 to 4 as the area shrinks 64 times: 3 * 64 / 4", lambda: 4 * 64 / 3),
             ("8 is the shrink of one side; the area shrinks 64 times", lambda: 8),
         ])

# --- lesson 01: the forward process --------------------------------------------------------------------------------

exercise(1, 1, "alpha_bar_999: the signal's variance left at the end of SD's schedule", lambda: _alpha_bar(999), [
    ("that is sqrt(alpha_bar_999), the signal's amplitude: the question asks its variance, alpha_bar_999",
     lambda: _alpha_bar(999) ** 0.5),
    ("that is 1 - alpha_bar_999, the noise's variance", lambda: 1 - _alpha_bar(999)),
    ("that is linear betas' alpha_bar_999; SD's betas are scaled_linear", lambda: float(_linear_alpha_bar()[999])),
    ("that is 1 - beta_999; alpha_bar_t is the running product of (1 - beta_s)",
     lambda: 1 - float(NoiseSchedule.sd().betas[999])),
])


def _first_snr_below_one(alphas_cumprod) -> int:
    return int((alphas_cumprod / (1 - alphas_cumprod) < 1).nonzero()[0])


exercise(1, 2, "the first t at which SD's SNR alpha_bar_t / (1 - alpha_bar_t) is below 1",
         lambda: _first_snr_below_one(NoiseSchedule.sd().alphas_cumprod), [
             ("off by one: that is the last t with SNR >= 1; asked is the first below 1",
              lambda: _first_snr_below_one(NoiseSchedule.sd().alphas_cumprod) - 1),
             ("that is the schedule with linear betas; SD's are scaled_linear",
              lambda: _first_snr_below_one(_linear_alpha_bar())),
         ], kind="an int")

# --- lesson 02: DDPM -----------------------------------------------------------------------------------------------


def _posterior_variance(t: int) -> float:
    a_t, a_prev = _alpha_bar(t), _alpha_bar(t - 1)
    return (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)


exercise(2, 1, "the variance of DDPM's posterior q(x_499 | x_500, x_0), beta_tilde_500",
         lambda: _posterior_variance(500), [
    ("that is beta_500, the fixed large variance; the posterior's is beta_tilde_t = (1 - alpha_bar_{t-1}) / "
     "(1 - alpha_bar_t) beta_t", lambda: 1 - _alpha_bar(500) / _alpha_bar(499)),
    ("that is the standard deviation sqrt(beta_tilde_500); the question asks the variance",
     lambda: _posterior_variance(500) ** 0.5),
])
exercise(2, 2, "v at t = 500 for x_0 = 1 and eps = 0 (v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0)",
         lambda: -((1 - _alpha_bar(500)) ** 0.5), [
             ("sign: v = sqrt(alpha_bar) eps - sqrt(1 - alpha_bar) x_0, the x_0 term is subtracted",
              lambda: (1 - _alpha_bar(500)) ** 0.5),
             ("the coefficients are swapped: x_0's is sqrt(1 - alpha_bar_t)", lambda: -(_alpha_bar(500) ** 0.5)),
             ("missing sqrt: x_0's coefficient is sqrt(1 - alpha_bar_t)", lambda: -(1 - _alpha_bar(500))),
         ])

# --- lesson 03: DDIM -----------------------------------------------------------------------------------------------

exercise(3, 1, "SD's 10-step trailing grid (steps_offset 0), noisiest first",
         lambda: NoiseSchedule.sd().timesteps(10, "trailing", 0).tolist(), [
             ("that is the leading grid (SD's default, steps_offset 1); trailing ends its grid at t = 999",
              lambda: NoiseSchedule.sd().timesteps(10, "leading", 1).tolist()),
             ("that is the linspace grid (rounded linspace(0, 999, 10)); trailing steps down from 999 by 100",
              lambda: NoiseSchedule.sd().timesteps(10, "linspace", 0).tolist()),
             ("the grid runs noisiest first: reverse it", lambda: NoiseSchedule.sd().timesteps(10, "trailing", 0)
              .tolist()[::-1]),
         ], kind="a list of ints")


def _ddim_sigma(t: int, t_prev: int, eta: float = 1.0) -> float:
    a_t, a_prev = _alpha_bar(t), _alpha_bar(t_prev)
    return eta * math.sqrt((1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev))


exercise(3, 2, "DDIM's sigma_t at eta = 1 for the step from t = 981 to 961", lambda: _ddim_sigma(981, 961), [
    ("the factor sqrt(1 - alpha_bar_t / alpha_bar_prev) is missing from sigma_t",
     lambda: math.sqrt((1 - _alpha_bar(961)) / (1 - _alpha_bar(981)))),
    ("that is sigma_t squared, the variance; sigma_t is its square root", lambda: _ddim_sigma(981, 961) ** 2),
    ("the ratio is (1 - alpha_bar_prev) / (1 - alpha_bar_t), not its inverse",
     lambda: math.sqrt((1 - _alpha_bar(981)) / (1 - _alpha_bar(961)) * (1 - _alpha_bar(981) / _alpha_bar(961)))),
])

# --- lesson 04: the ODE view ---------------------------------------------------------------------------------------

exercise(4, 1, "k-diffusion's sigma at t = 999, sqrt((1 - alpha_bar) / alpha_bar)",
         lambda: float(NoiseSchedule.sd().sigmas[999]), [
             ("that is sqrt(1 - alpha_bar_999), the noise's coefficient in x_t (the VP sigma_t); the ODE's sigma is "
              "sigma_t / alpha_t", lambda: (1 - _alpha_bar(999)) ** 0.5),
             ("missing sqrt: sigma = sqrt((1 - alpha_bar) / alpha_bar)",
              lambda: (1 - _alpha_bar(999)) / _alpha_bar(999)),
         ])
exercise(4, 2, "lambda at t = 500, log(alpha_t / sigma_t), the half log-SNR DPM++ steps in",
         lambda: 0.5 * math.log(_alpha_bar(500) / (1 - _alpha_bar(500))), [
             ("that is the full log-SNR, log(alpha_bar / (1 - alpha_bar)); lambda is half of it",
              lambda: math.log(_alpha_bar(500) / (1 - _alpha_bar(500)))),
             ("sign: lambda = log(alpha_t / sigma_t), which grows as the noise shrinks",
              lambda: -0.5 * math.log(_alpha_bar(500) / (1 - _alpha_bar(500)))),
         ])

# --- lesson 05: attention ------------------------------------------------------------------------------------------


def _tokens() -> int:
    from minidiff.unet import UNetConfig

    return UNetConfig.sd15().sample_size ** 2  # the first stage works at the latent's own size, 64 x 64


def _text_tokens() -> int:
    from minidiff.clip import CLIPTextConfig

    return CLIPTextConfig.sd15().max_position_embeddings


exercise(5, 1, "the scores in one head's Q K^T of SD 1.5's first self-attention at 512 px",
         lambda: _tokens() ** 2, [
    ("that is the number of tokens (64 x 64 positions); Q K^T holds one score per pair of them",
     lambda: _tokens()),
    ("that is the cross-attention's (the keys are the 77 text tokens); in self-attention the keys are the image's",
     lambda: _tokens() * _text_tokens()),
    ("that is the 512 x 512 pixels' pairs: the UNet runs on the 64 x 64 latent", lambda: (512 * 512) ** 2),
], kind="an int")
exercise(5, 2, "the scores in one head's Q K^T of the same block's cross-attention",
         lambda: _tokens() * _text_tokens(), [
    ("that is self-attention's: in cross-attention the keys are the 77 text tokens", lambda: _tokens() ** 2),
    ("that is 77 x 77, the text encoder's own attention: the queries are the image's 4096 tokens",
     lambda: _text_tokens() ** 2),
], kind="an int")

# --- lesson 06: the UNet -------------------------------------------------------------------------------------------


def _unet_config():
    from minidiff.unet import UNetConfig

    return UNetConfig.sd15()


exercise(6, 1, "the side of SD 1.5's feature map at the mid block, for a 512 px picture",
         lambda: _unet_config().sample_size // 2 ** (len(_unet_config().block_out_channels) - 1), [
             ("four stages, but only three downsamplers: the last down stage keeps its size", lambda: 4),
             ("that is the latent's side: the down stages halve it", lambda: 64),
             ("the stages work on the 64 x 64 latent, not on the 512 px picture", lambda: 512 // 8),
         ], kind="an int")
exercise(6, 2, "the skips SD 1.5's down path hands to the up path",
         lambda: (_unet_config().layers_per_block + 1) * len(_unet_config().block_out_channels), [
             ("conv_in's output is a skip too (it feeds the last up resnet)",
              lambda: _unet_config().layers_per_block * 4 + 3),
             ("each downsampler's output is a skip too", lambda: _unet_config().layers_per_block * 4 + 1),
             ("that counts the resnets only; conv_in and the downsamplers hand their outputs on too",
              lambda: _unet_config().layers_per_block * 4),
         ], kind="an int")
