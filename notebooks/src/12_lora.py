# Source of notebooks/12_lora.ipynb: build it with `python notebooks/build.py`.
# ruff: noqa: E402, E501  (imports after Markdown cells; long equations in Markdown)

# %% [markdown]
# # Lesson 12: adapters: LoRA as a low-rank update, textual inversion as a new row
#
# $$W' = W + s\,\frac{\alpha}{r}\,BA,\qquad B\in\mathbb R^{d_\text{out}\times r},\ A\in\mathbb R^{r\times d_\text{in}},\ r\ll d\qquad\text{(Hu et al. 2021)}$$
#
# Two ways to teach a frozen Stable Diffusion something new with a file of a few megabytes. A **LoRA** adds a
# low-rank matrix to the weights of many layers; a **textual inversion** adds one new word: a new row of the text
# encoder's token-embedding table (Gal et al. 2022). Read beside `course/12_lora.md`, `minidiff/lora.py` and
# `minidiff/embeddings.py`.
#
# | code name | symbol | shape |
# |---|---|---|
# | `down`, `up` | $A$, $B$ (PEFT's lora_A / lora_B, kohya's lora_down / lora_up) | $(r, d_\text{in})$, $(d_\text{out}, r)$ |
# | `rank`, `alpha` | $r$, $\alpha$ | numbers in the file; no alpha means $\alpha = r$ |
# | `scale` | $s$ | yours: `load_lora(path, scale=0.8)`, `--lora file:0.8` |

# %%
import time
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from minidiff.course.notebook import use
from minidiff.course.viz import course_pipeline, show_images
from minidiff.embeddings import add_word
from minidiff.lora import LoRA, LoRALayer, lora_targets

OUT = Path("out") / "12_lora"
OUT.mkdir(parents=True, exist_ok=True)
generator = torch.Generator().manual_seed(0)

# %% [markdown]
# ## Re-implement it: the LoRA forward and the merge
#
# Unfused, a LoRA layer computes $y = xW^\top + b + s\frac{\alpha}{r}(xA^\top)B^\top$: two thin matmuls beside the
# big one. Fused, the same map is one matmul with $W' = W + s\frac{\alpha}{r}BA$. Write both in your workbook's
# `lesson_12.py` (`minidiff course init workbook`): `lora_forward` and `lora_merge`. Where one is still blank, the
# reference runs in its place and the milestone says "to do".

# %%
mine = use(12)  # your lesson_12.py: lora_forward, lora_merge (the reference where still blank)

base = nn.Linear(320, 320)  # the shape of SD 1.5's first to_q
down, up = 0.1 * torch.randn(4, 320, generator=generator), 0.1 * torch.randn(320, 4, generator=generator)
x = torch.randn(8, 320, generator=generator)

layer = LoRALayer(base)  # the library's layer: base beside a dict of LoRAs, each with its scale
layer.loras["demo"], layer.scales["demo"] = LoRA(base, down, up, alpha=2.0), 0.8
with torch.no_grad():
    library = layer(x)
    yours = mine.lora_forward(x, base.weight, base.bias, down, up, alpha=2.0, scale=0.8)
    merged = nn.functional.linear(x, mine.lora_merge(base.weight, down, up, alpha=2.0, scale=0.8), base.bias)
print(f"max |lora_forward - LoRALayer| = {float((yours - library).abs().max()):.1e}")
print(f"max |merged weight - unfused| = {float((merged - library).abs().max()):.1e}")
print(mine.check("lora_forward"))  # the milestones: ✓, ✗ with the mistake named, or ○ to do
print(mine.check("lora_merge"))

# %% [markdown]
# ## Why "low rank": what the update can and cannot do
#
# $BA$ is a $320\times320$ matrix of rank at most 4: every output of the update lies in the 4-dimensional span of
# $B$'s columns. That is the bet of LoRA: fine-tuning changes a weight along few directions. It is also why the
# file is small: $r(d_\text{in} + d_\text{out})$ numbers instead of $d_\text{in}d_\text{out}$.

# %%
with torch.no_grad():
    delta = mine.lora_merge(base.weight, down, up, alpha=2.0, scale=0.8) - base.weight
singular_values = torch.linalg.svdvals(delta.detach())
print("rank of the update:", int(torch.linalg.matrix_rank(delta.detach())))
print("its largest singular values:", [round(float(s), 3) for s in singular_values[:6]])
print(f"numbers: full update {320 * 320:,}, LoRA rank 4 {4 * (320 + 320):,}")

# %% [markdown]
# ## Use it: a LoRA file on the shapes model
#
# No LoRA for the shapes model can be downloaded here, so we write one: random matrices in the kohya layout
# (`lora_unet_<module path with _>.lora_down.weight`, `.lora_up.weight`, `.alpha`) for the UNet's cross-attention
# keys and values, the layers that read the prompt. Its pictures show what a scale does, not a style.

# %%
pipe = course_pipeline()
state = {}
for path, module in lora_targets(pipe.unet).items():
    if path.endswith(("attn2.to_k", "attn2.to_v")):
        name = "lora_unet_" + path.replace(".", "_")
        state[f"{name}.lora_down.weight"] = 0.3 * torch.randn(4, module.in_features, generator=generator)
        state[f"{name}.lora_up.weight"] = 0.3 * torch.randn(module.out_features, 4, generator=generator)
        state[f"{name}.alpha"] = torch.tensor(4.0)
