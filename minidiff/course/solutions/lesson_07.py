"""Lesson 07, the VAE: between the encoder's z and the UNet's latents (Rombach et al. 2022, sec. 4.3.2).

Notation (course/07_vae.md):
    z               -> the VAE encoder's latent (B, 4, H / 8, W / 8)
    scaling_factor  -> 1 / std(z) over the training images: 0.18215 for SD 1.x / 2.x
    latents         -> z * scaling_factor, what the UNet is trained on (unit variance)
"""


def scale_latents(latents):
    """The SD VAE encoder's z -> the UNet's latents: z * 0.18215."""
    return latents * 0.18215


def decode_latents(latents, vae):
    """The sampler's latents -> images in [0, 1]: vae.decode(latents / vae.scaling_factor), mapped from [-1, 1]
    to [0, 1] by (image + 1) / 2 and clamped."""
    return ((vae.decode(latents / vae.scaling_factor) + 1) / 2).clamp(0, 1)
