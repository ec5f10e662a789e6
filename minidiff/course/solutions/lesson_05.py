"""Lesson 05, attention: softmax(Q K^T / sqrt(d)) V (Vaswani et al. 2017), the formula SD's UNet and CLIP use.

Notation (course/05_attention.md):
    q, k, v  -> (B, heads, L_q, d) queries and (B, heads, L_k, d) keys and values; d the head dimension
    scores   -> Q K^T / sqrt(d), (B, heads, L_q, L_k): one row of weights per query
"""


def attention(q, k, v):
    """softmax(Q K^T / sqrt(d)) V, the softmax over the keys (the last axis): (B, heads, L_q, d)."""
    scores = q @ k.transpose(-2, -1) / q.shape[-1] ** 0.5
    return scores.softmax(dim=-1) @ v
