"""Prompt weights and long prompts (minidiff.prompts): the parses of A1111's syntax, the chunks, the weighting
against a direct computation, exactly today's embeddings without syntax, SDXL, and the colour-word measurement."""

import pytest
import torch

from minidiff.cli import main
from minidiff.clip import CLIPTextConfig, CLIPTextModel
from minidiff.course.viz import shapes_available, tiny_pipeline
from minidiff.errors import InputError
from minidiff.prompts import (
    CHUNK_TOKENS,
    MAX_CHUNKS,
    apply_token_weights,
    count_chunks,
    parse_prompt_weights,
    tokenize_prompts,
)
from minidiff.sdxl import encode_text
from minidiff.tokenizer import CLIPTokenizer

B = "BREAK"
# (prompt, expected parse): the first six are the examples A1111 documents for parse_prompt_attention
PARSES = [
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [("a ", 1.0), ("house", 1.1 * 1.1 * 1.3), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
      (", sun, ", 1.1), ("sky", 1.1**4), (".", 1.1)]),
    ("((a))", [("a", 1.21)]),
    ("[a]", [("a", 1 / 1.1)]),
    ("[[a]] b", [("a", 1 / 1.21), (" b", 1.0)]),
    ("(red:1.6) circle", [("red", 1.6), (" circle", 1.0)]),
    ("( red : 0.5 )", [(" red ", 0.5)]),
    ("(red:.5)", [("red", 0.5)]),
    ("(red:0)", [("red", 0.0)]),
    ("unclosed ) and ]", [("unclosed ) and ]", 1.0)]),
    ("top left: a red circle", [("top left: a red circle", 1.0)]),
    ("a smiley :)", [("a smiley :)", 1.0)]),
    (r"\(a\:b\) \\", [("(a:b) \\", 1.0)]),
    ("(a:b:1.2)", [("a:b", 1.2)]),
    ("[a:b:0.5]", [("a:b:0.5", 1 / 1.1)]),
    ("red BREAK blue", [("red", 1.0), (B, None), ("blue", 1.0)]),
    ("(red BREAK blue)", [("red", 1.1), (B, None), ("blue", 1.1)]),
    ("BREAKFAST", [("BREAKFAST", 1.0)]),
    ("", [("", 1.0)]),
]


@pytest.mark.parametrize(("prompt", "expected"), PARSES)
def test_parse_is_a1111s(prompt, expected):
    parsed = parse_prompt_weights(prompt)
    assert [text for text, _ in parsed] == [text for text, _ in expected]
    assert [w is None for _, w in parsed] == [w is None for _, w in expected]  # None: a BREAK
    assert [w for _, w in parsed if w is not None] == pytest.approx([w for _, w in expected if w is not None],
                                                                    rel=1e-12)


@pytest.mark.parametrize(("prompt", "message"), [
    ("(red:abc) circle", "the weight 'abc' in '(red:abc)' is not a number"),
    ("(red:nan)", "the weight 'nan' in '(red:nan)' is not a number"),
    ("(red:inf)", "'inf' in '(red:inf)' is not a number"),
    ("(red:1e9)", "the weight '1e9'"),
    ("(red:)", "the weight '' in '(red:)' is not a number"),
    ("(red:1.2.3)", "the weight '1.2.3'"),
    ("(red:-1)", "the weight -1 in '(red:-1)' must lie from 0 to 10"),
    ("(red:11)", "the weight 11 in '(red:11)' must lie from 0 to 10"),
    ("(((((((((((((((((((((((((((red)))))))))))))))))))))))))))", "multiply to a weight of 13.1, more than 10"),
    ("(a photo: at night)", "the weight 'at night' in '(a photo: at night)' is not a number"),
])
def test_bad_weights_are_one_line_errors_naming_the_weight(prompt, message):
    with pytest.raises(InputError, match=message.replace("(", r"\(").replace(")", r"\)").replace(".", r"\.")) as e:
        parse_prompt_weights(prompt)
    assert "\n" not in str(e.value)


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline()


def words(n: int) -> str:
    """n one-token words."""
    return " ".join(["circle"] * n)


@pytest.mark.parametrize("prompt", ["a red circle", "", "top left: red square, small", words(CHUNK_TOKENS)])
def test_without_syntax_the_embedding_is_exactly_todays(pipe, prompt):
    today = pipe.text_encoder(pipe.tokenizer([prompt]))
    assert torch.equal(pipe.encode_prompt([prompt]), today)
    assert torch.equal(pipe.encode_prompt([prompt], prompt_weights=False), today)


