"""Milestones of guidance and training: classifier-free guidance with its rescale, the denoising loss and the
grounding loss.

Notation (Ho & Salimans 2022; Lin et al. 2023; Ho et al. 2020, alg. 1):
    eps_uncond, eps_cond -> the predictions without and with the prompt; w -> guidance_scale
    phi                  -> guidance_rescale: mix of the guided prediction rescaled to eps_cond's std, per picture
    loss                 -> mean (eps_theta(x_t, t, c) - eps)^2 over every element
    P, M, J              -> the grounding loss's probabilities, shape cells and grounded tokens (lesson_09.py)
"""

import torch
import torch.nn.functional as F

from minidiff.course.milestones.core import Tolerance, call_candidate, compare, fixed_randn, milestone, signature
from minidiff.course.milestones.explain import term_by_term
from minidiff.schedule import NoiseSchedule

GUIDANCE = "reread lesson 08 (course/08_text_and_guidance.md, classifier-free guidance)"
LOSS = "reread lesson 09 (course/09_train_shapes.md, the two phases)"


def guided_eps(eps_uncond, eps_cond, guidance_scale, guidance_rescale=0.0, swapped=False, plus_one=False,
               std_over_batch=False, rescale_uncond=False):
    """eps_uncond + w (eps_cond - eps_uncond), with Lin et al. 2023's rescale; the flags are known mistakes."""
    if swapped:
        eps_uncond, eps_cond = eps_cond, eps_uncond
    base = eps_cond if plus_one else eps_uncond
    guided = base + guidance_scale * (eps_cond - eps_uncond)
    if guidance_rescale > 0:
        dims = list(range(0 if std_over_batch else 1, guided.ndim))
        target = eps_uncond if rescale_uncond else eps_cond
        rescaled = guided * target.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
        guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
    return guided


def guidance_mistakes(*args):
    return [
        (f"the two predictions are swapped: eps = eps_uncond + w (eps_cond - eps_uncond) moves away from the empty "
         f"prompt, towards the prompt; {GUIDANCE}", lambda: guided_eps(*args, swapped=True)),
        (f"eps_cond + w (eps_cond - eps_uncond) is a guidance of w + 1: start from eps_uncond; {GUIDANCE}",
         lambda: guided_eps(*args, plus_one=True)),
        (f"the rescale's std is per picture (every axis but the batch), not over the whole batch; {GUIDANCE}",
         lambda: guided_eps(*args, std_over_batch=True)),
        (f"the rescale matches the std of eps_cond, the prompt's prediction, not eps_uncond's; {GUIDANCE}",
         lambda: guided_eps(*args, rescale_uncond=True)),
    ]


@milestone("classifier-free guidance, with guidance rescale (Ho & Salimans 2022; Lin et al. 2023)", lesson=8)
def check_guided_eps(candidate=None):
    """guided_eps(eps_uncond, eps_cond, guidance_scale, guidance_rescale=0.0) -> eps (B, C, H, W)

    w = 7.5 and 1.0 without rescale, then w = 7.5 with rescale 0.7 (the std per picture), on fixed predictions;
    the reference restates the pipeline's guidance (Pipeline.guided_model; tests/test_milestones.py checks that).
    """
    tol = Tolerance(1e-5, 1e-5)
    eps_uncond, eps_cond = fixed_randn(2, 4, 8, 8, seed=80), fixed_randn(2, 4, 8, 8, seed=81) * 1.5 + 0.1
    for scale, rescale in ((7.5, 0.0), (1.0, 0.0), (7.5, 0.7)):
        args = (eps_uncond, eps_cond, scale, rescale)
        yours = call_candidate(candidate or guided_eps, signature(check_guided_eps), eps_uncond.clone(),
                               eps_cond.clone(), scale, guidance_rescale=rescale)
        terms = None if rescale else lambda args=args: term_by_term(  # noqa: E731 (the rescale is not linear)
            candidate or guided_eps, guided_eps, args, {0: "eps_uncond", 1: "eps_cond"}, tol)
        compare(yours, guided_eps(*args), tol, f"guidance {scale}, rescale {rescale}", guidance_mistakes(*args),
                terms)
    return f"w = 7.5 and 1 without rescale, w = 7.5 with rescale 0.7, within {tol.atol:g} (fp32)"


# --- the training loss ------------------------------------------------------------------------------------------


def diffusion_loss(unet, text_encoder, ids, latents, schedule, generator, target="eps", sqrt=True, t_from_one=False):
    """The denoising loss of one batch (minidiff.course.train.diffusion_loss), or a known mistake."""
    t = torch.randint(schedule.num_train_timesteps, (len(latents),), generator=generator) + int(t_from_one)
    noise = torch.randn(latents.shape, generator=generator)
    a = schedule.alphas_cumprod[t.clamp(max=schedule.num_train_timesteps - 1)].float().view(-1, 1, 1, 1)
    x_t = (a.sqrt() * latents + (1 - a).sqrt() * noise) if sqrt else (a * latents + (1 - a) * noise)
    wanted = {"eps": noise, "x0": latents, "x_t": x_t}[target]
    return F.mse_loss(unet(x_t, t, text_encoder(ids)), wanted)


