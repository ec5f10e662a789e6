"""Loading: diffusers folders written by diffusers/transformers' own save_pretrained load strictly and give the
reference outputs (float32, max abs diff <= 1e-4 * max |reference|); every bad input is a CheckpointError that
names the problem; the hub resolves known names offline. Tiny random models: the whole file runs in seconds."""

import copy
import json
import shutil

import huggingface_hub
import pytest
import torch
import transformers
from diffusers import AutoencoderKL as ReferenceVAE
from diffusers import AutoencoderTiny as ReferenceTiny
from diffusers import DDIMScheduler
from diffusers import UNet2DConditionModel as ReferenceUNet
from safetensors.torch import load_file, save_file

from minidiff import hub, keymap
from minidiff.clip import CLIPTextConfig
from minidiff.config import to_diffusers
from minidiff.errors import CheckpointError, MinidiffError
from minidiff.load import load_components, load_taesd, load_text_encoder, load_tokenizer, load_unet, load_vae
from minidiff.tokenizer import write_vocab_files
from minidiff.unet import UNetConfig
from minidiff.vae import VAEConfig

RELATIVE_TOLERANCE = 1e-4  # float32


def assert_close(ours, reference, what):
    error, scale = (ours - reference).abs().max().item(), reference.abs().max().item()
    assert error <= RELATIVE_TOLERANCE * scale, f"{what}: max abs diff {error:.3g} > 1e-4 * {scale:.3g}"


