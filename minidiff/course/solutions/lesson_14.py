"""Lesson 14, inspect and edit: the pieces the student writes, one group per section of course/14_inspect_and_edit.md.

Notation (section 3, prompt weights):
    states, weights -> (N, 77, d) hidden states of N prompt chunks and (N, 77) per-token weights

Notation (section 4, DDIM inversion; Song et al. 2021, eq. 12 run backwards):
    alpha_bar_from, alpha_bar_to -> alpha_bar at the level a step starts from (t_prev; alpha_bar_0 for the first
                                    step, as SD ships it) and at the level it goes to (t)
    eps                          -> the network's noise for x, asked at the timestep t the step goes to

Notation (section 5, inpainting):
    mask m        -> 1 where the picture is repainted and 0 where it is kept, at latent size (B, 1, H/8, W/8)
    image_latents -> z_0, the picture's latents; noise eps is the noise that started the run
    alpha, sigma  -> the level of the step, so that the picture at that level is alpha z_0 + sigma eps

Notation (sections 1 and 2, attention maps and the step callback):
    layer_probs    -> the cross-attention probabilities P = softmax(Q K^T / sqrt(d)) of several layers (and steps),
                      each (B, heads, h * w, L): latent position (row-major) by text token, h x w the layer's map
    token maps     -> (B, L, height, width): summed over heads, layers and steps at the latent size (bilinear),
                      each token's map divided by its own maximum
    callback       -> called at the end of every step with step, timestep, sigma, x, pred_x0, guidance_scale; returns
                      None or {"guidance_scale": w} (w <= 1: guidance off from the next step on)
"""

import math

import torch.nn.functional as F

from minidiff.course.solutions.lesson_03 import timesteps

# --- section 1: cross-attention maps ---


def aggregate_attention(layer_probs, height, width):
    """DAAM's aggregation: a list of (B, heads, h * w, L) probability tensors (layers at any resolution, any number
    of steps) -> (B, L, height, width) maps. Each tensor: summed over its heads, reshaped to (B, L, h, w) (h, w from
    height : width and h * w), bilinearly upsampled to (height, width) (align_corners=False); all summed; then each
    token's map (B and L fixed) divided by its own maximum."""
    total = 0
    for probs in layer_probs:
        batch, _, positions, tokens = probs.shape
        factor = round((height * width / positions) ** 0.5)
        maps = probs.sum(dim=1).transpose(1, 2).reshape(batch, tokens, height // factor, width // factor)
        total = total + F.interpolate(maps, size=(height, width), mode="bilinear", align_corners=False)
    return total / total.amax(dim=(-2, -1), keepdim=True)


# --- section 2: a writable step callback ---


def guidance_cutoff_callback(steps, ratio):
    """A step callback for a run of `steps` steps that switches classifier-free guidance off after step
    int(steps * ratio) (steps count from 0), as diffusers' SDCFGCutoffCallback: it returns {"guidance_scale": 0.0}
    at that step and None at every other. It is called as callback(step=..., timestep=..., sigma=..., x=...,
    pred_x0=..., guidance_scale=...)."""
    cutoff = int(steps * ratio)

    def callback(step, timestep, sigma, x, pred_x0, guidance_scale):
        return {"guidance_scale": 0.0} if step == cutoff else None

    return callback


# --- section 3: weighting words ---


def apply_token_weights(states, weights):
    """A1111's prompt weighting of N chunks: every position's hidden state times its weight, h_i <- w_i h_i, then
    each chunk scaled by one number so that its mean over all its positions and channels is what it was before
    weighting: h <- (w h) * mean(h) / mean(w h). states (N, 77, d), weights (N, 77); returns (N, 77, d).
    """
    weighted = states * weights[..., None]
    original_mean = states.mean(dim=(-2, -1), keepdim=True)  # (N, 1, 1): one mean per chunk
    return weighted * original_mean / weighted.mean(dim=(-2, -1), keepdim=True)


# --- section 4: DDIM inversion ---


def ddim_inverse_step(x, eps, alpha_bar_from, alpha_bar_to):
    """One DDIM inversion step, from the level alpha_bar_from up to alpha_bar_to (less signal, more noise).

    x_0    = (x - sqrt(1 - alpha_bar_from) eps) / sqrt(alpha_bar_from)     the clean latent seen in x
    x_next = sqrt(alpha_bar_to) x_0 + sqrt(1 - alpha_bar_to) eps           DDIM's update, towards the noise
    """
    x0 = (x - math.sqrt(1 - alpha_bar_from) * eps) / math.sqrt(alpha_bar_from)
    return math.sqrt(alpha_bar_to) * x0 + math.sqrt(1 - alpha_bar_to) * eps


def ddim_invert(model, x_0, alphas_cumprod, steps):
    """DDIM inversion on SD's grid (leading, steps_offset 1): x_0 -> x_T, which ddim_sample turns back into x_0.

    The sampler's steps (t, t_prev), t_prev = t - 1000 // steps (-1 after the last, read as alpha_bar_0), walked
    in reverse: least noisy first, each from t_prev up to t, the model asked at t (eps(x_{t_prev}, t) stands in
    for eps(x_t, t), which is not known yet). model(x, t) -> eps.
    """
    x = x_0
    for t in reversed(timesteps(steps)):
        t_prev = t - 1000 // steps
        alpha_bar_from = alphas_cumprod[max(t_prev, 0)]
        x = ddim_inverse_step(x, model(x, t), float(alpha_bar_from), float(alphas_cumprod[t]))
    return x


# --- section 5: inpainting ---


def blend_latents(x_t, mask, image_latents, noise, alpha, sigma):
    """Latent blending: x_t where mask is 1 (repainted), the picture noised to (alpha, sigma) where it is 0 (kept).

    x_t, image_latents, noise: (B, 4, h, w); mask: (B, 1, h, w) of 0 and 1; alpha, sigma: numbers.
    """
    kept = alpha * image_latents + sigma * noise
    return mask * x_t + (1 - mask) * kept
