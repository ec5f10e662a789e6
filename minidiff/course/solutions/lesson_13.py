"""Lesson 13, interactive: the exercises (what a redraw of the live panel costs, counted).

Notation (course/13_interactive.md):
    redraw      -> one run of the panel: sample, decode the shown x_inter / pred_x0 pair, decode the final picture
    trace=True  -> the pipeline decodes x_inter and pred_x0 at every step
"""

# --- exercises (course/13_interactive.md, "Exercises") ---


def exercise_13_1():
    """The UNet calls of one redraw of the live panel: 20 DPM++ 2M steps with guidance 5 (an int)."""
    steps, calls_per_step = 20, 1  # the prompt and the empty prompt in one batch; DPM++ 2M: one call a step
    return steps * calls_per_step


def exercise_13_2():
    """The latents the VAE decodes when only the panel's step slider moves (an int)."""
    return len(["x_inter", "pred_x0"])  # the pair at the new step; nothing is sampled again
