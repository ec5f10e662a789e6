"""The number exercises of lessons 07 to 13 (the machinery and lessons 00 to 06: exercises.py)."""

from minidiff.course.milestones.exercises import exercise

# --- lesson 07: the VAE --------------------------------------------------------------------------------------------


def _vae_config():
    from minidiff.vae import VAEConfig

    return VAEConfig.sd()


exercise(7, 1, "how many times SD's VAE shrinks each side of the picture",
         lambda: 2 ** (len(_vae_config().block_out_channels) - 1), [
             ("four levels, but the last one does not downsample: three halvings", lambda: 16),
             ("that is the area's shrink (8 x 8); the question asks one side", lambda: 64),
             ("three downsamplers halve the side three times: 2^3", lambda: 3),
         ], kind="an int")
exercise(7, 2, "the std of SD's unscaled latents z that the scaling factor 0.18215 implies",
         lambda: 1 / _vae_config().scaling_factor, [
             ("that is the scaling factor itself; it is 1 / std(z), so std(z) is its inverse",
              lambda: _vae_config().scaling_factor),
             ("the scaling factor is 1 / std(z), not 1 / var(z)", lambda: _vae_config().scaling_factor ** -0.5),
         ])

# --- lesson 08: text and guidance ----------------------------------------------------------------------------------

exercise(8, 1, "the weight of eps_uncond in the guided eps at guidance scale 7.5", lambda: 1 - 7.5, [
    ("eps = eps_uncond + w (eps_cond - eps_uncond) = (1 - w) eps_uncond + w eps_cond: the 1 is missing", lambda: -7.5),
    ("sign: (1 - w) eps_uncond, negative for w > 1: guidance pushes away from the empty prompt", lambda: 7.5 - 1),
    ("that is the weight of eps_cond, w", lambda: 7.5),
])
exercise(8, 2, "the pictures that go through the UNet for 4 prompts, 20 steps, with guidance",
         lambda: 4 * 2 * 20, [
             ("guidance needs the empty prompt's prediction too: each step runs a batch of 2 x 4", lambda: 4 * 20),
             ("one batched call per step, but each call holds 2 x 4 pictures", lambda: 20),
             ("each step sees every prompt with and without it: 2 x 4 per step, 20 steps", lambda: 2 * 4),
         ], kind="an int")

# --- lesson 09: training -------------------------------------------------------------------------------------------


def _alpha_bar(t: int) -> float:
    from minidiff.schedule import NoiseSchedule

    return float(NoiseSchedule.sd().alphas_cumprod[t])


exercise(9, 1, "the expected loss at t = 500 of the best eps prediction when x_0 is N(0, I) noise itself",
         lambda: _alpha_bar(500), [
             ("that is 1 - alpha_bar_500; the best guess of eps is sqrt(1 - alpha_bar) x_t, whose error has "
              "variance 1 - (1 - alpha_bar) = alpha_bar", lambda: 1 - _alpha_bar(500)),
             ("1 is the loss of predicting eps = 0; knowing x_t does better: E[eps | x_t] = sqrt(1 - alpha_bar) x_t",
              lambda: 1.0),
         ])
exercise(9, 2, "the expected loss at t = 500 of a model that returns x_t as its eps, on unit-variance x_0",
         lambda: _alpha_bar(500) + (1 - (1 - _alpha_bar(500)) ** 0.5) ** 2, [
             ("the noise's part is missing: x_t - eps = sqrt(alpha_bar) x_0 + (sqrt(1 - alpha_bar) - 1) eps, whose "
              "variance has both terms", lambda: _alpha_bar(500)),
             ("missing sqrt: x_t holds sqrt(alpha_bar) x_0 + sqrt(1 - alpha_bar) eps",
              lambda: _alpha_bar(500) ** 2 + _alpha_bar(500) ** 2),
         ])

# --- lesson 10: speed ----------------------------------------------------------------------------------------------


def _unet_parameters() -> int:
    import torch

    from minidiff.unet import UNet, UNetConfig

    with torch.device("meta"):  # shapes only: no memory, no time
        return sum(parameter.numel() for parameter in UNet(UNetConfig.sd15()).parameters())


exercise(10, 1, "the megabytes (10^6 bytes) of SD 1.5's UNet weights in fp16", lambda: 2 * _unet_parameters() / 1e6, [
    ("that is fp32, 4 bytes a number; fp16 is 2", lambda: 4 * _unet_parameters() / 1e6),
    ("that is in MiB (2^20 bytes); asked are megabytes, 10^6 bytes", lambda: 2 * _unet_parameters() / 2**20),
    ("that is the number of parameters in millions; each takes 2 bytes in fp16", lambda: _unet_parameters() / 1e6),
], rtol=1e-3)


