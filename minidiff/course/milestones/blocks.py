"""Milestones of the transformer parts: self- and cross-attention, the UNet's transformer block (lesson 05), and
CLIP's pieces (lesson 08): one BPE merge, the causal mask, a layer, the text encoder built from them.

Each reference is the library's module (minidiff.unet, minidiff.clip, minidiff.tokenizer) with seeded weights;
the candidate gets the same weights as a dict under the official keys. The known mistakes are computed by
`_attention_variant` / `_block_variant` / `_clip_variant` below, the formula with one term changed.
See core.py for the machinery.
"""

import functools

import torch
import torch.nn.functional as F

from minidiff.course.milestones.core import (
    Mismatch,
    Tolerance,
    call_candidate,
    compare,
    fixed_randn,
    milestone,
    randomized,
    signature,
)

TOL = Tolerance(1e-5, 1e-5)
LESSON_OF = {"multi-head attention": "05_attention", "cross-attention": "05_attention",
             "the transformer block": "05_attention", "byte-pair encoding": "08_text_and_guidance",
             "the causal mask": "08_text_and_guidance", "the CLIP layer": "08_text_and_guidance",
             "the text encoder": "08_text_and_guidance"}


def hint(text: str, section: str) -> str:
    """A named mistake and the lesson section that explains it."""
    lesson = LESSON_OF[section]
    return f"{text}; reread lesson {lesson[:2]} (course/{lesson}.md, {section})"


def sub(params: dict, prefix: str) -> dict:
    return {key[len(prefix) + 1:]: value for key, value in params.items() if key.startswith(prefix + ".")}


@functools.cache
def _transformer_block():
    from minidiff.unet import BasicTransformerBlock

    with torch.random.fork_rng():
        torch.manual_seed(60)
        return randomized(BasicTransformerBlock(32, 4, 24), 61)


def _attention_variant(x, context, p, heads, split="transpose", head_scale=True, project_out=True):
    """Multi-head attention with diffusers' keys, or one of its mistakes."""
    q, k, v = x @ p["to_q.weight"].T, context @ p["to_k.weight"].T, context @ p["to_v.weight"].T
    batch, length, width = q.shape
    d = width // heads
    if split == "transpose":  # (B, L, D) -> (B, heads, L, d)
        q, k, v = (t.reshape(batch, t.shape[1], heads, d).transpose(1, 2) for t in (q, k, v))
    else:  # reshape straight to (B, heads, L, d): the tokens mixed
        q, k, v = (t.reshape(batch, heads, t.shape[1], d) for t in (q, k, v))
    scores = q @ k.transpose(-2, -1) / (d if head_scale else width) ** 0.5
    out = scores.softmax(-1) @ v
    out = out.transpose(1, 2).reshape(batch, length, width) if split == "transpose" else out.reshape(batch, length,
                                                                                                     width)
    return out @ p["to_out.0.weight"].T + p["to_out.0.bias"] if project_out else out


def attention_mistakes(x, context, p, heads):
    section = "multi-head attention"
    mistakes = [
        (hint("one head: split D into `heads` heads of d = D / heads, attend in each, join them back", section),
         lambda: _attention_variant(x, context, p, 1)),
        (hint("the heads are split wrongly: reshape (B, L, D) to (B, L, heads, d), then transpose to (B, heads, L, "
              "d); reshaping straight to (B, heads, L, d) mixes the tokens", section),
         lambda: _attention_variant(x, context, p, heads, split="reshape")),
        (hint("scaled by sqrt(D): the scale is 1 / sqrt(d), d = D / heads the head dimension", section),
         lambda: _attention_variant(x, context, p, heads, head_scale=False)),
        (hint("to_out.0 (a linear with bias) is missing after the heads are joined", section),
         lambda: _attention_variant(x, context, p, heads, project_out=False)),
    ]
    return mistakes


def _attention_check(candidate, call, cross: bool) -> str:
    block = _transformer_block()
    module, p = (block.attn2, sub(block.state_dict(), "attn2")) if cross else (block.attn1,
                                                                               sub(block.state_dict(), "attn1"))
    x, context = fixed_randn(2, 10, 32, seed=62), fixed_randn(2, 7, 24, seed=63)
    with torch.no_grad():
        args = (x.clone(), context.clone(), dict(p), 4) if cross else (x.clone(), dict(p), 4)
        yours = call_candidate(candidate, call, *args)
        expected = module(x, context) if cross else module(x)
        error = compare(yours, expected, TOL, "output", attention_mistakes(x, context if cross else x, p, 4))
    return f"D = 32, 4 heads, largest |diff| {error:.1e} <= {TOL.atol:g} (fp32)"


