"""Unit tests of minidiff.tokenizer on the bundled CLIP vocabulary (no reference library needed)."""

import json

import pytest
import torch

from minidiff.errors import CheckpointError, MinidiffError
from minidiff.tokenizer import END, START, CLIPTokenizer, bundled_vocab, split_words, write_vocab_files


@pytest.fixture(scope="module")
def tokenizer():
    return CLIPTokenizer.default()


def test_bundled_vocabulary_has_the_official_size_and_layout(tokenizer):
    vocab, merges = bundled_vocab()
    assert len(vocab) == len(tokenizer) == 49408 and len(merges) == 48894
    tokens = list(vocab)
    assert tokens[0] == "!" and tokens[255] == "\u0143" and tokens[256] == "!</w>"  # 256 bytes, then with </w>
    assert tokens[512] == "in" and tokens[-2:] == [START, END]
    assert (tokenizer.start_id, tokenizer.end_id) == (49406, 49407)


def test_known_ids(tokenizer):
    assert tokenizer.encode("a photo of a cat") == [320, 1125, 539, 320, 2368]
    assert tokenizer.encode("") == [] and tokenizer.encode(" \t\n ") == []


def test_call_wraps_pads_and_truncates(tokenizer):
    ids = tokenizer(["a photo of a cat", "a " * 100])
    assert ids.shape == (2, 77) and ids.dtype == torch.long
    assert ids[0, :7].tolist() == [49406, 320, 1125, 539, 320, 2368, 49407] and (ids[0, 7:] == 49407).all()
    assert ids[1, 0] == 49406 and (ids[1, 1:76] == 320).all() and ids[1, 76] == 49407  # last kept token: END
    assert tokenizer("a cat", max_length=5).tolist() == [[49406, 320, 2368, 49407, 49407]]


@pytest.mark.parametrize("words, dropped", [(0, 0), (75, 0), (76, 1), (100, 25)])
def test_truncation_count(tokenizer, words, dropped):
    prompt = "a " * words
    assert len(tokenizer.dropped_tokens(prompt)) == dropped
    assert len(tokenizer.dropped_tokens(prompt, max_length=10)) == max(0, words - 8)


def test_dropped_tokens_decode_to_the_lost_text(tokenizer):
    prompt = "a " * 75 + "red cat"
    assert tokenizer.decode(tokenizer.dropped_tokens(prompt)) == "red cat"


@pytest.mark.parametrize(
    "prompt, text",
    [
        ("a photo of a cat", "a photo of a cat"),
        ("  A  Photo\tOF\na CAT ", "a photo of a cat"),
        ("Café naïve, 東京タワー! 3.14", "café naïve , 東京タワー ! 3 . 1 4"),
        ("Привет 🔥👩‍👩‍👧", "привет 🔥👩\u200d👩\u200d👧"),
    ],
)
def test_decode(tokenizer, prompt, text):
    assert tokenizer.decode(tokenizer.encode(prompt)) == text
    assert tokenizer.decode(tokenizer(prompt)[0]) == text  # START skipped, stops at the first END


@pytest.mark.parametrize(
    "prompt", ["a photo of a cat", "Don't PANIC!!", "ΟΔΟΣ café 東京 ٣½", "emoji 🎨🖼️ 🏳️‍🌈", "x<|ENDOFTEXT|>!", "a" * 300]
)
def test_round_trip(tokenizer, prompt):
    """decode undoes encode up to the clean-up and the spaces between words."""
    ids = tokenizer.encode(prompt)
    assert tokenizer.encode(tokenizer.decode(ids)) == ids


def test_presets_pad_tokens():
    sd15, sd21 = CLIPTokenizer.sd15(), CLIPTokenizer.sd21()
    assert (sd15.pad_token, sd15.pad_id) == (END, 49407) and (sd21.pad_token, sd21.pad_id) == ("!", 0)
    assert sd15("a cat")[0, 3:].eq(49407).all() and sd21("a cat")[0, 4:].eq(0).all()
    assert sd21("a cat")[0, :4].tolist() == [49406, 320, 2368, 49407]
    # a pad token other than END is also a special token inside the prompt, as in diffusers
    assert sd15.encode("wow!!") == [2781, 748] and sd21.encode("wow!!") == [2781, 0, 0]


