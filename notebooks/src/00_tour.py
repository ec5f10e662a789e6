# Source of notebooks/00_tour.ipynb: build it with `python notebooks/build.py`.
# ruff: noqa: E402, E501  (imports after Markdown cells; long equations in Markdown)

# %% [markdown]
# # Lesson 00: a tour, and the first image
#
# minidiff is Stable Diffusion from scratch in plain PyTorch: one readable file per component, each proved equal to
# the reference implementation (diffusers, transformers) on the same weights. This notebook makes a first picture,
# shows how it formed, and maps the package. Read beside `course/00_tour.md`; the course index is
# `course/README.md`.

# %%
import ast
from pathlib import Path

import torch

import minidiff
from minidiff.cli import main as minidiff_cli
from minidiff.course.milestones import main as milestones
from minidiff.course.viz import course_pipeline, image_grid, show_trace, trace_gif

OUT = Path("out") / "00_tour"
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## The first image
#
# `load_pipeline("shapes")` loads the bundled model: tokenizer, text encoder, UNet, VAE and noise schedule, from
# the official diffusers folder layout. `course_pipeline()` does that when `weights/shapes` is there, and otherwise
# builds a tiny random-weight pipeline, whose pictures are noise (it says which). One call makes a picture:

# %%
pipe = course_pipeline()
prompt = "a big red circle at the top left"
result = pipe(prompt, steps=20, seed=0, trace=True, progress=False)
print(pipe.describe())
result.images[0].resize((192, 192))

# %% [markdown]
# ## How it formed: the trace
#
# The course's signature picture. `trace=True` keeps every sampler step: the latent the sampler holds, $x_t$
# (**x_inter**, top row), and the model's guess of the finished picture, $\hat x_0$ (**pred_x0**, bottom row), both
# decoded by the VAE. x_inter goes from noise to the picture at the pace of the noise schedule; pred_x0 is a clean
# guess from the start and sharpens. Every lesson shows this view for what it changes.

# %%
show_trace(result.trace, title=f"{prompt!r}, DPM++ 2M, 20 steps: {pipe.source}")

# %%
trace_gif(result.trace, OUT / "trace.gif")

# %% [markdown]
# ## One knob at a time
#
# The same seed through four samplers (lessons 02 to 04), and through four guidance scales (lesson 08):

# %%
samplers = ("ddim", "euler_a", "dpmpp_2m", "unipc")
image_grid([pipe(prompt, sampler=s, steps=20, seed=0, progress=False).images[0] for s in samplers])

# %%
image_grid([pipe(prompt, guidance_scale=w, steps=20, seed=0, progress=False).images[0] for w in (1, 3, 7.5, 12)])

# %% [markdown]
# ## The package: the folder listing is the architecture
#
# One file per component, each small enough to read in one sitting. The first line of each file's docstring:

# %%
package = Path(minidiff.__file__).parent
for path in sorted(package.glob("*.py")):
    docstring = ast.get_docstring(ast.parse(path.read_text())) or ""
    lines = len(path.read_text().splitlines())
    print(f"{path.name:22s} {lines:4d} lines  {docstring.splitlines()[0] if docstring else ''}")

# %% [markdown]
# ## The command line
#
# `minidiff generate "a big red circle at the top left" --model shapes --trace trace.gif` does the above from a
# shell; `minidiff samplers`, `minidiff models`, `minidiff info MODEL`, `minidiff download NAME`, `minidiff bench`.
# The same entry point, called from Python:

# %%
for command in (["samplers"], ["models"]):
    minidiff_cli(command)

# %% [markdown]
# ## The milestones: your checklist for the course
#
# Each lesson asks you to write a few functions in your workbook (`minidiff course init workbook` writes one
# file per lesson, each function a blank that raises NotImplementedError) and checks them with a milestone, which
# compares your function with the reference and names the usual mistake when they differ:
# `minidiff milestones --workbook workbook` prints ✓ passed, ✗ failed or ○ to do for each. `--reference` runs the
# same checks, and the course checklist, on minidiff itself (here without `compile`, which needs a C++ compiler
# and a minute):

# %%
exit_status = milestones(["--reference", "--skip", "compile"])  # 0: none failed

# %% [markdown]
# Next: lesson 01, the forward process, where the noise comes from. Torch and minidiff versions for the record:

# %%
print(f"torch {torch.__version__}, minidiff {minidiff.__version__}, {torch.get_num_threads()} CPU threads")
