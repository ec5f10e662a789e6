"""Pictures and plots for the course notebooks: image grids, the trace view, schedules, a demo pipeline.

The trace view is the course's signature picture (after the `x_inter` / `pred_x0` of CompVis' DDIM): for chosen
sampler steps, the latent x_t the sampler holds (top row, x_inter) above the model's guess of the clean image
(bottom row, pred_x0), both decoded to pixels. `Pipeline(..., trace=True)` records it for text-to-image;
`StepRecorder` records it for `minidiff.sample` called directly (pixel-space toy models, the Gaussian reference).

Notation (Ho et al. 2020; Song et al. 2021; Lu et al. 2022):
    x_inter      -> x_t, what the sampler holds after a step (VP space: alpha_t x0 + sigma_t eps)
    pred_x0      -> x0_theta(x_t, t) = E[x0 | x_t] for a perfect model
    alpha_t, sigma_t -> sqrt(alpha_bar_t), sqrt(1 - alpha_bar_t)
    sigma        -> sigma_t / alpha_t, k-diffusion's noise level (`NoiseSchedule.sigmas`), shown under each column
    lambda_t     -> log(alpha_t / sigma_t) = -log(sigma), the half log-SNR (the `log_snr` attribute is 2 lambda_t)

Plotting functions return a matplotlib Figure that is already closed: a notebook shows it once when it is the
cell's last expression (or through `display(fig)`), and `fig.savefig(path)` writes it.
"""

import contextlib
import dataclasses
import io
import logging
import math
import os
import statistics
import time
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from minidiff.clip import CLIPTextConfig, CLIPTextModel
from minidiff.errors import MinidiffError
from minidiff.files import atomic_save
from minidiff.hub import bundled_path
from minidiff.images import evenly_spaced_steps, to_pil, trace_frames  # noqa: F401 (to_pil: the notebooks')
from minidiff.pipeline import Pipeline, TraceStep, load_pipeline
from minidiff.schedule import NoiseSchedule
from minidiff.tokenizer import CLIPTokenizer
from minidiff.unet import UNet, UNetConfig
from minidiff.vae import AutoencoderKL, VAEConfig

SHAPES = bundled_path("shapes")


# --- pictures ----------------------------------------------------------------------------------------------------


def latents_to_pil(latents: torch.Tensor, channels=(0, 1, 2)) -> list:
    """(B, C, h, w) latents -> PIL images of three of their channels, each stretched to its own min..max."""
    picked = latents[:, list(channels)].float()
    low = picked.amin(dim=(2, 3), keepdim=True)
    high = picked.amax(dim=(2, 3), keepdim=True)
    return to_pil((picked - low) / (high - low).clamp_min(1e-8) * 2 - 1)