@milestone("self-attention: multi-head, diffusers' to_q / to_k / to_v / to_out.0", lesson=5)
def check_self_attention(candidate=None):
    """self_attention(x, params, heads) -> (B, L, D); params: to_q.weight, to_k.weight, to_v.weight, to_out.0.*

    On x (2, 10, 32), 4 heads, the weights of attn1 of a seeded minidiff.unet.BasicTransformerBlock.
    """
    if candidate is None:
        return _attention_check(lambda x, p, heads: _transformer_block().attn1(x), signature(check_self_attention),
                                False)
    return _attention_check(candidate, signature(check_self_attention), False)


@milestone("cross-attention: the image's tokens attend to the text", lesson=5)
def check_cross_attention(candidate=None):
    """cross_attention(x, context, params, heads) -> (B, L, D); x (B, L, D), context (B, L_c, D_c)

    On x (2, 10, 32), context (2, 7, 24), 4 heads, the weights of attn2 of the block of self_attention.
    """
    candidate = candidate or (lambda x, c, p, heads: _transformer_block().attn2(x, c))
    return _attention_check(candidate, signature(check_cross_attention), True)


def _block_variant(x, c, p, heads, post_norm=False, residual=True, cross_first=False, gate_first=False):
    """The BasicTransformerBlock, or one of its mistakes."""
    def norm(h, name):
        return F.layer_norm(h, h.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"], 1e-5)

    def attn1(h):
        return _attention_variant(h, h, sub(p, "attn1"), heads)

    def attn2(h):
        return _attention_variant(h, c, sub(p, "attn2"), heads)

    def ff(h):
        value, gate = F.linear(h, p["ff.net.0.proj.weight"], p["ff.net.0.proj.bias"]).chunk(2, -1)
        value, gate = (gate, value) if gate_first else (value, gate)
        return F.linear(value * F.gelu(gate), p["ff.net.2.weight"], p["ff.net.2.bias"])

    layers = [("norm2", attn2), ("norm1", attn1)] if cross_first else [("norm1", attn1), ("norm2", attn2)]
    for name, layer in [*layers, ("norm3", ff)]:
        if post_norm:
            x = norm(x + layer(x), name)
        else:
            x = x + layer(norm(x, name)) if residual else layer(norm(x, name))
    return x


@milestone("transformer block: self-attention, cross-attention, GEGLU feed-forward", lesson=5)
def check_transformer_block(candidate=None):
    """transformer_block(x, context, params, heads) -> (B, L, D); params: norm1..3, attn1/2, ff.net.0.proj, ff.net.2

    On x (2, 10, 32), context (2, 7, 24), 4 heads, a seeded minidiff.unet.BasicTransformerBlock's weights.
    """
    block = _transformer_block()
    p, x, c = block.state_dict(), fixed_randn(2, 10, 32, seed=64), fixed_randn(2, 7, 24, seed=65)
    section = "the transformer block"
    mistakes = [(hint(text, section), lambda o=options: _block_variant(x, c, p, 4, **o)) for text, options in [
        ("post-norm: SD's block is pre-norm, x + attn(norm(x)), not norm(x + attn(x))", {"post_norm": True}),
        ("the residuals are missing: each sub-layer's output is added to its input", {"residual": False}),
        ("self-attention (attn1, norm1) comes first, then cross-attention (attn2, norm2)", {"cross_first": True}),
        ("GEGLU's halves are swapped: [value, gate] = proj(x).chunk(2), out = value * GELU(gate)",
         {"gate_first": True}),
    ]]
    candidate = candidate or (lambda x, c, p, heads: block(x, c))
    with torch.no_grad():
        yours = call_candidate(candidate, signature(check_transformer_block), x.clone(), c.clone(), dict(p), 4)
        error = compare(yours, block(x, c), TOL, "output", mistakes)
    return f"D = 32, 4 heads, largest |diff| {error:.1e} <= {TOL.atol:g} (fp32)"


# --- CLIP's pieces -------------------------------------------------------------------------------------------

BPE_CASES = [  # (symbols, ranks): the lowest rank wins, every occurrence is merged, no known pair: unchanged
    (["l", "o", "w", "l", "o", "w", "e", "r</w>"], {("w", "e"): 3, ("l", "o"): 1, ("o", "w"): 0, ("e", "r</w>"): 2}),
    (["a", "b", "a", "b", "c</w>"], {("b", "c</w>"): 4, ("a", "b"): 7}),
    (["x", "y</w>"], {("y", "x"): 0}),
]


def _bpe_variant(symbols, ranks, pick="lowest", every=True):
    pairs = [pair for pair in zip(symbols, symbols[1:]) if pair in ranks]
    if not pairs:
        return list(symbols)
    best = {"lowest": min(pairs, key=ranks.get), "first": pairs[0], "highest": max(pairs, key=ranks.get)}[pick]
    out, i, done = [], 0, False
    while i < len(symbols):
        if i + 1 < len(symbols) and (symbols[i], symbols[i + 1]) == best and not done:
            out.append(symbols[i] + symbols[i + 1])
            i, done = i + 2, not every
        else:
            out.append(symbols[i])
            i += 1
    return out


@milestone("BPE: one merge step (Sennrich et al. 2016)", lesson=8)
def check_bpe_merge(candidate=None):
    """bpe_merge(symbols, ranks) -> list: the lowest-ranked adjacent pair merged everywhere; no known pair: unchanged

    On three made-up words and ranks, then merged to the end on five words with SD's 49,152 merges: each word's
    symbols must be the library tokenizer's.
    """
    from minidiff.tokenizer import CLIPTokenizer

    candidate, call, section = candidate or _bpe_variant, signature(check_bpe_merge), "byte-pair encoding"
    mistakes = [("the first known pair was merged: merge the pair of LOWEST rank (learnt first), wherever it is",
                 "first", True), ("the pair of highest rank was merged: rank 0 is the first merge learnt, the "
                                  "lowest rank wins", "highest", True),
                ("only the first occurrence was merged: merge the pair everywhere it occurs, left to right", "lowest",
                 False)]
    for n, (symbols, ranks) in enumerate(BPE_CASES):
        yours = call_candidate(candidate, call, list(symbols), dict(ranks))
        expected = _bpe_variant(symbols, ranks)
        if list(yours) != expected:
            named = next((text for text, pick, every in mistakes if list(yours) == _bpe_variant(symbols, ranks, pick,
                                                                                                   every)), None)
            raise Mismatch(f"case {n}, {symbols} with ranks {ranks}: yours {list(yours)}, reference {expected}"
                           + (f"\n  hint: {hint(named, section)}" if named else ""))
    tokenizer = CLIPTokenizer.sd15()
    for word in ("astronaut", "riding", "horse", "lowest", "crêpes"):
        parts = [*word[:-1], word[-1] + "</w>"]
        for _ in range(len(word)):
            parts = list(call_candidate(candidate, call, parts, tokenizer.merge_ranks))
        if tuple(parts) != tokenizer._bpe(word):
            raise Mismatch(f"{word!r} merged to the end with SD's merges: yours {parts}, the tokenizer's "
                           f"{list(tokenizer._bpe(word))}")
    return f"{len(BPE_CASES)} made-up cases and 5 words with SD's merges, exact"


@milestone("CLIP's causal mask: token i sees tokens 0 .. i", lesson=8)
def check_causal_mask(candidate=None):
    """causal_mask(length) -> (length, length) bool, True where token i may attend to token j (j <= i)"""
    candidate, section = candidate or (lambda n: torch.ones(n, n, dtype=torch.bool).tril()), "the causal mask"
    for length in (5, 77, 1):
        full = torch.ones(length, length, dtype=torch.bool)
        mistakes = [
            (hint("it lets a token see the future: True for j <= i is the lower triangle (tril), not triu", section),
             lambda f=full: f.triu().double()),
            (hint("a token must see itself: the diagonal belongs to the mask (tril(), not tril(-1))", section),
             lambda f=full: f.tril(-1).double()),
            (hint("inverted: True marks the tokens a token MAY attend to (F.scaled_dot_product_attention's "
                  "convention)", section), lambda f=full: (~f.tril()).double()),
        ]
        yours = call_candidate(candidate, signature(check_causal_mask), length)
        if not torch.is_tensor(yours) or yours.dtype != torch.bool:
            raise Mismatch(f"length {length}: yours returned {getattr(yours, 'dtype', type(yours).__name__)}, "
                           "expected a bool tensor (True: may attend)")
        compare(yours.double(), full.tril().double(), Tolerance(0, 0, "exact"), f"length {length}", mistakes)
    return "lengths 5, 77 and 1, exact"


@functools.cache
def _clip():
    from minidiff.course.milestones.networks import reference_network

    return reference_network("clip")


def _clip_variant(x, p, heads, mask, exact_gelu=False, post_norm=False):
    def norm(h, name):
        return F.layer_norm(h, h.shape[-1:], p[f"{name}.weight"], p[f"{name}.bias"], 1e-5)

    from minidiff.attention import attention

    def attend(h):
        q, k, v = (F.linear(h, p[f"self_attn.{n}_proj.weight"], p[f"self_attn.{n}_proj.bias"]) for n in "qkv")
        return F.linear(attention(q, k, v, heads, mask), p["self_attn.out_proj.weight"], p["self_attn.out_proj.bias"])

    def mlp(h):
        h = F.linear(h, p["mlp.fc1.weight"], p["mlp.fc1.bias"])
        return F.linear(F.gelu(h) if exact_gelu else h * torch.sigmoid(1.702 * h), p["mlp.fc2.weight"],
                        p["mlp.fc2.bias"])

    if post_norm:
        x = norm(x + attend(x), "layer_norm1")
        return norm(x + mlp(x), "layer_norm2")
    x = x + attend(norm(x, "layer_norm1"))
    return x + mlp(norm(x, "layer_norm2"))


@milestone("CLIP layer: pre-norm attention with the causal mask, quick_gelu MLP", lesson=8)
def check_clip_layer(candidate=None):
    """clip_layer(x, params, heads, mask) -> (B, L, D); params: layer_norm1/2, self_attn.{q,k,v,out}_proj, mlp.fc1/2

    On x (2, 9, 32), 2 heads, the causal mask of 9 tokens, layer 0 of the tiny seeded CLIP text encoder.
    """
    layer, section = _clip().text_model.encoder.layers[0], "the CLIP layer"
    p, x = layer.state_dict(), fixed_randn(2, 9, 32, seed=66)
    mask = torch.ones(9, 9, dtype=torch.bool).tril()
    mistakes = [
        (hint("the mask was not applied: token i must attend only to tokens 0 .. i (scores -inf elsewhere)", section),
         lambda: _clip_variant(x, p, 2, None)),
        (hint("SD 1.x's CLIP uses quick_gelu, a sigmoid(1.702 a), not the exact GELU", section),
         lambda: _clip_variant(x, p, 2, mask, exact_gelu=True)),
        (hint("post-norm: CLIP is pre-norm, x + attn(layer_norm1(x))", section),
         lambda: _clip_variant(x, p, 2, mask, post_norm=True)),
    ]
    candidate = candidate or (lambda x, p, heads, mask: layer(x, mask))
    with torch.no_grad():
        yours = call_candidate(candidate, signature(check_clip_layer), x.clone(), dict(p), 2, mask.clone())
        error = compare(yours, layer(x, mask), TOL, "output", mistakes)
    return f"largest |diff| {error:.1e} <= {TOL.atol:g} (fp32)"


@milestone("text encoder from your CLIP layers", lesson=8, function="text_encoder")
def check_text_encoder_from_parts(candidate=None):
    """text_encoder(ids, params, heads) -> (B, L, D) the last hidden state; params: the text_model.* state_dict

    The tiny seeded CLIP text encoder (2 heads, 3 layers) on the 77 ids of two prompts.
    """
    from minidiff.course.milestones.networks import PROMPTS, _clip_without, tokenize

    model, section = _clip(), "the text encoder"
    ids, p = torch.stack([tokenize(PROMPTS[0]), tokenize(PROMPTS[1])]), model.state_dict()
    text = model.text_model
    mistakes = [
        (hint("no causal mask: pass causal_mask(L) to every layer", section),
         lambda: _clip_without(model, ids, causal=False)),
        (hint("the final layer norm (text_model.final_layer_norm) is missing", section),
         lambda: _clip_without(model, ids, final_norm=False)),
        (hint("the position embedding is missing: x = token_embedding[ids] + position_embedding[0 .. L - 1]",
              section), lambda: _no_positions(text, ids)),
    ]
    candidate = candidate or (lambda ids, p, heads: model(ids))
    with torch.no_grad():
        yours = call_candidate(candidate, signature(check_text_encoder_from_parts), ids.clone(), dict(p), 2)
        error = compare(yours, model(ids), Tolerance(1e-4, 1e-4), "last hidden state", mistakes)
    return f"tiny config, largest |diff| {error:.1e} <= 1e-4 (fp32)"


def _no_positions(text, ids):
    x, mask = text.embeddings.token_embedding(ids), torch.ones(ids.shape[1], ids.shape[1], dtype=torch.bool).tril()
    for layer in text.encoder.layers:
        x = layer(x, mask)
    return text.final_layer_norm(x)
