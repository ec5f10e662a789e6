"""Train the bundled shapes model from scratch: the VAE first, then the text encoder and the UNet together.

    python -m minidiff.course.train shapes [--steps N] [--vae-steps N] [--out weights/shapes] [--quick] [--seed 0]

Latent diffusion (Rombach et al. 2022) at toy scale, on minidiff.course.shapes: 64x64 pictures <-> 8x8x4 latents.
    phase 1  the VAE: L1 + MSE reconstruction (shape pixels weighted up) + kl_weight * KL(q(z|x) || N(0, I)),
             on 32x32 windows and, for the last vae_full_steps, whole pictures; then frozen, and
             scaling_factor = 1 / std(z) over the training pictures, as SD's 0.18215 was found
    phase 2  the text encoder and the UNet, jointly, on the epsilon loss of Ho et al. 2020:
             || eps - eps_theta(alpha_t z + sigma_t eps, t, c) ||^2, t ~ U{0, ..., 999} on SD's schedule; the
             caption is replaced by "" 10% of the time, so that one network also serves as the unconditional
             model of classifier-free guidance (Ho & Salimans 2022); plus grounding_weight times the token loss
             of TokenCompose (Wang et al. 2024) on the colour and shape words' attention (minidiff.course.grounding)
    output   a diffusers folder (model_index.json, unet/ vae/ text_encoder/ tokenizer/ scheduler/), its loss
             curve (loss_curve.png) and train_log.json (configs, timings per phase, losses, held-out adherence)

Notation:
    z, latents      -> the VAE posterior means of the training pictures, times scaling_factor
    t, noise, x_t   -> t, eps, x_t = alpha_t z + sigma_t eps (NoiseSchedule.add_noise)
    context         -> c, the text encoder's hidden states for the (possibly dropped) caption

Every random draw comes from the seed: the same command on the same machine writes the same weights.

Under `torchrun --nproc_per_node N` (minidiff.distributed) every process draws each whole global batch (pictures,
windows, t, eps) from the same seed and trains on its 1/N of the rows; DistributedDataParallel averages the
gradients, so the steps are one process's on the whole batch, and rank 0 alone writes the folder and the log.
"""

import argparse
import json
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from minidiff import distributed
from minidiff.clip import CLIPTextConfig, CLIPTextModel
from minidiff.config import to_diffusers
from minidiff.course import shapes
from minidiff.course.evaluate import evaluate
from minidiff.course.grounding import grounded_tokens, shape_cells, with_grounding
from minidiff.files import atomic_save, atomic_write_text
from minidiff.hub import bundled_path
from minidiff.schedule import NoiseSchedule
from minidiff.tokenizer import MAX_LENGTH, CLIPTokenizer, write_vocab_files
from minidiff.unet import UNet, UNetConfig
from minidiff.vae import AutoencoderKL, VAEConfig

DEFAULT_OUT = bundled_path("shapes")
SCHEDULER_CONFIG = {  # SD's training schedule, sampled as SD's pipelines do by default
    "_class_name": "DPMSolverMultistepScheduler",
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
    "timestep_spacing": "leading",
    "steps_offset": 1,
}


