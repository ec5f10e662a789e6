"""Lesson 05, attention: softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017), the formula SD's UNet and CLIP use.

Notation (course/05_attention.md):
    q, k, v  -> (B, heads, L_q, d) queries and (B, heads, L_k, d) keys and values; d the head dimension
    scores   -> Q K^T / sqrt(d), (B, heads, L_q, L_k): one row of weights per query
    params   -> a layer's weights under diffusers' keys: "to_q.weight", "attn1.to_q.weight", "norm1.weight", ...
"""

import torch.nn.functional as F


def attention(q, k, v):
    """softmax(Q K^T / sqrt(d)) V, the softmax over the keys (the last axis): (B, heads, L_q, d)."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    return scores.softmax(dim=-1) @ v


def _sub(params, prefix):
    """The entries of `params` under `prefix.`, with the prefix removed: _sub(p, "attn1")["to_q.weight"]."""
    return {key[len(prefix) + 1:]: value for key, value in params.items() if key.startswith(prefix + ".")}


def cross_attention(x, context, params, heads):
    """Multi-head attention of the tokens x (B, L, D) to context (B, L_c, D_c), diffusers' keys in params:
    to_q / to_k / to_v (no bias) and to_out.0 (with bias).

    q = x W_q, k = context W_k, v = context W_v, each split into `heads` heads of d = D / heads:
    (B, L, D) -> (B, heads, L, d); out = to_out.0(attention(q, k, v) with the heads joined back: (B, L, D)).
    """
    batch, length, width = x.shape
    q = x @ params["to_q.weight"].T
    k, v = context @ params["to_k.weight"].T, context @ params["to_v.weight"].T
    # (B, L, D) -> (B, heads, L, d)
    q, k, v = (t.reshape(batch, t.shape[1], heads, width // heads).transpose(1, 2) for t in (q, k, v))
    out = attention(q, k, v).transpose(1, 2).reshape(batch, length, width)  # (B, L, D)
    return out @ params["to_out.0.weight"].T + params["to_out.0.bias"]


def self_attention(x, params, heads):
    """Multi-head self-attention: the tokens x (B, L, D) attend to themselves, cross_attention(x, x, ...)."""
    return cross_attention(x, x, params, heads)


def transformer_block(x, context, params, heads):
    """The UNet's BasicTransformerBlock, pre-norm, each sub-layer added to its input (diffusers' keys):

    x = x + attn1(norm1(x))                 self-attention
    x = x + attn2(norm2(x), context)        cross-attention to the text
    x = x + ff(norm3(x))                    ff.net.0.proj -> [a, g]; a * GELU(g) (GEGLU); ff.net.2
    LayerNorms with eps 1e-5.
    """
    def norm(h, name):
        return F.layer_norm(h, h.shape[-1:], params[f"{name}.weight"], params[f"{name}.bias"], 1e-5)

    x = x + self_attention(norm(x, "norm1"), _sub(params, "attn1"), heads)
    x = x + cross_attention(norm(x, "norm2"), context, _sub(params, "attn2"), heads)
    value, gate = F.linear(norm(x, "norm3"), params["ff.net.0.proj.weight"], params["ff.net.0.proj.bias"]).chunk(2, -1)
    return x + F.linear(value * F.gelu(gate), params["ff.net.2.weight"], params["ff.net.2.bias"])


# --- exercises (course/05_attention.md, "Exercises") ---


def exercise_05_1():
    """The number of scores in one head's Q K^T of SD 1.5's first self-attention, for a 512x512 picture (an int):
    the first stage works on the 64 x 64 latent, one token per position."""
    tokens = 64 * 64
    return tokens * tokens


def exercise_05_2():
    """The same for that block's cross-attention, whose keys are the text encoder's 77 tokens (an int)."""
    return 64 * 64 * 77
