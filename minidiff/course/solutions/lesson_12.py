"""Lesson 12, adapters: a LoRA as a low-rank update of a linear layer (Hu et al. 2021), unfused and merged.

Notation (course/12_lora.md):
    W, b        -> weight (d_out, d_in) and bias (d_out,) of the frozen layer
    A, B        -> down (r, d_in) and up (d_out, r): PEFT's lora_A / lora_B, kohya's lora_down / lora_up
    r, alpha    -> the rank (down's first dimension) and the file's alpha (alpha = r when a file has none)
    s           -> scale, the user's strength (load_lora(path, scale=0.8))
"""


def lora_forward(x, weight, bias, down, up, alpha, scale):
    """A linear layer with a LoRA beside it, unfused: x (N, d_in) -> (N, d_out),

    y = x W^T + b + s (alpha / r) (x A^T) B^T,   r = down.shape[0], without ever forming B A.
    """
    rank = down.shape[0]
    return x @ weight.T + bias + scale * (alpha / rank) * ((x @ down.T) @ up.T)


def lora_merge(weight, down, up, alpha, scale):
    """The LoRA fused into the weight: W' = W + s (alpha / r) B A, shaped like W (d_out, d_in)."""
    return weight + scale * (alpha / down.shape[0]) * (up @ down)


# --- exercises (course/12_lora.md, "Exercises") ---


def exercise_12_1():
    """The numbers stored by a rank-8 LoRA of SD 1.5's first cross-attention to_k, which maps the 768-wide text
    to the 320 channels of the first stage (an int)."""
    rank, d_in, d_out = 8, 768, 320
    return rank * d_in + d_out * rank  # A (r, d_in) and B (d_out, r)
