"""Lesson 14, inspect and edit: look inside a run and steer it (course/14_inspect_and_edit.md).

Notation (one block per section):
    inpainting (section 5): mask m is 1 where the picture is repainted and 0 where it is kept, at latent size
        (B, 1, H/8, W/8); image_latents z_0 are the picture's latents; noise eps is the noise that started the
        run; (alpha, sigma) the level of the step, so that the picture at that level is alpha z_0 + sigma eps
"""

# --- section 5: inpainting ---


def blend_latents(x_t, mask, image_latents, noise, alpha, sigma):
    """Latent blending: x_t where mask is 1 (repainted), the picture noised to (alpha, sigma) where it is 0 (kept).

    x_t, image_latents, noise: (B, 4, h, w); mask: (B, 1, h, w) of 0 and 1; alpha, sigma: numbers.
    """
    kept = alpha * image_latents + sigma * noise
    return mask * x_t + (1 - mask) * kept
