"""Fine-tuning a pipeline on a folder of captioned pictures: a LoRA (Hu et al. 2021) or a new word (textual
inversion, Gal et al. 2022), written as the files that `load_lora` / `load_textual_inversion` read back.

    minidiff train lora FOLDER --out my-lora.safetensors [--rank 4] [--steps 300] [--resume FILE]
    minidiff train lora FOLDER --token "<my-word>" --out my-lora.safetensors    # pivotal tuning: word + UNet LoRA
    minidiff train textual-inversion FOLDER --token "<my-word>" --out my-word.safetensors [--init-word circle]

The folder (kohya's layout): each picture (.png, .jpg, .jpeg, .webp, .bmp) beside a caption file of the same name
with the extension .txt, UTF-8, one caption (red_1.png + red_1.txt). Pictures are resized to the model's size.

The loss is the one the model was trained with (Ho et al. 2020; Rombach et al. 2022, eq. 2), the networks frozen:
    || target - model(alpha_t z + sigma_t eps, t, c) ||^2,   target = eps (or v = alpha_t eps - sigma_t z)
with z a picture's VAE posterior mean times scaling_factor (encoded once), t ~ U{0, ..., 999}, c the text encoder's
states for its caption. Only the LoRA matrices (beside every linear layer of the UNet's attention blocks and of the
text encoder's layers) or the new word's embedding rows are trained, by AdamW. A LoRA with a token is pivotal
tuning (the recipe of cloneofsimo's lora and diffusers' advanced DreamBooth script): the new word's rows and a LoRA
on the UNet alone train together, the text encoder's weights untouched, so that a prompt without the word gets
exactly the text states it had; the file carries the word's rows as kohya does (bundle_emb.<token>.string_to_param.*).

Notation:
    z, latents      -> the pictures' latents;  t, noise -> t, eps;  ids -> the captions' token ids
    global batch    -> the `batch` (picture, t, eps) triples drawn for one step, the same on every process; a
                       shard is one process's slice of it (minidiff.distributed), and `batch_loss` is its loss

A checkpoint is one safetensors file, rewritten every `save_every` steps: the trained tensors, AdamW's moments, the
step, the random generator and the losses so far; its header holds the settings, which a resume must repeat (only
`steps` may change), so that k steps, then a resume to 2k, equal 2k steps in one go.
"""

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from minidiff import distributed
from minidiff.checks import check_choice, check_float, check_int, check_seed, check_text, shown
from minidiff.embeddings import add_word, bundle_key
from minidiff.errors import CheckpointError, InputError, MinidiffError
from minidiff.files import atomic_save
from minidiff.images import from_pil
from minidiff.lora import BUNDLE_PREFIX, LoRA, LoRALayer, lora_targets, read_file

METHODS = ("lora", "textual_inversion")
PICTURE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
TRAINED = "trained"  # the name of the LoRA being trained among the pipeline's LoRAs
CHECKPOINT_KIND = "minidiff fine-tuning checkpoint"
RESUMABLE = ("steps", "save_every")  # the settings a resume may change


@dataclass
class FinetuneConfig:
    method: str = "lora"  # lora | textual_inversion
    steps: int = 300  # optimizer steps in all (a resume may raise it)
    batch: int = 16  # pictures per step: the global batch
    lr: float | None = None  # AdamW's learning rate after warm-up (None: 1e-3 for lora, 3e-5 for pivotal, 5e-3 word)
    word_lr: float = 5e-3  # pivotal tuning (lora with a token): the learning rate of the word's rows
    warmup: int = 20  # steps of linear warm-up, then constant: a resume can go on past `steps`
    rank: int = 4  # lora: the inner width r of each update
    alpha: float | None = None  # lora: the file's alpha (None: = rank, so that alpha / rank = 1)
    token: str | None = None  # the new word, as written in the captions ("<my-word>"); lora: pivotal tuning
    vectors: int = 1  # embedding rows of the word (each takes one of the 77 positions)
    init_word: str | None = None  # start the word from this word's embedding (None: the table's mean)
    seed: int = 0  # the LoRA's initial matrices and every draw of the training
    save_every: int = 100  # steps between checkpoints

    def check(self) -> "FinetuneConfig":
        """Every setting in range, one line naming the first that is not; fills in the default learning rate."""
        check_choice("method", self.method, METHODS)
        check_int("steps", self.steps, 1, 10**7)
        check_int("batch", self.batch, 1, 4096, "a larger batch does not fit in memory anyway")
        if self.lr is None:  # pivotal: the word learns the new thing, the UNet's LoRA only touches it up (README)
            self.lr = 5e-3 if self.method == "textual_inversion" else 3e-5 if self.token is not None else 1e-3
        check_float("learning rate", self.lr, 1e-8, 1.0, "e.g. 1e-3")
        check_float("word learning rate", self.word_lr, 1e-8, 1.0, "e.g. 5e-3")
        check_int("warmup", self.warmup, 0, 10**7)
        check_int("rank", self.rank, 1, 1024, "LoRA ranks are small: 4 to 128")
        check_float("alpha", self.alpha, 1e-6, 1e6, "alpha = rank is the usual choice", optional=True)
        check_int("vectors", self.vectors, 1, 16, "each vector takes one of the prompt's 77 positions")
        check_seed(self.seed)
        check_int("save_every", self.save_every, 1, 10**7)
        if self.method == "textual_inversion" or self.token is not None:
            check_text("token", self.token)
            if not self.token.strip() or self.token != self.token.strip() or " " in self.token:
                raise InputError(f"the new word must be one word without spaces, such as <my-word>, got "
                                 f"{shown(self.token)!r}")
            check_text("init word", self.init_word, optional=True)
        return self

    @property
    def pivotal(self) -> bool:
        """A LoRA on the UNet trained together with a new word (the text encoder untouched)."""
        return self.method == "lora" and self.token is not None

    def settings(self) -> dict:
        """What a resume must repeat."""
        return {k: v for k, v in asdict(self).items() if k not in RESUMABLE}


