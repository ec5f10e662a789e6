"""Lesson 08, text and guidance: SD 1.x's 77 token ids, and classifier-free guidance (Ho & Salimans 2022).

Notation (course/08_text_and_guidance.md):
    ids              -> <|startoftext|> 49406, at most 75 BPE tokens, <|endoftext|> 49407, then 49407 padding to 77
    eps_uncond/cond  -> eps_theta(x_t, t, empty prompt) and eps_theta(x_t, t, prompt)
    w                -> guidance_scale; phi -> guidance_rescale (Lin et al. 2023, eq. 16)
    symbols, ranks   -> a word as a list of BPE symbols; {(a, b): rank} the merges, rank 0 learnt first
    mask             -> (L, L) bool, True where token i may attend to token j (j <= i: causal)
"""

import torch
import torch.nn.functional as F

from minidiff.tokenizer import CLIPTokenizer


def tokenize(text):
    """SD 1.x's 77 ids of one prompt: [49406, *tokens[:75], 49407] padded with 49407 to 77 (a list of ints).

    The BPE itself is the library's: CLIPTokenizer.sd15().encode(text) gives the tokens.
    """
    ids = [49406, *CLIPTokenizer.sd15().encode(text)[:75], 49407]
    return ids + [49407] * (77 - len(ids))


def guided_eps(eps_uncond, eps_cond, guidance_scale, guidance_rescale=0.0):
    """Classifier-free guidance: eps = eps_uncond + w (eps_cond - eps_uncond).

    With phi = guidance_rescale > 0 (Lin et al. 2023, eq. 15-16), per picture (std over every axis but the batch):
    rescaled = eps * std(eps_cond) / std(eps), and eps = phi rescaled + (1 - phi) eps.
    """
    guided = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
    if guidance_rescale > 0:
        dims = list(range(1, guided.ndim))
        rescaled = guided * eps_cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True)
        guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
    return guided


def bpe_merge(symbols, ranks):
    """One BPE merge step (Sennrich et al. 2016): among the adjacent pairs of `symbols`, the one with the lowest
    rank in `ranks` is merged wherever it occurs, left to right, into one symbol a + b; a new list. When no
    adjacent pair has a rank, the symbols come back unchanged."""
    pairs = [pair for pair in zip(symbols, symbols[1:]) if pair in ranks]
    if not pairs:
        return list(symbols)
    best = min(pairs, key=ranks.get)
    merged, i = [], 0
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best:
            merged.append(symbols[i] + symbols[i + 1])
            i += 2
        else:
            merged.append(symbols[i])
            i += 1
    return merged


def causal_mask(length):
    """CLIP's causal mask (length, length), bool: True where token i may attend to token j, i.e. j <= i."""
    return torch.ones(length, length, dtype=torch.bool).tril()


def clip_layer(x, params, heads, mask):
    """One CLIP text-encoder layer, pre-norm (transformers' keys; LayerNorm eps 1e-5; quick_gelu):

    x = x + out_proj(attention(q_proj, k_proj, v_proj of layer_norm1(x), heads, only where mask is True))
    x = x + fc2(quick_gelu(fc1(layer_norm2(x)))),  quick_gelu(a) = a sigmoid(1.702 a)
    The projections have biases. Masked-out scores are -inf before the softmax.
    """
    def norm(h, name):
        return F.layer_norm(h, h.shape[-1:], params[f"{name}.weight"], params[f"{name}.bias"], 1e-5)

    batch, length, width = x.shape
    h = norm(x, "layer_norm1")
    q, k, v = (F.linear(h, params[f"self_attn.{n}_proj.weight"], params[f"self_attn.{n}_proj.bias"]) for n in "qkv")
    q, k, v = (t.reshape(batch, length, heads, width // heads).transpose(1, 2) for t in (q, k, v))  # (B, heads, L, d)
    scores = (q @ k.transpose(-2, -1) / (width // heads) ** 0.5).masked_fill(~mask, float("-inf"))
    h = (scores.softmax(dim=-1) @ v).transpose(1, 2).reshape(batch, length, width)  # (B, L, D)
    x = x + F.linear(h, params["self_attn.out_proj.weight"], params["self_attn.out_proj.bias"])
    h = F.linear(norm(x, "layer_norm2"), params["mlp.fc1.weight"], params["mlp.fc1.bias"])
    return x + F.linear(h * torch.sigmoid(1.702 * h), params["mlp.fc2.weight"], params["mlp.fc2.bias"])


def _sub(params, prefix):
    """The entries of `params` under `prefix.`, with the prefix removed."""
    return {key[len(prefix) + 1:]: value for key, value in params.items() if key.startswith(prefix + ".")}


def text_encoder(ids, params, heads):
    """SD 1.x's text encoder from your layers: ids (B, L) -> the last hidden state (B, L, D); params its
    state_dict (keys text_model.*).

    x = embeddings.token_embedding[ids] + embeddings.position_embedding[0 .. L - 1]
    x = every encoder.layers.i in order, with causal_mask(L)
    out = final_layer_norm(x)                                    (eps 1e-5)
    """
    p = _sub(params, "text_model")
    x = p["embeddings.token_embedding.weight"][ids] + p["embeddings.position_embedding.weight"][:ids.shape[1]]
    mask = causal_mask(ids.shape[1])
    for i in range(len({key.split(".")[2] for key in p if key.startswith("encoder.layers.")})):
        x = clip_layer(x, _sub(p, f"encoder.layers.{i}"), heads, mask)
    return F.layer_norm(x, x.shape[-1:], p["final_layer_norm.weight"], p["final_layer_norm.bias"], 1e-5)


# --- exercises (course/08_text_and_guidance.md, "Exercises") ---


def exercise_08_1():
    """The weight of eps_uncond in the guided prediction at guidance scale w = 7.5, written as
    eps = a eps_uncond + b eps_cond: the number a."""
    w = 7.5
    return 1 - w


def exercise_08_2():
    """The pictures that go through the UNet to draw 4 prompts in 20 steps with guidance (an int)."""
    prompts, steps = 4, 20
    return 2 * prompts * steps  # each prompt and the empty prompt, every step
