# Source of notebooks/13_interactive.ipynb: build it with `python notebooks/build.py`.
# ruff: noqa: E402, E501  (imports after Markdown cells; long equations in Markdown)

# %% [markdown]
# # Lesson 13: interactive: the trace under a slider, and a live panel
#
# Two widgets on the bundled shapes model: a slider through the steps of one trace (x_inter beside pred_x0),
# and a panel that changes the prompt, the sampler, the number of steps and the guidance scale and redraws,
# fast enough on a 2-core CPU to feel live. Read beside `course/13_interactive.md`.
#
# The widgets need a live kernel and a front end (JupyterLab, VS Code, classic Notebook) with `ipywidgets`; run
# headless (as CI does) they draw nothing, but every cell still runs, and the cell that measures the panel's
# latency calls the same redraw function directly.
#
# | code name | what |
# |---|---|
# | `x_inter` | the latent the sampler holds after a step, decoded (lesson 03: why it looks dark) |
# | `pred_x0` | the model's guess of the clean latent at that step's $t$, decoded |
# | `sigma` | $\sigma=\sigma_t/\alpha_t$, k-diffusion's noise level at the step's $t$ (lesson 04) |
# | `guidance_scale` | $w$ of classifier-free guidance (lesson 08) |

# %%
import io
import statistics
import time

import ipywidgets as widgets
import torch
from IPython.display import display

from minidiff.course.viz import StepRecorder, course_pipeline, image_grid, median_seconds, step_label, to_pil

pipe = course_pipeline()
SAMPLERS = ("dpmpp_2m", "unipc", "ddim", "euler", "euler_a", "heun", "dpmpp_2m_sde", "ddpm")


def png(image) -> bytes:
    """A PIL image as PNG bytes, what an ipywidgets Image shows."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


# %% [markdown]
# ## A slider through the steps of a trace
#
# `trace=True` decodes every step's x_inter and pred_x0 once; the slider then only picks which pair to show.
# Each frame is labelled with the step, the timestep $t$ the model saw and its noise level $\sigma$.

# %%
prompt = "a big red circle at the top left"
result = pipe(prompt, steps=20, seed=0, trace=True, progress=False)


def trace_frame(trace, step: int):
    """x_inter beside pred_x0 at one step of a decoded trace, labelled."""
    s = trace[step]
    return image_grid([s.x_inter[0], s.pred_x0[0]], labels=["x_inter (after the step)", "pred_x0 (at t)"],
                      title=f"{step_label(s.step, s.timestep, pipe.schedule, sep=', ')}  (steps 0..{len(trace) - 1})",
                      scale=3)


view = widgets.Image(value=png(trace_frame(result.trace, 0)), format="png")
slider = widgets.IntSlider(value=0, min=0, max=len(result.trace) - 1, description="step")
slider.observe(lambda change: setattr(view, "value", png(trace_frame(result.trace, change["new"]))), names="value")
display(widgets.VBox([widgets.Label(f"{prompt!r}, DPM++ 2M, 20 steps, seed 0 ({pipe.source})"), slider, view]))

# %% [markdown]
# Without a front end the slider is not drawn; setting its value from code runs the same callback. Step 8, as the
# slider would show it:

# %%
slider.value = 8
trace_frame(result.trace, slider.value)

# %% [markdown]
# ## The live panel
#
# `redraw` is the whole panel: generate with the library's pipeline, keep each step's latents with a
# `StepRecorder` callback, and decode only what is shown: the final picture (the pipeline decodes it) and the
# x_inter / pred_x0 pair of one step, in one batched VAE call. `trace=True` would decode all 2 x 20 latents, which
# at 64 px costs about as much again as the sampling (measured below). Moving only the step slider re-decodes one
# pair and does not sample again.

# %%
last = {"key": None, "image": None, "steps": None}  # the last generation, reused when only the step moves


def generate(prompt: str, sampler: str, steps: int, guidance_scale: float, seed: int):
    key = (prompt, sampler, steps, guidance_scale, seed)
    if key != last["key"]:
        recorder = StepRecorder()
        result = pipe(prompt, sampler=sampler, steps=steps, guidance_scale=guidance_scale, seed=seed,
                      callback=recorder, progress=False)
        last.update(key=key, image=result.images[0], steps=recorder.steps)
    return last["image"], last["steps"]


def redraw(prompt: str, sampler: str, steps: int, guidance_scale: float, seed: int, step: int):
    """The panel's picture: x_inter and pred_x0 at `step` beside the final image, labelled."""
    image, recorded = generate(prompt, sampler, steps, guidance_scale, seed)
    s = recorded[min(step, len(recorded) - 1)]
    with torch.no_grad():
        x_inter, pred_x0 = to_pil(pipe.decode(torch.cat([s["x"], s["pred_x0"]])))
    return image_grid([x_inter, pred_x0, image], scale=3,
                      labels=["x_inter (after the step)", "pred_x0 (at t)", f"final, {len(recorded)} steps"],
                      title=f"{sampler}, guidance {guidance_scale:g}, seed {seed}: "
                            f"{step_label(s['step'], s['timestep'], pipe.schedule, sep=', ')}")