def test_long_prompt_is_cut_into_chunks_of_75_and_each_encoded_alone(pipe):
    tokenizer, prompt = pipe.tokenizer, words(CHUNK_TOKENS + 5) + " red"
    ids, weights = tokenize_prompts(tokenizer, [prompt])
    assert ids.shape == weights.shape == (1, 2, 77) and torch.equal(weights, torch.ones(1, 2, 77))
    tokens = tokenizer.encode(prompt)
    first = [tokenizer.start_id, *tokens[:75], tokenizer.end_id]
    second = [tokenizer.start_id, *tokens[75:], tokenizer.end_id] + [tokenizer.pad_id] * 69
    assert ids[0, 0].tolist() == first and ids[0, 1].tolist() == second
    context = pipe.encode_prompt([prompt])
    assert context.shape == (1, 154, pipe.text_encoder.config.hidden_size)
    expected = torch.cat([pipe.text_encoder(torch.tensor([first])), pipe.text_encoder(torch.tensor([second]))], 1)
    torch.testing.assert_close(context, expected, rtol=0, atol=1e-6)


def test_the_shorter_prompt_of_a_batch_ends_in_empty_chunks(pipe):
    long, short = words(2 * CHUNK_TOKENS + 1), "a red circle"
    assert count_chunks(pipe.tokenizer, [long, short]) == 3
    context = pipe.encode_prompt([long, short])
    assert context.shape[1] == 3 * 77
    empty = pipe.text_encoder(pipe.tokenizer([""]))
    torch.testing.assert_close(context[1:, 77:154], empty, rtol=0, atol=1e-6)
    torch.testing.assert_close(context[1:, 154:], empty, rtol=0, atol=1e-6)
    torch.testing.assert_close(pipe.encode_prompt([short], min_chunks=3), context[1:], rtol=0, atol=1e-6)


def test_break_starts_a_new_chunk(pipe):
    ids, _ = tokenize_prompts(pipe.tokenizer, ["a red circle BREAK blue"])
    assert ids.shape == (1, 2, 77)
    assert pipe.tokenizer.decode(ids[0, 0]) == "a red circle" and pipe.tokenizer.decode(ids[0, 1]) == "blue"


@pytest.fixture(scope="module")
def biased():
    """The tiny pipeline with a bias in the final norm: hidden states whose mean is well away from 0, as in SD."""
    pipe = tiny_pipeline(seed=1)
    with torch.no_grad():
        pipe.text_encoder.text_model.final_layer_norm.bias.fill_(0.3)
    return pipe


def direct(pipe, scale_back: bool):
    """ "a (red:1.5) [circle]" computed by hand from "a red circle": red x 1.5, circle / 1.1, then the mean."""
    states = pipe.text_encoder(pipe.tokenizer(["a red circle"]))[0].double()
    scaled = states.clone()
    scaled[2] *= 1.5
    scaled[3] /= 1.1
    return scaled * states.mean() / scaled.mean() if scale_back else scaled


def test_weights_equal_a_direct_computation(biased):
    """(red:1.5): red's state x 1.5, then the chunk scaled back to its mean; the other tokens as in "a red circle"."""
    ids, weights = tokenize_prompts(biased.tokenizer, ["a (red:1.5) [circle]"])
    assert torch.equal(ids[:, 0], biased.tokenizer(["a red circle"]))
    assert weights[0, 0, :5].tolist() == pytest.approx([1.0, 1.0, 1.5, 1 / 1.1, 1.0])
    ours = biased.encode_prompt(["a (red:1.5) [circle]"])[0]
    torch.testing.assert_close(ours.double(), direct(biased, True), rtol=1e-5, atol=1e-6)
    assert not torch.allclose(ours.double(), direct(biased, False), rtol=1e-3, atol=1e-3)


def test_a_mean_near_zero_is_not_divided_by(pipe):
    """The random tiny encoder's final norm has no bias: its mean is ~0, so the weighted states are not rescaled."""
    states = pipe.text_encoder(pipe.tokenizer(["a red circle"]))[0]
    assert states.mean().abs() < 1e-3 * states.abs().mean()
    ours = pipe.encode_prompt(["a (red:1.5) [circle]"])[0]
    torch.testing.assert_close(ours.double(), direct(pipe, False), rtol=1e-5, atol=1e-6)
    assert torch.isfinite(apply_token_weights(torch.zeros(1, 77, 4), torch.full((1, 77), 2.0))).all()


def test_weighting_keeps_each_chunks_mean_and_its_dtype():
    states = torch.randn(3, 77, 8, dtype=torch.float16) + 0.3
    weights = torch.rand(3, 77) + 0.5
    out = apply_token_weights(states, weights)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out.float().mean(dim=(1, 2)), states.float().mean(dim=(1, 2)), rtol=2e-3, atol=1e-3)
    assert torch.equal(apply_token_weights(states, torch.ones(3, 77)), states)


def test_literal_parentheses_need_prompt_weights_off(pipe):
    with pytest.raises(InputError, match="is not a number"):
        pipe("f(x:y)", steps=1, progress=False)
    result = pipe("f(x:y)", steps=1, progress=False, prompt_weights=False)
    assert len(result.images) == 1
    torch.testing.assert_close(pipe.encode_prompt(["f(x:y)"], prompt_weights=False),
                               pipe.text_encoder(pipe.tokenizer(["f(x:y)"])), rtol=0, atol=0)


