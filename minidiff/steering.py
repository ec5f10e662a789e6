"""A writable step callback: look at every step of a run, and change its latent or its guidance on the way.

At the end of every sampler step the pipeline calls the user's callback with the keywords
    step, timestep, sigma, x, pred_x0     (as minidiff.samplers reports them: x is the latent the next step starts
                                           from, in VP space; pred_x0 the step's clean prediction)
    guidance_scale                        the guidance w of the next steps, to a callback that has a parameter of
                                          that name (or **kwargs): a read-only callback(step, timestep, sigma, x,
                                          pred_x0) keeps working as it is
and the callback returns what it changes:
    None                                  nothing
    a tensor shaped like x                the sampler goes on from that latent
    {"x": latent, "guidance_scale": w}    either or both, by the names it got them; w <= 1 switches guidance off
                                          (one UNet call on the prompt alone per step), w > 1 back on

This is diffusers' callback_on_step_end contract (the callback returns the tensors it changes; diffusers'
SDCFGCutoffCallback sets the guidance to 0 and keeps the prompt's embeddings alone) with minidiff's names:
`guidance_cutoff(steps, 0.4)` is that callback, and matches it on the same weights and noise
(tests/parity/test_steering.py).
"""

import inspect

import torch

from minidiff.checks import check_float, literal
from minidiff.errors import InputError


def takes_guidance(callback) -> bool:
    """Whether the callback has a parameter `guidance_scale` (or **kwargs), so that it is handed the guidance."""
    try:
        parameters = inspect.signature(callback).parameters.values()
    except (TypeError, ValueError):  # a builtin without a signature
        return False
    return any(p.name == "guidance_scale" or p.kind is p.VAR_KEYWORD for p in parameters)


class Steering:
    """The guided model of one run, whose guidance a step callback may change between steps.

    pipe.guided_model builds the function (x_t, t) -> prediction for a guidance scale (calling `unet`, when given:
    an inpainting UNet with its mask channels); it is rebuilt when the scale
    changes, and the negative prompt's states are computed only when guidance is first on (`uncond()`).
    """

    def __init__(self, pipe, context, uncond, guidance_scale: float, guidance_rescale: float, encode_uncond,
                 unet=None):
        self.pipe, self.context, self.guidance_rescale, self.unet = pipe, context, guidance_rescale, unet
        self._uncond, self.encode_uncond = uncond, encode_uncond
        self.guidance_scale = guidance_scale
        self._model, self._built_for = None, None

    def uncond(self):
        if self._uncond is None and self.guidance_scale > 1.0:
            self._uncond = self.encode_uncond()
        return self._uncond

    def model(self, x, t):
        if self._model is None or self._built_for != self.guidance_scale:
            self._model = self.pipe.guided_model(self.context, self.uncond(), self.guidance_scale,
                                                 self.guidance_rescale, self.unet)
            self._built_for = self.guidance_scale
        return self._model(x, t)

    def step_end(self, callback, info: dict):
        """Call the callback at the end of a step; returns the latent to go on from (None: the sampler's own)."""
        extra = {"guidance_scale": self.guidance_scale} if takes_guidance(callback) else {}
        returned = callback(**info, **extra)
        if returned is None or torch.is_tensor(returned):
            return returned
        if not isinstance(returned, dict) or not set(returned) <= {"x", "guidance_scale"}:
            shown = sorted(returned) if isinstance(returned, dict) else type(returned).__name__
            raise InputError(f"the callback returned {literal(shown)}: return None (nothing changes), a latent shaped "
                             "like x, or a dict with 'x' and/or 'guidance_scale'")
        if "guidance_scale" in returned:
            self.guidance_scale = check_float("the callback's guidance_scale", returned["guidance_scale"],
                                              fix="w <= 1 switches guidance off")
        return returned.get("x")


def guidance_cutoff(steps: int, ratio: float = 0.4):
    """A step callback that switches guidance off after the step int(steps * ratio), counted from 0 (diffusers'
    SDCFGCutoffCallback(cutoff_step_ratio=ratio) on a run of `steps` steps)."""
    cutoff = int(steps * ratio)

    def cut_guidance(step, timestep, sigma, x, pred_x0, guidance_scale):
        return {"guidance_scale": 0.0} if step == cutoff else None

    return cut_guidance
