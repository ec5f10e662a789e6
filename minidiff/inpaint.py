"""Inpainting: repaint the white part of a mask, keep the rest of the picture.

Two ways, as diffusers' StableDiffusionInpaintPipeline has them:
    an inpainting UNet (9 input channels, e.g. stable-diffusion-inpainting) sees at every step the latent x_t,
        the mask and the latents of the picture with the masked part blanked, stacked as channels; it was
        trained to fill the hole so that it fits what is around it.
    any other model (4 channels, the shapes model included): latent blending (Lugmayr et al. 2022, RePaint;
        A1111's and diffusers' 4-channel path). After each step the part outside the mask is replaced by the
        picture noised to the level the sampler is at, so that the model sees the kept part while it paints the
        hole, and at the end by the picture itself.

Notation:
    mask                 -> m at latent size (B, 1, H/8, W/8): 1 where the picture is repainted, 0 where kept;
                            the picture's mask made grey, resized, cut at 0.5, then shrunk by nearest neighbour
    image_latents        -> z_0, the picture's latents (what `Pipeline.encode_image` returns)
    masked_image_latents -> the latents of the picture with the repainted pixels set to 0 (mid-grey)
    noise                -> eps, the noise that starts the run; outside the mask x_t = alpha_t z_0 + sigma_t eps

How the blend is placed: the samplers are pure functions, so instead of writing into their latent after a step,
`blended` replaces the part outside the mask in the latent the model is given. Every sampler's update is element
by element, so the part inside the mask follows exactly the path it follows when the sampler's own latent is
blended (what diffusers does), and `keep_outside` puts the picture back outside the mask at the end.
"""

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from PIL import Image

from minidiff.errors import InputError
from minidiff.images import from_pil, open_picture

INPAINT_CHANNELS = 9  # an inpainting UNet's input: 4 latent + 1 mask + 4 masked-image latent channels
HIGH_BIT_MODES = ("I", "I;16", "I;16B", "I;16L", "I;16N", "F")  # 16/32-bit pictures: PIL clips them to 8 bits


def read_picture(image, what: str) -> Image.Image:
    """A PIL image or a picture file (read with open_picture's safety limits), in a mode that converts to 8-bit RGB."""
    if not isinstance(image, Image.Image):
        image = open_picture(image, what)
    if image.mode in HIGH_BIT_MODES:
        raise InputError(f"{what} is a {image.mode} (16/32-bit) picture, not 8-bit RGB or grey: save it as an "
                         "8-bit PNG first")
    return image


def check_inpaint_inputs(image, mask) -> tuple:
    """The picture and its mask, read and checked: an 8-bit picture without transparent pixels, and a mask of the
    same size (white repaints, black keeps). Returns both as PIL images."""
    if image is None:
        raise InputError("a mask needs the picture it masks: pass image= (--image) too, or drop the mask")
    picture = read_picture(image, "the input image")
    if picture.mode in ("RGBA", "LA", "PA") or (picture.mode == "P" and "transparency" in picture.info):
        alpha = picture.convert("RGBA").getchannel("A")
        if alpha.getextrema()[0] < 255:
            raise InputError("the input image has transparent pixels, whose colour is undefined: flatten it onto a "
                             "background first, or paint the transparent part white in the mask and pass an RGB "
                             "picture")
    mask_image = read_picture(mask, "the mask")
    if mask_image.size != picture.size:
        raise InputError(f"the mask is {mask_image.width}x{mask_image.height} px but the image is {picture.width}x"
                         f"{picture.height} px: give a mask of the image's size (white repaints, black keeps)")
    return picture, mask_image


def mask_pixels(mask: Image.Image, height: int, width: int) -> torch.Tensor:
    """A mask picture -> (1, 1, height, width) of 0 and 1: made grey, resized, cut at 0.5 (diffusers' mask
    processor does the same)."""
    grey = mask.convert("L")
    if grey.size != (width, height):
        grey = grey.resize((width, height), Image.LANCZOS)
    values = torch.frombuffer(bytearray(grey.tobytes()), dtype=torch.uint8).reshape(1, 1, height, width)
    return (values.float() / 255 >= 0.5).float()