def test_typed_special_tokens(tokenizer):
    assert tokenizer.encode("a<|endoftext|>b") == [320, 49407, 321]
    assert tokenizer.encode("<|startoftext|>") == [49406]
    assert 49407 not in tokenizer.encode("<|ENDOFTEXT|>")  # another case is text


@pytest.mark.parametrize(
    "text, words",
    [
        ("it's we'll i'd", ["it", "'s", "we", "'ll", "i", "'d"]),
        ("naïve3½x", ["naïve", "3", "½", "x"]),  # ½ is a number (No), one per word
        ("東京123", ["東京", "1", "2", "3"]),
        ("ab٣४c", ["ab", "٣", "४", "c"]),  # Arabic-Indic and Devanagari digits
        ("x\u3000y\u00a0z", ["x", "y", "z"]),  # ideographic and no-break spaces
        ("a\x1cb", ["a", "\x1c", "b"]),  # Python's \s has U+001C, Unicode White_Space does not
        ("e\u0301!?🔥", ["e", "\u0301!?🔥"]),  # a combining mark is not a letter
        ("ǅemal ⅻ", ["ǅemal", "ⅻ"]),  # title-case letter; Roman numeral (Nl) is a number
    ],
)
def test_split_words_unicode_classes(text, words):
    assert split_words(text) == words


def test_html_unescape_option():
    tokenizer = CLIPTokenizer.default()
    assert tokenizer.encode("salt &amp; pepper") != tokenizer.encode("salt & pepper")
    tokenizer.unescape_html = True
    assert tokenizer.encode("salt &amp; pepper") == tokenizer.encode("salt & pepper")
    assert tokenizer.encode("&amp;lt;3") == tokenizer.encode("<3")  # twice, like OpenAI CLIP


def test_bpe_cache(tokenizer):
    tokenizer.encode("xylophonist")
    cached = dict(tokenizer._bpe_cache)
    assert "xylophonist" in cached  # keyed by the byte symbols of the word
    assert tokenizer.encode("xylophonist") == tokenizer.encode("XYLOPHONIST")


def test_write_and_read_folder(tmp_path):
    vocab_path, merges_path = write_vocab_files(tmp_path)
    assert len(json.loads(vocab_path.read_text(encoding="utf-8"))) == 49408
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": {"content": "!", "normalized": False}}))
    tokenizer = CLIPTokenizer.from_folder(tmp_path)
    assert tokenizer.pad_id == 0
    prompt = "a photo of an astronaut riding a horse on mars"
    assert tokenizer.encode(prompt) == CLIPTokenizer.default().encode(prompt)


def test_read_tokenizer_json(tmp_path):
    vocab, merges = bundled_vocab()
    model = {"type": "BPE", "vocab": vocab, "merges": [list(pair) for pair in merges]}
    (tmp_path / "tokenizer.json").write_text(json.dumps({"model": model}), encoding="utf-8")
    assert CLIPTokenizer.from_folder(tmp_path).encode("a photo of a cat") == [320, 1125, 539, 320, 2368]


def test_errors(tokenizer, tmp_path):
    with pytest.raises(CheckpointError, match="vocab.json"):
        CLIPTokenizer.from_folder(tmp_path)
    with pytest.raises(MinidiffError, match="string"):
        tokenizer(123)
    with pytest.raises(MinidiffError, match="non-empty"):
        tokenizer([])
    with pytest.raises(MinidiffError, match="string"):
        tokenizer(["ok", None])
    with pytest.raises(MinidiffError, match="max_length"):
        tokenizer("a cat", max_length=1)
    with pytest.raises(MinidiffError, match="outside the vocabulary"):
        tokenizer.decode([49408])
    vocab, merges = bundled_vocab()
    with pytest.raises(CheckpointError, match="missing from the vocabulary"):
        CLIPTokenizer(vocab, merges, pad_token="<pad>")
    with pytest.raises(CheckpointError, match="do not match"):
        CLIPTokenizer({k: v for k, v in vocab.items() if k != "in"}, merges)
