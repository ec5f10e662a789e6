"""The CLIP tokenizer: prompt text -> the 77 token ids that Stable Diffusion's text encoder reads.

Byte-level byte-pair encoding (Sennrich et al. 2016, "Neural Machine Translation of Rare Words with
Subword Units"), in the variant of CLIP (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision"): text is lower-cased, cut into words, every word is spelled in UTF-8
bytes, the last symbol of a word carries "</w>", and symbol pairs are merged in the learnt order.

Notation:
    BYTE_TO_CHAR   -> GPT-2's reversible map byte -> printable character (Radford et al. 2019), so
                      every UTF-8 byte is one vocabulary symbol
    merge_ranks    -> {(left, right): rank}: lower rank = learnt earlier = merged first
    word           -> one pre-token: a run of letters, a single digit, a run of other non-space
                      symbols, or one of the English endings 's 't 're 've 'm 'll 'd
    START, END     -> <|startoftext|> (49406) and <|endoftext|> (49407) around every prompt

Text clean-up is that of transformers' CLIPTokenizer (the `tokenizers`-backed one, which SD pipelines
use): Unicode NFC, every run of whitespace -> one space, lower case character by character (so a
final capital sigma gives "σ", not "ς"). OpenAI's CLIP also ran ftfy.fix_text (repairs mojibake such as
"â€™", straightens curly quotes, expands ligatures like "ﬁ", narrows full-width "ＡＢＣ", drops control
characters) and html.unescape twice ("&amp;" -> "&"). ftfy is not a dependency; `unescape_html=True`
adds the html step.

A special token typed in a prompt, spelt exactly, is that token, as in transformers. So is the pad
token: SD 2.x pads with "!", so every "!" of a prompt becomes token 0, which is what diffusers feeds
SD 2.x (OpenCLIP, which SD 2 was trained with, merged "!" like any other symbol).
"""

import functools
import gzip
import html
import json
import re
import unicodedata
from pathlib import Path

import torch

from minidiff.errors import CheckpointError, MinidiffError
from minidiff.files import atomic_write_text

START, END = "<|startoftext|>", "<|endoftext|>"
MAX_LENGTH = 77  # positions of the CLIP text encoder: START + 75 tokens + END
DATA_FILE = Path(__file__).parent / "data" / "bpe_simple_vocab_16e6.txt.gz"
NUM_MERGES = 49408 - 2 * 256 - 2  # CLIP keeps the first 48,894 merges: 49,408 tokens in all


