# Source of notebooks/08_text_and_guidance.ipynb: build it with `python notebooks/build.py`.
# ruff: noqa: E402, E501  (imports after Markdown cells; long equations in Markdown)

# %% [markdown]
# # Lesson 08: the tokenizer, the text encoder and classifier-free guidance
#
# The prompt reaches the UNet in three steps: text -> 77 token ids (CLIP's byte-level BPE) -> 77 hidden states
# (CLIP's causal transformer) -> keys and values of every cross-attention layer. Classifier-free guidance then
# amplifies what the prompt changes. Read beside `course/08_text_and_guidance.md`, `minidiff/tokenizer.py`,
# `minidiff/clip.py` and `guided_model` in `minidiff/pipeline.py`.
#
# | code name | symbol |
# |---|---|
# | `ids` | 77 token ids: 49406 (start), the tokens, 49407 (end), padding |
# | `context`, `uncond` | $c$ = text encoder(prompt), $\varnothing$ = text encoder(negative or empty prompt) |
# | `guidance_scale` | $w$: $\hat\epsilon=\epsilon_\theta(x_t,\varnothing)+w\,(\epsilon_\theta(x_t,c)-\epsilon_\theta(x_t,\varnothing))$ |

# %%
import numpy as np
import torch
from IPython.display import display

from minidiff.course import shapes
from minidiff.course.milestones import check
from minidiff.course.notebook import use
from minidiff.course.viz import course_pipeline, plot_curves, show_images, show_trace
from minidiff.tokenizer import CLIPTokenizer

tokenizer = CLIPTokenizer.default()
pipe = course_pipeline()

# %% [markdown]
# ## The tokenizer
#
# Byte-level BPE (Sennrich et al. 2016; Radford et al. 2021): a prompt is lower-cased, split into words, and
# each word is merged from bytes into the longest known pieces, 49,408 in all (`</w>` marks a word's end).

# %%
prompt = "a big red circle at the top left"
ids = tokenizer(prompt)
pieces = [tokenizer.id_to_token[i] for i in tokenizer.encode(prompt)]
print(f"ids {tuple(ids.shape)}: {ids[0, :12].tolist()} ...")
print("pieces:", pieces)
for word in ("minidiff", "Stable Diffusion", "photorealistic"):
    print(f"{word!r:20s} -> {[tokenizer.id_to_token[i] for i in tokenizer.encode(word)]}")
long_prompt = ", ".join(["a big red circle at the top left"] * 12)
print(f"a {len(tokenizer.encode(long_prompt))}-token prompt loses its last {len(tokenizer.dropped_tokens(long_prompt))}"
      " tokens: only 75 fit between the start and end tokens")

# %% [markdown]
# Re-implement the framing (the BPE itself is in `minidiff/tokenizer.py`) and let the milestone compare it with
# the reference on a set of awkward prompts:

# %%
# your workbook's lesson_08.py (`minidiff course init workbook`); where a function is still blank, the reference
mine = use(8)
print(mine.tokenize("a big red circle")[:8], "...")
for name in ("tokenizer", "bpe_merge"):
    print(mine.check(name))

# %% [markdown]
# ## The text encoder is causal
#
# CLIP's text transformer lets token $i$ attend to tokens $0..i$ only. So two prompts that differ in their last
# word have *identical* hidden states up to that word, and different ones from it on (the padding positions
# after the end token attend to everything, and differ too):

# %%
with torch.no_grad():
    a, b = pipe.text_encoder(tokenizer(["a big red circle", "a big red square"]))
difference = (a - b).abs().amax(dim=-1)
print("max |a - b| per position:", [f"{d:.1e}" for d in difference[:8].tolist()], "...")
print("tokens:", ["<start>", *[tokenizer.id_to_token[i] for i in tokenizer.encode("a big red circle")], "<end>"])
print(check("text_encoder"))
# your causal mask, CLIP layer and the text encoder built from them (lesson_08.py)
for name in ("causal_mask", "clip_layer", "text_encoder_from_parts"):
    print(mine.check(name))

# %% [markdown]
# ## Classifier-free guidance
#
# One network trained with the caption dropped 10% of the time predicts both $\epsilon_\theta(x_t,c)$ and
# $\epsilon_\theta(x_t,\varnothing)$. Guidance (Ho & Salimans 2022) extrapolates from the unconditional towards the
# conditional prediction by $w$; $w=1$ is the conditional model alone, $w>1$ trades diversity for adherence. The
# pipeline runs both in one batched UNet call. Re-implement it and compare:

# %%
with torch.no_grad():
    context, uncond = pipe.encode_prompt([prompt]), pipe.encode_prompt([""])
    x = torch.randn(1, pipe.latent_channels(), 8, 8, generator=torch.Generator().manual_seed(0))
    ours = mine.guided_eps(pipe.unet(x, 500, uncond), pipe.unet(x, 500, context), 7.5)  # your guided_eps
    library = pipe.guided_model(context, uncond, 7.5)(x, 500)
print(f"max |mine - pipeline| = {float((ours - library).abs().max()):.1e} (fp32; one batched call against two)")
print(mine.check("guided_eps"))

# %% [markdown]
# ## A guidance-scale grid
#
# Same prompt, same seed, $w$ from 1 to 12. With the shapes model the checker of `minidiff.course.shapes` reads colour,
# shape and position back from the pixels, so adherence can be *measured*: 8 prompts per scale.

# %%
scales = [1.0, 2.0, 4.0, 7.5, 12.0]
grid = [pipe(prompt, guidance_scale=w, steps=20, seed=0, progress=False).images[0] for w in scales]
show_images(grid, [f"w = {w}" for w in scales], size=1.8, title=f"{prompt!r}: {pipe.source}")

# %%
specs = shapes.random_specs(8, np.random.default_rng(0), split="train")
prompts = [shapes.caption(spec) for spec in specs]
adherence = []
for w in scales:
    images = pipe(prompts, guidance_scale=w, steps=20, seed=1, progress=False).images
    adherence.append(shapes.adherence(images, specs)["all"])
    print(f"w = {w:4}: colour, shape and position all right in {adherence[-1]:.0%} of 8 pictures")
plot_curves(scales, {"adherence": adherence}, "guidance scale w", "fraction right", f"8 prompts, {pipe.source}")

# %% [markdown]
# ## The trace at two guidance scales

# %%
for w in (1.0, 7.5):
    result = pipe(prompt, guidance_scale=w, steps=20, seed=0, trace=True, progress=False)
    display(show_trace(result.trace, title=f"guidance scale {w}: {pipe.source}"))


# %% [markdown]
# **Milestones:** `minidiff milestones --only tokenizer text_encoder`. Next: lesson 09, where the shapes model is
# trained from scratch, text encoder included.
