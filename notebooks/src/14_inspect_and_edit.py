# Source of notebooks/14_inspect_and_edit.ipynb: build it with `python notebooks/build.py`.
# ruff: noqa: E402, E501  (imports after Markdown cells; long equations in Markdown)

# %% [markdown]
# # Lesson 14: inspect and edit
#
# Look inside a run and steer it, on the bundled shapes model: cross-attention maps, a writable step callback,
# prompt weights and long prompts, DDIM inversion, inpainting. Read beside `course/14_inspect_and_edit.md`.

# %%
import numpy as np
import torch

from minidiff.course.viz import course_pipeline, image_grid, show_images

pipe = course_pipeline()
torch.manual_seed(0)

# %% [markdown]
# ## 1. Which word drew which pixels: cross-attention maps

# %% [markdown]
# `attention_maps=True` records every cross-attention layer's softmax over the text tokens, for the prompt's half of
# the batch, and sums it over heads, layers (upsampled to the latent size) and steps. Each row below: the picture,
# then one heat map per token (pale: where the token was read most).

# %%
from minidiff.images import attention_grid

prompts = ["a large red circle in the top left", "a small blue square at the bottom centre"]
result = pipe(prompts, steps=20, seed=0, progress=False, attention_maps=True)
attention_grid(result.images, result.attention_maps)

# %% [markdown]
# The hook wraps each `attn2` module's kernel and puts it back afterwards: the picture is bit-identical with and
# without it. Below, your aggregation beside the library's on the probabilities of one UNet call, then the milestone.

# %%
from minidiff.attention_maps import record_attention, token_maps
from minidiff.course.notebook import use

mine = use(14)
probs = []
with record_attention(pipe.unet, 1, 8, 8) as recorder:
    recorder.add = lambda q, k, mask=None: probs.append(((q[-1:] / q.shape[-1] ** 0.5) @ k[-1:].transpose(-2, -1))
                                                        .softmax(-1))
    pipe("a large red circle in the top left", steps=1, seed=0, progress=False)
print(f"{len(probs)} layers:", [tuple(p.shape) for p in probs])
difference = (mine.aggregate_attention(probs, 8, 8) - token_maps(probs, 8, 8)).abs().max()
print(f"yours against the library: max |diff| {float(difference):.1e}")
print(mine.check("aggregate_attention"))

# %% [markdown]
# ## 2. Steering mid-run: a writable step callback

# %% [markdown]
# A callback that returns something changes the run: a latent to go on from, or `{"guidance_scale": w}`. Here the
# guidance goes off after 40% of the steps (diffusers' SDCFGCutoffCallback), and a second callback pulls the latent
# towards its own pred_x0 halfway through.

# %%
from minidiff.steering import guidance_cutoff

prompt, base = "a large green triangle on the right", dict(steps=20, seed=3, progress=False)
full = pipe(prompt, **base)
cut = pipe(prompt, callback=guidance_cutoff(20, 0.4), **base)
scales = []


def watch(step, timestep, sigma, x, pred_x0, guidance_scale):
    scales.append(guidance_scale)
    return {"x": 0.5 * x + 0.5 * pred_x0} if step == 10 else None  # a nudge towards the clean guess


nudged = pipe(prompt, callback=watch, **base)
print("guidance seen by the callback:", scales[:3], "...")
image_grid([full.images[0], cut.images[0], nudged.images[0]], labels=["guided all the way", "cut after 40%",
                                                                       "nudged at step 10"], scale=2)

# %%
print(mine.check("guidance_cutoff_callback"))

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
# DDIM run backwards: `pipe.invert(picture, prompt)` climbs SD's 50-step grid from the picture's latent to the
# noise that DDIM turns back into it. Below: a rendered picture of a held-out prompt, its noise, and DDIM 50 from
# that noise; then the same climb seen step by step through the callback (x_inter above, pred_x0 below).

# %%

from minidiff.course import shapes
from minidiff.course.evaluate import held_out_prompts
from minidiff.course.gaussian import convergence_order, inversion_round_trip
from minidiff.course.notebook import use
from minidiff.course.viz import latents_to_pil
from minidiff.images import from_pil, psnr

prompt, spec = held_out_prompts(3)[2]
picture = shapes.render(spec, np.random.default_rng(4))
climb = []
noise = pipe.invert(picture, prompt, steps=50, callback=lambda **info: climb.append(info))
again = pipe(prompt, sampler="ddim", steps=50, guidance_scale=1.0, latents=noise, progress=False).images[0]
fresh = pipe(prompt, sampler="ddim", steps=50, guidance_scale=1.0, seed=1, progress=False).images[0]
print(f"{prompt!r}: round trip {psnr(again, picture):.1f} dB, checker {shapes.check(again) == spec}; "
      f"a fresh seed, same prompt: {psnr(fresh, picture):.1f} dB; noise std {float(noise.std()):.2f}")
