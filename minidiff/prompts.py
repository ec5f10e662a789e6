"""Prompt weights and long prompts: `(word:1.3)`, `(word)`, `[word]` in the syntax of AUTOMATIC1111's web UI, and
prompts past CLIP's 77 positions, encoded in chunks of 75 tokens whose hidden states are laid side by side.

The syntax (parse_prompt_weights); brackets multiply when they nest:
    (text)          weight x 1.1                    ((text)) -> 1.21
    [text]          weight / 1.1                    [[text]] -> 1 / 1.21
    (text:1.3)      weight x 1.3, a plain number from 0 to MAX_WEIGHT
    \\( \\) \\[ \\] \\: \\\\  the character itself, not syntax
    BREAK           in capitals, a word of its own: the rest starts a new chunk
Brackets are read leniently, as A1111 reads them: a ( or [ that is never closed weights the text to the end of the
prompt, and a ) or ] that closes nothing is text. Numbers are read strictly: (word:abc), (word:nan), (word:-1) and
(word:1e9) are an InputError naming the weight. A colon outside round brackets is text ("top left: a red circle").
Prompt editing ([a:b:0.5]) is not supported: it is read as the text "a:b:0.5" at weight 1 / 1.1.

The encoding (tokenize_prompts, join_chunks; Pipeline.encode_prompt calls them):
    chunk     START + up to 75 tokens + END, then padding: one pass of the text encoder over 77 positions
    chunks    a prompt of n tokens takes ceil(n / 75) chunks (BREAK closes one early); the prompts of a batch and
              their negative prompts are padded with empty chunks to the same count, so guidance can batch them
    context   the chunks' hidden states side by side: (B, 77 * chunks, width); the UNet's cross-attention reads any
              number of positions. SDXL's pooled embedding comes from the first chunk.
    weights   w_i per position (1 at START, END and padding): h_i <- w_i h_i, then the chunk is scaled so that the
              mean over all its positions and channels is what it was: h <- h * mean(h) / mean(w h), unless that
              mean is near 0 (MEAN_FLOOR)
A prompt of at most 75 tokens without weight syntax gives exactly the ids and hidden states of the plain encoder call
(no weighting is applied when every weight is 1). The rescale is A1111's, which takes the mean of a chunk over the
whole batch (diffusers' long-prompt-weighting pipeline: per prompt, over all its chunks); minidiff takes it per prompt
and per chunk, so that a prompt's embedding does not depend on the prompts beside it in the batch.
"""

import math
import re

import torch

from minidiff.checks import literal
from minidiff.errors import InputError
from minidiff.tokenizer import MAX_LENGTH

CHUNK_TOKENS = MAX_LENGTH - 2  # 75: the tokens between START and END in one pass of the encoder
ROUND, SQUARE = 1.1, 1 / 1.1  # the weight of (text) and of [text]
MAX_WEIGHT = 10.0  # a larger weight drowns the rest of the prompt: refused as a mistake
MEAN_FLOOR = 0.01  # rescale a weighted chunk to its mean only where the mean is at least 1% of the mean |state|
MAX_CHUNKS = 16  # 1,200 tokens: past this a prompt is almost certainly a pasted file, not a prompt
NUMBER = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)")

# One piece of syntax per match: an escape, a bracket, ":number)" closing a round bracket, plain text, a lone \ or :
SYNTAX = re.compile(r"""
    \\[()\[\]:\\]                   # an escaped character: the character itself
  | [()\[\]]                        # a bracket
  | :\s*([^()\[\]\\:]*?)\s*\)       # ":1.3)": the weight of the round bracket it closes
  | [^\\()\[\]:]+                   # plain text
  | [\\:]                           # a lone backslash or colon: text
""", re.VERBOSE)
BREAK_WORD = re.compile(r"\s*\bBREAK\b\s*")


def parse_prompt_weights(text: str) -> list:
    """A prompt -> [(text, weight), ...], neighbours of equal weight merged; a BREAK is the piece ("BREAK", None).

    'a (red:1.3) circle' -> [('a ', 1.0), ('red', 1.3), (' circle', 1.0)]; see the module docstring for the syntax.
    """
    pieces = []  # [text, weight] lists, weights multiplied as brackets close
    open_round, open_square = [], []  # (index into pieces, position in text) of each open bracket

    def multiply(start: int, factor: float) -> None:
        for piece in pieces[start:]:
            if piece[1] is not None:
                piece[1] *= factor

    for match in SYNTAX.finditer(text):
        part, weight = match.group(0), match.group(1)
        if part.startswith("\\") and len(part) == 2:
            pieces.append([part[1], 1.0])
        elif part in "([":
            (open_round if part == "(" else open_square).append((len(pieces), match.start()))
        elif weight is not None and open_round:
            start, position = open_round.pop()
            multiply(start, read_weight(weight, text[position : match.end()]))
        elif part == ")" and open_round:
            multiply(open_round.pop()[0], ROUND)
        elif part == "]" and open_square:
            multiply(open_square.pop()[0], SQUARE)
        else:  # text, or a bracket that closes nothing
            for i, words in enumerate(BREAK_WORD.split(part)):
                if i > 0:
                    pieces.append(["BREAK", None])
                pieces.append([words, 1.0])
    for start, _ in open_round:  # never closed: to the end of the prompt
        multiply(start, ROUND)
    for start, _ in open_square:
        multiply(start, SQUARE)

    merged = []
    for text_part, weight in pieces:
        if merged and weight is not None and merged[-1][1] == weight:
            merged[-1] = (merged[-1][0] + text_part, weight)
        elif text_part or weight is None:
            merged.append((text_part, weight))
    for text_part, weight in merged:
        if weight is not None and weight > MAX_WEIGHT:
            raise InputError(f"the brackets around {literal(text_part)} multiply to a weight of {weight:.3g}, more "
                             f"than {MAX_WEIGHT:g}: use fewer brackets, or (text:1.5)")
    return merged or [("", 1.0)]