@dataclass
class TrainConfig:
    vae: VAEConfig = field(default_factory=VAEConfig)
    unet: UNetConfig = field(default_factory=UNetConfig)
    text_encoder: CLIPTextConfig = field(default_factory=CLIPTextConfig)
    pool_size: int = 20000  # training pictures, rendered once and encoded once
    vae_steps: int = 2000  # phase 1 optimizer steps
    vae_batch: int = 32
    vae_lr: float = 1e-3
    vae_full_steps: int = 1000  # the last phase 1 steps see whole pictures (vae_batch // 4 of them), not windows
    background_windows: float = 0.25  # fraction of VAE windows taken anywhere, not around the shape
    shape_weight: float = 10.0  # reconstruction weight of a shape pixel relative to a background pixel
    kl_weight: float = 1e-4
    steps: int = 3000  # phase 2 optimizer steps
    batch: int = 128
    lr: float = 1e-3
    warmup: int = 100  # steps of linear warm-up, then cosine decay to zero (both phases)
    caption_dropout: float = 0.1  # fraction of captions replaced by "" (the unconditional prompt)
    grounding_weight: float = 0.02  # of the colour and shape words' attention on the shape (course.grounding)
    seed: int = 0
    eval_prompts: int = 256  # held-out prompts generated after training
    eval_steps: int = 20  # DPM++ 2M steps per picture
    guidance_scale: float = 5.0

    @classmethod
    def shapes(cls) -> "TrainConfig":
        """The bundled model, under 30 MB of weights (stored in fp16), sized to train in under 45 minutes on 2 CPU
        cores. Measured on 2 cores (AMD EPYC; Intel Xeon with AMX): the VAE phase ~6 (11) steps/s, the UNet + text
        encoder phase 0.84 (0.60) s/step."""
        return cls(
            vae=VAEConfig(block_out_channels=(16, 32, 64, 64), layers_per_block=1, norm_num_groups=8),
            unet=UNetConfig(block_out_channels=(48, 96), cross_attention=(True, True), layers_per_block=1,
                            num_attention_heads=(4, 8), cross_attention_dim=96, norm_num_groups=16,
                            sample_size=8),
            text_encoder=CLIPTextConfig(hidden_size=96, intermediate_size=384, num_hidden_layers=2,
                                        num_attention_heads=4),
            vae_steps=4500, steps=2100,
        )

    @classmethod
    def quick(cls) -> "TrainConfig":
        """Tiny networks and a few steps: the smoke test of the whole command (seconds)."""
        return cls(
            vae=VAEConfig(block_out_channels=(8, 8, 8, 8), layers_per_block=1, norm_num_groups=4),
            unet=UNetConfig(block_out_channels=(16, 16), cross_attention=(True, True), layers_per_block=1,
                            num_attention_heads=(2, 2), cross_attention_dim=16, norm_num_groups=4, sample_size=8),
            text_encoder=CLIPTextConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2),
            pool_size=64, vae_steps=3, vae_full_steps=1, vae_batch=8, steps=3, batch=8, warmup=1, eval_prompts=4,
            eval_steps=2,
        )


def learning_rate(step: int, total: int, peak: float, warmup: int) -> float:
    """Linear warm-up to `peak`, then cosine decay to zero (Loshchilov & Hutter 2017)."""
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return peak * 0.5 * (1 + math.cos(math.pi * progress))