def randomized(model):
    """Every parameter perturbed, so that norms are not identities and a mix-up of two tensors shows."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


def reference_unet(**changes):
    return randomized(ReferenceUNet.from_config(to_diffusers(UNetConfig.tiny()) | changes))


def reference_text_encoder(config=None):
    config = config or CLIPTextConfig.tiny()
    return randomized(transformers.CLIPTextModel(transformers.CLIPTextConfig(**to_diffusers(config))))


def unet_inputs(context_dim=32):
    return torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 5, context_dim)


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    """A diffusers model folder as published: model_index.json, unet/ vae/ text_encoder/ tokenizer/ scheduler/."""
    root = tmp_path_factory.mktemp("models") / "tiny-sd"
    torch.manual_seed(0)
    models = {"unet": reference_unet(), "vae": randomized(ReferenceVAE.from_config(to_diffusers(VAEConfig.tiny()))),
              "text_encoder": reference_text_encoder()}
    for name, model in models.items():
        model.save_pretrained(root / name)
    write_vocab_files(root / "tokenizer")
    DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, steps_offset=1,
                  prediction_type="v_prediction").save_pretrained(root / "scheduler")
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    return root, models


def test_diffusers_folder_loads_strictly_and_matches_the_reference(sd_folder):
    root, ref = sd_folder
    parts = load_components(root)
    x, t, context = unet_inputs()
    with torch.no_grad():
        assert_close(parts.unet(x, t, context), ref["unet"](x, t, context).sample, "unet")
        image = torch.rand(1, 3, 16, 16) * 2 - 1
        assert_close(parts.vae.encode(image), ref["vae"].encode(image).latent_dist.mean, "vae encode")
        latent = torch.randn(1, 4, 2, 2)
        assert_close(parts.vae.decode(latent), ref["vae"].decode(latent).sample, "vae decode")
        ids = parts.tokenizer(["a red circle", "a blue square on the left"])
        assert_close(parts.text_encoder(ids), ref["text_encoder"](ids).last_hidden_state, "text encoder")
    assert parts.prediction_type == parts.unet.prediction_type == "v_prediction"  # from scheduler_config.json
    assert parts.scheduler_config["steps_offset"] == 1
    assert torch.equal(parts.schedule.alphas_cumprod.float(), DDIMScheduler.from_pretrained(root / "scheduler")
                       .alphas_cumprod)
    # a component folder on its own, and its weights file named directly
    assert_close(load_unet(root / "unet")(x, t, context), ref["unet"](x, t, context).sample.detach(), "unet/")
    assert load_vae(root / "vae" / "diffusion_pytorch_model.safetensors").config == parts.vae.config


def test_published_text_encoder_keys_with_text_model_prefix_load(tmp_path, sd_folder):
    """Published text_encoder/model.safetensors files say text_model.*; transformers >= 5.6 saves without it."""
    root, ref = sd_folder
    folder = tmp_path / "text_encoder"
    shutil.copytree(root / "text_encoder", folder)
    state = load_file(folder / "model.safetensors")
    state = {f"text_model.{k}": v for k, v in state.items()}
    state["text_model.embeddings.position_ids"] = torch.arange(77)[None]  # a buffer older files carry
    save_file(state, folder / "model.safetensors")
    ids = torch.randint(0, 49408, (1, 77))
    assert_close(load_text_encoder(folder)(ids), ref["text_encoder"](ids).last_hidden_state.detach(), "text")


def test_loaded_models_hold_no_meta_tensors_and_honour_dtype_and_device(sd_folder):
    root, _ = sd_folder
    for model in (load_unet(root, dtype=torch.float16, device="cpu"), load_vae(root, dtype=torch.bfloat16),
                  load_text_encoder(root, dtype=torch.float16)):
        tensors = [*model.parameters(), *model.buffers()]
        assert not any(t.is_meta for t in tensors)
        assert {t.device.type for t in tensors} == {"cpu"}
        assert len({t.dtype for t in tensors if t.is_floating_point()}) == 1
    assert next(load_unet(root).parameters()).dtype == torch.float32  # the default


def test_fp16_variant_is_chosen_or_used_when_it_is_the_only_one(tmp_path, sd_folder):
    root, ref = sd_folder
    folder = tmp_path / "unet"
    copy.deepcopy(ref["unet"]).half().save_pretrained(folder, variant="fp16")
    only_fp16 = load_unet(folder)  # the only weights present
    assert next(only_fp16.parameters()).dtype == torch.float32
    half = ref["unet"].state_dict()
    assert all(torch.equal(v, half[k].half().float()) for k, v in only_fp16.state_dict().items())
    shutil.copy(root / "unet" / "diffusion_pytorch_model.safetensors", folder)  # now both
    chosen = load_unet(folder, variant="fp16", dtype=torch.float16)
    assert all(torch.equal(v, half[k].half()) for k, v in chosen.state_dict().items())
    full = load_unet(folder)
    assert all(torch.equal(v, half[k]) for k, v in full.state_dict().items())
    with pytest.raises(CheckpointError, match="no diffusion_pytorch_model.bf16.safetensors.*variant="):
        load_unet(folder, variant="bf16")


def test_wrong_architecture_names_the_keys_and_says_what_it_means(tmp_path, sd_folder):
    root, _ = sd_folder
    folder = tmp_path / "unet"
    reference_unet(cross_attention_dim=1024).save_pretrained(folder)  # SD 2.x-like context width
    config = json.loads((folder / "config.json").read_text()) | {"cross_attention_dim": 768}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError) as error:
        load_unet(folder)
    message = str(error.value)
    assert "attn2.to_k.weight (32, 1024) in the file, (32, 768) in the model" in message
    assert "context dim 1024 vs 768: an SD 2.x checkpoint into an SD 1.x config" in message
    # a VAE's weights where a UNet's should be
    shutil.copy(root / "vae" / "diffusion_pytorch_model.safetensors", folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match=r"(?s)684 missing key\(s\): time_embedding.*load it with load_vae"):
        load_unet(folder)


def test_an_original_checkpoint_in_a_diffusers_folder_is_recognised(tmp_path, sd_folder):
    root, ref = sd_folder
    folder = tmp_path / "unet"
    shutil.copytree(root / "unet", folder)
    config = to_diffusers(UNetConfig.tiny())
    original = {keymap.PREFIXES["unet"] + k: v for k, v in keymap.to_original(ref["unet"].state_dict(), "unet",
                                                                                 config).items()}
    save_file(original, folder / "diffusion_pytorch_model.safetensors")
    with pytest.raises(CheckpointError, match="original single-file checkpoint; pass the .safetensors file itself"):
        load_unet(folder)


def test_truncated_file_says_damaged_and_to_download_again(tmp_path, sd_folder):
    root, _ = sd_folder
    folder = tmp_path / "vae"
    shutil.copytree(root / "vae", folder)
    weights = folder / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="damaged or incomplete.*download it again"):
        load_vae(folder)
    weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 1\n")
    with pytest.raises(CheckpointError, match="Git LFS pointer"):
        load_vae(folder)


def test_pickle_files_are_refused_unless_allowed_and_then_read_weights_only(tmp_path, sd_folder):
    root, ref = sd_folder
    config = VAEConfig.tiny()
    original = keymap.to_original(ref["vae"].state_dict(), "vae", to_diffusers(config))
    path = tmp_path / "model.ckpt"
    torch.save({"state_dict": {keymap.PREFIXES["vae"] + k: v for k, v in original.items()}, "global_step": 1}, path)
    with pytest.raises(CheckpointError, match="pickle file: unpickling can run arbitrary code.*allow_pickle=True"):
        load_vae(path, config=config)
    vae = load_vae(path, config=config, allow_pickle=True)
    latent = torch.randn(1, 4, 4, 4)
    assert_close(vae.decode(latent), ref["vae"].decode(latent).sample.detach(), "vae from .ckpt")
    # a diffusers folder that has only pickle weights is refused the same way
    folder = tmp_path / "vae"
    folder.mkdir()
    shutil.copy(root / "vae" / "config.json", folder)
    torch.save(ref["vae"].state_dict(), folder / "diffusion_pytorch_model.bin")
    with pytest.raises(CheckpointError, match="allow_pickle=True"):
        load_vae(folder)
    assert load_vae(folder, allow_pickle=True).config == config
    torch.save({"model": torch.nn.Linear(1, 1)}, path)  # an object, not just tensors
    with pytest.raises(CheckpointError, match="weights_only=True"):
        load_vae(path, allow_pickle=True)


def test_missing_paths_and_folders_are_explained(tmp_path, sd_folder):
    root, _ = sd_folder
    with pytest.raises(CheckpointError, match="no such file or folder: .*nope"):
        load_unet(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="neither a diffusers model folder"):
        load_unet(tmp_path)
    partial = tmp_path / "partial"
    partial.mkdir()
    shutil.copy(root / "model_index.json", partial)
    with pytest.raises(CheckpointError, match="diffusers model folder without a unet/ folder"):
        load_unet(partial)
    (partial / "unet").mkdir()
    shutil.copy(root / "unet" / "config.json", partial / "unet")
    with pytest.raises(CheckpointError, match="no weights in .*expected diffusion_pytorch_model.safetensors"):
        load_unet(partial)
    with pytest.raises(CheckpointError, match="not a weights file"):
        load_unet(root / "model_index.json")
    with pytest.raises(CheckpointError, match="describes a AutoencoderKL, not a UNet2DConditionModel: .*load_vae"):
        load_unet(root / "vae" / "diffusion_pytorch_model.safetensors")  # config.json beside it says VAE
    (root / "vae" / "config.json").rename(root / "vae" / "config.json.bak")
    try:
        with pytest.raises(CheckpointError, match="has no model.diffusion_model"):
            load_unet(root / "vae" / "diffusion_pytorch_model.safetensors")
    finally:
        (root / "vae" / "config.json.bak").rename(root / "vae" / "config.json")


def test_taesd_from_diffusers_folder_and_from_original_files(tmp_path):
    reference = randomized(ReferenceTiny())
    reference.save_pretrained(tmp_path / "diffusers")
    state = reference.state_dict()
    for part in ("encoder", "decoder"):
        half = {k: v for k, v in state.items() if k.startswith(part + ".")}
        save_file(keymap.to_original(half, f"taesd_{part}", {}), tmp_path / f"taesd_{part}.safetensors")
    latent = torch.randn(1, 4, 2, 2)
    expected = reference.decode(latent).sample.detach()
    for source in (tmp_path / "diffusers", tmp_path, tmp_path / "taesd_decoder.safetensors"):
        taesd = load_taesd(source)
        assert all(torch.equal(v, state[k]) for k, v in taesd.state_dict().items())
        assert_close(taesd.decode(latent), expected, f"taesd from {source.name}")
    (tmp_path / "taesd_encoder.safetensors").unlink()
    with pytest.raises(CheckpointError, match="both halves: taesd_encoder.safetensors is missing"):
        load_taesd(tmp_path / "taesd_decoder.safetensors")


def test_tokenizer_from_folder_and_for_single_files(tmp_path, sd_folder):
    root, _ = sd_folder
    assert load_tokenizer(root)(["a cat"]).shape == (1, 77)
    sd2 = tmp_path / "v2.safetensors"
    save_file({"cond_stage_model.model.token_embedding.weight": torch.zeros(2, 2)}, sd2)
    assert load_tokenizer(sd2)(["a cat"])[0, -1] == 0  # SD 2.x pads with "!" (id 0)
    sd1 = tmp_path / "v1.safetensors"
    save_file({"cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(2)}, sd1)
    assert load_tokenizer(sd1)(["a cat"])[0, -1] == 49407  # SD 1.x pads with <|endoftext|>


# --- the hub: known names, offline ---------------------------------------------------------------------------


def fake_cache(cache, name, files):
    """The Hugging Face cache layout: models--org--name/refs/main -> snapshots/<commit>/<files>."""
    repo = cache / ("models--" + hub.KNOWN_MODELS[name]["repo"].replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123abcd")
    snapshot = repo / "snapshots" / "0123abcd"
    for file in files:
        (snapshot / file).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / file).write_text("{}")
    return snapshot


def test_manifest_lists_the_official_models():
    assert {"sd15", "sd21", "sd21-base", "bk-sdm-base", "bk-sdm-small", "bk-sdm-tiny", "taesd"} <= set(hub.KNOWN_MODELS)
    assert hub.KNOWN_MODELS["sd15"]["repo"] == "stable-diffusion-v1-5/stable-diffusion-v1-5"
    assert hub.KNOWN_MODELS["sd21"]["prediction_type"] == "v_prediction"
    for entry in hub.KNOWN_MODELS.values():
        assert {"license", "size_gb", "components", "description"} <= set(entry)
        assert ("repo" in entry) != ("bundled" in entry)  # downloaded from the hub, or shipped in weights/
    assert "unet/diffusion_pytorch_model.fp16.safetensors" in hub.files("sd15", "fp16")
    with pytest.raises(MinidiffError, match="bk-sdm-tiny has no 'fp16' variant"):
        hub.files("bk-sdm-tiny", "fp16")


def test_resolve_finds_a_known_model_in_the_cache_without_network(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve(tmp_path) == tmp_path  # a path is returned as it is
    with pytest.raises(MinidiffError, match="sd15 .* is not downloaded yet: run `minidiff download sd15`"):
        hub.resolve("sd15", cache_dir=tmp_path)
    with pytest.raises(MinidiffError, match="known models: shapes, sd15, sd21"):
        hub.resolve("sd-99", cache_dir=tmp_path)
    snapshot = fake_cache(tmp_path, "sd15", hub.files("sd15", "fp16")[:-1])  # incomplete: no scheduler config
    assert hub.local_path("sd15", cache_dir=tmp_path) is None
    (snapshot / "scheduler").mkdir()
    (snapshot / "scheduler" / "scheduler_config.json").write_text("{}")
    assert hub.resolve("sd15", cache_dir=tmp_path) == snapshot  # the fp16 files alone will do
    assert hub.local_path("sd15", cache_dir=tmp_path, variant="fp16") == snapshot


def test_download_fetches_only_the_needed_files_and_nothing_when_cached(tmp_path, monkeypatch):
    calls = []

    def fake_snapshot_download(repo_id, allow_patterns=None, local_files_only=False, cache_dir=None, **kwargs):
        calls.append((repo_id, tuple(allow_patterns), local_files_only))
        if local_files_only:
            raise huggingface_hub.errors.LocalEntryNotFoundError("not cached")
        return str(fake_cache(tmp_path, "taesd", allow_patterns))

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    folder = hub.download("taesd", cache_dir=tmp_path)
    assert (folder / "diffusion_pytorch_model.safetensors").is_file()
    assert calls[-1] == ("madebyollin/taesd", ("config.json", "diffusion_pytorch_model.safetensors"), False)
    real = monkeypatch.undo() or huggingface_hub.snapshot_download

    def offline_only(repo_id, **kwargs):
        assert kwargs.get("local_files_only"), "went online for a model already in the cache"
        return real(repo_id, **kwargs)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline_only)
    assert hub.download("taesd", cache_dir=tmp_path) == folder
    with pytest.raises(MinidiffError, match="unknown model 'nope': known models are shapes, sd15"):
        hub.download("nope")


def test_a_missing_mid_block_is_explained(tmp_path):
    folder = tmp_path / "unet"
    reference_unet(mid_block_type=None).save_pretrained(folder)  # BK-SDM small/tiny drop the mid block
    config = json.loads((folder / "config.json").read_text()) | {"mid_block_type": "UNetMidBlock2DCrossAttn"}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"(?s)missing key\(s\): mid_block.*the file has no mid block: BK-SDM"):
        load_unet(folder)


def test_known_names_resolve_through_the_hub(monkeypatch, sd_folder):
    root, _ = sd_folder
    monkeypatch.setattr(hub, "local_path", lambda name, cache_dir=None, variant=None: None)
    with pytest.raises(MinidiffError, match="run `minidiff download sd15`"):
        load_unet("sd15")
    monkeypatch.setattr(hub, "local_path", lambda name, cache_dir=None, variant=None: root)
    assert load_unet("sd15").config == UNetConfig.tiny()
