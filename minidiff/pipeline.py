"""Text-to-image and image-to-image: a prompt in, a picture out, and a view of how it formed.

Notation (Rombach et al. 2022, latent diffusion; Ho & Salimans 2022, classifier-free guidance):
    context           -> c, the text encoder's hidden states for the prompt (B, 77 * chunks, width): minidiff.prompts
    uncond            -> the hidden states of the negative (or empty) prompt
    guidance_scale    -> w: eps = eps_uncond + w (eps_cond - eps_uncond); w <= 1 means no guidance
    guidance_rescale  -> phi (Lin et al. 2023, eq. 16): mix the guided prediction rescaled to the
                         conditional one's standard deviation, to undo over-exposure at high w
    latents           -> z = vae.encode(image) * scaling_factor: the space the UNet works in
    strength          -> img2img: the fraction of the steps run, starting from the image noised to
                         the first of them (strength 0 returns the image, 1 ignores it)
    mask              -> inpainting: white repaints, black keeps the image (minidiff.inpaint)
    denoising_end     -> SDXL base + refiner: stop at this fraction of the schedule and hand over the latent x_t;
    denoising_start   -> go on from that latent (latents=) at this fraction (minidiff.refiner)
"""

import contextlib
from dataclasses import dataclass, field

import torch
from PIL import Image

from minidiff import embeddings, inpaint, inversion, lora, refiner
from minidiff.attention_maps import record_attention
from minidiff.checks import (
    check_bool,
    check_choice,
    check_device,
    check_float,
    check_input_file,
    check_int,
    check_memory,
    check_path_like,
    check_seed,
    check_text,
    literal,
)
from minidiff.errors import InputError, MinidiffError
from minidiff.images import from_pil, to_pil
from minidiff.prompts import count_chunks, join_chunks, tokenize_prompts
from minidiff.samplers import SAMPLERS, call_grid, sample
from minidiff.sdxl import SDXLConditioning
from minidiff.speed import vae_decode
from minidiff.steering import Steering


def guided(model_call, context, guidance_scale: float, guidance_rescale: float = 0.0):
    """(x_t, t) -> prediction with classifier-free guidance, from one call model_call(x, t, context) on the batch
    [x, x]: `context` holds the uncond and the cond states, in that order (see the notation above)."""

    def model(x, t):
        pred_uncond, pred_cond = model_call(torch.cat([x, x]), t, context).chunk(2)
        pred = pred_uncond + guidance_scale * (pred_cond - pred_uncond)
        if guidance_rescale > 0:
            dims = list(range(1, pred.ndim))
            rescaled = pred * (pred_cond.std(dim=dims, keepdim=True) / pred.std(dim=dims, keepdim=True))
            pred = guidance_rescale * rescaled + (1 - guidance_rescale) * pred
        return pred

    return model


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
    latents: torch.Tensor  # the final latents (scaled, what the UNet works in; denoising_end: x_t at the cut)
    trace: list = field(default_factory=list)  # TraceStep per step, when trace=True
    attention_maps: list = field(default_factory=list)  # TokenMaps per image, when attention_maps=True


def prompt_list(name: str, prompt) -> list:
    """A prompt or a non-empty list of prompts, as a list of strings."""
    prompts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(prompts, (list, tuple)) or not prompts:
        raise InputError(f"{name} must be a string or a non-empty list of strings, got {literal(prompt)} "
                         f"({type(prompt).__name__})")
    return [check_text(name, p) for p in prompts]


def check_latents(latents, shape: tuple) -> None:
    """latents, when given, are the starting noise: a finite float tensor of exactly `shape`."""
    if latents is None:
        return
    if not torch.is_tensor(latents) or not latents.is_floating_point():
        got = latents.dtype if torch.is_tensor(latents) else type(latents).__name__
        raise InputError(f"latents must be a float tensor of shape {shape} (noise from torch.randn), got {got}")
    if tuple(latents.shape) != shape:
        found = tuple(latents.shape)
        size = f", which is a {8 * found[-1]}x{8 * found[-2]} px image" if len(found) == 4 else ""
        raise InputError(f"latents have shape {found}{size}, but this call makes {shape[0]} image(s) of "
                         f"{8 * shape[-1]}x{8 * shape[-2]} px: pass latents of shape {shape} (or set height, width "
                         "and num_images to match)")
    if not torch.isfinite(latents).all():
        raise InputError("latents hold NaN or inf: pass finite noise such as torch.randn(...)")