# --- the data: a folder of pictures and captions -----------------------------------------------------------


def read_folder(folder) -> tuple[list[Path], list[str]]:
    """The pictures of a training folder, sorted by name, and their captions (whitespace collapsed)."""
    check_text("the training folder", str(folder))
    folder = Path(folder)
    if not folder.is_dir():
        raise InputError(f"the training data {shown(folder)} is not a folder: give a folder of pictures, each with a "
                         "caption file of the same name (red_1.png + red_1.txt)")
    pictures = sorted(p for p in folder.iterdir() if p.suffix.lower() in PICTURE_SUFFIXES and p.is_file())
    if not pictures:
        raise InputError(f"{shown(folder)} holds no pictures ({', '.join(PICTURE_SUFFIXES)}): put the training "
                         "pictures there, each with a caption file of the same name (red_1.png + red_1.txt)")
    captions, owners = [], {}
    for picture in pictures:
        caption_file = picture.with_suffix(".txt")
        if caption_file in owners:
            raise InputError(f"{shown(owners[caption_file].name)} and {shown(picture.name)} share the caption file "
                             f"{shown(caption_file.name)}: give each picture its own name")
        owners[caption_file] = picture
        if not caption_file.is_file():
            raise InputError(f"the picture {shown(picture)} has no caption: write it in {shown(caption_file)} (one "
                             "line of UTF-8 text)")
        try:
            text = " ".join(caption_file.read_bytes().decode("utf-8").split())
        except UnicodeDecodeError:
            raise InputError(f"the caption {shown(caption_file)} is not UTF-8 text: save it as UTF-8") from None
        if not text:
            raise InputError(f"the caption {shown(caption_file)} is empty: write what the picture shows in it")
        captions.append(text)
    return pictures, captions


def fingerprint(pictures: list, captions: list) -> str:
    """A hash of the pictures' bytes and the captions: a resume must train on the same data."""
    digest = hashlib.sha256()
    for picture, caption in zip(pictures, captions):
        digest.update(picture.read_bytes() + b"\0" + caption.encode() + b"\0")
    return digest.hexdigest()[:16]


@torch.no_grad()
def encode_pictures(pipe, pictures: list, batch: int = 32) -> torch.Tensor:
    """Scaled latents z (n, 4, size/8, size/8) of the pictures, resized to the model's size: posterior means."""
    size = pipe.default_size()
    pixels = torch.cat([from_pil(picture, size, size) for picture in pictures])
    latents = [pipe.vae.encode(pixels[i : i + batch].to(pipe.device, pipe.dtype)) for i in range(0, len(pixels), batch)]
    return torch.cat(latents) * pipe.vae.scaling_factor


# --- what is trained: LoRA matrices, or a word's embedding rows --------------------------------------------


def trained_here(component: str, path: str, layer: nn.Module) -> bool:
    """The layers a trained LoRA sits beside: the UNet's attention blocks' linears, the text encoder layers'."""
    if not isinstance(layer.base if isinstance(layer, LoRALayer) else layer, nn.Linear):
        return False
    return ".attentions." in f".{path}" if component == "unet" else ".encoder.layers." in f".{path}"


