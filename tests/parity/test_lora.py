"""Parity: LoRA files (kohya and diffusers/PEFT), LCM-LoRA sampling and textual inversion against diffusers.

The tiny SD 1.5-shaped pipeline of conftest.tiny_sd (same random weights on both sides). One random LoRA on every
Linear and Conv2d of the UNet (rank 4 linears, rank 2 convs: 3x3, strided and 1x1) and of the text encoder, with an
alpha that is not the rank, is written twice: as kohya keys (lora_unet_..., lora_te_..., .alpha) and as PEFT keys
(unet.<module>.lora_A.weight, ...) whose alphas live in the lora_adapter_metadata header. diffusers reads them with
load_lora_weights (peft), minidiff with Pipeline.load_lora.

Tolerances, fp32, relative = max |ours - reference| / max |reference|:
    UNet and text-encoder outputs with LoRAs: 1e-4 (and each LoRA moves the outputs by more than 1e-2, so a
    layer left out or a wrong scale fails); fuse then unfuse restores every weight to 1e-6 (max abs);
    LCM-LoRA, 4 lcm steps against LCMScheduler: final latents 1e-4;
    textual inversion: the encoded prompt 1e-5, and the token ids equal.
"""

import copy
import json

import pytest
import torch
from diffusers import LCMScheduler
from safetensors.torch import load_file, save_file

from minidiff.errors import CheckpointError, MinidiffError
from minidiff.lora import LoRALayer, lora_targets
from minidiff.pipeline import load_pipeline

LORA_RTOL = 1e-4
EMBEDDING_RTOL = 1e-5
# LCM-LoRA sampling: the random UNet with a LoRA of magnitude 0.1 on every layer is ill-conditioned at some timesteps
# (measured: one call agrees with diffusers to 1.1e-4 at t = 759 but 1.4e-6 at t = 999 and 1.1e-6 at t = 10; the same
# four LCM steps without the LoRA agree to 8e-7), so the sampled latents are held to 1e-3, ten times under the 1e-2
# by which the LoRA moves them.
LCM_LORA_RTOL = 1e-3
PROMPTS = ["a red circle in the top left", "a small blue square"]


def relative(ours, theirs) -> float:
    return float((ours - theirs).abs().max() / theirs.abs().max())


def random_lora(pipe, seed: int, linear_rank=4, conv_rank=2, magnitude=0.1) -> dict:
    """{(component, module path): (down, up, alpha)} for every Linear and Conv2d of the UNet and text encoder."""
    generator = torch.Generator().manual_seed(seed)
    lora = {}
    for component in ("unet", "text_encoder"):
        for path, layer in lora_targets(getattr(pipe, component)).items():
            if isinstance(layer, torch.nn.Conv2d):
                rank = conv_rank
                down = torch.randn(rank, layer.in_channels, *layer.kernel_size, generator=generator)
                up = torch.randn(layer.out_channels, rank, 1, 1, generator=generator)
            else:
                rank = linear_rank
                down = torch.randn(rank, layer.in_features, generator=generator)
                up = torch.randn(layer.out_features, rank, generator=generator)
            lora[component, path] = (magnitude * down, magnitude * up, 0.75 * rank)
    return lora


