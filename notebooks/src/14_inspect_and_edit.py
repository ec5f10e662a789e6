# Source of notebooks/14_inspect_and_edit.ipynb: build it with `python notebooks/build.py`.
# ruff: noqa: E402, E501  (imports after Markdown cells; long equations in Markdown)

# %% [markdown]
# # Lesson 14: inspect and edit
#
# Look inside a run and steer it, on the bundled shapes model: cross-attention maps, a writable step callback,
# prompt weights and long prompts, DDIM inversion, inpainting. Read beside `course/14_inspect_and_edit.md`.

# %%
import torch

from minidiff.course.viz import course_pipeline, image_grid, show_images

pipe = course_pipeline()
torch.manual_seed(0)

# %% [markdown]
# ## 1. Which word drew which pixels: cross-attention maps

# %% [markdown]
# ## 2. Steering mid-run: a writable step callback

# %% [markdown]
# ## 3. Weighting words, and prompts past 77 tokens
#
# The prompt text itself carries the weights, in the syntax of AUTOMATIC1111's web UI: `(word)` is 1.1, `[word]` is
# 1 / 1.1, `(word:1.6)` is 1.6, brackets multiply when they nest, `\(` is a literal bracket, `BREAK` starts a new
# chunk. `parse_prompt_weights` reads it into pieces of text and their weights:

# %%
import re

from minidiff.course import evaluate, shapes
from minidiff.course.notebook import use
from minidiff.prompts import apply_token_weights, parse_prompt_weights, tokenize_prompts

for text in ["a large (red:1.6) circle", "a ((red)) [small] circle", "top left: a red circle", r"a \(red\) circle"]:
    print(f"{text!r:32} -> {parse_prompt_weights(text)}")

# %% [markdown]
# Each piece is tokenized, and every token gets its piece's weight; START, END and the padding keep 1. The text
# encoder runs on the unweighted ids. Then each position's hidden state is multiplied by its weight, and the chunk
# is scaled by one number so that its mean is what it was: $h \leftarrow (w h)\,\overline{h} / \overline{w h}$.
# Write that in your workbook (`apply_token_weights` in lesson_14.py) and compare it with the pipeline's:

# %%
mine = use(14)
ids, weights = tokenize_prompts(pipe.tokenizer, ["a large (red:1.6) circle"])
print("tokens: ", [pipe.tokenizer.id_to_token[i] for i in ids[0, 0, :6].tolist()])
print("weights:", weights[0, 0, :6].tolist())
with torch.no_grad():
    states = pipe.text_encoder(ids[:, 0]) + 0.5  # an offset: a mean well away from 0, as in SD's encoders
    yours, library = mine.apply_token_weights(states, weights[:, 0]), apply_token_weights(states, weights[:, 0])
print(f"max |mine - library| = {float((yours - library).abs().max()):.1e}; mean before {float(states.mean()):.4f}, "
      f"after {float(library.mean()):.4f}")
print(mine.check("apply_token_weights"))

# %% [markdown]
# The offset above is there for a reason: the shapes model's encoder ends in a norm without bias, so its states
# have a mean near 0, and dividing by such a mean would be dividing by noise. The library leaves a chunk unscaled
# when its mean is under 1% of its mean absolute value (`MEAN_FLOOR` in `minidiff/prompts.py`); the weight then
# simply multiplies the word's state:

# %%
with torch.no_grad():
    plain = pipe.encode_prompt(["a large red circle"])
print(f"shapes model: mean {float(plain.mean()):.4f}, mean |h| {float(plain.abs().mean()):.2f}")

# %% [markdown]
# Does the weight steer? Ask for a cyan circle while the negative prompt says "cyan" (at weight 1 the shapes model
# drifts to blue, the nearest colour it knows), and raise the weight of "cyan"; the checker names the colour:

# %%
prompt, weights_tried = "a large {} circle on the left", [1.0, 1.3, 1.6, 2.0]
pictures = [pipe(prompt.format(f"(cyan:{w:g})" if w != 1 else "cyan"), negative_prompt="cyan", seed=0, steps=20,
                 progress=False).images[0] for w in weights_tried]
show_images(pictures, [f"cyan at {w:g}: {shapes.check(p).colour}" for p, w in zip(pictures, weights_tried)],
            title="negative prompt 'cyan'")

# %% [markdown]
# One picture proves little; the shapes checker reads the colour of many. 24 held-out prompts, each with its
# own colour word as the negative prompt, the colour word at 1 and at 1.6 (the full measurement, with more prompts, is
# `python -m benchmarks.prompt_weights`; its numbers are in the lesson text):

# %%
pairs = evaluate.held_out_prompts(24)
for weight in (1.0, 1.6):
    texts, negatives = [], []
    for text, spec in pairs:
        word = next(w for w in shapes.COLOUR_WORDS[spec.colour] if re.search(rf"\b{w}\b", text))
        texts.append(re.sub(rf"\b{word}\b", f"({word}:{weight:g})", text, count=1) if weight != 1 else text)
        negatives.append(word)
    images = evaluate.generate(pipe, texts, seed=0, steps=20, negative_prompt=negatives)
    print(f"colour word at {weight:g}: colour right in {shapes.adherence(images, [s for _, s in pairs])['colour']:.0%}")

# %% [markdown]
# **Past 77 tokens.** CLIP reads 77 positions: START, 75 tokens, END. A longer prompt is cut into chunks of 75, each
# encoded on its own with START and END around it, and the chunks' states are laid side by side; cross-attention
# reads any number of positions. The negative prompt gets as many chunks (empty ones), so that guidance can batch
# the two:

# %%
long_prompt = "a large red circle in the centre, " * 12
print(f"{len(pipe.tokenizer.encode(long_prompt))} tokens -> context {tuple(pipe.encode_prompt([long_prompt]).shape)}")
print("with BREAK:", tuple(pipe.encode_prompt(["a red circle BREAK in the centre"]).shape))
print("the empty prompt padded to 3 chunks:", tuple(pipe.encode_prompt([""], min_chunks=3).shape))

# %% [markdown]
# ## 4. Back to the noise: DDIM inversion

# %% [markdown]
# ## 5. Repainting part of a picture: inpainting

# %% [markdown]
# ## Exercises
