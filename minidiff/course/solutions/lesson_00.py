"""Lesson 00, the tour: the exercises (the lesson has no function to write yet; it shows the whole pipeline).

Notation (course/00_tour.md):
    picture  -> RGB, (B, 3, 512, 512) for SD 1.5, values in [-1, 1] at the VAE's input
    latent   -> what the sampler and the UNet work on: (B, 4, 64, 64) for a 512 px picture
"""

from minidiff.vae import VAEConfig

# --- exercises (course/00_tour.md, "Exercises") ---


def exercise_00_1():
    """The numbers in SD 1.5's latent of one 512x512 picture (an int): its channels times its height times its
    width. VAEConfig.sd() has the channels; each of its downsamplers halves the side."""
    config = VAEConfig.sd()
    side = 512 // 2 ** (len(config.block_out_channels) - 1)  # one downsampler between two levels
    return config.latent_channels * side * side


def exercise_00_2():
    """How many times fewer numbers the latent has than the RGB picture it decodes to (a number)."""
    return 3 * 512 * 512 / exercise_00_1()
