"""Text-to-image and image-to-image: a prompt in, a picture out, and a view of how it formed.

Notation (Rombach et al. 2022, latent diffusion; Ho & Salimans 2022, classifier-free guidance):
    context           -> c, the text encoder's hidden states for the prompt (B, 77, width)
    uncond            -> the hidden states of the negative (or empty) prompt
    guidance_scale    -> w: eps = eps_uncond + w (eps_cond - eps_uncond); w <= 1 means no guidance
    guidance_rescale  -> phi (Lin et al. 2023, eq. 16): mix the guided prediction rescaled to the
                         conditional one's standard deviation, to undo over-exposure at high w
    latents           -> z = vae.encode(image) * scaling_factor: the space the UNet works in
    strength          -> img2img: the fraction of the steps run, starting from the image noised to
                         the first of them (strength 0 returns the image, 1 ignores it)
"""

import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from minidiff.errors import MinidiffError
from minidiff.samplers import SAMPLERS, sample


@dataclass
class TraceStep:
    """One sampler step, decoded: the latent x_t (x_inter) and the model's clean prediction pred_x0."""

    step: int
    timestep: float
    x_inter: list  # PIL images, one per generated image
    pred_x0: list


@dataclass
class GenerationResult:
    images: list  # PIL images
    latents: torch.Tensor  # the final latents (scaled, what the UNet works in)
    trace: list = field(default_factory=list)  # TraceStep per step, when trace=True


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> PIL images."""
    array = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in array.permute(0, 2, 3, 1).cpu().numpy()]


def from_pil(image, height=None, width=None) -> torch.Tensor:
    """A PIL image (or path) -> (1, 3, H, W) in [-1, 1], resized to (height, width) if given."""
    if not isinstance(image, Image.Image):
        try:
            image = Image.open(image)
            image.load()
        except (OSError, ValueError) as e:
            raise MinidiffError(f"cannot read the input image {image!r}: {e}. Give a PNG or JPEG file.") from None
    image = image.convert("RGB")
    if height and width and image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    array = np.asarray(image, dtype=np.float32) / 127.5 - 1
    return torch.from_numpy(array).permute(2, 0, 1)[None]


class Pipeline:
    """Stable Diffusion from its parts: tokenizer, text encoder, UNet, VAE (or TAESD), noise schedule."""

    def __init__(self, unet, vae, text_encoder, tokenizer, schedule, prediction_type="epsilon", taesd=None,
                 spacing="leading", steps_offset=1, source=None, guidance_scale: float = 7.5):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.schedule, self.prediction_type, self.taesd = schedule, prediction_type, taesd
        self.spacing, self.steps_offset, self.source = spacing, steps_offset, source
        self.guidance_scale = guidance_scale  # the default w: SD's 7.5, or what a model was tuned for
        self.vae_tile_size = None  # decode in tiles of this many latent pixels (set by minidiff.speed.optimize)

    def describe(self) -> str:
        """Architecture, parameter counts, dtype and source, for `minidiff info`."""
        lines = [f"model:       {self.source}", f"prediction:  {self.prediction_type}",
                 f"schedule:    {self.schedule.beta_schedule} {self.schedule.beta_start}..{self.schedule.beta_end}, "
                 f"{self.spacing} spacing, steps_offset {self.steps_offset}",
                 f"image size:  {self.default_size()} px (latent {self.unet.config.sample_size})"]
        for name in ("unet", "vae", "text_encoder", "taesd"):
            module = getattr(self, name)
            if module is not None:
                count = sum(p.numel() for p in module.parameters())
                dtype = next(module.parameters()).dtype
                lines.append(f"{name + ':':13s}{type(module).__name__}, {count:,} parameters, {dtype}")
        return "\n".join(lines)

    @property
    def device(self):
        return next(self.unet.parameters()).device

    @property
    def dtype(self):
        return next(self.unet.parameters()).dtype

    def latent_channels(self) -> int:
        return self.unet.config.in_channels

    # --- the three stages ----------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompts: list) -> torch.Tensor:
        """Token ids -> the text encoder's hidden states; warns when a prompt is cut at 77 tokens."""
        ids = self.tokenizer(prompts)
        for prompt in prompts:
            dropped = len(self.tokenizer.dropped_tokens(prompt))
            if dropped:
                warnings.warn(
                    f"the prompt is longer than the text encoder's 77 positions: its last {dropped} "
                    f"token(s) were dropped ({prompt[:40]!r}...)",
                    stacklevel=3,
                )
        return self.text_encoder(ids.to(self.device)).to(self.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, decoder=None) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] with the VAE (or TAESD, or the decoder given)."""
        decoder = decoder or self.taesd or self.vae
        if decoder is self.vae and self.vae_tile_size:
            return decoder.decode(latents / decoder.scaling_factor, tile_size=self.vae_tile_size)
        return decoder.decode(latents / decoder.scaling_factor)

    @torch.no_grad()
    def encode_image(self, image, height, width, generator) -> torch.Tensor:
        """An image -> scaled latents, drawn from the VAE's posterior with `generator` (as diffusers does)."""
        pixels = from_pil(image, height, width).to(self.device, self.dtype)
        latent = self.vae.encode(pixels, generator=generator, sample=True)
        return latent * self.vae.scaling_factor

    def guided_model(self, context, uncond, guidance_scale: float, guidance_rescale: float = 0.0):
        """The function (x_t, t) -> prediction the samplers call: one batched UNet call for CFG."""
        if guidance_scale <= 1.0:  # no guidance: the conditional prediction alone
            return lambda x, t: self.unet(x, t, context)
        both = torch.cat([uncond, context])

        def model(x, t):
            pred_uncond, pred_cond = self.unet(torch.cat([x, x]), t, both).chunk(2)
            guided = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
            if guidance_rescale > 0:
                dims = list(range(1, guided.ndim))
                rescaled = guided * (pred_cond.std(dim=dims, keepdim=True) / guided.std(dim=dims, keepdim=True))
                guided = guidance_rescale * rescaled + (1 - guidance_rescale) * guided
            return guided

        return model

    # --- the call ------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt=None, steps: int = 20, sampler: str = "dpmpp_2m",
                 guidance_scale: float | None = None, seed: int | None = None, height: int | None = None,
                 width: int | None = None, num_images: int = 1, image=None, strength: float = 0.8,
                 early_exit=None, preview: str | None = None, callback=None, trace: bool = False,
                 guidance_rescale: float = 0.0, latents: torch.Tensor | None = None,
                 progress: bool = True, **sampler_options) -> GenerationResult:
        """Generate images. See the module docstring for the symbols; returns a GenerationResult."""
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
        negatives = negative_prompt if isinstance(negative_prompt, list) else [negative_prompt or ""] * len(prompts)
        height, width = height or self.default_size(), width or self.default_size()
        self.check_options(steps, sampler, height, width, strength, num_images, len(negatives), len(prompts), preview)
        batch = len(prompts) * num_images
        prompts = [p for p in prompts for _ in range(num_images)]
        negatives = [n for n in negatives for _ in range(num_images)]

        context = self.encode_prompt(prompts)
        uncond = self.encode_prompt(negatives) if guidance_scale > 1.0 else None
        model = self.guided_model(context, uncond, guidance_scale, guidance_rescale)

        # all randomness from one CPU generator: the same seed gives the same image on any device
        generator = torch.Generator().manual_seed(seed if seed is not None else int(torch.seed() % 2**63))
        shape = (batch, self.latent_channels(), height // 8, width // 8)
        init = self.encode_image(image, height, width, generator).expand(shape) if image is not None else None
        noise = latents if latents is not None else torch.randn(shape, generator=generator)
        noise = noise.to(self.device, self.dtype)

        timesteps = sampler_options.pop("timesteps", None)
        sampler_options.setdefault("spacing", self.spacing)
        sampler_options.setdefault("steps_offset", self.steps_offset)
        first_step = 0
        if image is not None:  # img2img: the last `strength` of the sampler's own grid, from the image noised there
            n_grid = len(timesteps) if timesteps is not None else steps
            first_step = n_grid - min(int(n_grid * strength), n_grid)  # diffusers' t_start
            if first_step == n_grid:  # strength 0: nothing to denoise
                return self.finish(init, [], preview)

        recorded = []

        def on_step(**info):
            if trace:
                recorded.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in info.items()})
            if callback is not None:
                callback(**info)

        final = sample(model, noise, sampler=sampler, steps=steps, prediction_type=self.prediction_type,
                       schedule=self.schedule, timesteps=timesteps, generator=generator, callback=on_step,
                       early_exit=early_exit, progress=progress, first_step=first_step, x0=init, **sampler_options)
        return self.finish(final, recorded, preview)

    def finish(self, latents, recorded, preview) -> GenerationResult:
        images = to_pil(self.decode(latents, self.vae))
        decoder = self.taesd if preview == "taesd" else self.vae
        trace = [
            TraceStep(r["step"], float(r["timestep"]), to_pil(self.decode(r["x"], decoder)),
                      to_pil(self.decode(r["pred_x0"], decoder)))
            for r in recorded
        ]
        return GenerationResult(images, latents, trace)

    def default_size(self) -> int:
        return 8 * self.unet.config.sample_size

    def check_options(self, steps, sampler, height, width, strength, num_images, n_neg, n_prompts, preview):
        if not isinstance(steps, int) or steps < 1:
            raise MinidiffError(f"steps must be a positive integer, got {steps!r}")
        if sampler not in SAMPLERS:
            raise MinidiffError(f"unknown sampler {sampler!r}. Valid names: {', '.join(sorted(SAMPLERS))}")
        for name, size in (("height", height), ("width", width)):
            if size < 8 or size % 8:
                fix = max(8, 8 * round(size / 8))
                raise MinidiffError(f"{name} must be a positive multiple of 8 (the VAE downsamples by 8), "
                                    f"got {size}: try {fix}")
        if not 0.0 <= strength <= 1.0:
            raise MinidiffError(f"strength must be between 0 and 1 (the fraction of steps run), got {strength}")
        if num_images < 1:
            raise MinidiffError(f"num_images must be at least 1, got {num_images}")
        if n_neg != n_prompts:
            raise MinidiffError(f"{n_prompts} prompts but {n_neg} negative prompts: give one per prompt")
        if preview not in (None, "vae", "taesd"):
            raise MinidiffError(f"preview must be 'vae' or 'taesd', got {preview!r}")
        if preview == "taesd" and self.taesd is None:
            raise MinidiffError("preview='taesd' needs a TAESD: load_pipeline(..., taesd=path or 'taesd')")


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_pipeline(path_or_name="shapes", dtype=None, device=None, taesd=None, variant=None,
                  prediction_type=None, **speed_options) -> Pipeline:
    """A ready pipeline from a known model name (see `minidiff models`) or a path to official files.

    dtype: a torch dtype or "float32" / "float16" / "bfloat16"; device: default cuda when present.
    taesd: a path or known name of TAESD weights, for fast previews (preview="taesd").
    speed_options: channels_last, compile, freeze, cuda_graphs, attention, attention_slice, vae_tile_size, reuse_memory
    (see minidiff.speed.optimize).
    """
    from minidiff.hub import KNOWN_MODELS, resolve
    from minidiff.load import load_components, load_taesd

    dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) or dtype is None else dtype
    if isinstance(dtype, str):
        raise MinidiffError(f"unknown dtype {dtype!r}: use one of {', '.join(DTYPES)}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = resolve(path_or_name)
    parts = load_components(path, dtype=dtype, device=device, variant=variant, prediction_type=prediction_type)
    tiny = load_taesd(resolve(taesd), dtype=dtype, device=device) if taesd else None
    pipe = Pipeline(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer, parts.schedule,
                    parts.prediction_type, tiny, parts.scheduler_config.get("timestep_spacing", "leading"),
                    parts.scheduler_config.get("steps_offset", 1), source=str(path_or_name),
                    guidance_scale=KNOWN_MODELS.get(str(path_or_name), {}).get("guidance_scale", 7.5))
    if speed_options:
        from minidiff.speed import optimize

        optimize(pipe, **speed_options)
    return pipe


def trace_grid(trace: list, steps_to_show=None, index: int = 0) -> Image.Image:
    """The signature picture: x_inter (top row) against pred_x0 (bottom row) at chosen steps."""
    chosen = [s for s in trace if steps_to_show is None or s.step in steps_to_show]
    if not chosen:
        raise MinidiffError("no trace steps to show: generate with trace=True and pick steps that were run")
    w, h = chosen[0].x_inter[index].size
    grid = Image.new("RGB", (w * len(chosen), 2 * h), "white")
    for col, s in enumerate(chosen):
        grid.paste(s.x_inter[index], (col * w, 0))
        grid.paste(s.pred_x0[index], (col * w, h))
    return grid


def trace_frames(trace: list, index: int = 0) -> list:
    """One frame per step, x_inter above pred_x0, for an animated GIF."""
    frames = []
    for s in trace:
        w, h = s.x_inter[index].size
        frame = Image.new("RGB", (w, 2 * h))
        frame.paste(s.x_inter[index], (0, 0))
        frame.paste(s.pred_x0[index], (0, h))
        frames.append(frame)
    return frames


def evenly_spaced_steps(total: int, count: int = 8) -> list:
    """`count` step indices spread over 0..total-1, always including the last."""
    return sorted({round(i * (total - 1) / max(count - 1, 1)) for i in range(count)}) if total else []