def image_grid(images: list, columns: int | None = None, pad: int = 2, labels: list | None = None,
               title: str | None = None, scale: int = 1) -> Image.Image:
    """PIL images of one size in a grid, `columns` per row, on a white background: one PIL image.

    With `labels`, each picture's label (one or more lines) is written above it; with `title`, a line on top;
    `scale` enlarges every picture (nearest neighbour). Cheaper to redraw than a matplotlib figure (a widget).
    """
    if not images:
        raise MinidiffError("image_grid got no images")
    if labels is not None and len(labels) != len(images):
        raise MinidiffError(f"image_grid got {len(images)} images but {len(labels)} labels: give one label each")
    columns = columns or len(images)
    rows = math.ceil(len(images) / columns)
    w, h = images[0].width * scale, images[0].height * scale
    font, line = (ImageFont.load_default(size=11), 13) if labels is not None or title else (None, 0)
    measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    text_width = lambda text: measure.multiline_textbbox((0, 0), str(text), font=font, spacing=2)[2]  # noqa: E731
    lines = max((str(label).count("\n") + 1 for label in labels), default=0) if labels is not None else 0
    label_h = line * lines + (2 if lines else 0)
    title_h = line + 4 if title else 0
    cell_w = max([w] + ([text_width(label) for label in labels] if labels is not None else []))
    margin = 3 if font else 0  # white space around a labelled grid, so that no text touches the edge
    width = max(columns * (cell_w + pad) - pad, text_width(title) if title else 0) + 2 * margin
    grid = Image.new("RGB", (width, title_h + rows * (label_h + h + pad) - pad + 2 * margin), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((margin, margin), title, fill="black", font=font)
    for i, image in enumerate(images):
        x = margin + (i % columns) * (cell_w + pad)
        y = margin + title_h + (i // columns) * (label_h + h + pad)
        if labels is not None:
            draw.multiline_text((x, y), str(labels[i]), fill="black", font=font, spacing=2)
        grid.paste(image if scale == 1 else image.resize((w, h), Image.NEAREST), (x, y + label_h))
    return grid


def _figure(rows: int, columns: int, size: float):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, columns, figsize=(size * columns, size * rows), squeeze=False)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    return plt, fig, axes


def show_images(images: list, titles=None, columns: int | None = None, size: float = 1.8, title: str | None = None):
    """PIL images in a grid with a title under each: a closed Figure."""
    columns = min(columns or len(images), len(images))
    plt, fig, axes = _figure(math.ceil(len(images) / columns), columns, size)
    for ax in axes.flat[len(images):]:
        ax.axis("off")
    for i, (ax, image) in enumerate(zip(axes.flat, images)):
        ax.imshow(image, interpolation="nearest")
        if titles is not None:
            ax.set_xlabel(titles[i], fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig


def step_label(step: int, timestep: float, schedule: NoiseSchedule | None = None, sep: str = "\n") -> str:
    """"step 3, t = 801, sigma = 5.14": which step a trace column is, its timestep and k-diffusion noise level."""
    sigma = float((schedule or NoiseSchedule.sd()).sigma_at(float(timestep)))
    t = f"{timestep:.0f}" if float(timestep) == round(float(timestep)) else f"{timestep:.1f}"
    return sep.join((f"step {step}", f"t = {t}", f"sigma = {sigma:.3g}"))


def show_trace(trace: list, steps=None, index: int = 0, size: float = 1.5, title: str | None = None,
               schedule: NoiseSchedule | None = None):
    """The signature picture: x_inter (top) above pred_x0 (bottom) at the chosen steps (default: 8 spread out).

    Each column is labelled with its sampler step, the timestep t the model saw in it and sigma = sigma_t / alpha_t
    there (from `schedule`, default SD's, the schedule of every model in the course): pred_x0 is the guess made at
    t, x_inter the latent the step then moved to (one grid point further).
    """

    if not trace:
        raise MinidiffError("the trace is empty: generate with trace=True, or record with StepRecorder")
    steps = evenly_spaced_steps(len(trace)) if steps is None else steps
    chosen = [s for s in trace if s.step in set(steps)]
    if not chosen:
        raise MinidiffError(f"none of the steps {list(steps)} is in the trace (steps 0..{len(trace) - 1})")
    plt, fig, axes = _figure(2, len(chosen), size)
    for column, s in enumerate(chosen):
        axes[0, column].imshow(s.x_inter[index], interpolation="nearest")
        axes[1, column].imshow(s.pred_x0[index], interpolation="nearest")
        axes[0, column].set_title(step_label(s.step, s.timestep, schedule), fontsize=7)
    axes[0, 0].set_ylabel("x_inter\n(after step)", fontsize=8)
    axes[1, 0].set_ylabel("pred_x0\n(at t)", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    plt.close(fig)
    return fig


def trace_gif(trace: list, path=None, index: int = 0, ms_per_frame: int = 150, scale: int = 2,
              schedule: NoiseSchedule | None = None):
    """The trace as an animated GIF (x_inter beside pred_x0, labelled, one frame per step, the last held longer).

    Written to `path` if given; returns an IPython Image to show in a notebook (or the GIF's bytes without IPython).
    """
    frames = [image_grid([s.x_inter[index], s.pred_x0[index]], labels=["x_inter (after the step)", "pred_x0 (at t)"],
                         title=step_label(s.step, s.timestep, schedule, sep=", "), scale=scale, pad=4)
              for s in trace]
    durations = [ms_per_frame] * (len(frames) - 1) + [4 * ms_per_frame]
    buffer = io.BytesIO()
    frames[0].save(buffer, format="GIF", save_all=True, append_images=frames[1:], duration=durations, loop=0)
    data = buffer.getvalue()
    if path is not None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        atomic_save(path, lambda tmp: Path(tmp).write_bytes(data))
    try:
        from IPython.display import Image as IPythonImage
    except ImportError:
        return data
    return IPythonImage(data=data, format="gif")


class StepRecorder:
    """A sampler callback that keeps every step's x_inter and pred_x0, for `sample(..., callback=recorder)`.

    `recorder.trace(decode)` turns them into the TraceSteps `show_trace` draws, with `decode` mapping a tensor to
    PIL images (`to_pil` for pixel-space models, `latents_to_pil`, or a pipeline's VAE).
    """

    def __init__(self):
        self.steps = []  # dicts: step, timestep, sigma, x, pred_x0

    def __call__(self, **info):
        self.steps.append({k: (v.detach().clone() if torch.is_tensor(v) else v) for k, v in info.items()})

    def trace(self, decode=to_pil) -> list:

        return [TraceStep(s["step"], float(s["timestep"]), decode(s["x"]), decode(s["pred_x0"])) for s in self.steps]


# --- plots -------------------------------------------------------------------------------------------------------


def plot_schedules(schedules: dict):
    """alpha_bar_t (signal kept) and lambda_t = log(alpha_t / sigma_t), the half log-SNR, against t, one line per
    schedule."""
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    for name, schedule in schedules.items():
        t = range(schedule.num_train_timesteps)
        left.plot(t, schedule.alphas_cumprod.numpy(), label=name)
        right.plot(t, -schedule.sigmas.log().numpy(), label=name)  # lambda_t = -log(sigma_t / alpha_t)
    left.set(xlabel="timestep t", ylabel="alphas_cumprod  (alpha_bar_t)", title="signal kept")
    right.set(xlabel="timestep t", ylabel="lambda_t = log(alpha_t / sigma_t)", title="half log-SNR (0: SNR = 1)")
    for ax in (left, right):
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_curves(x, curves: dict, xlabel: str, ylabel: str, title: str = "", log: str = "", marker: str = "o-"):
    """One line per entry of `curves` ({label: y values}) against x; log in "", "x", "y", "xy"."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.8))
    for label, y in curves.items():
        ax.plot(x, y, marker, label=label)
    ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
    ax.set_xscale("log" if "x" in log else "linear")
    ax.set_yscale("log" if "y" in log else "linear")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    fig.tight_layout()
    plt.close(fig)
    return fig


def plot_losses(vae_losses: list, diffusion_losses: list):
    """The shapes model's two training loss curves (raw and a running mean) side by side, log scale."""
    import matplotlib.pyplot as plt
    import numpy as np

    fig, axes = plt.subplots(1, 2, figsize=(10, 3.5))
    for ax, losses, title in ((axes[0], vae_losses, "phase 1: VAE"), (axes[1], diffusion_losses,
                                                                         "phase 2: UNet + text encoder")):
        window = max(1, len(losses) // 50)
        smooth = np.convolve(losses, np.ones(window) / window, mode="valid") if losses else []
        ax.plot(losses, alpha=0.3, lw=0.5, label="per step")
        ax.plot(np.arange(len(smooth)) + window - 1, smooth, label=f"mean of {window}")
        ax.set(title=title, xlabel="step", ylabel="loss", yscale="log")
        ax.legend()
    fig.tight_layout()
    plt.close(fig)
    return fig


@contextlib.contextmanager
def quiet_stderr():
    """Silence stderr (Python's, and the process's file descriptor 2) and log records up to warnings, for the
    duration: torch.profiler's C++ side prints two lines per run, the ONNX exporter its warnings, which a notebook
    would show under the cell."""
    saved = os.dup(2)
    with open(os.devnull, "w") as null, contextlib.redirect_stderr(io.StringIO()):
        os.dup2(null.fileno(), 2)
        logging.disable(logging.WARNING)
        try:
            yield
        finally:
            logging.disable(logging.NOTSET)
            os.dup2(saved, 2)
            os.close(saved)


# --- models for the lessons --------------------------------------------------------------------------------------


class DatasetEpsModel:
    """The ideal eps-predictor when the data is a finite set of images: E[eps | x_t] in closed form (Bayes' rule).

    For x0 drawn uniformly from `images` {y_i} and x_t = alpha_t x0 + sigma_t eps, the posterior over which image
    was noised is w_i = softmax_i(-|x_t - alpha_t y_i|^2 / (2 sigma_t^2)), so
        pred_x0 = E[x0 | x_t] = sum_i w_i y_i        and        eps = (x_t - alpha_t pred_x0) / sigma_t.
    A network trained to perfection on these images would output exactly this, and could only reproduce them.
    Called like a UNet, model(x_t, t) -> eps, at integer or fractional timesteps t.
    """

    def __init__(self, images: torch.Tensor, schedule: NoiseSchedule | None = None):
        self.images = images  # (N, C, H, W)
        self.schedule = schedule or NoiseSchedule.sd()

    def __call__(self, x_t, t):
        sigma = float(self.schedule.sigma_at(float(t)))  # k-diffusion sigma_t / alpha_t, interpolated like samplers
        alpha_t, sigma_t = 1 / math.sqrt(1 + sigma**2), sigma / math.sqrt(1 + sigma**2)
        images = self.images.to(x_t.dtype)
        # (B, 1, C, H, W) - (1, N, C, H, W) -> squared distances (B, N)
        distances = (x_t[:, None] - alpha_t * images[None]).pow(2).flatten(2).sum(-1)
        weights = (-distances / (2 * sigma_t**2)).softmax(dim=1)
        pred_x0 = torch.einsum("bn,nchw->bchw", weights, images)
        return (x_t - alpha_t * pred_x0) / sigma_t


def tiny_pipeline(seed: int = 0, image_size: int = 64):
    """A Stable Diffusion pipeline of miniature networks with RANDOM weights (the SD 1.x layout, 8x VAE, CLIP
    tokenizer): the mechanics of every stage in a second, and pictures that are noise."""

    with torch.random.fork_rng():
        torch.manual_seed(seed)
        unet = UNet(dataclasses.replace(UNetConfig.tiny(), sample_size=image_size // 8))
        vae, text_encoder = AutoencoderKL(VAEConfig.tiny()), CLIPTextModel(CLIPTextConfig.tiny())
    return Pipeline(unet.eval(), vae.eval(), text_encoder.eval(), CLIPTokenizer.default(), NoiseSchedule.sd(),
                    source=f"tiny random-weight pipeline (seed {seed})")


def shapes_available() -> bool:
    """Whether the bundled shapes model is in weights/shapes."""
    return (SHAPES / "model_index.json").is_file()


def course_pipeline(dtype=torch.float32, device: str = "cpu"):
    """The bundled shapes model if it is there, else `tiny_pipeline()`; says which, since only one draws shapes."""
    if shapes_available():

        print("course pipeline: the bundled shapes model (weights/shapes)")
        return load_pipeline("shapes", dtype=dtype, device=device)
    print("course pipeline: weights/shapes is not there, so this is a tiny RANDOM-weight pipeline. Its pictures "
          "are noise: read them for the mechanics only (train it: python -m minidiff.course.train shapes)")
    pipe = tiny_pipeline()
    for module in (pipe.unet, pipe.vae, pipe.text_encoder):
        module.to(device=device, dtype=dtype)
    return pipe


def median_seconds(function, repeats: int = 3) -> float:
    """The median wall time of `repeats` calls of function() (the notebooks' timings)."""
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)