show_images([picture, latents_to_pil(noise)[0].resize((64, 64), 0), again, fresh],
            ["the picture", "its noise (ch. 0-2)", "DDIM 50 from it", "DDIM 50, seed 1"])

# %%
chosen = [0, 10, 20, 30, 40, 49]
decoded = [pipe.finish(climb[i]["x"], [], None).images[0] for i in chosen]
predicted = [pipe.finish(climb[i]["pred_x0"], [], None).images[0] for i in chosen]
show_images(decoded + predicted, [f"t={climb[i]['timestep']}" for i in chosen] * 2, columns=len(chosen))

# %% [markdown]
# The order of the round trip, measured on the exact Gaussian model: each doubling of the steps halves the error.

# %%
steps = (10, 20, 40, 80, 160)
errors = inversion_round_trip(steps)
print(", ".join(f"{n}: {e:.3f}" for n, e in zip(steps, errors)), f"-> order {convergence_order(steps, errors):.2f}")

# %% [markdown]
# Write `ddim_inverse_step` and `ddim_invert` in your workbook's `lesson_14.py`; the milestones compare them with
# `minidiff.inversion.invert_ddim` and name the usual mistakes.

# %%
mine = use(14)
for name in ("ddim_inverse_step", "ddim_invert"):
    print(mine.check(name))
with torch.no_grad():
    context = pipe.encode_prompt([prompt])
    x_0 = pipe.vae.encode(from_pil(picture)) * pipe.vae.scaling_factor  # the posterior mean
    x_T = mine.ddim_invert(lambda x, t: pipe.unet(x, t, context), x_0, pipe.schedule.alphas_cumprod, 50)
print(f"max |mine - pipe.invert|: {float((x_T - noise).abs().max()):.1e}")


# %% [markdown]
# ## 5. Repainting part of a picture: inpainting
#
# A picture, a mask (white: repaint, black: keep) and a prompt. The shapes model is an ordinary 4-channel model,
# so it repaints by **latent blending** (`minidiff.inpaint`): after every step the part outside the mask is put back
# as the picture noised to the level the sampler has reached, $x_t \leftarrow m\,x_t + (1-m)(\alpha_t z_0 +
# \sigma_t\epsilon)$, and after the last step as the picture itself. Here a red circle at the top left is replaced
# by whatever the held-out prompts ask for there.

# %%
from minidiff import inpaint
from minidiff.course import shapes
from minidiff.course.inpainting import place_mask, psnr, source_picture
from minidiff.course.notebook import use

asked = [("cyan", "square"), ("white", "circle"), ("orange", "triangle")]
picture, source = source_picture("top left", asked, seed=0)
mask = place_mask("top left")
prompts = [f"a {colour} {shape} in the top left" for colour, shape in asked]
result = pipe(prompts, image=picture, mask=mask, steps=20, seed=0, progress=False)
kept = np.asarray(mask) < 128
outside = [psnr(np.asarray(image)[kept], np.asarray(picture)[kept]) for image in result.images]
show_images([picture, mask.convert("RGB"), *result.images],
            ["picture", "mask", *[f"{p.removeprefix('a ')}\nreads: {shapes.check(i).colour} {shapes.check(i).shape}"
                                 for p, i in zip(prompts, result.images)]], size=1.6)

# %%
print("PSNR of the kept pixels against the picture:", ", ".join(f"{v:.1f} dB" for v in outside))

# %% [markdown]
# Your `blend_latents` (the workbook's `lesson_14.py`) is that one line; the milestone compares it with
# `minidiff.inpaint.blend` and names the usual mistakes (the clean picture instead of the noised one, the mask
# read the wrong way round). Then the same inpainting with your blend in place of the library's:

# %%
mine = use(14)
print(mine.check("blend_latents"))
original_blend = inpaint.blend
inpaint.blend = mine.blend_latents  # minidiff.inpaint.blended looks the blend up at each call
try:
    yours = pipe(prompts[:1], image=picture, mask=mask, steps=20, seed=0, progress=False)
finally:
    inpaint.blend = original_blend
difference = np.abs(np.asarray(yours.images[0], dtype=float) - np.asarray(result.images[0], dtype=float)).max()
print(f"largest pixel difference to the library's picture: {difference:.0f} (of 255)")

# %% [markdown]
# ## Exercises
