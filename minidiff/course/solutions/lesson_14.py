"""Lesson 14, inspect and edit: look inside a run and steer it, on the bundled shapes model.

Notation (course/14_inspect_and_edit.md):
    states, weights  -> section 3: (N, 77, d) hidden states of N prompt chunks and (N, 77) per-token weights
"""

# --- section 3: weighting words ---


def apply_token_weights(states, weights):
    """A1111's prompt weighting of N chunks: every position's hidden state times its weight, h_i <- w_i h_i, then
    each chunk scaled by one number so that its mean over all its positions and channels is what it was before
    weighting: h <- (w h) * mean(h) / mean(w h). states (N, 77, d), weights (N, 77); returns (N, 77, d).
    """
    weighted = states * weights[..., None]
    original_mean = states.mean(dim=(-2, -1), keepdim=True)  # (N, 1, 1): one mean per chunk
    return weighted * original_mean / weighted.mean(dim=(-2, -1), keepdim=True)