controls = {
    "prompt": widgets.Text(value="a small blue square in the centre", description="prompt",
                           continuous_update=False, layout=widgets.Layout(width="420px")),
    "sampler": widgets.Dropdown(options=SAMPLERS, value="dpmpp_2m", description="sampler"),
    "steps": widgets.IntSlider(value=20, min=2, max=50, description="steps", continuous_update=False),
    "guidance_scale": widgets.FloatSlider(value=5.0, min=1.0, max=12.0, step=0.5, description="guidance",
                                          continuous_update=False),
    "seed": widgets.IntText(value=0, description="seed"),
    "step": widgets.IntSlider(value=19, min=0, max=19, description="trace step"),
}
panel_view = widgets.Image(format="png")
timing = widgets.Label()


def update(change=None):
    controls["step"].max = controls["steps"].value - 1  # fewer steps may move the step slider (a cached redraw)
    values = {name: control.value for name, control in controls.items()}
    start = time.perf_counter()
    panel_view.value = png(redraw(**values))
    timing.value = f"redrawn in {time.perf_counter() - start:.2f} s"


for control in controls.values():
    control.observe(update, names="value")
update()
display(widgets.VBox([*controls.values(), timing, panel_view]))

# %% [markdown]
# Driven from code, as clicks would drive it (this is also what runs headless): DDIM with 10 steps; the step
# slider's range shrinks to 0..9 and its value follows.

# %%
from IPython.display import Image

controls["sampler"].value = "ddim"
controls["steps"].value = 10
print(f"step slider {controls['step'].value} of 0..{controls['step'].max}; {timing.value}")
Image(data=panel_view.value, format="png")

# %% [markdown]
# ## The latency, measured
#
# What one redraw costs when a control changes: DPM++ 2M, 20 steps, guidance 5 (two UNet evaluations per step,
# batched), the shapes model at 64 px, in this warm process. The cell calls `redraw` directly, as the panel
# does, with a new seed each time so that nothing is reused, and PNG-encodes the result as the widget would. On a
# shared machine (a CI runner) the wall-clock time includes waiting for the CPU; the process's CPU time does not.
# Then where the time goes, each part timed on its own.

# %%
options = dict(prompt="a big red circle at the top left", sampler="dpmpp_2m", steps=20, guidance_scale=5.0)
png(redraw(**options, seed=100, step=10))  # warm-up
seconds, cpu_seconds = [], []
for seed in range(101, 108):
    start, start_cpu = time.perf_counter(), time.process_time()
    png(redraw(**options, seed=seed, step=10))
    seconds.append(time.perf_counter() - start)
    cpu_seconds.append(time.process_time() - start_cpu)
print(f"one redraw: median {statistics.median(seconds):.3f} s over {len(seconds)} (min {min(seconds):.3f}, "
      f"max {max(seconds):.3f}), {torch.get_num_threads()} torch thread(s), {pipe.default_size()} px, {pipe.source}")
print(f"process CPU time per redraw: median {statistics.median(cpu_seconds):.3f} s (with one thread, about what the "
      "redraw takes on a core nobody else uses)")


with torch.no_grad():
    context, uncond = pipe.encode_prompt([options["prompt"]]), pipe.encode_prompt([""])
    model = pipe.guided_model(context, uncond, 5.0)
    x = torch.randn(1, pipe.latent_channels(), pipe.default_size() // 8, pipe.default_size() // 8)
    parts = {
        "text encoder (prompt and empty prompt)":
            median_seconds(lambda: pipe.encode_prompt([options["prompt"], ""]), 5),
        "20 guided UNet calls (batch of 2)": 20 * median_seconds(lambda: model(x, 500), 5),
        "VAE decode, final picture": median_seconds(lambda: pipe.decode(x), 5),
        "VAE decode, the shown pair": median_seconds(lambda: pipe.decode(torch.cat([x, x])), 5),
        "VAE decode, all 40 trace latents": median_seconds(lambda: pipe.decode(x.repeat(40, 1, 1, 1)), 2),
    }
for name, part in parts.items():
    print(f"{name:40s} {1000 * part:7.1f} ms")

# %% [markdown]
# The UNet calls are most of a redraw; decoding the whole trace instead of one pair would add the last line. The
# `realtime` milestone (`minidiff milestones --only realtime`) asks the same of a GPU: one image in under a second
# on the shapes model. For SD 1.5 at 512 px each UNet call is 1.61 TFLOP (lesson 06), 6,500 times the shapes model's
# 0.25 GFLOP: that is what the speed ladder of lesson 10 is for.