class Pipeline:
    """Stable Diffusion from its parts: tokenizer, text encoder, UNet, VAE (or TAESD), noise schedule."""

    def __init__(self, unet, vae, text_encoder, tokenizer, schedule, prediction_type="epsilon", taesd=None,
                 spacing="leading", steps_offset=1, source=None, guidance_scale: float = 7.5,
                 sdxl: SDXLConditioning | None = None):
        self.unet, self.vae, self.text_encoder, self.tokenizer = unet, vae, text_encoder, tokenizer
        self.schedule, self.prediction_type, self.taesd = schedule, prediction_type, taesd
        self.spacing, self.steps_offset, self.source = spacing, steps_offset, source
        self.guidance_scale = guidance_scale  # the default w: SD's 7.5, or what a model was tuned for
        self.vae_tile_size = None  # decode in tiles of this many latent pixels (set by minidiff.speed.optimize)
        self.sdxl = sdxl  # SDXL: the second text encoder, pooled text and size/crop ids (minidiff.sdxl); else None
        self.text_encoder_2 = sdxl.text_encoder_2 if sdxl is not None else None

    def describe(self) -> str:
        """Architecture, parameter counts, dtype and source, for `minidiff info`."""
        lines = [f"model:       {self.source}", f"prediction:  {self.prediction_type}",
                 f"schedule:    {self.schedule.beta_schedule} {self.schedule.beta_start}..{self.schedule.beta_end}, "
                 f"{self.spacing} spacing, steps_offset {self.steps_offset}",
                 f"image size:  {self.default_size()} px (latent {self.unet.config.sample_size})"]
        for name in ("unet", "vae", "text_encoder", "text_encoder_2", "taesd"):
            module = getattr(self, name, None)
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

    @property
    def is_refiner(self) -> bool:
        return self.sdxl is not None and self.text_encoder is None  # the SDXL refiner: bigG alone (minidiff.refiner)

    def latent_channels(self) -> int:
        return self.unet.config.out_channels  # an inpainting UNet takes 9 channels in, gives 4 out

    def inpainting_unet(self) -> bool:
        """True for a UNet that takes the mask and the masked picture as extra input channels (minidiff.inpaint)."""
        return self.unet.config.in_channels != self.latent_channels()

    # --- adapters: LoRA (minidiff.lora) and textual inversion (minidiff.embeddings) ---------------------

    def load_lora(self, path, scale: float = 1.0, name: str | None = None) -> str:
        """Attach a LoRA file (kohya/A1111 or diffusers/PEFT safetensors) at `scale`; returns its name. The words
        bundled into it (pivotal tuning: bundle_emb.<token>.*) are added to the tokenizer, and stay when unloaded."""
        words = embeddings.bundled_words(self, path)  # checked before the LoRA touches a layer
        name = lora.load_lora(self, path, scale, name)
        for token, vectors in words.items():
            embeddings.add_word(self.tokenizer, self.text_encoder, token, vectors)
        return name

    def fuse_lora(self):
        """Merge the loaded LoRAs into the weights (as fast as no LoRA); unfuse_lora() restores them exactly."""
        lora.fuse_lora(self)

    def unfuse_lora(self):
        lora.unfuse_lora(self)

    def unload_lora(self, name: str | None = None):
        """Remove one LoRA by name, or all of them."""
        lora.unload_lora(self, name)

    def load_textual_inversion(self, path, token: str | None = None) -> str:
        """Add the word of an embedding file (A1111 or diffusers safetensors); returns the token to write."""
        return embeddings.load_textual_inversion(self, path, token)

    # --- DDIM inversion (minidiff.inversion) ------------------------------------------------------------

    def invert(self, image, prompt: str, steps: int = 50, guidance_scale: float = 1.0, **options) -> torch.Tensor:
        """A picture -> the noise that self(prompt, sampler="ddim", steps=steps, guidance_scale=guidance_scale,
        latents=noise) turns back into it (options: negative_prompt, height, width, timesteps, callback, progress)."""
        return inversion.invert(self, image, prompt, steps, guidance_scale, **options)

    # --- the three stages ----------------------------------------------------------------------

    @torch.no_grad()
    def encode_prompt(self, prompts: list, min_chunks: int = 1, prompt_weights: bool = True) -> torch.Tensor:
        """Prompts -> the text encoder's hidden states (B, 77 * chunks, width) (SDXL: both encoders' and the pooled
        embedding): weights such as (word:1.3) applied, a prompt past 75 tokens in chunks of 75 (minidiff.prompts)."""
        if self.sdxl is not None:
            return self.sdxl.encode(self.text_encoder, self.tokenizer, prompts, self.device, self.dtype, min_chunks,
                                    prompt_weights)
        ids, weights = tokenize_prompts(self.tokenizer, prompts, min_chunks, prompt_weights)
        states = self.text_encoder(ids.view(-1, ids.shape[-1]).to(self.device))  # (B * chunks, 77, width)
        return join_chunks(states, weights).to(self.dtype)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor, decoder=None) -> torch.Tensor:
        """Scaled latents -> images in [-1, 1] with the VAE (or TAESD, or the decoder given)."""
        decoder = decoder or self.taesd or self.vae
        if decoder is self.vae:  # in tiles if asked; a float16 decode that overflows is redone in float32
            return vae_decode(decoder, latents / decoder.scaling_factor, tile_size=self.vae_tile_size)
        return decoder.decode(latents / decoder.scaling_factor)

    @torch.no_grad()
    def encode_image(self, image, height, width, generator) -> torch.Tensor:
        """An image (or a (1, 3, H, W) tensor in [-1, 1]) -> scaled latents, drawn from the VAE's posterior with
        `generator` (as diffusers does)."""
        pixels = (image if torch.is_tensor(image) else from_pil(image, height, width)).to(self.device, self.dtype)
        latent = self.vae.encode(pixels, generator=generator, sample=True)
        return latent * self.vae.scaling_factor

    def guided_model(self, context, uncond, guidance_scale: float, guidance_rescale: float = 0.0, unet=None):
        """The function (x_t, t) -> prediction the samplers call: one batched UNet call for CFG (to `unet`, a
        function (x, t, context), when given: an inpainting UNet with its mask channels)."""
        if self.sdxl is not None:  # the same guidance; the UNet call adds SDXL's pooled text and size/crop ids
            if guidance_scale <= 1.0:
                return lambda x, t: self.sdxl.unet_call(self.unet)(x, t, context)
            both = self.sdxl.batch(uncond, context)
            return guided(self.sdxl.unet_call(self.unet, halves=True), both, guidance_scale, guidance_rescale)
        unet = unet or self.unet
        if guidance_scale <= 1.0:  # no guidance: the conditional prediction alone
            return lambda x, t: unet(x, t, context)
        return guided(unet, torch.cat([uncond, context]), guidance_scale, guidance_rescale)

    # --- the call ------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(self, prompt, negative_prompt=None, steps: int = 20, sampler: str = "dpmpp_2m",
                 guidance_scale: float | None = None, seed: int | None = None, height: int | None = None,
                 width: int | None = None, num_images: int = 1, image=None, strength: float | None = None,
                 mask=None,
                 early_exit=None, preview: str | None = None, callback=None, trace: bool = False,
                 guidance_rescale: float = 0.0, latents: torch.Tensor | None = None,
                 progress: bool = True, attention_maps: bool = False, prompt_weights: bool = True,
                 denoising_start: float | None = None, denoising_end: float | None = None, output: str = "pil",
                 **sampler_options) -> GenerationResult:
        """Generate images. See the module docstring for the symbols; returns a GenerationResult. SDXL also takes
        original_size, crop_top_left, target_size (and the refiner's aesthetic scores): see minidiff.sdxl.
        strength defaults to 0.8 for img2img, 1.0 for inpainting (image and mask).
        callback: called at the end of every step; it may change the latent or the guidance (minidiff.steering).
        attention_maps: also return each image's cross-attention map per prompt token (minidiff.attention_maps).
        prompt_weights: read (word:1.3), (word), [word], BREAK in the prompts (minidiff.prompts); False: plain text.
        denoising_end, denoising_start: SDXL's base and refiner as two experts on one grid (minidiff.refiner); with
        denoising_start, latents= are the latents a base run handed over. output="latent": latents only, no decode."""
        if self.sdxl is not None:
            self.sdxl.start_call(negative_prompt, sampler_options)  # takes SDXL's size/crop options out
        prompts = prompt_list("prompt", prompt)
        negatives = [""] * len(prompts) if negative_prompt is None else prompt_list("negative_prompt", negative_prompt)
        if isinstance(negative_prompt, str):
            negatives = negatives * len(prompts)
        guidance_scale = check_float("guidance_scale", guidance_scale, optional=True)
        guidance_scale = self.guidance_scale if guidance_scale is None else guidance_scale
        height = self.default_size() if height is None else check_int("height", height)
        width = self.default_size() if width is None else check_int("width", width)
        refiner.check_stage(self, denoising_start, denoising_end, image, latents, strength, output)
        strength = (0.8 if mask is None else 1.0) if strength is None else strength
        self.check_options(steps, sampler, height, width, strength, num_images, len(negatives), len(prompts), preview)
        check_seed(seed)
        check_float("guidance_rescale", guidance_rescale, 0.0, 1.0, "phi mixes the rescaled prediction in: 0 is off")
        check_bool("trace", trace)
        check_bool("progress", progress)
        check_bool("attention_maps", attention_maps)
        check_bool("prompt_weights", prompt_weights)
        chunks = count_chunks(self.tokenizer, prompts + negatives, prompt_weights)  # the same for both halves of CFG
        if callback is not None and not callable(callback):
            raise InputError(f"callback must be a function callback(step, timestep, sigma, x, pred_x0), got "
                             f"{type(callback).__name__}")
        if image is not None and not isinstance(image, Image.Image) and mask is None:
            check_input_file(image, "the input image")
        if mask is not None:  # inpainting: the picture and its mask, read and checked
            image, mask = inpaint.check_inpaint_inputs(image, mask)
        elif self.inpainting_unet():
            raise InputError(f"this is an inpainting UNet ({self.unet.config.in_channels} input channels): pass "
                             "image= and mask= (--image, --mask), or load a text-to-image model")
        batch = len(prompts) * num_images
        check_latents(latents, (batch, self.latent_channels(), height // 8, width // 8))
        self.check_memory(batch, height, width, guidance_scale > 1.0)
        if image is not None and trace:
            grid_size = len(sampler_options["timesteps"]) if sampler_options.get("timesteps") is not None else steps
            if int(grid_size * strength) == 0:
                raise InputError(f"strength {strength} runs none of the {grid_size} steps, so there is nothing to "
                                 "trace: raise strength (or steps), or pass trace=False")
        prompts = [p for p in prompts for _ in range(num_images)]
        negatives = [n for n in negatives for _ in range(num_images)]

        context = self.encode_prompt(prompts, chunks, prompt_weights)
        uncond = self.encode_prompt(negatives, chunks, prompt_weights) if guidance_scale > 1.0 else None

        # all randomness from one CPU generator: the same seed gives the same image on any device
        generator = torch.Generator().manual_seed(seed if seed is not None else int(torch.seed() % 2**63))
        shape = (batch, self.latent_channels(), height // 8, width // 8)
        # an inpainting UNet starting from pure noise (strength 1) never needs the image's own latents
        needs_init = image is not None and (mask is None or strength < 1 or not self.inpainting_unet())
        init = self.encode_image(image, height, width, generator).expand(shape) if needs_init else None
        noise = latents if latents is not None else torch.randn(shape, generator=generator)
        noise = noise.to(self.device, self.dtype)
        job = inpaint.prepare(self, image, mask, height, width, generator, init, noise) if mask is not None else None
        steering = Steering(self, context, uncond, guidance_scale, guidance_rescale,  # guidance open to the callback
                            lambda: self.encode_prompt(negatives, chunks, prompt_weights),
                            unet=job and job.unet(self.unet))
        model = steering.model

        timesteps = sampler_options.pop("timesteps", None)
        sampler_options.setdefault("spacing", self.spacing)
        sampler_options.setdefault("steps_offset", self.steps_offset)
        first_step, end_step = 0, None
        if denoising_start is not None or denoising_end is not None:  # one of two experts on the grid
            grid = call_grid(self.schedule, sampler, steps, timesteps, sampler_options)[0]
            first_step, end_step = refiner.stage_steps(grid, self.schedule.num_train_timesteps, denoising_start,
                                                       denoising_end)
            if denoising_start is not None:
                sampler_options["noise_is_x_t"] = True  # latents= is the x_t handed over
        if image is not None:  # img2img: the last `strength` of the sampler's own grid, from the image noised there
            n_grid = len(timesteps) if timesteps is not None else steps
            first_step = n_grid - min(int(n_grid * strength), n_grid)  # diffusers' t_start
            if first_step == n_grid:  # strength 0: nothing to denoise
                return self.finish(init, [], preview)

        recorded = []

        def on_step(**info):
            if trace:
                recorded.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in info.items()})
                if job is not None:
                    recorded[-1]["calls"] = len(job.seen)
            return steering.step_end(callback, info) if callback is not None else None

        x0 = init
        if job is not None:  # latent blending (4 channels) or an inpainting UNet's mask channels (9)
            model = job.model(model, inpaint.grid_levels(self.schedule, sampler, steps, timesteps, sampler_options))
            x0 = None if strength == 1.0 else init  # diffusers starts from pure noise at strength 1
        recording = record_attention(self.unet, batch, height // 8, width // 8) if attention_maps else None
        with recording or contextlib.nullcontext() as recorder:
            final = sample(model, noise, sampler=sampler, steps=steps, prediction_type=self.prediction_type,
                           schedule=self.schedule, timesteps=timesteps, generator=generator, callback=on_step,
                           early_exit=early_exit, progress=progress, first_step=first_step, x0=x0, end_step=end_step,
                           **sampler_options)
        if job is not None:
            final = job.keep_outside(final)
            job.trace_view(recorded)
        result = self.finish(final, recorded, preview, output)
        result.attention_maps = recorder.maps(self.tokenizer, prompts, prompt_weights) if attention_maps else []
        return result

    def finish(self, latents, recorded, preview, output="pil") -> GenerationResult:
        if output == "latent":  # nothing decoded (the trace still is)
            return GenerationResult([], latents, self.trace_steps(recorded, preview))
        pixels = self.decode(latents, self.vae)
        if not torch.isfinite(pixels).all():  # after the VAE's own float32 redo: never a black image
            raise MinidiffError(f"the VAE decoder returned NaN or inf (dtype {pixels.dtype}, also after its float32 "
                                "redo): check the VAE weights, or load the model with dtype=torch.float32")
        return GenerationResult(to_pil(pixels), latents, self.trace_steps(recorded, preview))

    def trace_steps(self, recorded, preview) -> list:
        decoder = self.taesd if preview == "taesd" else self.vae
        return [TraceStep(r["step"], float(r["timestep"]), to_pil(self.decode(r["x"], decoder)),
                          to_pil(self.decode(r["pred_x0"], decoder))) for r in recorded]

    def default_size(self) -> int:
        return 8 * self.unet.config.sample_size

    def check_memory(self, batch: int, height: int, width: int, guided: bool) -> None:
        """InputError before anything is allocated when the images would not fit in memory (a rough estimate:
        about a dozen UNet activations of the first stage, one attention score matrix, the VAE decoder's
        largest activations unless it decodes in tiles)."""
        tokens = (height // 8) * (width // 8)
        unet_batch = batch * (2 if guided else 1)
        element = torch.finfo(self.dtype).bits // 8
        first = self.unet.config.block_out_channels[0]
        unet_bytes = unet_batch * tokens * (12 * first * element + tokens * element)
        vae_pixels = height * width if not self.vae_tile_size else (8 * self.vae_tile_size) ** 2
        vae_bytes = batch * vae_pixels * self.vae.config.block_out_channels[0] * 4 * 4
        check_memory(max(unet_bytes, vae_bytes), f"{batch} image(s) of {width}x{height} px",
                     "use a smaller size or fewer images (or vae_tile_size=64 from Python)", self.device)

    def check_options(self, steps, sampler, height, width, strength, num_images, n_neg, n_prompts, preview):
        check_int("steps", steps, 1, self.schedule.num_train_timesteps)
        check_choice("sampler", sampler, sorted(SAMPLERS))
        for name, size in (("height", height), ("width", width)):
            if size < 8 or size % 8:
                fix = max(8, 8 * round(size / 8))
                raise InputError(f"{name} must be a positive multiple of 8 (the VAE downsamples by 8), "
                                    f"got {size}: try {fix}")
        check_float("strength", strength, 0.0, 1.0, "the fraction of the steps run")
        check_int("num_images", num_images, 1, 1000, "generate in several calls")
        if n_neg != n_prompts:
            raise MinidiffError(f"{n_prompts} prompts but {n_neg} negative prompts: give one per prompt")
        if preview not in (None, "vae", "taesd"):
            raise MinidiffError(f"preview must be 'vae' or 'taesd', got {preview!r}")
        if preview == "taesd" and self.taesd is None:
            raise MinidiffError("preview='taesd' needs a TAESD: load_pipeline(..., taesd=path or 'taesd')")


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def load_pipeline(path_or_name="shapes", dtype=None, device=None, taesd=None, variant=None,
                  prediction_type=None, allow_pickle: bool = False, **speed_options) -> Pipeline:
    """A ready pipeline from a known model name (see `minidiff models`) or a path to official files.

    dtype: a torch dtype or "float32" / "float16" / "bfloat16"; device: default cuda when present.
    taesd: a path or known name of TAESD weights, for fast previews (preview="taesd").
    allow_pickle: read .ckpt/.pt/.bin files (tensors only, torch.load(weights_only=True)); only for files you trust.
    speed_options: channels_last, compile, freeze, autotune, cuda_graphs, attention, attention_slice, vae_tile_size,
    reuse_memory
    (see minidiff.speed.optimize).
    """
    import inspect

    from minidiff.hub import KNOWN_MODELS, resolve
    from minidiff.load import load_components, load_taesd
    from minidiff.schedule import PREDICTION_TYPES
    from minidiff.speed import optimize

    check_path_like("path_or_name", path_or_name)
    speed_names = [name for name in inspect.signature(optimize).parameters if name != "target"]
    unknown = [name for name in speed_options if name not in speed_names]
    if unknown:
        raise InputError(f"load_pipeline() has no option {literal(unknown[0])}: its own are dtype, device, taesd, "
                         f"variant, prediction_type, allow_pickle, and the speed options {', '.join(speed_names)}")
    if isinstance(dtype, str) or dtype is None:
        dtype = DTYPES.get(dtype, dtype) if isinstance(dtype, str) else None
    if isinstance(dtype, str) or not (dtype is None or dtype in DTYPES.values()):
        raise InputError(f"unknown dtype {literal(dtype)}: use one of {', '.join(DTYPES)} (or torch.float32, "
                         "torch.float16, torch.bfloat16)")
    check_device(device)
    if taesd is not None:
        check_path_like("taesd", taesd)
    check_text("variant", variant, optional=True)
    check_choice("prediction_type", prediction_type, PREDICTION_TYPES, optional=True)
    check_bool("allow_pickle", allow_pickle)
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    path = resolve(path_or_name)
    parts = load_components(path, dtype=dtype, device=device, variant=variant, prediction_type=prediction_type,
                            allow_pickle=allow_pickle)
    tiny = load_taesd(resolve(taesd), dtype=dtype, device=device, allow_pickle=allow_pickle) if taesd else None
    sdxl = None if parts.text_encoder_2 is None else SDXLConditioning(parts.text_encoder_2, parts.tokenizer_2,
                                                                       parts.force_zeros_for_empty_prompt)
    pipe = Pipeline(parts.unet, parts.vae, parts.text_encoder, parts.tokenizer or parts.tokenizer_2, parts.schedule,
                    parts.prediction_type, tiny, parts.scheduler_config.get("timestep_spacing", "leading"),
                    parts.scheduler_config.get("steps_offset", 1), source=str(path_or_name),
                    guidance_scale=KNOWN_MODELS.get(str(path_or_name), {}).get("guidance_scale", 7.5), sdxl=sdxl)
    if speed_options:
        optimize(pipe, **speed_options)
    return pipe
