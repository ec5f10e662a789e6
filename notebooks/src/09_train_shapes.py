# Source of notebooks/09_train_shapes.ipynb: build it with `python notebooks/build.py`.
# ruff: noqa: E402, E501  (imports after Markdown cells; long equations in Markdown)

# %% [markdown]
# # Lesson 09: train your own small Stable Diffusion
#
# The bundled **shapes** model is latent diffusion at toy scale, trained from scratch on a CPU by
# `python -m minidiff.course.train shapes`: a VAE for 64x64 pictures of coloured shapes, then a CLIP-style text encoder
# and a UNet together, on the $\epsilon$-prediction loss of Ho et al. 2020 (plus a grounding term). Read beside
# `course/09_train_shapes.md`, `minidiff/course/shapes.py` and `minidiff/course/train.py`.
#
# | code name | symbol |
# |---|---|
# | `latents` | $z\cdot s$: the VAE's posterior means times the scaling factor |
# | `t`, `noise`, `x_t` | $t\sim\mathcal U\{0..999\}$, $\epsilon\sim\mathcal N(0,I)$, $x_t=\alpha_t z+\sigma_t\epsilon$ |
# | loss | $\lVert\epsilon-\epsilon_\theta(x_t,t,c)\rVert^2$, the caption $c$ replaced by "" 10% of the time |

# %%
import json
from pathlib import Path

import torch
from IPython.display import Image, display

from minidiff.course import grounding, shapes, train
from minidiff.course.evaluate import held_out_prompts
from minidiff.course.notebook import use
from minidiff.course.viz import SHAPES, course_pipeline, shapes_available, show_images, show_trace, to_pil
from minidiff.pipeline import load_pipeline
from minidiff.schedule import NoiseSchedule

OUT = Path("out") / "09_train_shapes"
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## The data: pictures, captions, a held-out split, and a checker
#
# Every picture is drawn from a seed (nothing is downloaded): one circle, square or triangle, in one of 8 colours,
# small or large, at one of 9 places. 32 of the 216 colour-shape-place combinations never appear in training, so
# the model can be asked for pictures it has never seen.

# %%
images, captions, specs = shapes.batch(8, seed=0)
show_images(to_pil(images), [c if len(c) < 34 else c[:32] + "..." for c in captions], columns=4, size=2.3)

# %%
print(f"{len(shapes.ALL_COMBINATIONS)} combinations, {len(shapes.HELD_OUT)} held out, e.g. {shapes.HELD_OUT[:3]}")
print("the checker reads the real pictures back:", shapes.adherence(to_pil(images), specs))

# %% [markdown]
# ## Re-implement the loss, compare
#
# Phase 2 of training is this loss and an optimizer (plus the small grounding term of the lesson,
# `minidiff.course.grounding`). Ours against `train.diffusion_loss` on the same random draws (a tiny random UNet
# and text encoder stand in for the real ones):

# %%
# your workbook's lesson_09.py (`minidiff course init workbook`); where a function is still blank, the reference
mine = use(9)
print(mine.check("diffusion_loss"))
pipe = course_pipeline()  # any UNet and text encoder will do for the comparison
latents = torch.randn(4, pipe.latent_channels(), 8, 8, generator=torch.Generator().manual_seed(0))
ids = pipe.tokenizer(captions[:4])
with torch.no_grad():
    ours = mine.diffusion_loss(pipe.unet, pipe.text_encoder, ids, latents, NoiseSchedule.sd(),
                             torch.Generator().manual_seed(1))
    library = train.diffusion_loss(pipe.unet, pipe.text_encoder, ids, latents, NoiseSchedule.sd(),
                                   torch.Generator().manual_seed(1))
print(f"my loss {float(ours):.6f}, minidiff's {float(library):.6f}, difference {float((ours - library).abs()):.1e}")

# %% [markdown]
# ## The grounding term
#
# The colour and shape words' share of attention on the shape, for one caption, as the training sees it: the
# cells a rendered picture's shape touches, the caption's grounded tokens, the cross-attention probabilities of
# every layer recorded in one UNet call, and the loss (yours, where you wrote `grounding_loss`, against the
# library's on the same probabilities).

