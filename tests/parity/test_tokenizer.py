"""Parity: minidiff.tokenizer.CLIPTokenizer against transformers' CLIPTokenizer on the same vocabulary.

Both read the vocab.json / merges.txt that `write_vocab_files` writes. The reference is the
`tokenizers`-backed class (in transformers 5, CLIPTokenizer and CLIPTokenizerFast are that one class),
which is what diffusers' SD pipelines call. Token ids must be EXACTLY equal.

Expected differences, tested explicitly below rather than dropped:
  * A special token typed in a prompt in another case ("<|STARTOFTEXT|>"): the official SD folders
    let transformers match <|startoftext|> after lower-casing; ours reads it as text.
  * `unescape_html=True` (OpenAI CLIP's html.unescape, off by default) turns "&amp;" into "&";
    transformers keeps the five characters.
  * Code points unassigned in this Python's Unicode database (unicodedata.unidata_version) but assigned
    in the newer one of the `tokenizers` regex engine are classed "other symbol" here; the all-code-point
    checks run over the characters this Python knows.
"""

import json
import unicodedata

import pytest
import transformers

from minidiff.tokenizer import CLIPTokenizer, clean_text, split_words, write_vocab_files

LONG = " ".join(["a highly detailed digital painting of a castle on a hill at sunset, trending on artstation"] * 6)
CORPUS = [
    "a photo of an astronaut riding a horse on mars",
    "A PHOTO OF A CAT",
    "MiXeD CaSe WoRdS and CamelCaseWords",
    "Hello, world! How's it going?",
    "it's, don't, you're, we've, I'm, we'll, he'd",
    "IT'S DON'T YOU'RE WE'VE I'M WE'LL HE'D",
    "rock'n'roll o'clock 'quoted' ''double'' trailing' '''s",
    "3.14159 1,000,000 2024-01-01 10:30pm 1st 2nd 3rd 100% 0x1F",
    "numbers123abc456 a1b2c3 9000000000000",
    "½ ² ³ Ⅻ ① ٣٤٥ ४२ ໕ 〇 二十",
    "café naïve résumé façade Ångström Øresund",
    "cafe\u0301 nai\u0308ve decomposed accents",
    "\u0301 a lone combining mark at the start",
    "東京タワーの夜景、美しい",
    "一只可爱的猫在草地上，高清。",
    "한국어 프롬프트 테스트",
    "Привет, мир! Москва ЁЛКА",
    "ΟΔΟΣ Ελληνικά αλφάβητο ΣΊΣΥΦΟΣ",
    "İstanbul ǅemal ß ẞ ŉ",
    "مرحبا بالعالم",
    "हिन्दी भाषा and ภาษาไทย and עברית",
    "emoji 🎨🖼️ 🐱‍👤 🔥🔥🔥",
    "👩‍👩‍👧‍👦 family 👍🏽 thumbs 🏳️‍🌈 flag 🇯🇵 1️⃣",
    "   leading and trailing spaces   ",
    "tabs\tand\nnewlines\r\nand\u00a0nbsp\u3000ideographic\u2003em\u2028line",
    "multiple     spaces    between\t\t\twords",
    "&amp; &lt;b&gt;bold&lt;/b&gt; &quot;quoted&quot; &#39;apos&#39; &nbsp; &amp;amp;",
    "<b>html tags</b> <br/> <div class='x'>",
    "(masterpiece:1.2), [best quality], {{detailed}}, <lora:foo:0.8>, BREAK",
    "!!!??? ... --- *** ~~~ ___ @#$%^&*() «guillemets» „quotes“ ‘curly’ — –",
    "email@example.com https://example.com/path?q=1&r=2#frag",
    "snake_case_words kebab-case-words",
    "",
    "   ",
    "a",
    "zero\u200bwidth\u200cnon\u200djoiner and soft\u00adhyphen \ufeffbom",
    "control\x01chars\x1c\x1fhere\x7f\x85",
    "fullwidth ＡＢＣ １２３ ！ ligatures ﬁ ﬂ math 𝐀𝐁𝐂 𝟙𝟚𝟛",
    "<|startoftext|> special tokens <|endoftext|> typed in a prompt",
    "<|ENDOFTEXT|> upper-case specials x<|ENDOFTEXT|>! <|StartOfText|>",
    "vs. e.g. i.e. U.S.A. Mr. Smith's",
    "supercalifragilisticexpialidocious antidisestablishmentarianism",
    "a " * 75,  # exactly 75 tokens: fits
    "a " * 76,  # one too many
    LONG,
    "🔥 " * 100,
    "東京" * 60,
]


