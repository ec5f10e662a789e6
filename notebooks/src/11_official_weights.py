# Source of notebooks/11_official_weights.ipynb: build it with `python notebooks/build.py`.
# ruff: noqa: E402, E501  (imports after Markdown cells; long equations in Markdown)

# %% [markdown]
# # Lesson 11: the official weights, in both layouts, and SD 1.5 on your own machine
#
# Stable Diffusion checkpoints come in two layouts: the **diffusers folder** (one folder per component, each
# with a `config.json` and a `.safetensors` file) and the **original single file** (CompVis' three networks in
# one `.safetensors`, under `model.diffusion_model.`, `first_stage_model.` and `cond_stage_model.`). minidiff
# reads both, strictly: every missing, unexpected or wrong-shape tensor is named. Read beside
# `course/11_official_weights.md`, `minidiff/load.py`, `minidiff/keymap.py` and `minidiff/hub.py`.
#
# Nothing can be downloaded here, so the notebook writes a miniature SD 1.5 (random weights, SD 1.5's layout and
# key names) in both layouts itself, loads both, and checks that they generate the same picture.

# %%
import json
from pathlib import Path

import torch
from IPython.display import display
from safetensors.torch import load_file, save_file

from minidiff import hub, keymap
from minidiff.clip import CLIPTextConfig, CLIPTextModel
from minidiff.config import to_diffusers
from minidiff.course.notebook import use
from minidiff.course.viz import show_images, show_trace
from minidiff.errors import CheckpointError
from minidiff.load import load_unet
from minidiff.pipeline import load_pipeline
from minidiff.tokenizer import write_vocab_files
from minidiff.unet import UNet, UNetConfig
from minidiff.vae import AutoencoderKL, VAEConfig

OUT = Path("out") / "11_official_weights"
OUT.mkdir(parents=True, exist_ok=True)

# %% [markdown]
# ## On real weights (runs when you have downloaded them)
#
# ```bash
# minidiff download sd15                 # 4.3 GB once, into the Hugging Face cache (or --variant fp16: 2.1 GB)
# minidiff generate "an astronaut riding a horse" --model sd15 --steps 25 --trace trace.gif
# ```
#
# From Python, the cell below does the same: it only *looks* in the local cache (`hub.local_path` never goes
# online) and is skipped when SD 1.5 is not there, as on the machine that checks these notebooks.

# %%
folder = hub.local_path("sd15")
if folder is None:
    print("SD 1.5 is not in the local Hugging Face cache: `minidiff download sd15` fetches it (4.3 GB)")
else:
    device = "cuda" if torch.cuda.is_available() else "cpu"
    sd15 = load_pipeline("sd15", dtype=torch.float16 if device == "cuda" else torch.float32, device=device)
    prompt = "an astronaut riding a horse, photograph"
    result = sd15(prompt, steps=25, seed=0, trace=True)
    display(show_images(result.images, [prompt], size=5.0, title="SD 1.5, DPM++ 2M, 25 steps, seed 0"))
    display(show_trace(result.trace, title="SD 1.5, DPM++ 2M, 25 steps"))
    # the original single file works the same: load_pipeline("path/to/v1-5-pruned-emaonly.safetensors")

# %% [markdown]
# ## A miniature SD 1.5
#
# SD 1.5's architecture at a fraction of the width: the same block types, 8 attention heads, a CLIP text encoder
# with quick-GELU, a VAE with 8x downsampling. The widths are chosen so that the single-file loader can read the
# architecture back from the tensor shapes alone, as it does for the real file (SD 1.x: 8 heads, GroupNorm of 32
# groups, text heads of 64 channels).

# %%
torch.manual_seed(0)
unet = UNet(UNetConfig(block_out_channels=(32, 64, 64, 64), num_attention_heads=(8, 8, 8, 8),
                       cross_attention_dim=64, sample_size=8)).eval()