def _byte_to_char() -> dict[int, str]:
    """GPT-2's byte -> character table: printable Latin-1 bytes stand for themselves, the other 68
    bytes (controls, space, ...) borrow the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    table = {b: chr(b) for b in printable}
    table.update({b: chr(256 + n) for n, b in enumerate(others)})
    return table  # insertion order (printable bytes, then the others) is the order of the vocabulary


BYTE_TO_CHAR = _byte_to_char()
CHAR_TO_BYTE = {char: byte for byte, char in BYTE_TO_CHAR.items()}

# The Unicode White_Space property: what \s means to the regex engine of `tokenizers` (Python's \s
# would also take U+001C..U+001F).
WHITESPACE_RUN = re.compile("[\t\n\x0b\x0c\r \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]+")


@functools.lru_cache(maxsize=4096)
def _stand_in(char: str) -> str:
    """An ASCII character of the same class as `char` for the word pattern: itself if ASCII, else
    "a" for a letter \\p{L}, "0" for a number \\p{N}, " " for whitespace, "!" for anything else."""
    if char.isascii():
        return char
    if WHITESPACE_RUN.fullmatch(char):
        return " "
    return {"L": "a", "N": "0"}.get(unicodedata.category(char)[0], "!")


# CLIP's pre-tokenisation: specials | English endings | letters+ | one digit | other symbols+, written
# for ASCII: it runs on the text with every character replaced by its stand-in (same length, same spans).
WORD_PATTERN = re.compile(
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-zA-Z]+|[0-9]|[^\t\n\x0b\x0c\r a-zA-Z0-9]+"
)


def clean_text(text: str, unescape_html: bool = False) -> str:
    """NFC, whitespace runs -> " ", lower case per character (transformers' CLIPTokenizer normaliser)."""
    if unescape_html:
        text = html.unescape(html.unescape(text))
    text = WHITESPACE_RUN.sub(" ", unicodedata.normalize("NFC", text))
    return "".join(char.lower() for char in text)


def split_words(text: str) -> list[str]:
    """Cut cleaned text into words. A special token written in another case is text again after
    lower-casing; byte-level BPE then sees it as the three words "<|", "endoftext", "|>"."""
    words = []
    for match in WORD_PATTERN.finditer("".join(map(_stand_in, text))):
        word = text[match.start() : match.end()]
        words += [word[:2], word[2:-2], word[-2:]] if word in (START, END) else [word]
    return words


@functools.cache
def bundled_vocab() -> tuple[dict[str, int], list[tuple[str, str]]]:
    """The vocabulary and merges of SD's `tokenizer/` folders, built from OpenAI's shipped merge list."""
    with gzip.open(DATA_FILE, "rt", encoding="utf-8") as file:
        lines = file.read().split("\n")
    merges = [tuple(line.split()) for line in lines[1 : 1 + NUM_MERGES]]  # line 0 is a header
    symbols = list(BYTE_TO_CHAR.values())
    tokens = symbols + [s + "</w>" for s in symbols] + [left + right for left, right in merges] + [START, END]
    return {token: i for i, token in enumerate(tokens)}, merges


def write_vocab_files(folder) -> tuple[Path, Path]:
    """Write the `vocab.json` and `merges.txt` of an official SD tokenizer folder; return their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab, merges = bundled_vocab()
    vocab_path, merges_path = folder / "vocab.json", folder / "merges.txt"
    texts = {vocab_path: json.dumps(vocab, ensure_ascii=False),
             merges_path: "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)}
    for path, text in texts.items():
        atomic_write_text(path, text)
    return vocab_path, merges_path


def _read_pad_token(folder: Path) -> str | None:
    """The pad token named by tokenizer_config.json / special_tokens_map.json (a string or a dict)."""
    pad = None
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        path = folder / name
        if path.is_file():
            value = json.loads(path.read_text(encoding="utf-8")).get("pad_token")
            if value is not None:
                pad = value["content"] if isinstance(value, dict) else value
    return pad


class CLIPTokenizer:
    """CLIP's byte-level BPE tokenizer (Sennrich et al. 2016; Radford et al. 2021)."""

    def __init__(self, vocab: dict, merges: list, pad_token: str = END, unescape_html: bool = False):
        self.vocab = dict(vocab)
        self.id_to_token = {i: token for token, i in self.vocab.items()}
        pairs = [tuple(m.split()) if isinstance(m, str) else tuple(m) for m in merges]
        self.merge_ranks = {pair: rank for rank, pair in enumerate(pairs)}
        for token in [START, END, pad_token, *("".join(pair) for pair in pairs)]:
            if token not in self.vocab:
                raise CheckpointError(f"token {token!r} is missing from the vocabulary: vocab and merges do not match")
        self.start_id, self.end_id, self.pad_id = self.vocab[START], self.vocab[END], self.vocab[pad_token]
        self.pad_token = pad_token
        # special tokens are split out of the raw prompt first, the pad token too (see the module docstring)
        self.added_from = len(self.vocab)  # ids from here on were added by add_token
        self.added_tokens: dict[str, list[int]] = {}  # textual inversion: a new word -> its ids (see add_token)
        self._build_special_split()
        self.unescape_html = unescape_html
        self._bpe_cache: dict[str, tuple[str, ...]] = {}

    def _build_special_split(self):
        specials = dict.fromkeys([START, END, self.pad_token, *sorted(self.added_tokens, key=len, reverse=True)])
        self._special_split = re.compile("(" + "|".join(map(re.escape, specials)) + ")")

    def add_token(self, token: str, count: int = 1) -> list[int]:
        """A new word for textual inversion: `count` ids after the vocabulary, all of them wherever `token` is
        written in a prompt (exactly, case included, as a special token is). Its extra ids are named token_1,
        token_2, ... as diffusers names them."""
        if not isinstance(token, str) or not token.strip() or token != token.strip():
            raise MinidiffError(f"a new token must be a non-empty string without surrounding spaces, got {token!r}")
        names = [token] + [f"{token}_{i}" for i in range(1, count)]
        taken = [name for name in names if name in self.vocab]
        if taken:
            raise MinidiffError(f"the token {token!r} clashes with {taken[0]!r}, already in the vocabulary: choose "
                                "another word, e.g. <my-word>")
        ids = list(range(len(self.vocab), len(self.vocab) + count))
        for name, i in zip(names, ids):
            self.vocab[name], self.id_to_token[i] = i, name
        self.added_tokens[token] = ids
        self._build_special_split()
        return ids

    @classmethod
    def default(cls, pad_token: str = END) -> "CLIPTokenizer":
        """The tokenizer of SD 1.x and 2.x from the vocabulary shipped in minidiff/data."""
        return cls(*bundled_vocab(), pad_token=pad_token)

    @classmethod
    def sd15(cls) -> "CLIPTokenizer":
        """SD 1.x (OpenAI CLIP ViT-L/14): pads with <|endoftext|>."""
        return cls.default(pad_token=END)

    @classmethod
    def sd21(cls) -> "CLIPTokenizer":
        """SD 2.x (OpenCLIP ViT-H/14): pads with "!" (id 0)."""
        return cls.default(pad_token="!")

    @classmethod
    def from_folder(cls, folder) -> "CLIPTokenizer":
        """Read a diffusers `tokenizer/` folder: vocab.json + merges.txt (or tokenizer.json), pad token."""
        folder = Path(folder)
        vocab_path, merges_path, joint_path = folder / "vocab.json", folder / "merges.txt", folder / "tokenizer.json"
        if vocab_path.is_file() and merges_path.is_file():
            vocab = json.loads(vocab_path.read_text(encoding="utf-8"))
            lines = merges_path.read_text(encoding="utf-8").split("\n")
            merges = [line for line in lines if line.strip() and not line.startswith("#version")]
        elif joint_path.is_file():
            model = json.loads(joint_path.read_text(encoding="utf-8"))["model"]
            vocab, merges = model["vocab"], model["merges"]
        else:
            raise CheckpointError(
                f"no vocab.json + merges.txt (nor tokenizer.json) in {folder}: "
                "pass the 'tokenizer' folder of a Stable Diffusion checkpoint, or use CLIPTokenizer.default()"
            )
        return cls(vocab, merges, pad_token=_read_pad_token(folder) or END)

    def _bpe(self, word: str) -> tuple[str, ...]:
        """Merge the byte symbols of one word, the lowest-ranked adjacent pair first, until none is known."""
        if word in self._bpe_cache:
            return self._bpe_cache[word]
        parts = [*word[:-1], word[-1] + "</w>"]
        while len(parts) > 1:
            best = min(zip(parts, parts[1:]), key=lambda pair: self.merge_ranks.get(pair, float("inf")))
            if best not in self.merge_ranks:
                break
            merged, i = [], 0
            while i < len(parts):
                if i + 1 < len(parts) and (parts[i], parts[i + 1]) == best:
                    merged.append(parts[i] + parts[i + 1])
                    i += 2
                else:
                    merged.append(parts[i])
                    i += 1
            parts = merged
        self._bpe_cache[word] = tuple(parts)
        return self._bpe_cache[word]

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, without <|startoftext|>/<|endoftext|> around it and without truncation."""
        if not isinstance(text, str):
            raise MinidiffError(f"a prompt must be a string, got {type(text).__name__}")
        ids = []
        for piece in self._special_split.split(text):
            if piece in (START, END, self.pad_token):
                ids.append(self.vocab[piece])
                continue
            if piece in self.added_tokens:
                ids += self.added_tokens[piece]
                continue
            for word in split_words(clean_text(piece, self.unescape_html)):
                symbols = "".join(BYTE_TO_CHAR[byte] for byte in word.encode("utf-8"))
                ids += [self.vocab[token] for token in self._bpe(symbols)]
        return ids

    def decode(self, ids) -> str:
        """Text of token ids: <|startoftext|> skipped, everything from the first <|endoftext|> dropped."""
        data = bytearray()
        for i in torch.as_tensor(ids).flatten().tolist():
            if i == self.end_id:
                break
            token = self.id_to_token.get(i)
            if token is None:
                raise MinidiffError(f"token id {i} is outside the vocabulary (0..{len(self.vocab) - 1})")
            if i >= self.added_from:  # a textual-inversion word: its name once, for all its ids
                data += token.encode("utf-8") + b" " if token in self.added_tokens else b""
            elif i != self.start_id:
                data += bytes(CHAR_TO_BYTE[char] for char in token.removesuffix("</w>"))
                data += b" " if token.endswith("</w>") else b""
        return data.decode("utf-8", errors="replace").strip()

    def dropped_tokens(self, prompt: str, max_length: int = MAX_LENGTH) -> list[int]:
        """The ids of `prompt` that do not fit in `max_length` positions (len() of it is what is lost)."""
        return self.encode(prompt)[max_length - 2 :]

    def __call__(self, prompts: str | list[str], max_length: int = MAX_LENGTH) -> torch.Tensor:
        """(B, max_length) int64 ids: START, tokens (truncated), END, then the pad token, as SD uses them."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if not isinstance(prompts, (list, tuple)) or not prompts:
            raise MinidiffError(f"prompts must be a string or a non-empty list of strings, got {prompts!r}")
        if max_length < 2:
            raise MinidiffError(f"max_length must leave room for <|startoftext|> and <|endoftext|>, got {max_length}")
        rows = []
        for prompt in prompts:
            ids = [self.start_id, *self.encode(prompt)[: max_length - 2], self.end_id]
            rows.append(ids + [self.pad_id] * (max_length - len(ids)))
        return torch.tensor(rows, dtype=torch.long)

    def __len__(self) -> int:
        return len(self.vocab)
