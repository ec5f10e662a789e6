"""Textual inversion: a new word for the text encoder, as a new row (or a few) of its token-embedding table.

Textual inversion (Gal et al. 2022, "An Image is Worth One Word") freezes the whole model and learns only the
embedding vectors v_1 .. v_n of one made-up token: the prompt "a photo of <my-word>" then reads those vectors
where the word stands, and the text encoder and UNet do the rest.

Notation:
    token       -> the new word, written exactly so in prompts ("<my-word>")
    vectors     -> (n, hidden_size): n embedding rows; a word of n > 1 vectors takes n positions of the 77
    ids         -> the new rows' indices, after the vocabulary (49408, 49409, ... for SD)

Files (safetensors only):
    A1111       {"emb_params": (n, hidden_size)}: the token defaults to the file name, as in the web UI
    diffusers   learned_embeds.safetensors, {"<token>": (hidden_size,) or (n, hidden_size)}
    kohya       words bundled into a LoRA file (pivotal tuning), {"bundle_emb.<token>.string_to_param.*": (n,
                hidden_size)}, which A1111 loads with the LoRA: `load_lora` adds them (bundled_words)
"""

from dataclasses import replace
from pathlib import Path

import torch
from torch import nn

from minidiff.errors import CheckpointError, MinidiffError
from minidiff.lora import BUNDLE_PREFIX, read_file


def read_embedding(path, token: str | None = None) -> tuple[str, torch.Tensor]:
    """(token, (n, hidden_size) vectors) of an embedding file; `token` replaces the file's own name."""
    state, _ = read_file(path)
    if "emb_params" in state:  # A1111
        name, vectors = Path(path).stem, state["emb_params"]
    elif len(state) == 1:  # diffusers
        name, vectors = next(iter(state.items()))
    elif {"clip_l", "clip_g"} <= set(state):
        raise CheckpointError(f"{path} is an SDXL embedding (clip_l + clip_g): it needs SDXL's two text encoders")
    else:
        raise CheckpointError(f"{path} is not a textual-inversion embedding: expected one tensor (diffusers' "
                              f"learned_embeds) or 'emb_params' (A1111), found {', '.join(list(state)[:4])}")
    return token or name, _checked(path, vectors)


def _checked(path, vectors: torch.Tensor) -> torch.Tensor:
    """(width,) or (n, width) floats -> (n, width); one line for anything else."""
    if vectors.ndim == 1:
        vectors = vectors[None]
    if vectors.ndim != 2 or vectors.shape[0] == 0 or not vectors.is_floating_point():
        raise CheckpointError(f"{path}: the embedding must be (vectors, width) floats, got {vectors.dtype} "
                              f"{tuple(vectors.shape)}")
    return vectors


def bundle_key(token: str) -> str:
    """The name of a word's rows in a LoRA file, as kohya writes them (SD 1.x / 2.x: one text encoder)."""
    return f"{BUNDLE_PREFIX}{token}.string_to_param.*"


def bundled_words(pipe, path) -> dict:
    """{token: (n, hidden_size) vectors} of the words bundled into a LoRA file that the pipeline lacks, all checked
    (none: {}). A word it has already with the same rows (the file loaded before) is left out; other rows refused."""
    state, _ = read_file(path)
    words = {}
    for key, vectors in state.items():
        if not key.startswith(BUNDLE_PREFIX):
            continue
        if key.endswith((".clip_l", ".clip_g")):
            raise CheckpointError(f"{path} bundles an SDXL word ({key}): it needs SDXL's two text encoders")
        token, _, part = key[len(BUNDLE_PREFIX):].rpartition(".string_to_param.")
        if part != "*" or not token:
            raise CheckpointError(f"unexpected key {key!r} in {path}: a bundled word is written "
                                  "bundle_emb.<token>.string_to_param.*")
        vectors = _checked(path, vectors)
        table = pipe.text_encoder.text_model.embeddings.token_embedding  # (only when a word is bundled)
        if vectors.shape[1] != table.embedding_dim:
            raise CheckpointError(f"{path}: the bundled word {token!r} is {vectors.shape[1]} wide but this text "
                                  f"encoder is {table.embedding_dim} wide: it was made for another base model")
        ids = pipe.tokenizer.added_tokens.get(token)
        if ids is None and token in pipe.tokenizer.vocab:
            raise MinidiffError(f"{path} bundles the word {token!r}, which clashes with {token!r}, already in the "
                                "vocabulary: rename the bundled word (bundle_emb.<my-word>.string_to_param.*)")
        if ids is None:
            words[token] = vectors
        elif len(ids) != len(vectors) or not torch.equal(table.weight[ids], vectors.to(table.weight)):
            raise MinidiffError(f"{path} bundles the word {token!r}, which this pipeline has already with other "
                                "rows: load the LoRA into a pipeline without that word")
    return words


def add_word(tokenizer, text_encoder, token: str, vectors: torch.Tensor) -> list[int]:
    """Give `token` the rows `vectors` (n, hidden_size): new ids in the tokenizer, new rows in the table."""
    table = text_encoder.text_model.embeddings.token_embedding
    if vectors.shape[1] != table.embedding_dim:
        raise CheckpointError(f"the embedding for {token!r} is {vectors.shape[1]} wide but this text encoder is "
                              f"{table.embedding_dim} wide: it was made for another base model (768: SD 1.x, "
                              "1024: SD 2.x)")
    if len(tokenizer) != table.num_embeddings:
        raise MinidiffError(f"the tokenizer has {len(tokenizer)} tokens but the text encoder {table.num_embeddings} "
                            "rows: they do not belong together")
    ids = tokenizer.add_token(token, vectors.shape[0])
    rows = ids[-1] + 1
    grown = nn.Embedding(rows, table.embedding_dim, device=table.weight.device, dtype=table.weight.dtype)
    with torch.no_grad():
        grown.weight[: table.num_embeddings] = table.weight
        grown.weight[ids] = vectors.to(grown.weight)  # (n, hidden_size): the new rows
    grown.weight.requires_grad_(table.weight.requires_grad)
    text_encoder.text_model.embeddings.token_embedding = grown
    text_encoder.config = replace(text_encoder.config, vocab_size=rows)
    return ids


def load_textual_inversion(pipe, path, token: str | None = None) -> str:
    """Add the word of an embedding file to pipe.tokenizer and pipe.text_encoder; returns the token to write."""
    if token is not None and (not isinstance(token, str) or not token.strip()):
        raise MinidiffError(f"token must be a non-empty string such as '<my-word>', got {token!r}")
    token, vectors = read_embedding(path, token)
    add_word(pipe.tokenizer, pipe.text_encoder, token, vectors)
    return token