@pytest.fixture(scope="module")
def vocab_folder(tmp_path_factory):
    folder = tmp_path_factory.mktemp("clip_tokenizer")
    write_vocab_files(folder)
    return folder


def reference_classes():
    """CLIPTokenizer and CLIPTokenizerFast, where this transformers version has them as distinct classes."""
    classes = [transformers.CLIPTokenizer, getattr(transformers, "CLIPTokenizerFast", transformers.CLIPTokenizer)]
    return list(dict.fromkeys(classes))


@pytest.fixture(scope="module", params=reference_classes(), ids=lambda cls: cls.__name__)
def reference(request, vocab_folder):
    tokenizer = request.param.from_pretrained(str(vocab_folder), model_max_length=77)  # a local folder
    # transformers < 5 without ftfy: the slow class falls back to BERT's BasicTokenizer, which we do not copy
    assert tokenizer.is_fast, "the parity reference is the tokenizers-backed CLIP tokenizer SD pipelines use"
    return tokenizer


@pytest.fixture(scope="module")
def ours(vocab_folder):
    return CLIPTokenizer.from_folder(vocab_folder)


def reference_ids(reference, prompts):
    """What diffusers' pipelines do: pad to 77, truncate, as a tensor."""
    return reference(prompts, padding="max_length", max_length=77, truncation=True, return_tensors="pt").input_ids


def test_written_vocab_is_the_official_one(vocab_folder):
    vocab = json.loads((vocab_folder / "vocab.json").read_text(encoding="utf-8"))
    merges = (vocab_folder / "merges.txt").read_text(encoding="utf-8").splitlines()
    assert len(vocab) == 49408 and sorted(vocab.values()) == list(range(49408))
    assert merges[0] == "#version: 0.2" and len(merges) == 1 + 48894
    # spot checks against the published SD tokenizer/vocab.json
    assert vocab["!"] == 0 and vocab["a</w>"] == 320 and vocab["cat</w>"] == 2368 and vocab["photo</w>"] == 1125
    assert vocab["<|startoftext|>"] == 49406 and vocab["<|endoftext|>"] == 49407
    assert merges[1] == "i n" and vocab["in"] == 512


@pytest.mark.parametrize("prompt", CORPUS, ids=range(len(CORPUS)))
def test_padded_ids_match(reference, ours, prompt):
    assert ours(prompt).tolist() == reference_ids(reference, [prompt]).tolist()


@pytest.mark.parametrize("prompt", CORPUS, ids=range(len(CORPUS)))
def test_untruncated_ids_and_dropped_count_match(reference, ours, prompt):
    expected = reference(prompt, add_special_tokens=False).input_ids
    assert ours.encode(prompt) == expected
    assert len(ours.dropped_tokens(prompt)) == max(0, len(expected) - 75)


def test_batch_matches(reference, ours):
    assert ours(CORPUS).tolist() == reference_ids(reference, CORPUS).tolist()
    assert sum(len(ours.dropped_tokens(p)) > 0 for p in CORPUS) == 4  # "a " * 76, LONG, fire emoji, 東京


@pytest.mark.parametrize("prompt", [p for p in CORPUS if "<|" not in p.lower()])
def test_decode_matches(reference, ours, prompt):
    ids = ours(prompt)[0]
    assert ours.decode(ids) == reference.decode(ids, skip_special_tokens=True)