def test_the_command_reads_weights_or_with_no_prompt_weights_plain_text(tiny_sd, tmp_path, capsys):
    common = ["--model", str(tiny_sd[0]), "--steps", "1", "--size", "64", "--device", "cpu"]
    weighted = ["generate", "a (red:1.3) circle", "--negative", "[blue]", *common, "--out", str(tmp_path / "a.png")]
    assert main(weighted) == 0
    assert main(["generate", "f(x:y)", *common, "--out", str(tmp_path / "b.png")]) == 2
    assert "the weight 'y' in '(x:y)' is not a number" in capsys.readouterr().err
    assert main(["generate", "f(x:y)", "--no-prompt-weights", *common, "--out", str(tmp_path / "b.png")]) == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.png", "b.png"]


def test_a_long_prompt_with_a_short_negative_generates(pipe):
    result = pipe(words(100), negative_prompt="(red:1.2)", steps=2, progress=False, guidance_scale=5.0)
    assert len(result.images) == 1


def test_a_prompt_past_the_chunk_limit_is_refused(pipe):
    with pytest.raises(InputError, match=f"more than {MAX_CHUNKS}"):
        pipe(words(MAX_CHUNKS * CHUNK_TOKENS + 1), steps=1, progress=False)


def test_sdxl_chunks_both_encoders_and_pools_the_first_chunk():
    torch.manual_seed(0)
    small, big = CLIPTextConfig.tiny(), CLIPTextConfig(hidden_size=48, intermediate_size=96, num_hidden_layers=3,
                                                        num_attention_heads=2, hidden_act="gelu", projection_dim=40)
    encoders = (CLIPTextModel(small).eval(), CLIPTextModel(big).eval())
    tokenizers = (CLIPTokenizer.sd15(), CLIPTokenizer.sd21())
    prompt = words(CHUNK_TOKENS + 3) + " (red:1.4)"
    with torch.no_grad():
        text = encode_text(encoders, tokenizers, [prompt, "a red circle"])
        short = encode_text(encoders, tokenizers, ["a red circle"])
        first_chunk = encode_text(encoders, tokenizers, [words(CHUNK_TOKENS)])
    assert text.context.shape == (2, 154, 32 + 48) and text.pooled.shape == (2, 40)
    torch.testing.assert_close(text.pooled[:1], first_chunk.pooled, rtol=0, atol=1e-6)
    torch.testing.assert_close(text.context[1:, :77], short.context, rtol=0, atol=1e-6)
    torch.testing.assert_close(text.pooled[1:], short.pooled, rtol=0, atol=1e-6)
    ids, _ = tokenize_prompts(tokenizers[1], [prompt])
    assert ids[0, 1, 6:].tolist() == [0] * 71  # bigG's chunks pad with "!" (id 0), ViT-L's with <|endoftext|>


@pytest.mark.skipif(not shapes_available(), reason="needs the bundled shapes model (weights/shapes)")
def test_up_weighting_the_colour_word_wins_colour_back_from_a_negative_prompt():
    """The measurement of benchmarks/prompt_weights.py on 24 held-out prompts: the colour word as the negative prompt
    costs colour adherence, and writing it (colour:1.6) in the prompt wins some back (the README: the full run)."""
    from benchmarks.prompt_weights import measure
    from minidiff.pipeline import load_pipeline

    results, _, _ = measure(load_pipeline("shapes", device="cpu", dtype=torch.float32), 24, [1.6], batch=24)
    plain, against, weighted = (r["colour"] for r in results.values())
    assert against < plain and weighted > against, results


@pytest.mark.parametrize("flag, name", [("--json", "prompt_weights.json"), ("--grid", "prompt_weights.png")])
def test_the_benchmark_refuses_an_output_in_a_missing_folder_before_any_work(capsys, monkeypatch, tmp_path, flag,
                                                                             name):
    """benchmarks/prompt_weights.py: a one-line error and exit status 2 before the pipeline is loaded."""
    import benchmarks.prompt_weights as prompt_weights

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(prompt_weights, "load_pipeline", lambda *args, **kwargs: pytest.fail(f"loaded despite {flag}"))
    others = {"--json": str(tmp_path / "record.json"), "--grid": str(tmp_path / "grid.png")}
    assert prompt_weights.main(["--json", others["--json"], "--grid", others["--grid"],
                                flag, f"no/such/folder/{name}"]) == 2
    error = capsys.readouterr().err
    assert error.startswith("prompt_weights: error: ") and "the folder no/such/folder does not exist" in error, error
    assert error.count("\n") == 1, error
    assert list(tmp_path.iterdir()) == []  # nothing written