def _scores_megabytes(batch: int = 2, heads: int = 8, bytes_per_number: int = 2) -> float:
    from minidiff.unet import UNetConfig

    config = UNetConfig.sd15()
    return batch * config.num_attention_heads[0] * (config.sample_size**2) ** 2 * bytes_per_number / 1e6


exercise(10, 2, "the megabytes of fp16 scores softmax(Q K^T) of SD 1.5's first self-attention, 512 px, with "
                "guidance", _scores_megabytes, [
                    ("guidance doubles the batch: the UNet sees the prompt and the empty prompt together",
                     lambda: _scores_megabytes(batch=1)),
                    ("that is one head; SD 1.5's first stage has 8", lambda: _scores_megabytes(heads=1) / 8),
                    ("that is fp32, 4 bytes a score", lambda: _scores_megabytes(bytes_per_number=4)),
                ], rtol=1e-3)

# --- lesson 11: the official weights -------------------------------------------------------------------------------


def _original_key(key: str) -> str:
    from minidiff import keymap
    from minidiff.config import unet_to_diffusers
    from minidiff.unet import UNetConfig

    rules = keymap.invert(keymap.unet_rules(unet_to_diffusers(UNetConfig.sd15())))
    return next(iter(keymap.rename({key: None}, rules)[0]))


exercise(11, 1, "the original single-file key (without model.diffusion_model.) of down_blocks.0.resnets.0.conv1.weight",
         lambda: _original_key("down_blocks.0.resnets.0.conv1.weight"), [
             ("input_blocks.0 is conv_in: the first resnet is input_blocks.1.0",
              lambda: "input_blocks.0.0.in_layers.2.weight"),
             ("in_layers.0 is norm1 (in_layers.1 the SiLU): conv1 is in_layers.2",
              lambda: "input_blocks.1.0.in_layers.0.weight"),
             ("that is the diffusers key unchanged; the original layout numbers input_blocks",
              lambda: "down_blocks.0.resnets.0.conv1.weight"),
         ], kind="a str")
exercise(11, 2, "the original key of mid_block.attentions.0.proj_in.weight",
         lambda: _original_key("mid_block.attentions.0.proj_in.weight"), [
             ("middle_block.0 is the first resnet: the attention sits between the resnets, middle_block.1",
              lambda: "middle_block.0.proj_in.weight"),
             ("the original mid block is middle_block (a Sequential of resnet, attention, resnet)",
              lambda: "mid_block.1.proj_in.weight"),
         ], kind="a str")

# --- lesson 12: LoRA (the functions: milestones/lora.py) -----------------------------------------------------------


def _lora_numbers(rank: int = 8, parts: str = "both") -> int:
    from minidiff.clip import CLIPTextConfig
    from minidiff.unet import UNetConfig

    d_in, d_out = CLIPTextConfig.sd15().hidden_size, UNetConfig.sd15().block_out_channels[0]
    return rank * {"both": d_in + d_out, "down": d_in, "square": 2 * d_out}[parts]


exercise(12, 1, "the numbers in a rank-8 LoRA of SD 1.5's first cross-attention to_k (768 -> 320)", _lora_numbers, [
    ("that is the full update B A (320 x 768); the LoRA stores A (8 x 768) and B (320 x 8)", lambda: 768 * 320),
    ("that is A (down, 8 x 768) only; B (up, 320 x 8) is stored too", lambda: _lora_numbers(parts="down")),
    ("to_k reads the text (768 wide), not the image's 320 channels: d_in = 768",
     lambda: _lora_numbers(parts="square")),
], kind="an int")

# --- lesson 13: interactive ----------------------------------------------------------------------------------------

exercise(13, 1, "the UNet calls of one redraw of the live panel: 20 DPM++ 2M steps, guidance 5", lambda: 20, [
    ("the prompt and the empty prompt go through the UNet as one batch of two: one call per step", lambda: 40),
    ("DPM++ 2M is multistep: one model call per step (it reuses the previous D), not two", lambda: 40 - 1),
], kind="an int")
exercise(13, 2, "the latents the VAE decodes when only the step slider moves", lambda: 2, [
    ("moving the step slider samples nothing again: the trace is kept, only the pair at the new step is decoded",
     lambda: 3),
    ("that is what trace=True decodes for 20 steps (x_inter and pred_x0 at every step); the panel decodes what it "
     "shows", lambda: 40),
    ("the pair is x_inter and pred_x0 at that step, two latents (decoded in one batched call)", lambda: 1),
], kind="an int")