vae = AutoencoderKL(VAEConfig(block_out_channels=(32, 32, 64, 64), layers_per_block=1)).eval()
text_encoder = CLIPTextModel(CLIPTextConfig(hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                            num_attention_heads=1)).eval()
for name, module in (("unet", unet), ("vae", vae), ("text_encoder", text_encoder)):
    print(f"{name:13s} {sum(p.numel() for p in module.parameters()):>9,} parameters, "
          f"{len(module.state_dict())} tensors, e.g. {next(iter(module.state_dict()))}")

# %% [markdown]
# ## Layout 1: the diffusers folder
#
# What `StableDiffusionPipeline.save_pretrained` writes, file by file. minidiff's attribute names *are* the
# diffusers keys, so each component is its `state_dict()` as it is.

# %%
diffusers_folder = OUT / "mini-sd15"
for name, module, config, weights in (
    ("unet", unet, to_diffusers(unet.config), "diffusion_pytorch_model.safetensors"),
    ("vae", vae, to_diffusers(vae.config), "diffusion_pytorch_model.safetensors"),
    ("text_encoder", text_encoder, to_diffusers(text_encoder.config), "model.safetensors"),
):
    (diffusers_folder / name).mkdir(parents=True, exist_ok=True)
    (diffusers_folder / name / "config.json").write_text(json.dumps(config, indent=2))
    save_file({k: v.contiguous() for k, v in module.state_dict().items()}, diffusers_folder / name / weights)
write_vocab_files(diffusers_folder / "tokenizer")
(diffusers_folder / "scheduler").mkdir(exist_ok=True)
(diffusers_folder / "scheduler" / "scheduler_config.json").write_text(json.dumps({
    "_class_name": "DPMSolverMultistepScheduler", "num_train_timesteps": 1000, "beta_start": 0.00085,
    "beta_end": 0.012, "beta_schedule": "scaled_linear", "prediction_type": "epsilon",
    "timestep_spacing": "leading", "steps_offset": 1}, indent=2))
