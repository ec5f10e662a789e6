"""The milestone of lesson 14's inpainting section: latent blending, the step that lets any model repaint.

The reference is minidiff.inpaint.blend; the known mistakes are blending with the clean latents (the model then
sees a sharp picture beside a noisy hole, at every level), the mask read the wrong way round, and the noise level
applied as a variance. See core.py for the machinery.
"""

import torch

from minidiff.course.milestones.core import Tolerance, call_candidate, compare, fixed_randn, milestone, signature

REREAD = "reread lesson 14, section 5 (course/14_inspect_and_edit.md, latent blending)"


@milestone("inpainting: blend the noised picture outside the mask", lesson=14, function="blend_latents")
def check_blend_latents(candidate=None):
    """blend_latents(x_t, mask, image_latents, noise, alpha, sigma) -> m x_t + (1 - m) (alpha z_0 + sigma eps)

    Two pictures of 4 x 8 x 8 latents with different masks, at three levels of SD's schedule (t = 999, 500, 20).
    """
    from minidiff.inpaint import blend
    from minidiff.schedule import NoiseSchedule

    x_t, image_latents, noise = (fixed_randn(2, 4, 8, 8, seed=seed) for seed in (40, 41, 42))
    mask = (fixed_randn(2, 1, 8, 8, seed=43) > 0).float()
    tol = Tolerance(1e-6, 1e-6)
    run = candidate or blend
    for t in (999, 500, 20):
        alpha, sigma = (float(v) for v in NoiseSchedule.sd().alpha_sigma(t))
        mistakes = [
            (f"yours keeps the clean picture outside the mask; it must be noised to the step's level (alpha z_0 + "
             f"sigma eps), or the model sees a sharp picture beside a noisy hole; {REREAD}",
             lambda: blend(x_t, mask, image_latents, noise, 1.0, 0.0)),
            (f"yours reads the mask inverted: 1 (white) is the part repainted, where x_t stays; {REREAD}",
             lambda a=alpha, s=sigma: blend(x_t, 1 - mask, image_latents, noise, a, s)),
            (f"yours scales the noise by sigma squared (a variance) where sigma (a standard deviation) belongs; "
             f"{REREAD}", lambda a=alpha, s=sigma: blend(x_t, mask, image_latents, noise, a, s**2)),
        ]
        with torch.no_grad():
            yours = call_candidate(run, signature(check_blend_latents), x_t.clone(), mask.clone(),
                                   image_latents.clone(), noise.clone(), alpha, sigma)
        compare(yours, blend(x_t, mask, image_latents, noise, alpha, sigma), tol, f"t={t}", mistakes)
    return f"blended latents at t = 999, 500 and 20 within {tol.atol:g} (fp32)"
