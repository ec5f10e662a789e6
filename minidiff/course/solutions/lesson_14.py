"""Lesson 14, inspect and edit: look inside a run (cross-attention maps) and steer it (a writable step callback).

Notation (course/14_inspect_and_edit.md):
    layer_probs    -> the cross-attention probabilities P = softmax(Q K^T / sqrt(d)) of several layers (and steps),
                      each (B, heads, h * w, L): latent position (row-major) by text token, h x w the layer's map
    token maps     -> (B, L, height, width): summed over heads, layers and steps at the latent size (bilinear),
                      each token's map divided by its own maximum
    callback       -> called at the end of every step with step, timestep, sigma, x, pred_x0, guidance_scale; returns
                      None or {"guidance_scale": w} (w <= 1: guidance off from the next step on)
"""

import torch.nn.functional as F

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