(diffusers_folder / "model_index.json").write_text(json.dumps({
    "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
    "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
    "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "DPMSolverMultistepScheduler"]},
    indent=2))
for path in sorted(diffusers_folder.rglob("*")):
    if path.is_file():
        print(f"{str(path.relative_to(diffusers_folder)):52s} {path.stat().st_size / 1024:8.0f} KiB")

# %% [markdown]
# ## Layout 2: the original single file
#
# The CompVis layout names the same tensors differently (`input_blocks.1.0.in_layers.2` for
# `down_blocks.0.resnets.0.conv1`), puts the VAE's attention projections in 1x1 convolutions, and prefixes each
# network. `minidiff.keymap` holds the map as a short list of per-block rules, computed from the config, in both
# directions: `to_original` here, `from_original` when loading.

# %%
single = {}
for component, module, config in (("unet", unet, to_diffusers(unet.config)),
                                  ("vae", vae, to_diffusers(vae.config)),
                                  ("clip", text_encoder, to_diffusers(text_encoder.config))):
    for key, tensor in keymap.to_original(module.state_dict(), component, config).items():
        single[keymap.PREFIXES[component] + key] = tensor.contiguous()
single_file = OUT / "mini-sd15.safetensors"
save_file(single, single_file)
print(f"{single_file.name}: {len(single)} tensors, {single_file.stat().st_size / 2**20:.1f} MiB")
examples = ("down_blocks.0.resnets.0.conv1.weight", "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight")
for diffusers_key in examples:
    original = next(k for k, v in single.items() if k.startswith("model.diffusion_model.")
                    and v.shape == unet.state_dict()[diffusers_key].shape
                    and torch.equal(v, unet.state_dict()[diffusers_key]))
    print(f"{diffusers_key:62s} <- {original}")

# %% [markdown]
# Your turn, in your workbook's lesson_11.py: `rename_keys(state, rules)` takes the UNet's original names back to
# diffusers' through the same rules (`keymap.unet_rules(config)`), and `load_unet(folder)` reads a diffusers
# `unet/` folder. Where a function is still blank, the reference runs (and says so).

# %%
mine = use(11)
prefix = keymap.PREFIXES["unet"]
original_unet = {key[len(prefix):]: value for key, value in single.items() if key.startswith(prefix)}
renamed = mine.rename_keys(original_unet, keymap.unet_rules(to_diffusers(unet.config)))
print(f"{len(renamed)} UNet keys renamed; exactly the diffusers names: {set(renamed) == set(unet.state_dict())}")
for name in ("rename_keys", "load_unet"):
    print(mine.check(name))

# %% [markdown]
# ## Load both, generate, compare
#
# `load_pipeline` builds each network on the `meta` device (no memory, no random initialisation), checks every
# key and shape against the file, then adopts the memory-mapped tensors (`load_state_dict(assign=True)`). For the
# single file it first reads the architecture from the tensor shapes (`keymap.infer_unet_config`, ...).

# %%
pipes = {"diffusers folder": load_pipeline(diffusers_folder, dtype=torch.float32, device="cpu"),
         "single file": load_pipeline(single_file, dtype=torch.float32, device="cpu")}
for name, pipe in pipes.items():
    config = pipe.unet.config
    print(f"{name:16s} UNet read back: channels {config.block_out_channels}, heads {config.num_attention_heads}, "
          f"text dim {config.cross_attention_dim}")
for component in ("unet", "vae", "text_encoder"):
    states = [getattr(pipe, component).state_dict() for pipe in pipes.values()]
    same = states[0].keys() == states[1].keys() and all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    print(f"{component:13s} the two layouts give bit-identical tensors: {same}")
results = {name: pipe("a red circle", steps=10, seed=0, height=64, width=64, trace=True, progress=False)
           for name, pipe in pipes.items()}
difference = (results["diffusers folder"].latents - results["single file"].latents).abs().max()
print(f"max |folder - single file| of the generated latents after 10 steps: {float(difference):.1e} (fp32)")

# %% [markdown]
# Identical weights, yet not bit-identical latents: CPU kernels round float32 sums differently depending on where
# the tensors sit in memory (the two loads memory-map different files; a `clone()` of the same weights differs by
# about $10^{-6}$ per UNet call too), and ten sampler steps carry it along. The parity tests use the same kind of
# tolerance.

# %%
show_trace(results["single file"].trace, title="loaded from the single file (random weights: noise-like pictures)")

# %% [markdown]
# ## Strict and loud
#
# A checkpoint that does not fit is reported by name, with what it likely means, never half-loaded. Two common
# cases: a damaged file missing a tensor, and the right file with the wrong architecture (here, an SD 2.x UNet
# config, whose text width is 1024, for an SD 1.x file).

# %%
broken = OUT / "broken-unet"
(broken).mkdir(exist_ok=True)
(broken / "config.json").write_text((diffusers_folder / "unet" / "config.json").read_text())
state = load_file(diffusers_folder / "unet" / "diffusion_pytorch_model.safetensors")
del state["down_blocks.1.attentions.0.proj_out.weight"]
save_file(state, broken / "diffusion_pytorch_model.safetensors")
for attempt in (lambda: load_unet(broken),
                lambda: load_unet(single_file, config=UNetConfig(block_out_channels=(32, 64, 64, 64),
                                                                 cross_attention_dim=1024))):
    try:
        attempt()
    except CheckpointError as error:
        print(f"CheckpointError: {error}\n")

# %%
show_images([results["diffusers folder"].images[0], results["single file"].images[0]],
            ["diffusers folder", "single file"], size=2.0, title="the same seed from both layouts")

# %% [markdown]
# **Milestone:** `minidiff milestones --only load_unet` (your loader: a diffusers `unet/` folder into a model
# called as `unet(x, t, context)`). That is the course: from here, `minidiff download sd15` and lesson 00's
# first image, on the real thing.