def write_official_folder(folder, vocab_folder, pad_token):
    """The tokenizer/ folder of SD 1.5 (pad <|endoftext|>) or SD 2.1 (pad "!"), in its 2022 file format."""
    for name in ("vocab.json", "merges.txt"):
        (folder / name).write_bytes((vocab_folder / name).read_bytes())
    special = lambda text: {"content": text, "lstrip": False, "normalized": True, "rstrip": False, "single_word": False}
    specials = {"bos_token": special("<|startoftext|>"), "eos_token": special("<|endoftext|>"), "pad_token": pad_token}
    specials["unk_token"] = special("<|endoftext|>")
    config = {"model_max_length": 77, "do_lower_case": True, "tokenizer_class": "CLIPTokenizer", "errors": "replace"}
    config |= {
        key: {"__type": "AddedToken", **value} if isinstance(value, dict) else value for key, value in specials.items()
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (folder / "special_tokens_map.json").write_text(json.dumps(specials))
    return folder


@pytest.mark.parametrize("pad_token, pad_id", [("<|endoftext|>", 49407), ("!", 0)])
def test_official_folder_layout_and_pad_token(vocab_folder, tmp_path, pad_token, pad_id):
    """SD 1.x pads with <|endoftext|>, SD 2.x with "!", which transformers also splits out of the prompt."""
    write_official_folder(tmp_path, vocab_folder, pad_token)
    reference = transformers.CLIPTokenizer.from_pretrained(str(tmp_path))  # a local folder, no download
    ours = CLIPTokenizer.from_folder(tmp_path)
    assert ours.pad_id == reference.pad_token_id == pad_id
    prompts = [
        "a photo of a cat",
        "",
        LONG,
        "東京タワー!!",
        "wow!! great! (masterpiece!)",
        "x<|startoftext|>y<|endoftext|>",
    ]
    assert ours(prompts).tolist() == reference_ids(reference, prompts).tolist()
    for prompt in prompts:
        assert ours.encode(prompt) == reference(prompt, add_special_tokens=False).input_ids


def test_expected_difference_special_tokens_typed_in_another_case(vocab_folder, tmp_path):
    """The official folders mark <|startoftext|> "normalized", so transformers also finds it after
    lower-casing. Ours takes a special token typed in a prompt only as written: otherwise it is text."""
    reference = transformers.CLIPTokenizer.from_pretrained(str(write_official_folder(tmp_path, vocab_folder, "!")))
    ours = CLIPTokenizer.from_folder(tmp_path)
    assert reference("x<|STARTOFTEXT|>y", add_special_tokens=False).input_ids == [343, 49406, 344]
    assert (
        ours.encode("x<|STARTOFTEXT|>y")
        == ours.encode("x <| startoftext |> y")
        == [343, 27, 347, 993, 6659, 4160, 91, 285, 344]
    )


def test_every_code_point_is_classed_like_the_reference_regex(reference):
    """\\p{L}, \\p{N} and whitespace emulated with unicodedata, against the regex engine of `tokenizers`."""
    code_points = [c for c in range(0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Cs")]
    # each character after a letter and after a symbol: the words differ for each of the four classes
    text = "".join(f"a{chr(c)}!{chr(c)} " for c in code_points)
    clip_split = reference.backend_tokenizer.pre_tokenizer[0]  # CLIP's Split; [1] is the byte-level mapping
    assert split_words(text) == [word for word, _ in clip_split.pre_tokenize_str(text)]
    text = "".join(f"A{chr(c)}" for c in code_points)
    assert clean_text(text) == reference.backend_tokenizer.normalizer.normalize_str(text)


def test_ids_of_many_code_points_match(reference, ours):
    """Byte-level BPE of single characters across the whole code space (every 5th assigned one)."""
    code_points = [c for c in range(0x80, 0x110000) if unicodedata.category(chr(c)) not in ("Cn", "Cs")][::5]
    text = " ".join(f"{chr(c)}x{chr(c)}" for c in code_points)
    assert ours.encode(text) == reference(text, add_special_tokens=False).input_ids


def test_expected_difference_html_unescape(reference, vocab_folder):
    """OpenAI CLIP unescapes html; transformers does not. Ours does it only when asked."""
    unescaping = CLIPTokenizer.from_folder(vocab_folder)
    unescaping.unescape_html = True
    prompt = "salt &amp; pepper &lt;3 &amp;amp;"
    assert unescaping(prompt).tolist() == reference_ids(reference, ["salt & pepper <3 &"]).tolist()
    assert unescaping(prompt).tolist() != reference_ids(reference, [prompt]).tolist()