# %%
print(mine.check("grounding_loss"))
pixels, specs = train.render_pool(4, seed=0)
cells = grounding.shape_cells(pixels)  # (4, 8, 8) bool: the latent cells each shape touches
texts = [shapes.caption(spec) for spec in specs]
tokens = grounding.grounded_tokens(pipe.tokenizer, texts, specs)
print(texts[0], "-> grounded positions", tokens[0].nonzero().flatten().tolist())
with torch.no_grad(), grounding.recorded_probabilities(pipe.unet) as probs:
    pipe.unet(latents, torch.tensor([500] * 4), pipe.text_encoder(pipe.tokenizer(texts)))
print(f"{len(probs)} cross-attention layers; my loss {float(mine.grounding_loss(probs, tokens, cells)):.6f}, "
      f"minidiff's {float(grounding.grounding_loss(probs, tokens, cells)):.6f}")

# %% [markdown]
# ## The whole run, in miniature
#
# `train.train(TrainConfig.quick())` runs every stage of the real command with tiny networks and a handful of
# steps: render the pool, phase 1 (the VAE), set the scaling factor to $1/\mathrm{std}(z)$, phase 2 (UNet and text
# encoder), save a diffusers folder, plot the losses, evaluate on held-out prompts. Seconds, and a model that has
# learned nothing yet.

# %%
log = train.train(train.TrainConfig.quick(), out=OUT / "quick", progress=False, threads=None)
print(json.dumps({key: log[key] for key in ("scaling_factor", "timings_s", "final_loss", "weights_mb")}, indent=1))
quick = load_pipeline(OUT / "quick", dtype=torch.float32, device="cpu")
result = quick("a small red circle at the top left", steps=10, seed=0, trace=True, progress=False)
show_trace(result.trace, title="after a few training steps: still noise")

# %% [markdown]
# ## The bundled model
#
# `python -m minidiff.course.train shapes` is the same run at full size (about 45 minutes on 2 CPU cores; `--threads`
# for more): a 64-128-channel UNet on 8x8x4 latents, a 3-layer text encoder of width 128. It writes
# `weights/shapes` with its loss curve and `train_log.json`, whose held-out adherence is measured by the checker
# on pictures the model generated for combinations it never saw.

# %%
if shapes_available():
    bundled = json.loads((SHAPES / "train_log.json").read_text())
    print(json.dumps({key: bundled[key] for key in ("timings_s", "final_loss", "weights_mb", "held_out_adherence")
                      if key in bundled}, indent=1))
    if (SHAPES / "loss_curve.png").is_file():
        display(Image(filename=str(SHAPES / "loss_curve.png")))
else:
    print("weights/shapes is not there yet: `python -m minidiff.course.train shapes` trains it (about 45 minutes)")

# %% [markdown]
# Held-out prompts, generated and checked here (`course_pipeline()` is the bundled model when it is there; the
# random-weight fallback scores 0%):

# %%
pairs = held_out_prompts(8, seed=1)
prompts, held_out_specs = [p for p, _ in pairs], [s for _, s in pairs]
generated = pipe(prompts, steps=20, guidance_scale=5.0, seed=0, progress=False).images
print(shapes.adherence(generated, held_out_specs), f"({pipe.source})")
show_images(generated, [p if len(p) < 34 else p[:32] + "..." for p in prompts], columns=4, size=2.3)

# %%
result = pipe(prompts[0], steps=20, guidance_scale=5.0, seed=0, trace=True, progress=False)
show_trace(result.trace, title=f"{prompts[0]!r}, never seen in training: {pipe.source}")

# %% [markdown]
# **Milestone:** `minidiff milestones --only dpmpp_20` also runs on the shapes model when it is there (DPM++ 2M at
# 20 steps drawing 16 held-out prompts right as often as DDIM at 50 does). Next: lesson 10, making it fast.