def to_images(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> float32 in [-1, 1]."""
    return pixels.float() / 127.5 - 1


def render_pool(n: int, seed: int, split: str = "train"):
    """n pictures of a split as uint8 (n, 3, 64, 64) and their specs (the captions are drawn fresh each step)."""
    rng = np.random.default_rng(seed)
    specs = shapes.random_specs(n, rng, split)
    pixels = np.stack([np.asarray(shapes.render(spec, rng)) for spec in specs])
    return torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(), specs


# --- phase 1: the autoencoder ------------------------------------------------------------------------------

CROP = 32  # the VAE trains on 32x32 windows: a quarter of the cost of a picture, and mostly shape...
# ...but a decoder trained only on windows decodes whole pictures with the wrong colours (measured: 100% right
# colour on windows, 80% on whole pictures): its GroupNorm statistics and mid-block attention are computed over
# a picture that is mostly background. So the last vae_full_steps steps train on whole pictures.
SHAPE_WINDOW = (0, 16, 32)  # per grid row / column: the window origin that holds any shape there
LATTICE = (0, 8, 16, 24, 32)  # window origins on the 8-pixel latent lattice, as the encoder sees a picture


def window_origins(specs: list, generator: torch.Generator, background_fraction: float) -> list:
    """(top, left) of each training window: the one around the shape, or (sometimes) any lattice window."""
    origins = []
    for spec in specs:
        if torch.rand((), generator=generator) < background_fraction:
            top, left = (LATTICE[int(i)] for i in torch.randint(len(LATTICE), (2,), generator=generator))
        else:
            row, col = divmod(shapes.POSITIONS.index(spec.position), 3)
            top, left = SHAPE_WINDOW[row], SHAPE_WINDOW[col]
        origins.append((top, left))
    return origins


def crop(pixels: torch.Tensor, origins: list) -> torch.Tensor:
    """The CROP x CROP windows of a batch of pictures at the given (top, left) origins."""
    return torch.stack([p[:, top : top + CROP, left : left + CROP] for p, (top, left) in zip(pixels, origins)])


def vae_loss(vae: AutoencoderKL, images: torch.Tensor, config: TrainConfig, generator: torch.Generator | None = None,
             noise: torch.Tensor | None = None):
    """Weighted L1 + MSE reconstruction of a posterior sample, plus kl_weight * KL(q(z|x) || N(0, I)). The
    sample's eps is `noise` (B, latent_channels, H/8, W/8), drawn from `generator` when not given."""
    mean, logvar = vae.quant_conv(vae.encoder(images)).chunk(2, dim=1)
    logvar = logvar.clamp(-30.0, 20.0)
    if noise is None:
        noise = torch.randn(mean.shape, generator=generator)
    z = mean + torch.exp(0.5 * logvar) * noise
    error = vae.decode(z) - images
    background = torch.tensor(shapes.BACKGROUND, dtype=images.dtype).view(1, 3, 1, 1) / 127.5 - 1
    on_shape = ((images - background).abs().amax(dim=1, keepdim=True) > 0.05).float()
    weight = 1 + (config.shape_weight - 1) * on_shape
    reconstruction = (weight * (error.abs() + error**2)).mean()
    kl = 0.5 * (mean**2 + logvar.exp() - 1 - logvar).sum(dim=(1, 2, 3)).mean()
    return reconstruction + config.kl_weight * kl


def latent_shape(vae: AutoencoderKL, images: torch.Tensor) -> tuple:
    """(B, latent_channels, H / f, W / f) of a batch of pictures, f = 2 ** (levels - 1) (8 for SD's VAE)."""
    f = 2 ** (len(vae.config.block_out_channels) - 1)
    return len(images), vae.config.latent_channels, images.shape[-2] // f, images.shape[-1] // f


def train_vae(vae: AutoencoderKL, pixels: torch.Tensor, specs: list, config: TrainConfig, progress=True) -> list:
    """Phase 1: fit the VAE on windows of the pool's pictures; returns the loss of every step (of the whole
    global batch when distributed: each process trains on its shard)."""
    generator = torch.Generator().manual_seed(config.seed + 1)
    vae.to(memory_format=torch.channels_last)  # about twice as fast for the CPU's convolutions
    step_loss = distributed.wrap(distributed.LossModule(
        lambda images, noise: vae_loss(vae, images, config, noise=noise), vae=vae))
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0, foreach=True)
    losses = []
    vae.train()
    bar = tqdm(range(config.vae_steps), desc="vae", disable=not (progress and distributed.is_main()))
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config.vae_steps, config.vae_lr, config.warmup)
        if step < config.vae_steps - config.vae_full_steps:  # a window around the shape: 4x cheaper
            index = torch.randint(len(pixels), (config.vae_batch,), generator=generator)
            origins = window_origins([specs[i] for i in index], generator, config.background_windows)
            images = crop(pixels[index], origins)
        else:  # whole pictures: GroupNorm and attention statistics as at inference
            images = pixels[torch.randint(len(pixels), (max(1, config.vae_batch // 4),), generator=generator)]
        noise = torch.randn(latent_shape(vae, images), generator=generator)
        images, noise = distributed.shard((images, noise))  # this process's rows of the global batch
        loss = step_loss(to_images(images).contiguous(memory_format=torch.channels_last), noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP: the gradient averaged over the processes, i.e. the whole batch's
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        losses.append(distributed.all_mean(loss.item()))
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    vae.eval()
    return losses


@torch.no_grad()
def encode_pool(vae: AutoencoderKL, pixels: torch.Tensor, batch: int = 256) -> torch.Tensor:
    """Unscaled posterior means z of every picture in the pool, (n, 4, 8, 8)."""
    vae.eval()
    return torch.cat([vae.encode(to_images(pixels[i : i + batch])) for i in range(0, len(pixels), batch)])


@torch.no_grad()
def reconstruction_adherence(vae: AutoencoderKL, n: int, seed: int) -> dict:
    """The checker's verdict on VAE reconstructions of n held-out pictures: the ceiling of the whole model."""
    pixels, specs = render_pool(n, seed + 4, "held_out")
    return shapes.adherence(list(vae.decode(vae.encode(to_images(pixels)))), specs)


# --- phase 2: text encoder + UNet ------------------------------------------------------------------------


def diffusion_loss(unet, text_encoder, ids, latents, schedule: NoiseSchedule, generator):
    """|| eps - eps_theta(x_t, t, c) ||^2 with t uniform over the training timesteps."""
    t = torch.randint(schedule.num_train_timesteps, (len(latents),), generator=generator)
    noise = torch.randn(latents.shape, generator=generator)
    return denoising_loss(unet, text_encoder, ids, latents, t, noise, schedule)


def denoising_loss(unet, text_encoder, ids, latents, t, noise, schedule: NoiseSchedule):
    """diffusion_loss with t and eps given."""
    x_t = schedule.add_noise(latents, noise, t)
    return F.mse_loss(unet(x_t, t, text_encoder(ids)), noise)


def train_diffusion(unet, text_encoder, tokenizer, latents, specs, cells, config: TrainConfig, progress=True) -> list:
    """Phase 2: the UNet and the text encoder from scratch, with caption dropout, on the noise loss plus the
    grounding loss of the colour and shape words in the pictures' shape `cells` (n, H, W) bool; returns every
    step's loss (of the whole global batch when distributed: each process trains on its shard)."""
    generator = torch.Generator().manual_seed(config.seed + 2)
    rng = np.random.default_rng(config.seed + 3)  # caption wording and dropout
    schedule = NoiseSchedule.sd()
    noise_loss = lambda ids, x0, t, noise: denoising_loss(unet, text_encoder, ids, x0, t, noise, schedule)
    objective = with_grounding(noise_loss, unet, config.grounding_weight)
    step_loss = distributed.wrap(distributed.LossModule(objective, unet=unet, text_encoder=text_encoder))
    parameters = list(unet.parameters()) + list(text_encoder.parameters())
    optimizer = torch.optim.AdamW(parameters, lr=config.lr, weight_decay=0.01, foreach=True)
    losses = []
    unet.train(), text_encoder.train()
    bar = tqdm(range(config.steps), desc="unet + text encoder", disable=not (progress and distributed.is_main()))
    for step in bar:
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, config.steps, config.lr, config.warmup)
        index = torch.randint(len(latents), (config.batch,), generator=generator)
        captions = ["" if rng.random() < config.caption_dropout else shapes.caption(specs[i], rng) for i in index]
        t = torch.randint(schedule.num_train_timesteps, (config.batch,), generator=generator)  # as diffusion_loss
        noise = torch.randn((config.batch, *latents.shape[1:]), generator=generator)
        tokens = grounded_tokens(tokenizer, captions, [specs[i] for i in index])
        batch = (tokenizer(captions), latents[index], t, noise, tokens, cells[index])
        loss = step_loss(*distributed.shard(batch), float(tokens.sum()) / distributed.world_size())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()  # under DDP: the gradient averaged over the processes, i.e. the whole batch's
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        losses.append(distributed.all_mean(loss.item()))
        bar.set_postfix(loss=f"{np.mean(losses[-50:]):.4f}")
    unet.eval(), text_encoder.eval()
    return losses


# --- saving: the diffusers folder layout -------------------------------------------------------------------


def save_weights(module: torch.nn.Module, path: Path, dtype: torch.dtype) -> None:
    from safetensors.torch import save_file

    state = {key: value.detach().to(dtype).contiguous() for key, value in module.state_dict().items()}
    atomic_save(path, lambda tmp: save_file(state, str(tmp), metadata={"format": "pt"}))


def write_json(path: Path, data: dict) -> None:
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")


def save_folder(out, vae: AutoencoderKL, unet: UNet, text_encoder: CLIPTextModel, dtype=torch.float32) -> Path:
    """Write the model as diffusers' StableDiffusionPipeline.save_pretrained would lay it out."""
    out = Path(out)
    for name in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        (out / name).mkdir(parents=True, exist_ok=True)
    torch_dtype = str(dtype).removeprefix("torch.")
    write_json(out / "unet" / "config.json", to_diffusers(unet.config))
    save_weights(unet, out / "unet" / "diffusion_pytorch_model.safetensors", dtype)
    write_json(out / "vae" / "config.json", to_diffusers(vae.config) | {"sample_size": 64})
    save_weights(vae, out / "vae" / "diffusion_pytorch_model.safetensors", dtype)
    text_config = to_diffusers(text_encoder.config) | {
        "model_type": "clip_text_model", "bos_token_id": 49406, "eos_token_id": 49407, "pad_token_id": 49407,
        "torch_dtype": torch_dtype,
    }
    write_json(out / "text_encoder" / "config.json", text_config)
    save_weights(text_encoder, out / "text_encoder" / "model.safetensors", dtype)
    write_vocab_files(out / "tokenizer")
    special = {"bos_token": "<|startoftext|>", "eos_token": "<|endoftext|>", "unk_token": "<|endoftext|>",
               "pad_token": "<|endoftext|>"}
    write_json(out / "tokenizer" / "special_tokens_map.json", special)
    write_json(out / "tokenizer" / "tokenizer_config.json",
               special | {"tokenizer_class": "CLIPTokenizer", "model_max_length": MAX_LENGTH, "do_lower_case": True})
    write_json(out / "scheduler" / "scheduler_config.json", SCHEDULER_CONFIG)
    write_json(out / "model_index.json", {
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", SCHEDULER_CONFIG["_class_name"]],
        "safety_checker": [None, None],
        "feature_extractor": [None, None],
        "requires_safety_checker": False,
    })
    return out


def folder_megabytes(out) -> float:
    return sum(p.stat().st_size for p in Path(out).rglob("*.safetensors")) / 2**20


# --- the whole run -----------------------------------------------------------------------------------------


def train(config: TrainConfig, out=DEFAULT_OUT, progress: bool = True, threads: int | None = 2) -> dict:
    """Both phases, save the folder and its loss curve, evaluate the saved model; returns the training log.
    Under torchrun (after minidiff.distributed.setup) every process trains on its shard of each global batch and
    rank 0 alone saves, evaluates and writes the log; the others return an empty log."""
    from minidiff.course.viz import plot_losses
    from minidiff.load import load_components
    from minidiff.pipeline import Pipeline

    for name, size in (("batch", config.batch), ("vae_batch", config.vae_batch),
                       ("vae_batch // 4 (whole pictures)", max(1, config.vae_batch // 4))):
        distributed.check_divisible(size, name)  # every global batch splits evenly over the processes
    if threads:
        torch.set_num_threads(threads)
    out = Path(out)
    if distributed.is_main():
        out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(config.seed)  # the initial weights
    vae, unet = AutoencoderKL(config.vae), UNet(config.unet)
    text_encoder = CLIPTextModel(config.text_encoder)
    tokenizer = CLIPTokenizer.default()
    timings, start = {}, time.perf_counter()

    pixels, specs = render_pool(config.pool_size, config.seed)
    timings["render pool"] = time.perf_counter() - start

    start = time.perf_counter()
    vae_losses = train_vae(vae, pixels, specs, config, progress)
    vae.requires_grad_(False)
    z = encode_pool(vae, pixels)  # every process encodes the whole pool: each needs all of it for its draws
    if distributed.is_main():
        reconstruction = reconstruction_adherence(vae, config.eval_prompts, config.seed)
        tqdm.write(f"VAE reconstructions of {config.eval_prompts} held-out pictures: {reconstruction}")
    vae.config.scaling_factor = float(1 / z.std())
    timings["phase 1: vae"] = time.perf_counter() - start

    start = time.perf_counter()
    diffusion_losses = train_diffusion(unet, text_encoder, tokenizer, z * vae.scaling_factor, specs,
                                       shape_cells(pixels), config, progress)
    timings["phase 2: unet + text encoder"] = time.perf_counter() - start
    if not distributed.is_main():
        return {}
    save_folder(out, vae, unet, text_encoder, dtype=torch.float16)  # fp16 files: half the size, loaded as fp32
    atomic_save(out / "loss_curve.png", lambda tmp: plot_losses(vae_losses, diffusion_losses).savefig(tmp, dpi=100))
    timings["total training"] = sum(timings.values())

    start = time.perf_counter()
    parts = load_components(out)  # judge what was shipped, as it will be loaded
    pipeline = Pipeline(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, parts.schedule)
    scores, _ = evaluate(pipeline, config.eval_prompts, config.eval_steps, config.guidance_scale, config.seed)
    timings["evaluation"] = time.perf_counter() - start

    log = {
        "config": asdict(config),
        "scaling_factor": vae.scaling_factor,
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "threads": torch.get_num_threads(),
        "processes": distributed.world_size(),
        "torch": torch.__version__,
        "final_loss": {"vae": float(np.mean(vae_losses[-100:])), "diffusion": float(np.mean(diffusion_losses[-100:]))},
        "weights_mb": round(folder_megabytes(out), 2),
        "vae_reconstruction_adherence": reconstruction,
        "held_out_adherence": scores,
        "losses": {"vae": vae_losses, "diffusion": diffusion_losses},  # every step's, of the whole global batch
    }
    write_json(out / "train_log.json", log)
    return log


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m minidiff.course.train", description=__doc__.splitlines()[0])
    parser.add_argument("model", choices=["shapes"], help="what to train (the bundled shapes model)")
    parser.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: weights/shapes)")
    parser.add_argument("--steps", type=int, help="phase 2 (UNet + text encoder) steps")
    parser.add_argument("--vae-steps", type=int, help="phase 1 (VAE) steps")
    parser.add_argument("--seed", type=int, help="the one seed of the whole run")
    parser.add_argument("--quick", action="store_true", help="tiny networks, a few steps: a smoke test")
    parser.add_argument("--threads", type=int,
                        help="torch CPU threads per process (default 2, shared out among torchrun's processes)")
    args = parser.parse_args(argv)
    config = TrainConfig.quick() if args.quick else TrainConfig.shapes()
    for name, value in (("steps", args.steps), ("vae_steps", args.vae_steps), ("seed", args.seed)):
        if value is not None:
            if value < 0 or (name != "seed" and value < 1):
                parser.error(f"--{name.replace('_', '-')} must be a positive integer, got {value}")
            setattr(config, name, value)
    if args.threads is not None and args.threads < 1:
        parser.error(f"--threads must be a positive integer, got {args.threads}")
    threads = args.threads or max(1, 2 // int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    distributed.setup("cpu")
    try:
        log = train(config, args.out, threads=threads)
    finally:
        distributed.teardown()
    if log:  # rank 0
        keys = ("timings_s", "final_loss", "weights_mb", "held_out_adherence")
        print(json.dumps({k: log[k] for k in keys}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