def read_weight(raw: str, where: str) -> float:
    """The number of "(text:raw)", checked: a plain decimal from 0 to MAX_WEIGHT."""
    where = where if len(where) <= 60 else where[:25] + " ... " + where[-25:]
    if not NUMBER.fullmatch(raw):
        raise InputError(f"the weight {literal(raw)} in {literal(where)} is not a number: write one from 0 to "
                         f"{MAX_WEIGHT:g} like (word:1.3), or \\: for a colon that is text (prompt_weights=False / "
                         "--no-prompt-weights read the prompt as plain text)")
    weight = float(raw)
    if weight < 0 or weight > MAX_WEIGHT or not math.isfinite(weight):
        raise InputError(f"the weight {raw} in {literal(where)} must lie from 0 to {MAX_WEIGHT:g} (1 is unweighted; "
                         "below 1 weakens, above 1 strengthens): e.g. (word:1.3) or [word]")
    return weight


def prompt_chunks(tokenizer, prompt: str, prompt_weights: bool = True) -> list:
    """One prompt -> [(token ids, weights), ...]: chunks of at most 75 tokens each (BREAK closes one early)."""
    pieces = parse_prompt_weights(prompt) if prompt_weights else [(prompt, 1.0)]
    chunks, ids, weights = [], [], []
    for text, weight in pieces:
        if weight is None:  # BREAK
            chunks.append((ids, weights))
            ids, weights = [], []
            continue
        for token in tokenizer.encode(text):
            if len(ids) == CHUNK_TOKENS:
                chunks.append((ids, weights))
                ids, weights = [], []
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        chunks.append((ids, weights))
    if len(chunks) > MAX_CHUNKS:
        raise InputError(f"the prompt {literal(prompt[:40])}... needs {len(chunks)} chunks of 75 tokens, more than "
                         f"{MAX_CHUNKS} ({MAX_CHUNKS * CHUNK_TOKENS} tokens): shorten it")
    return chunks


def count_chunks(tokenizer, prompts: list, prompt_weights: bool = True) -> int:
    """The chunks the longest of the prompts takes: pass it to tokenize_prompts for each half of a guided batch."""
    return max(len(prompt_chunks(tokenizer, prompt, prompt_weights)) for prompt in prompts)


def tokenize_prompts(tokenizer, prompts: list, min_chunks: int = 1, prompt_weights: bool = True) -> tuple:
    """(ids, weights), each (B, chunks, 77): START, the chunk's tokens, END, padding; weight 1 but at the tokens.

    Every prompt gets the same number of chunks, at least min_chunks: the short ones end in empty chunks."""
    per_prompt = [prompt_chunks(tokenizer, prompt, prompt_weights) for prompt in prompts]
    chunks = max(min_chunks, *(len(c) for c in per_prompt))
    ids, weights = [], []
    for prompt in per_prompt:
        for chunk_ids, chunk_weights in prompt + [([], [])] * (chunks - len(prompt)):
            row = [tokenizer.start_id, *chunk_ids, tokenizer.end_id]
            ids.append(row + [tokenizer.pad_id] * (MAX_LENGTH - len(row)))
            weights.append([1.0, *chunk_weights] + [1.0] * (MAX_LENGTH - 1 - len(chunk_weights)))
    shape = (len(prompts), chunks, MAX_LENGTH)
    return torch.tensor(ids, dtype=torch.long).view(shape), torch.tensor(weights, dtype=torch.float32).view(shape)


def apply_token_weights(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(N, 77, d) hidden states of N chunks, (N, 77) weights -> each position times its weight, each chunk then
    rescaled to its own mean (over positions and channels) before weighting. Computed in float32.

    The rescale is skipped for a chunk whose mean is not well defined: under MEAN_FLOOR of its mean absolute value
    before or after weighting, or of the other sign after (a final norm without bias gives means near 0, as in the
    bundled shapes model; the ratio of two such means is noise, not a correction)."""
    states32 = states.float()
    weighted = states32 * weights.to(states.device)[..., None]
    original_mean = states32.mean(dim=(-2, -1), keepdim=True)  # (N, 1, 1)
    weighted_mean = weighted.mean(dim=(-2, -1), keepdim=True)
    well_defined = ((original_mean.abs() >= MEAN_FLOOR * states32.abs().mean(dim=(-2, -1), keepdim=True))
                    & (weighted_mean.abs() >= MEAN_FLOOR * weighted.abs().mean(dim=(-2, -1), keepdim=True))
                    & (original_mean * weighted_mean > 0))
    scale = torch.where(well_defined, original_mean / weighted_mean, torch.ones_like(original_mean))
    return (weighted * scale).to(states.dtype)


def join_chunks(states: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """(B * chunks, 77, d) states of the chunks and their (B, chunks, 77) weights -> (B, chunks * 77, d), weighted
    (nothing is computed when every weight is 1: the states come back exactly)."""
    batch, chunks, length = weights.shape
    if (weights != 1).any():
        states = apply_token_weights(states, weights.view(batch * chunks, length))
    return states.reshape(batch, chunks * length, states.shape[-1])  # (B, chunks * 77, d)