@milestone("training: the denoising loss of one batch (Ho et al. 2020, alg. 1)", lesson=9)
def check_diffusion_loss(candidate=None):
    """diffusion_loss(unet, text_encoder, ids, latents, schedule, generator) -> scalar; t, then eps, from generator

    A tiny seeded UNet and text encoder (UNetConfig.tiny(), CLIPTextConfig.tiny()), 4 latents (4, 4, 8, 8), SD's
    schedule; compared with minidiff.course.train.diffusion_loss on a generator with the same seed.
    """
    from minidiff.course.milestones.networks import reference_network
    from minidiff.course.train import diffusion_loss as library_loss

    unet, clip, schedule = reference_network("unet"), reference_network("clip"), NoiseSchedule.sd()
    latents, ids = fixed_randn(4, 4, 8, 8, seed=82), torch.randint(0, 1000, (4, 77), generator=fixed_gen(83))
    generator = lambda: fixed_gen(84)  # noqa: E731
    mistakes = [
        (f"the target is the noise eps that was added, not the clean latents x_0; {LOSS}",
         lambda: diffusion_loss(unet, clip, ids, latents, schedule, generator(), target="x0")),
        (f"the target is the noise eps, not the noisy x_t; {LOSS}",
         lambda: diffusion_loss(unet, clip, ids, latents, schedule, generator(), target="x_t")),
        (f"missing sqrt: x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps; {LOSS}",
         lambda: diffusion_loss(unet, clip, ids, latents, schedule, generator(), sqrt=False)),
        (f"t runs over 0 .. T - 1 (torch.randint(T, ...)), not 1 .. T; {LOSS}",
         lambda: diffusion_loss(unet, clip, ids, latents, schedule, generator(), t_from_one=True)),
    ]
    with torch.no_grad():
        expected = library_loss(unet, clip, ids, latents, schedule, generator())
        yours = call_candidate(candidate or diffusion_loss, signature(check_diffusion_loss), unet, clip, ids.clone(),
                               latents.clone(), schedule, generator())
    yours = yours.detach() if torch.is_tensor(yours) else yours
    compare(yours, expected, Tolerance(1e-5, 1e-5), "loss", mistakes)
    return f"loss {float(expected):.6f} on the same draws, within 1e-5 (fp32)"


def fixed_gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def grounding_variant(layer_probs, tokens, cells, shares=True, pool="any", square=True, over="grounded"):
    """TokenCompose's token loss, or a known mistake: the mass inside not divided by the token's whole mass, a
    coarse layer's cells picked every f-th (pool "pick"), (1 - inside) not squared, the mean over every token."""
    batch, height, width = cells.shape
    total = 0.0
    for probs in layer_probs:
        f = round((height * width / probs.shape[2]) ** 0.5)
        if pool == "pick":
            mask = cells[:, ::f, ::f]
        else:
            mask = cells.reshape(batch, height // f, f, width // f, f).any(dim=4).any(dim=2)
        mask = mask.flatten(1).float()[:, None, :, None]
        inside = (probs * mask).sum(dim=2) / (probs.sum(dim=2) if shares else 1)
        miss = (1 - inside) ** 2 if square else 1 - inside
        chosen = tokens[:, None, :].float() if over == "grounded" else torch.ones_like(miss)
        total = total + (miss * chosen).sum() / (chosen.sum() * (probs.shape[1] if over == "grounded" else 1))
    return total / len(layer_probs)


def grounding_case():
    """Three layers of an 8 x 8 latent (8 x 8 with 2 heads, 4 x 4 twice with 4 heads), 3 pictures, 6 tokens; each
    position's probabilities sum to 1 over the tokens, so a token's mass over the positions differs from token to
    token; the shapes straddle the 4 x 4 layers' cells."""
    shapes = [(3, 2, 64, 6), (3, 4, 16, 6), (3, 4, 16, 6)]
    probs = [fixed_randn(*shape, seed=90 + i).mul(2).softmax(dim=-1) for i, shape in enumerate(shapes)]
    cells = torch.zeros(3, 8, 8, dtype=torch.bool)
    cells[0, 1:4, 2:5] = True
    cells[1, 5:8, 0:2] = True
    cells[2, 3, 3] = True
    tokens = torch.zeros(3, 6, dtype=torch.bool)
    tokens[0, [2, 3]] = tokens[1, [1]] = tokens[2, [3, 4, 5]] = True
    return probs, tokens, cells


@milestone("training: the grounding loss of the colour and shape words (TokenCompose, Wang et al. 2024)", lesson=9)
def check_grounding_loss(candidate=None):
    """grounding_loss(layer_probs, tokens, cells) -> scalar, the mean over layers of (1 - share inside)^2

    Three layers (8 x 8, 4 x 4 twice), 3 pictures, 6 tokens of which 1 to 3 are grounded per picture; the reference
    is minidiff.course.grounding.grounding_loss, which the shapes model trained with.
    """
    from minidiff.course.grounding import grounding_loss as library_loss

    probs, tokens, cells = grounding_case()
    mistakes = [
        (f"inside is a share: divide the token's mass on the shape by its mass over every position; {LOSS}",
         lambda: grounding_variant(probs, tokens, cells, shares=False)),
        (f"a coarser layer's cell is on the shape when ANY of the f x f latent cells it covers is, not only its "
         f"first; {LOSS}", lambda: grounding_variant(probs, tokens, cells, pool="pick")),
        (f"the loss is (1 - inside) squared; {LOSS}", lambda: grounding_variant(probs, tokens, cells, square=False)),
        (f"average over the grounded tokens (the colour and shape words) only, not every token; {LOSS}",
         lambda: grounding_variant(probs, tokens, cells, over="all")),
    ]
    yours = call_candidate(candidate or library_loss, signature(check_grounding_loss), [p.clone() for p in probs],
                           tokens.clone(), cells.clone())
    tol = Tolerance(1e-5, 1e-5)
    compare(yours.detach() if torch.is_tensor(yours) else yours, library_loss(probs, tokens, cells), tol, "loss",
            mistakes)
    return f"3 layers (8 x 8 and 4 x 4), 3 pictures, 6 tokens within {tol.atol:g} (fp32)"