def attach_lora(pipe, rank: int, alpha: float, generator: torch.Generator, text_encoder: bool = True) -> dict:
    """A new LoRA beside each trained layer (of the UNet, and of the text encoder if asked): down uniform in
    +-1/sqrt(in) (as nn.Linear starts), up zero (so the model starts unchanged). Returns {kohya key: parameter},
    the names the file is written with."""
    params = {}
    for prefix, component in (("lora_unet_", "unet"), ("lora_te_", "text_encoder"))[: 2 if text_encoder else 1]:
        model = getattr(pipe, component)
        for path, layer in lora_targets(model).items():
            if not trained_here(component, path, layer):
                continue
            if isinstance(layer, LoRALayer) and (layer.fused or TRAINED in layer.loras):
                raise MinidiffError(f"the pipeline has a LoRA named {TRAINED!r} or fused LoRAs: train on a "
                                    "pipeline without them (unload_lora() first)")
            if not isinstance(layer, LoRALayer):
                parent, _, child = path.rpartition(".")
                layer = LoRALayer(layer)
                setattr(model.get_submodule(parent), child, layer)
            base = layer.base
            down = (torch.rand(rank, base.in_features, generator=generator) * 2 - 1) / math.sqrt(base.in_features)
            lora = LoRA(base, down, torch.zeros(base.out_features, rank), alpha).requires_grad_(True)
            layer.loras[TRAINED], layer.scales[TRAINED] = lora, 1.0
            name = prefix + path.replace(".", "_")
            params[f"{name}.lora_down.weight"], params[f"{name}.lora_up.weight"] = lora.down.weight, lora.up.weight
    return params


class NewRows(nn.Module):
    """An embedding table whose rows from `first` on are the trainable `vectors`; the rows before stay frozen."""

    def __init__(self, table: nn.Embedding, first: int, vectors: torch.Tensor):
        super().__init__()
        self.table, self.first = table.requires_grad_(False), first
        self.vectors = nn.Parameter(vectors.clone())

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        new = (ids >= self.first)[..., None]
        rows = self.vectors[(ids - self.first).clamp(0, len(self.vectors) - 1)]
        return torch.where(new, rows, self.table(ids))

    def merged(self) -> nn.Embedding:
        """The plain table with the trained rows written in."""
        with torch.no_grad():
            self.table.weight[self.first :] = self.vectors
        return self.table


def attach_word(pipe, token: str, vectors: int, init_word: str | None) -> dict:
    """Add `token` to the tokenizer with `vectors` trainable rows, started at init_word's mean embedding (or the
    table's mean). Returns {"vectors": parameter}."""
    table = pipe.text_encoder.text_model.embeddings.token_embedding
    if init_word is not None:
        ids = pipe.tokenizer.encode(init_word)
        if not ids:
            raise InputError(f"the init word {shown(init_word)!r} has no tokens: give a word such as 'circle'")
        start = table.weight[ids].mean(0)
    else:
        start = table.weight.mean(0)
    ids = add_word(pipe.tokenizer, pipe.text_encoder, token, start.detach().expand(vectors, -1))
    embeddings = pipe.text_encoder.text_model.embeddings
    embeddings.token_embedding = NewRows(embeddings.token_embedding, ids[0], start.detach().expand(vectors, -1))
    return {"vectors": embeddings.token_embedding.vectors}


# --- one step -------------------------------------------------------------------------------------------


def draw_batch(generator: torch.Generator, pictures: int, batch: int, timesteps: int, latent_shape) -> tuple:
    """A global batch: picture indices, timesteps t and noises eps, drawn on the CPU from the one generator."""
    index = torch.randint(pictures, (batch,), generator=generator)
    t = torch.randint(timesteps, (batch,), generator=generator)
    noise = torch.randn((batch, *latent_shape), generator=generator)
    return index, t, noise