save_file(state, OUT / "random_style.safetensors")
print(f"{len(state) // 3} layers, {sum(v.numel() for v in state.values()):,} numbers")

prompt = "a red circle in the middle"
images, titles = [], []
for scale in (0.0, 0.5, 1.0, 2.0):
    pipe.load_lora(OUT / "random_style.safetensors", scale=scale)
    images += pipe(prompt, steps=10, seed=0, progress=False).images
    titles.append(f"scale {scale}")
    pipe.unload_lora()
show_images(images, titles, title=prompt)

# %% [markdown]
# ## Fuse and unfuse
#
# Unfused, every LoRA layer does two extra matmuls per call; fused, the model costs what it cost before. Unfusing
# puts the saved weights back bit for bit.

# %%
def seconds_per_unet_call(repeats=10):
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0]), pipe.encode_prompt([prompt, ""])
    with torch.no_grad():
        pipe.unet(x, t, context)
        start = time.perf_counter()
        for _ in range(repeats):
            pipe.unet(x, t, context)
    return (time.perf_counter() - start) / repeats


before = {k: v.clone() for k, v in pipe.unet.state_dict().items()}
plain = seconds_per_unet_call()
pipe.load_lora(OUT / "random_style.safetensors", scale=1.0)
unfused = seconds_per_unet_call()
pipe.fuse_lora()
fused = seconds_per_unet_call()
pipe.unfuse_lora()
pipe.unload_lora()
after = pipe.unet.state_dict()
print(f"ms per UNet call: plain {1000 * plain:.1f}, LoRA unfused {1000 * unfused:.1f}, fused {1000 * fused:.1f}")
restored = all(torch.equal(after[k], v) for k, v in before.items())
print("weights after fuse, unfuse, unload equal the originals:", restored)

# %% [markdown]
# ## Textual inversion: a new row of the embedding table
#
# The text encoder starts by looking every token id up in a table, `token_embedding`, of shape
# (49408, width). A new word is a new id at the end of the vocabulary and a new row at the end of the table; the
# tokenizer maps the word, written exactly, to that id. As a first experiment, give the new word `<zorb>` a copy of
# the row of "red": the model then reads "a <zorb> circle" as "a red circle".

# %%
table = pipe.text_encoder.text_model.embeddings.token_embedding.weight
red = pipe.tokenizer.encode("red")[0]
save_file({"<zorb>": table[red].detach().clone()}, OUT / "zorb.safetensors")  # diffusers' learned_embeds layout
pipe.load_textual_inversion(OUT / "zorb.safetensors")
print("ids of 'a <zorb> circle':", pipe.tokenizer.encode("a <zorb> circle"), " table rows:",
      pipe.text_encoder.text_model.embeddings.token_embedding.num_embeddings)
same = pipe.encode_prompt(["a <zorb> circle"]) - pipe.encode_prompt(["a red circle"])
print(f"max |encoded('a <zorb> circle') - encoded('a red circle')| = {float(same.abs().max()):.1e}")

# %% [markdown]
# ## Learning the row
#
# Real textual inversion learns the row from a few pictures, through the UNet's denoising loss, with everything
# else frozen. A quick stand-in that runs in seconds: learn the row of a second new word, `<blorp>`, so that
# "a <blorp> square" encodes like "a green square": gradient descent on one row of 49410, the text encoder frozen.

# %%
start = table[pipe.tokenizer.encode("shape")[0]].detach().clone()  # begin from a neutral word's row
[blorp] = add_word(pipe.tokenizer, pipe.text_encoder, "<blorp>", start[None])
embedding = pipe.text_encoder.text_model.embeddings.token_embedding
pipe.text_encoder.requires_grad_(False)
embedding.weight.requires_grad_(True)
others = torch.arange(embedding.num_embeddings) != blorp
target, ids = pipe.encode_prompt(["a green square"]), pipe.tokenizer(["a <blorp> square"])
optimizer = torch.optim.Adam([embedding.weight], lr=0.05)
for step in range(200):
    loss = (pipe.text_encoder(ids) - target).pow(2).mean()
    optimizer.zero_grad()
    loss.backward()
    embedding.weight.grad[others] = 0  # only the new row learns: Adam moves a row with zero gradients not at all
    optimizer.step()
    if step % 50 == 0 or step == 199:
        print(f"step {step:3d}  loss {loss.item():.2e}")
embedding.weight.requires_grad_(False)

green = embedding.weight[pipe.tokenizer.encode("green")[0]]
print(f"cosine(<blorp>, green) = {float(nn.functional.cosine_similarity(embedding.weight[blorp], green, dim=0)):.2f}, "
      f"cosine(start, green) = {float(nn.functional.cosine_similarity(start, green, dim=0)):.2f}")
prompts = ["a square", "a green square", "a <blorp> square"]
show_images([pipe(p, steps=10, seed=1, progress=False).images[0] for p in prompts], prompts)

# %% [markdown]
# ## What to remember
#
# * A LoRA is $W + s\frac{\alpha}{r}BA$ on many layers; unfused it runs beside them, fused it is free.
# * A textual inversion is one new row (or a few) of the token-embedding table, and nothing else.
# * The same file loads into diffusers and into minidiff with the same result (`tests/parity/test_lora.py`).