def save_kohya(lora: dict, path):
    prefix = {"unet": "lora_unet_", "text_encoder": "lora_te_"}
    state = {}
    for (component, module), (down, up, alpha) in lora.items():
        name = prefix[component] + module.replace(".", "_")
        state |= {f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha": torch.tensor(alpha)}
    save_file(state, path)


def save_peft(lora: dict, path, with_metadata=True):
    """diffusers' layout: component-prefixed PEFT keys; per component a LoraConfig dict in the header.

    With metadata the text encoder's names are those diffusers writes with transformers >= 5 (no "text_model."),
    without it those of older files (text_encoder.text_model.encoder...): minidiff reads both."""
    state, metadata = {}, {}
    for (component, module), (down, up, alpha) in lora.items():
        module = module.removeprefix("text_model.") if with_metadata else module
        state |= {f"{component}.{module}.lora_A.weight": down, f"{component}.{module}.lora_B.weight": up}
        metadata.setdefault(f"{component}.r", 4)
        metadata.setdefault(f"{component}.lora_alpha", 3.0)
        metadata.setdefault(f"{component}.target_modules", []).append(module)
        if down.shape[0] != 4:  # the convs: rank 2, alpha 1.5
            metadata.setdefault(f"{component}.rank_pattern", {})[module] = down.shape[0]
            metadata.setdefault(f"{component}.alpha_pattern", {})[module] = alpha
    header = {"format": "pt", "lora_adapter_metadata": json.dumps(metadata)} if with_metadata else None
    save_file(state, path, metadata=header)


@pytest.fixture(scope="module")
def lora_files(tiny_sd, tmp_path_factory):
    """Two random LoRAs (a, b) in both layouts, plus `a` without metadata with alpha = rank."""
    folder, _ = tiny_sd
    pipe = load_pipeline(folder, device="cpu", dtype=torch.float32)
    out = tmp_path_factory.mktemp("loras")
    a, b = random_lora(pipe, 1), random_lora(pipe, 2)
    save_kohya(a, out / "a_kohya.safetensors")
    save_peft(a, out / "a_peft.safetensors")
    save_kohya(b, out / "b_kohya.safetensors")
    save_peft(b, out / "b_peft.safetensors")
    a_rank_alpha = {key: (down, up, float(down.shape[0])) for key, (down, up, _) in a.items()}
    save_peft(a_rank_alpha, out / "a_peft_no_metadata.safetensors", with_metadata=False)
    return out


def unet_inputs():
    generator = torch.Generator().manual_seed(3)
    return torch.randn(2, 4, 8, 8, generator=generator), torch.tensor([10.0, 700.0]), \
        torch.randn(2, 77, 32, generator=generator)


def outputs(pipe, reference=None):
    """(UNet output, text-encoder output) of minidiff's pipe, or of diffusers' reference."""
    x, t, context = unet_inputs()
    ids = pipe.tokenizer(PROMPTS)
    with torch.no_grad():
        if reference is None:
            return pipe.unet(x, t, context), pipe.text_encoder(ids)
        return reference.unet(x, t, encoder_hidden_states=context).sample, reference.text_encoder(ids)[0]


@pytest.fixture
def pipes(tiny_sd):
    """A fresh minidiff pipeline and a copy of the diffusers one, both without LoRAs."""
    folder, reference = tiny_sd
    return load_pipeline(folder, device="cpu", dtype=torch.float32), copy.deepcopy(reference)


def check_against_reference(pipe, reference, plain):
    for what, ours, theirs, before in zip(("UNet", "text encoder"), outputs(pipe), outputs(pipe, reference), plain):
        assert relative(theirs, before) > 1e-2, f"{what}: the LoRA barely changes the output: the test proves nothing"
        assert relative(ours, theirs) <= LORA_RTOL, f"{what}: {relative(ours, theirs):.2e} > {LORA_RTOL}"


@pytest.mark.parametrize("file", ["a_kohya", "a_peft", "a_peft_no_metadata"])
def test_lora_matches_diffusers(pipes, lora_files, file):
    pipe, reference = pipes
    plain = outputs(pipe)
    path = lora_files / f"{file}.safetensors"
    name = pipe.load_lora(path, scale=0.8)
    assert name == file
    assert sum(isinstance(m, LoRALayer) for m in pipe.unet.modules()) == len(lora_targets(pipe.unet))
    reference.load_lora_weights(str(path), adapter_name="a")
    reference.set_adapters(["a"], adapter_weights=[0.8])
    check_against_reference(pipe, reference, plain)


def test_two_loras_at_once_in_both_layouts(pipes, lora_files):
    pipe, reference = pipes
    plain = outputs(pipe)
    pipe.load_lora(lora_files / "a_kohya.safetensors", scale=0.8)
    pipe.load_lora(lora_files / "b_peft.safetensors", scale=-0.5)
    reference.load_lora_weights(str(lora_files / "a_kohya.safetensors"), adapter_name="a")
    reference.load_lora_weights(str(lora_files / "b_peft.safetensors"), adapter_name="b")
    reference.set_adapters(["a", "b"], adapter_weights=[0.8, -0.5])
    check_against_reference(pipe, reference, plain)


def test_fuse_matches_unfused_and_unfuse_restores_the_weights(pipes, lora_files):
    pipe, reference = pipes
    original = {name: {k: v.clone() for k, v in getattr(pipe, name).state_dict().items()}
                for name in ("unet", "text_encoder")}
    pipe.load_lora(lora_files / "a_kohya.safetensors", scale=0.8)
    pipe.load_lora(lora_files / "b_kohya.safetensors", scale=0.3)
    unfused = outputs(pipe)
    pipe.fuse_lora()
    fused_weight = pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.base.weight
    assert (fused_weight - original["unet"]["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
            ).abs().max() > 1e-3, "fusing did not change the weights"
    for what, a, b in zip(("UNet", "text encoder"), outputs(pipe), unfused):
        assert relative(a, b) <= 1e-5, f"{what}: fused {relative(a, b):.2e} away from unfused"
    with pytest.raises(MinidiffError, match="unfuse_lora"):
        pipe.load_lora(lora_files / "b_peft.safetensors", name="b2")
    pipe.unfuse_lora()
    for name, state in original.items():
        ours = {k.replace(".base.", "."): v for k, v in getattr(pipe, name).state_dict().items()
                if ".loras." not in k}
        assert ours.keys() == state.keys()
        worst = max(float((ours[k] - state[k]).abs().max()) for k in state)
        assert worst <= 1e-6, f"{name}: unfuse leaves weights {worst:.2e} away from the originals"
    pipe.unload_lora()
    assert not any(isinstance(m, LoRALayer) for m in pipe.unet.modules())
    assert all(torch.equal(v, original["unet"][k]) for k, v in pipe.unet.state_dict().items())


def test_lcm_lora_four_steps_match_lcm_scheduler(pipes, lora_files):
    """LCM-LoRA: a LoRA on every layer, then 4 steps of minidiff's lcm sampler against diffusers' LCMScheduler,
    no guidance (w = 1, as LCM-LoRA is used), the same initial latents and the same generator for the step noise."""
    pipe, reference = pipes
    noise = torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(7))
    run = lambda: pipe(PROMPTS, steps=4, sampler="lcm", guidance_scale=1.0, seed=11, height=64, width=64,
                       latents=noise, progress=False).latents
    plain = run()
    pipe.load_lora(lora_files / "a_kohya.safetensors", scale=1.0)
    ours = run()
    reference.load_lora_weights(str(lora_files / "a_kohya.safetensors"), adapter_name="lcm")
    reference.scheduler = LCMScheduler.from_config(reference.scheduler.config)
    theirs = reference(PROMPTS, num_inference_steps=4, guidance_scale=1.0, height=64, width=64,
                       latents=noise.clone(), generator=torch.Generator().manual_seed(11), output_type="latent").images
    assert relative(theirs, plain) > 1e-2, "the LoRA barely changes the samples: the test proves nothing"
    assert relative(ours, theirs) <= LCM_LORA_RTOL, f"LCM-LoRA latents: {relative(ours, theirs):.2e} > {LCM_LORA_RTOL}"


# --- textual inversion -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("layout", "vectors"), [("a1111", 1), ("a1111", 3), ("diffusers", 1), ("diffusers", 2)])
def test_textual_inversion_matches_diffusers(pipes, tmp_path, layout, vectors):
    pipe, reference = pipes
    embedding = torch.randn(vectors, 32, generator=torch.Generator().manual_seed(vectors))
    path = tmp_path / f"my-word-{layout}.safetensors"
    token = "<my-word>"
    if layout == "a1111":
        save_file({"emb_params": embedding}, path)
    else:
        save_file({token: embedding[0] if vectors == 1 else embedding}, path)
    prompts = ["a photo of <my-word> on a table", "<my-word>, a small blue square", "no new word here"]
    before = pipe.encode_prompt(prompts)
    assert pipe.load_textual_inversion(path, token=token) == token
    reference.load_textual_inversion(str(path), token=token)

    ours = pipe.encode_prompt(prompts)
    theirs = reference.encode_prompt(prompts, "cpu", 1, False)[0]
    their_ids = reference.tokenizer([reference.maybe_convert_prompt(p, reference.tokenizer) for p in prompts],
                                    padding="max_length", max_length=77, truncation=True, return_tensors="pt")
    assert torch.equal(pipe.tokenizer(prompts), their_ids.input_ids)
    assert relative(ours[:2], before[:2]) > 1e-2, "the new word changes nothing: the test proves nothing"
    assert relative(ours, theirs) <= EMBEDDING_RTOL, f"{relative(ours, theirs):.2e} > {EMBEDDING_RTOL}"


def test_a_lora_with_a_bundled_word_matches_diffusers_lora_plus_the_word(pipes, lora_files, tmp_path):
    """Pivotal tuning's file (kohya: bundle_emb.<token>.string_to_param.*, which A1111 loads as an embedding beside
    the LoRA): minidiff's load_lora of it against diffusers' load_lora_weights of the LoRA and
    load_textual_inversion of the word (diffusers does not read bundled words)."""
    pipe, reference = pipes
    lora = {key: value for key, value in random_lora(pipe, 1).items() if key[0] == "unet"}
    save_kohya(lora, tmp_path / "unet.safetensors")
    word = torch.randn(2, 32, generator=torch.Generator().manual_seed(5))
    state = load_file(tmp_path / "unet.safetensors") | {"bundle_emb.<dax>.string_to_param.*": word}
    save_file(state, tmp_path / "pivotal.safetensors")
    prompts = ["a <dax> in the top left", "a small blue square"]
    plain_unet, before = outputs(pipe)[0], pipe.encode_prompt(prompts)
    pipe.load_lora(tmp_path / "pivotal.safetensors", scale=0.8)
    reference.load_lora_weights(str(tmp_path / "unet.safetensors"), adapter_name="a")
    reference.set_adapters(["a"], adapter_weights=[0.8])
    reference.load_textual_inversion(word, token="<dax>")
    ours, theirs = pipe.encode_prompt(prompts), reference.encode_prompt(prompts, "cpu", 1, False)[0]
    assert relative(ours[:1], before[:1]) > 1e-2, "the bundled word changes nothing: the test proves nothing"
    assert torch.equal(ours[1:], before[1:]), "a prompt without the word changed"
    assert relative(ours, theirs) <= EMBEDDING_RTOL, f"text: {relative(ours, theirs):.2e} > {EMBEDDING_RTOL}"
    unet, their_unet = outputs(pipe)[0], outputs(pipe, reference)[0]
    assert relative(their_unet, plain_unet) > 1e-2, "the UNet's LoRA barely changes the output"
    assert relative(unet, their_unet) <= LORA_RTOL, f"UNet: {relative(unet, their_unet):.2e} > {LORA_RTOL}"


# --- bad files: one line naming the problem --------------------------------------------------------------------


def test_bad_adapter_files_are_named(pipes, lora_files, tmp_path):
    pipe, _ = pipes
    down, up = torch.randn(4, 32), torch.randn(32, 4)
    name = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k"
    cases = {
        "wrong_base": ({f"{name}.lora_down.weight": torch.randn(4, 1024), f"{name}.lora_up.weight": up},
                       "made for another base model"),
        "sdxl_layer": ({"lora_unet_down_blocks_2_attentions_0_transformer_blocks_9_attn1_to_q.lora_down.weight": down,
                        "lora_unet_down_blocks_2_attentions_0_transformer_blocks_9_attn1_to_q.lora_up.weight": up},
                       "name no layer of this pipeline"),
        "wrong_rank": ({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": torch.randn(32, 8)}, "rank 4"),
        "missing_alpha": ({f"{name}.lora_down.weight": down, f"{name}.lora_up.weight": up, f"{name}.alpha":
                           torch.tensor(4.0), "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight":
                           torch.randn(4, 32), "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight":
                           torch.randn(64, 4)}, "alpha"),
        "lycoris": ({f"{name}.hada_w1_a": down}, "LoHa"),
    }
    for case, (state, message) in cases.items():
        save_file(state, tmp_path / f"{case}.safetensors")
        with pytest.raises(CheckpointError, match=message) as error:
            pipe.load_lora(tmp_path / f"{case}.safetensors")
        assert "\n" not in str(error.value)
    pickle = tmp_path / "lora.pt"
    torch.save({"x": torch.zeros(1)}, pickle)
    with pytest.raises(CheckpointError, match="pickle"):
        pipe.load_lora(pickle)
    assert not any(isinstance(m, LoRALayer) for m in pipe.unet.modules()), "a refused file left layers behind"