def batch_loss(pipe, latents: torch.Tensor, ids: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The diffusion loss of one batch (or one process's shard of it): mean of (prediction - target)^2."""
    x_t = pipe.schedule.add_noise(latents, noise, t)
    prediction = pipe.unet(x_t, t, pipe.text_encoder(ids))
    target = noise
    if pipe.prediction_type == "v_prediction":  # v = alpha_t eps - sigma_t z
        alpha, sigma = (s.to(latents).reshape(-1, 1, 1, 1) for s in pipe.schedule.alpha_sigma(t))
        target = alpha * noise - sigma * latents
    return F.mse_loss(prediction, target)


def learning_rate(step: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak` over `warmup` steps, then constant."""
    return peak * min(1.0, (step + 1) / warmup) if warmup else peak


# --- checkpoints: everything a resume needs, in one safetensors file ------------------------------------


def save_checkpoint(path, params: dict, optimizer, step: int, generator, losses: list, header: dict) -> None:
    """The trained tensors, AdamW's moments and step count, the generator's state and the losses, after `step`."""
    from safetensors.torch import save_file

    state = {f"trained.{name}": p.detach().cpu().contiguous() for name, p in params.items()}
    for name, p in params.items():
        for key, value in optimizer.state.get(p, {}).items():
            state[f"adamw.{name}.{key}"] = value.detach().cpu().contiguous()
    state["generator"] = generator.get_state()
    state["losses"] = torch.tensor(losses, dtype=torch.float64)
    metadata = {"kind": CHECKPOINT_KIND, "step": str(step), **{k: json.dumps(v) for k, v in header.items()}}
    atomic_save(path, lambda tmp: save_file(state, tmp, metadata=metadata))


def load_checkpoint(path, params: dict, optimizer, generator, header: dict) -> tuple[int, list]:
    """Restore a checkpoint written with the same settings and data; returns (step, losses)."""
    state, metadata = read_file(path)
    if metadata.get("kind") != CHECKPOINT_KIND:
        raise CheckpointError(f"{shown(path)} is not a minidiff fine-tuning checkpoint: give the file that "
                              "`minidiff train` wrote with --checkpoint")
    for key, value in header.items():
        theirs = json.loads(metadata.get(key, "null"))
        if key == "settings":
            changed = [k for k in value if theirs is None or value[k] != theirs.get(k)]
            if changed:
                was = "?" if theirs is None else theirs.get(changed[0])
                raise CheckpointError(f"{shown(path)} was trained with {changed[0]} = {was!r}, this run asks for "
                                      f"{value[changed[0]]!r}: resume with the same settings (only --steps may "
                                      "change), or start afresh without --resume")
        elif theirs != value:
            raise CheckpointError(f"{shown(path)} was trained on other {key} ({theirs}, now {value}): resume with "
                                  f"the same {key}, or start afresh without --resume")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(state[f"trained.{name}"])
            moments = {key.rpartition(".")[2]: value for key, value in state.items()
                       if key.startswith(f"adamw.{name}.")}
            if moments:
                optimizer.state[p] = {k: v.to(p.device) if k != "step" else v for k, v in moments.items()}
    generator.set_state(state["generator"])
    return int(metadata["step"]), state["losses"].tolist()


# --- outputs -------------------------------------------------------------------------------------------


def save_adapter(path, params: dict, config: FinetuneConfig, token: str | None = None) -> None:
    """The LoRA as a kohya file (lora_unet_* / lora_te_*, with alpha; a pivotal word as bundle_emb.<token>.*), or
    the word as a diffusers embedding file ({token: (vectors, width)})."""
    from safetensors.torch import save_file

    if config.method == "lora":
        alpha = float(config.alpha or config.rank)
        state = {name: p.detach().cpu().contiguous() for name, p in params.items()}
        state |= {name.removesuffix(".lora_down.weight") + ".alpha": torch.tensor(alpha)
                  for name in params if name.endswith(".lora_down.weight")}
        metadata = {"ss_network_module": "networks.lora", "ss_network_dim": str(config.rank),
                    "ss_network_alpha": str(alpha)}
    else:
        state, metadata = {token: params["vectors"].detach().cpu().contiguous()}, {}
    atomic_save(path, lambda tmp: save_file(state, tmp, metadata=metadata | {"format": "pt"}))


def plot_losses(path, losses: list, title: str) -> None:
    """The loss of every step and its running mean, log scale, as a PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    window = max(1, len(losses) // 30)
    smooth = [sum(losses[i - window + 1 : i + 1]) / window for i in range(window - 1, len(losses))]
    figure, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(range(1, len(losses) + 1), losses, alpha=0.3, lw=0.6, label="per step")
    ax.plot(range(window, len(losses) + 1), smooth, label=f"mean of {window}")
    ax.set(title=title, xlabel="optimizer step", ylabel="diffusion loss (MSE)", yscale="log")
    ax.legend()
    figure.tight_layout()
    atomic_save(path, lambda tmp: figure.savefig(tmp, format="png", dpi=100))
    plt.close(figure)


# --- the run -------------------------------------------------------------------------------------------


def check_pipeline(pipe) -> None:
    if getattr(pipe, "sdxl", None) is not None:
        raise MinidiffError("training LoRAs and words works on SD 1.x / 2.x pipelines; SDXL's two text encoders and "
                            "size conditioning are not covered yet")
    if pipe.dtype != torch.float32:
        raise MinidiffError(f"the pipeline is {str(pipe.dtype).removeprefix('torch.')}: train in float32 (load it "
                            "with dtype=torch.float32); half-precision training needs loss scaling")
    if pipe.prediction_type not in ("epsilon", "v_prediction"):
        raise MinidiffError(f"the model predicts {pipe.prediction_type!r}: training supports epsilon and "
                            "v_prediction models")


def finetune(pipe, folder, config: FinetuneConfig, out, checkpoint=None, resume=None, loss_curve=None,
             progress: bool = True) -> dict:
    """Train a LoRA or a new word on the pictures of `folder`, write it to `out` (and the checkpoint, the loss
    curve); the pipeline keeps it (the LoRA attached as "trained", the word in its tokenizer). Returns a log."""
    from tqdm.auto import tqdm

    config.check()
    distributed.check_divisible(config.batch, "--batch")
    check_pipeline(pipe)
    pictures, captions = read_folder(folder)
    if config.token is not None and not any(config.token in caption for caption in captions):
        raise InputError(f"no caption in {shown(folder)} contains the new word {shown(config.token)}: write it "
                         "where it belongs, e.g. 'a photo of " + shown(config.token) + "'")
    header = {"settings": config.settings(), "data": fingerprint(pictures, captions), "model": str(pipe.source)}
    for model in (pipe.unet, pipe.vae, pipe.text_encoder):
        model.requires_grad_(False)
    generator = torch.Generator().manual_seed(config.seed)
    params = {}
    if config.token is not None:  # textual inversion, or the word of pivotal tuning
        word = attach_word(pipe, config.token, config.vectors, config.init_word)["vectors"]
        params[bundle_key(config.token) if config.pivotal else "vectors"] = word
    if config.method == "lora":
        params |= attach_lora(pipe, config.rank, float(config.alpha or config.rank), generator,
                              text_encoder=not config.pivotal)
    latents = encode_pictures(pipe, pictures)
    ids = pipe.tokenizer(captions).to(pipe.device)
    step_loss = distributed.wrap(distributed.LossModule(
        lambda z, c, t, noise: batch_loss(pipe, z, c, t, noise), unet=pipe.unet, text_encoder=pipe.text_encoder))
    is_word = {name: name == "vectors" or name.startswith(BUNDLE_PREFIX) for name in params}
    words = [p for name, p in params.items() if is_word[name]]
    others = [p for name, p in params.items() if not is_word[name]]
    groups = [{"params": others, "peak": config.lr}] if others else []
    groups += [{"params": words, "peak": config.word_lr if config.pivotal else config.lr}] if words else []
    optimizer = torch.optim.AdamW(groups, lr=config.lr, weight_decay=0.0)
    step, losses = 0, []
    if resume is not None:
        step, losses = load_checkpoint(resume, params, optimizer, generator, header)
        if step >= config.steps:
            raise InputError(f"the checkpoint {shown(resume)} is at step {step} already: ask for more --steps")
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(range(step, config.steps), initial=step, total=config.steps,
               disable=not (progress and distributed.is_main()), desc=f"train {config.method.replace('_', ' ')}")
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, group["peak"], config.warmup)
        index, t, noise = distributed.shard(draw_batch(generator, len(latents), config.batch,
                                                       pipe.schedule.num_train_timesteps, latents.shape[1:]))
        loss = step_loss(latents[index], ids[index], t.to(pipe.device), noise.to(pipe.device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(params.values()), 1.0)
        optimizer.step()
        losses.append(distributed.all_mean(loss.item()))
        bar.set_postfix(loss=f"{sum(losses[-20:]) / len(losses[-20:]):.4f}")
        due = (step + 1) % config.save_every == 0 or step + 1 == config.steps
        if checkpoint is not None and due and distributed.is_main():
            save_checkpoint(checkpoint, params, optimizer, step + 1, generator, losses, header)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    for p in params.values():
        p.requires_grad_(False)
    if config.token is not None:
        embeddings = pipe.text_encoder.text_model.embeddings
        embeddings.token_embedding = embeddings.token_embedding.merged()
    if distributed.is_main():
        save_adapter(out, params, config, config.token)
    if loss_curve is not None and distributed.is_main():
        plot_losses(loss_curve, losses, f"{config.method.replace('_', ' ')} on {len(pictures)} pictures")
    tail = losses[-50:]
    return {"method": config.method, "steps": config.steps, "pictures": len(pictures), "seconds": seconds,
            "cpu_seconds": cpu_seconds, "final_loss": sum(tail) / len(tail), "losses": losses}