def latent_mask(pixels: torch.Tensor) -> torch.Tensor:
    """The pixel mask shrunk 8 times to the latent grid by nearest neighbour: still 0 and 1."""
    return F.interpolate(pixels, size=(pixels.shape[-2] // 8, pixels.shape[-1] // 8), mode="nearest")


def with_mask_channels(unet, mask: torch.Tensor, masked_image_latents: torch.Tensor):
    """An inpainting UNet as a plain one: (x, t, context) -> unet([x, m, masked-image latents], t, context), the
    mask and the masked latents repeated to x's batch (twice the images under classifier-free guidance)."""

    def call(x, t, context):
        repeat = x.shape[0] // mask.shape[0]
        extra = torch.cat([mask, masked_image_latents], dim=1).repeat(repeat, 1, 1, 1)
        return unet(torch.cat([x, extra.to(x.dtype)], dim=1), t, context)  # (B, 4 + 1 + 4, H, W)

    return call


def blend(x_t, mask, image_latents, noise, alpha: float, sigma: float):
    """Latent blending: x_t inside the mask, the picture noised to (alpha, sigma) outside it."""
    return mask * x_t + (1 - mask) * (alpha * image_latents + sigma * noise)


def blended(model, mask, image_latents, noise, levels, seen: list):
    """model(x_t, t), given x_t blended (`blend`) at the level `levels(t)` -> (alpha_t, sigma_t) of the call; the
    first call (the starting latent: pure noise at strength 1, as in diffusers) is left as it is. The timestep of
    every call is appended to `seen`."""

    def call(x_t, t):
        if seen and float(t) != seen[0]:
            x_t = blend(x_t, mask, image_latents, noise, *levels(t))
        seen.append(float(t))
        return model(x_t, t)

    return call


def grid_levels(schedule, sampler: str, steps: int, timesteps, options: dict):
    """t -> (alpha_t, sigma_t) for the model calls of `sampler`'s grid: the grid's own sigma where it has one
    (fractional timesteps, Karras sigmas), else the schedule's. `options` are the sampler's (spacing, karras ...)."""
    from minidiff.samplers import GRIDS, call_grid

    grid = call_grid(schedule, sampler, steps, timesteps, options)
    sigmas = {}
    if GRIDS[sampler] in ("sigma_grid", "multistep_grid"):  # k-diffusion sigmas: x = x0 + s eps, x_t = x / sqrt(1+s^2)
        sigmas = {float(t): float(s) for t, s in zip(grid[0], grid[1])}

    def levels(t):
        if float(t) in sigmas:
            s = sigmas[float(t)]
            return 1 / (1 + s**2) ** 0.5, s / (1 + s**2) ** 0.5
        return tuple(float(v) for v in schedule.alpha_sigma(int(t)))

    return levels


@dataclass
class Inpainting:
    """What one inpainting call needs beside the prompt (see the notation above)."""

    mask: torch.Tensor  # (1, 1, H/8, W/8), 1 = repaint
    image_latents: torch.Tensor | None  # z_0 (B, 4, H/8, W/8); None for an inpainting UNet at strength 1
    masked_image_latents: torch.Tensor | None  # for an inpainting UNet; None for latent blending
    noise: torch.Tensor
    seen: list = field(default_factory=list)  # the timestep of each model call (latent blending)
    levels: object = None  # t -> (alpha_t, sigma_t), set by `model`

    @property
    def blending(self) -> bool:
        return self.masked_image_latents is None

    def unet(self, unet):
        """The UNet call for the guided model: with the mask channels for an inpainting UNet, else unchanged."""
        return unet if self.blending else with_mask_channels(unet, self.mask, self.masked_image_latents)

    def model(self, model, levels):
        """The sampler's model: blended outside the mask for latent blending, else unchanged."""
        self.levels = levels
        return blended(model, self.mask, self.image_latents, self.noise, levels, self.seen) if self.blending else model

    def trace_view(self, recorded: list) -> None:
        """Latent blending's trace as diffusers' latents read: outside the mask, x_inter is the picture at the level
        of the next model call (the picture itself after the last) and pred_x0 the picture. Each record holds
        `calls`, the model calls made before it."""
        if not self.blending:
            return
        for record in recorded:
            after = record.pop("calls")
            level = self.levels(self.seen[after]) if after < len(self.seen) else (1.0, 0.0)
            record["x"] = blend(record["x"], self.mask, self.image_latents, self.noise, *level)
            record["pred_x0"] = self.keep_outside(record["pred_x0"])

    def keep_outside(self, latents):
        """The final latents, with the picture's own outside the mask (latent blending's last step)."""
        return blend(latents, self.mask, self.image_latents, self.noise, 1.0, 0.0) if self.blending else latents


def prepare(pipe, picture, mask_image, height, width, generator, image_latents, noise) -> Inpainting:
    """The mask at latent size and, for an inpainting UNet, the masked picture's latents, drawn from the VAE's
    posterior after the noise (the order of diffusers' draws from the generator)."""
    pixels = mask_pixels(mask_image, height, width)
    mask = latent_mask(pixels).to(pipe.device, pipe.dtype)
    in_channels = pipe.unet.config.in_channels
    if in_channels == pipe.latent_channels():
        if image_latents is None:
            raise InputError("latent blending needs the picture's latents: pass image=")
        return Inpainting(mask, image_latents, None, noise)
    if in_channels != INPAINT_CHANNELS or pipe.sdxl is not None:
        raise InputError(f"this UNet takes {in_channels} input channels: inpainting needs a 4-channel model "
                         f"(latent blending) or an SD 1.x/2.x inpainting UNet with {INPAINT_CHANNELS}")
    pixels_kept = from_pil(picture, height, width) * (pixels < 0.5)  # the repainted part set to 0, mid-grey
    masked = pipe.encode_image(pixels_kept, height, width, generator)  # a tensor: not rounded to 8 bits
    return Inpainting(mask, image_latents, masked, noise)
