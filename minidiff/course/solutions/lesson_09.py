"""Lesson 09, training: the denoising loss of one batch (Ho et al. 2020, alg. 1; Rombach et al. 2022, eq. 2).

Notation (course/09_train_shapes.md):
    t       -> one timestep per picture, uniform over 0 .. T - 1
    eps     -> the noise drawn, N(0, I), shaped like the latents
    loss    -> mean over every element of (eps_theta(x_t, t, c) - eps)^2

Notation (the grounding term; TokenCompose, Wang et al. 2024):
    P       -> one cross-attention layer's probabilities (B, heads, h * w, L): latent position (row-major) by token
    M       -> the latent cells the shape touches, (B, H, W) bool at the latent size; a layer f times smaller sees
               a cell as on the shape when any of the f x f latent cells it covers is
    J       -> the grounded tokens (B, L) bool: the caption's colour word and shape word
"""

import math

import torch
import torch.nn.functional as F


def diffusion_loss(unet, text_encoder, ids, latents, schedule, generator):
    """mean (eps - eps_theta(x_t, t, text_encoder(ids)))^2,  x_t = sqrt(alpha_bar_t) x_0 + sqrt(1 - alpha_bar_t) eps.

    Draw from `generator` in this order: t = torch.randint(T, (B,)), then eps = torch.randn(latents.shape).
    """
    t = torch.randint(schedule.num_train_timesteps, (len(latents),), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    alpha_bar = schedule.alphas_cumprod[t].float().view(-1, 1, 1, 1)
    x_t = alpha_bar.sqrt() * latents + (1 - alpha_bar).sqrt() * noise
    return F.mse_loss(unet(x_t, t, text_encoder(ids)), noise)


def grounding_loss(layer_probs, tokens, cells):
    """TokenCompose's token loss over a list of layers' P, each (B, heads, h * w, L): for every picture b, head and
    grounded token j (tokens[b, j] True), inside = sum over u in M of P[u, j] / sum over all u of P[u, j], and the
    layer's loss is the mean of (1 - inside)^2 over the grounded (b, j) and the heads; return the mean over the
    layers (0.0 when no token is grounded). The layer's M: `cells` (B, H, W) pooled with any() over f x f blocks,
    f = the layer's downsampling (H * W / (h * w) = f^2), flattened row-major."""
    count = int(tokens.sum())
    if count == 0:
        return torch.zeros(())
    batch, height, width = cells.shape
    total = 0.0
    for probs in layer_probs:
        f = round(math.sqrt(height * width / probs.shape[2]))
        mask = cells.reshape(batch, height // f, f, width // f, f).any(dim=4).any(dim=2).flatten(1).float()
        inside = (probs * mask[:, None, :, None]).sum(dim=2) / probs.sum(dim=2)  # (B, heads, L)
        total = total + ((1 - inside) ** 2 * tokens[:, None, :]).sum() / (count * probs.shape[1])
    return total / len(layer_probs)


# --- exercises (course/09_train_shapes.md, "Exercises") ---


def exercise_09_1():
    """If the training latents x_0 were themselves N(0, I) noise, the best a model can do at t is
    E[eps | x_t] = sqrt(1 - alpha_bar_t) x_t. Its expected loss (per element) at t = 500 of SD's schedule
    (a number)."""
    from minidiff.schedule import NoiseSchedule

    a = float(NoiseSchedule.sd().alphas_cumprod[500])
    return 1 - (1 - a)  # E[eps^2] - E[(sqrt(1 - a) x_t)^2] with E[x_t^2] = 1


def exercise_09_2():
    """The expected loss at t = 500 of SD's schedule of a model that answers eps_hat = x_t (the noisy input
    itself), on unit-variance x_0 independent of eps (a number)."""
    from minidiff.schedule import NoiseSchedule

    a = float(NoiseSchedule.sd().alphas_cumprod[500])
    # x_t - eps = sqrt(a) x_0 + (sqrt(1 - a) - 1) eps
    return a + (math.sqrt(1 - a) - 1) ** 2
