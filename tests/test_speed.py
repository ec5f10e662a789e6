"""The speed options keep the numbers: minidiff.speed (FastUNet, optimize, sliced attention) and the VAE's tiled
decoding and float16 overflow guard (minidiff.speed.vae_decode); the CPU kernels are in test_speed_kernels.py. All
float32 on the CPU unless a test says otherwise; tolerances are relative to max |reference| and stated in each
test."""

import copy
import subprocess
import sys
import types
import warnings

import pytest
import torch
import torch.nn.functional as F

from minidiff.errors import MinidiffError
from minidiff.pipeline import Pipeline
from minidiff.schedule import NoiseSchedule
from minidiff.speed import (
    CudaGraphCall,
    FastUNet,
    cpu_defaults,
    optimize,
    reuse_freed_memory,
    reuse_memory_available,
    set_attention,
    timestep_tensor,
    vae_decode,
)
from minidiff.speed.vae_decoding import decode_tiled, tile_starts
from minidiff.taesd import TAESD
from minidiff.unet import UNet, UNetConfig
from minidiff.vae import AutoencoderKL, VAEConfig


def relative_error(out, reference):
    return ((out - reference).abs().max() / reference.abs().max()).item()


def perturbed(model):
    """Random norm weights and biases (the default 1 and 0 would hide mistakes)."""
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return model.eval()


@pytest.fixture(scope="module")
def unet_and_inputs():
    torch.manual_seed(0)
    unet = perturbed(UNet(UNetConfig.tiny()))
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    with torch.no_grad():
        reference = unet(x, 321, context)
    return unet, x, context, reference


# --- the UNet options --------------------------------------------------------------------------------


def test_timestep_tensor_is_made_on_the_device_in_float32():
    x = torch.zeros(3, 4, 8, 8)
    assert torch.equal(timestep_tensor(250, x), torch.full((3,), 250.0))
    assert torch.equal(timestep_tensor(torch.tensor(7), x), torch.full((3,), 7.0))
    assert torch.equal(timestep_tensor(torch.tensor([1, 2, 3]), x), torch.tensor([1.0, 2.0, 3.0]))
    assert timestep_tensor(12.5, x).dtype == torch.float32


def test_fast_unet_eager_is_the_unet(unet_and_inputs):
    unet, x, context, reference = unet_and_inputs
    fast = FastUNet(unet)
    with torch.no_grad():
        assert torch.equal(fast(x, 321, context), reference)  # t as a device tensor changes nothing
    assert fast.config is unet.config


def test_channels_last_matches_fp32_within_1e_5():
    torch.manual_seed(0)
    unet = perturbed(UNet(UNetConfig.tiny()))
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    with torch.no_grad():
        reference = unet(x, 321, context)
        fast = FastUNet(unet, channels_last=True)
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        assert relative_error(fast(x, 321, context), reference) <= 1e-5


@pytest.mark.slow  # 20-90 s of tracing on a busy 2-core CPU
def test_compiled_unet_matches_eager_and_does_not_recompile_per_timestep():
    # backend "eager": TorchDynamo captures the graph (what could break: graph breaks, guards, recompiles per t)
    # without TorchInductor's code generation, which takes minutes on a small CPU (`minidiff bench` measures it)
    import torch._dynamo

    torch._dynamo.reset()
    torch._dynamo.utils.counters.clear()  # the counters are global: earlier compiles in this process count too
    torch.manual_seed(0)
    unet = cpu_defaults(perturbed(UNet(UNetConfig.tiny())))  # with the CPU kernels, as loaded on a CPU
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    fast = FastUNet(unet, compile=True, compile_options={"backend": "eager", "fullgraph": True})
    with torch.no_grad():
        for t in (999, 500.5):  # an int and a float: t reaches the graph as a tensor
            assert relative_error(fast(x, t, context), unet(x, t, context)) <= 1e-6
    counters = torch._dynamo.utils.counters["stats"]
    assert counters["unique_graphs"] == 1, "the UNet was compiled more than once"


@pytest.mark.slow  # 1-3 min: TorchInductor generates and compiles C++ for the tiny UNet, twice
def test_frozen_unet_matches_eager_and_its_weights_are_constants():
    # Inductor's real code generation: freezing happens only there (the "eager" backend has nothing to freeze)
    torch.manual_seed(0)
    unet = perturbed(UNet(UNetConfig.tiny()))
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    with torch.no_grad():
        reference = unet(x, 321, context)
        # compiled unfrozen first: the frozen UNet must get its own graph, not reuse this one for UNet.forward
        assert relative_error(FastUNet(unet, compile=True)(x, 321, context), reference) <= 1e-5
        frozen = FastUNet(unet, compile=True, freeze=True)
        out = frozen(x, 321, context)
        assert relative_error(out, reference) <= 1e-5
        unet.conv_out.bias.add_(1.0)  # the frozen graph holds its own folded copy of the weights
        assert torch.equal(frozen(x, 321, context), out)
        assert not torch.allclose(unet(x, 321, context), out)


def test_sliced_attention_matches_plain_within_1e_5(unet_and_inputs):
    unet, x, context, reference = unet_and_inputs
    sliced = copy.deepcopy(unet)  # the kernels are the model's own: the shared fixture stays plain
    with torch.no_grad():
        for slice_size in (1, 5, 100):  # 256 queries at the top level: uneven slices, and one slice
            set_attention(sliced, "sdpa", slice_size)
            assert relative_error(sliced(x, 321, context), reference) <= 1e-5
        optimize(sliced, attention="naive", attention_slice=7)
        assert relative_error(sliced(x, 321, context), reference) <= 1e-5
        assert torch.equal(unet(x, 321, context), reference)


def test_optimize_a_pipeline_wraps_the_unet_once_and_sets_the_vae_tiles():
    torch.manual_seed(0)
    unet, vae = UNet(UNetConfig.tiny()).eval(), AutoencoderKL(VAEConfig.tiny()).eval()
    pipe = Pipeline(unet, vae, None, None, NoiseSchedule.sd(), taesd=TAESD().eval())
    optimize(pipe, channels_last=True, vae_tile_size=8)
    assert isinstance(pipe.unet, FastUNet) and pipe.unet.unet is unet and pipe.vae_tile_size == 8
    assert vae.decoder.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    optimize(pipe)  # again: wraps the plain UNet, not the wrapper
    assert pipe.unet.unet is unet and pipe.vae_tile_size is None
    assert pipe.dtype == torch.float32 and pipe.latent_channels() == 4  # the pipeline still sees the UNet


def test_pipeline_decodes_in_tiles_when_asked():
    torch.manual_seed(0)
    vae = perturbed(AutoencoderKL(VAEConfig.tiny()))
    pipe = Pipeline(UNet(UNetConfig.tiny()).eval(), vae, None, None, NoiseSchedule.sd())
    latents = torch.randn(1, 4, 12, 12)
    pipe.vae_tile_size = 8
    expected = vae_decode(vae, latents / vae.scaling_factor, tile_size=8)
    assert torch.equal(pipe.decode(latents), expected)
    assert not torch.equal(expected, vae.decode(latents / vae.scaling_factor))


@pytest.mark.parametrize("options, message", [
    (dict(vae_tile_size=4), "vae_tile_size"),
    (dict(cuda_graphs=True), "CUDA"),
    (dict(attention="flash"), "unknown attention backend"),
    (dict(attention_slice=0), "slice_size"),
    (dict(freeze=True), "compile=True"),
])
def test_bad_options_say_what_to_do(options, message):
    target = types.SimpleNamespace(unet=UNet(UNetConfig.tiny()), vae=None, taesd=None)
    if options.get("cuda_graphs") and torch.cuda.is_available():
        pytest.skip("cuda_graphs is valid here (the model could be moved to the GPU)")
    with pytest.raises(MinidiffError, match=message):
        optimize(target, **options)


REUSE_MEMORY_SCRIPT = """
import torch
import torch.nn.functional as F
from minidiff.speed import reuse_freed_memory

def resident_mb():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024

x, weight = torch.randn(2, 320, 64, 64), torch.randn(320, 320, 3, 3)

def step():  # the tensors of a 512 px UNet layer; returns the MB given back to the kernel when they are freed
    projected = torch.ones(2, 4096, 2560)  # 84 MB: a GEGLU projection
    h = F.silu(F.group_norm(F.conv2d(x, weight, padding=1), 32))  # 10 MB feature maps
    (projected[..., :1280] * F.gelu(projected[..., 1280:])).sum() + h.sum()
    during = resident_mb()
    del projected, h
    return during - resident_mb()

default = step()
reuse_freed_memory(True)
kept = max(step() for _ in range(3))
before = resident_mb()
for _ in range(8):
    step()
grown = resident_mb() - before
before = resident_mb()
reuse_freed_memory(False)
print(default, kept, grown, before - resident_mb())
"""


@pytest.mark.skipif(not reuse_memory_available(), reason="reuse_memory tunes glibc's allocator (Linux)")
def test_reuse_memory_keeps_freed_tensors_in_the_process_and_off_gives_them_back():
    # a fresh process: the allocator's state in this one depends on the tests before
    out = subprocess.run([sys.executable, "-c", REUSE_MEMORY_SCRIPT], capture_output=True, text=True, check=True)
    default, kept, grown, trimmed = map(float, out.stdout.split())
    assert default > 80  # glibc's default: the large block goes back to the kernel at once
    assert kept < 10  # with reuse_memory: kept in the heap...
    # ...and used again by the next steps: eight of them grow the process by less than one step's tensors (a heap
    # that did not reuse them would grow by that much every step). Not a tighter bound: now and then the resident
    # size rises once by 20 MB (2 of 10 runs right after a long benchmark on the 2-core Intel Xeon, 0 of the next
    # 100), a one-off, not a growth per step
    assert grown < default
    assert trimmed > 80  # off again: what the heap kept goes back


def test_optimize_switches_reuse_memory_on(monkeypatch):
    calls = []
    monkeypatch.setattr("minidiff.speed.reuse_freed_memory", calls.append)
    optimize(UNet(UNetConfig.tiny()), reuse_memory=True)
    optimize(UNet(UNetConfig.tiny()))  # off by default: leaves the allocator as it is
    assert calls == [True]


def test_reuse_memory_elsewhere_says_to_drop_it(monkeypatch):
    monkeypatch.setattr("platform.system", lambda: "Darwin")
    with pytest.raises(MinidiffError, match="drop reuse_memory"):
        reuse_freed_memory(True)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a CUDA GPU")
def test_cuda_graph_replay_matches_eager_on_gpu():
    torch.manual_seed(0)
    unet = perturbed(UNet(UNetConfig.tiny())).cuda()
    x, context = torch.randn(2, 4, 16, 16, device="cuda"), torch.randn(2, 7, 32, device="cuda")
    fast = FastUNet(unet, cuda_graphs=True)
    with torch.no_grad():
        for t in (999, 500.5):  # the second call replays the graph with new inputs
            assert relative_error(fast(x * t / 500, t, context), unet(x * t / 500, t, context)) <= 1e-4
    assert len(fast.graphed.graphs) == 1


def test_cuda_graph_call_captures_once_per_shape():
    if not torch.cuda.is_available():
        call = CudaGraphCall(lambda a: a * 2)
        assert call.graphs == {}  # nothing is captured before the first call (which needs a GPU)
        return
    call = CudaGraphCall(lambda a: a * 2)
    a = torch.arange(4.0, device="cuda")
    assert torch.equal(call(a), a * 2) and torch.equal(call(a + 1), (a + 1) * 2)
    call(torch.zeros(3, device="cuda"))
    assert len(call.graphs) == 2


# --- the VAE: tiled decoding and the float16 guard -----------------------------------------------------


def test_tile_starts_cover_the_size_with_the_overlap():
    assert tile_starts(32, 16, 8) == [0, 8, 16]
    assert tile_starts(30, 16, 4) == [0, 12, 14]  # the last tile ends at the border
    assert tile_starts(16, 32, 8) == [0]


def test_tile_blending_is_exact_for_a_local_decoder():
    """With a decoder that has no context across pixels (nearest upsampling), tiling must change nothing: this
    checks the tile positions and the blend weights, which sum to 1 everywhere."""
    latent = torch.randn(2, 4, 20, 28)
    local = lambda z: F.interpolate(z[:, :3] * 2, scale_factor=8, mode="nearest")
    for tile, overlap in ((8, 0), (8, 3), (12, 4), (16, 15)):
        assert torch.allclose(decode_tiled(local, latent, tile, overlap, 8), local(latent), atol=1e-6)


def test_tiled_decode_is_close_to_the_untiled_decode():
    """Each tile normalises (GroupNorm) and attends (mid-block) within itself, so tiles differ from the whole; on
    this random tiny VAE with 16/24 tiles the mean |difference| is 0.060 with overlap 8 (0.084 with none) for an
    image of std 0.43. Pass: mean |diff| <= 0.2 std, and the overlap reduces the error."""
    torch.manual_seed(0)
    vae = perturbed(AutoencoderKL(VAEConfig.tiny()))
    latent = torch.randn(1, 4, 24, 24)
    with torch.no_grad():
        whole = vae.decode(latent)
        blended = vae_decode(vae, latent, tile_size=16, tile_overlap=8)
        seams = vae_decode(vae, latent, tile_size=16, tile_overlap=0)
        assert torch.equal(vae_decode(vae, latent, tile_size=24), whole)  # one tile: the plain decode
    assert blended.shape == whole.shape
    assert (blended - whole).abs().mean() <= 0.2 * whole.std()
    assert (blended - whole).abs().mean() < (seams - whole).abs().mean()


@pytest.mark.parametrize("tile_size, tile_overlap", [(4, 0), (16, 16), (16, -1), (16.0, 4), (16.0, None)])
def test_bad_tiles_say_what_to_do(tile_size, tile_overlap):
    vae = AutoencoderKL(VAEConfig.tiny()).eval()
    with pytest.raises(MinidiffError, match="tile_size"):
        vae_decode(vae, torch.randn(1, 4, 8, 8), tile_size=tile_size, tile_overlap=tile_overlap)


def overflowing_vae():
    """A tiny VAE whose first decoder conv produces values beyond float16's 65504 (the 'black image' bug):
    finite in float32 (the GroupNorm after it rescales them), inf/NaN in float16."""
    torch.manual_seed(0)
    vae = perturbed(AutoencoderKL(VAEConfig.tiny()))
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(3e5)
    return vae


@pytest.mark.parametrize("tile_size", [None, 8])
def test_float16_decode_that_overflows_is_redone_in_float32(tile_size):
    vae = overflowing_vae()
    latent = torch.randn(1, 4, 12, 12)
    half = AutoencoderKL(VAEConfig.tiny()).eval()
    half.load_state_dict(vae.state_dict())
    half.half()
    with torch.no_grad():
        raw = half.decoder(half.post_quant_conv(latent.half()))
        assert not torch.isfinite(raw).all()  # the overflow is real
        with pytest.warns(UserWarning, match="overflowed.*decode_in_float32"):
            image = vae_decode(half, latent.half(), tile_size=tile_size)
        assert torch.isfinite(image).all() and image.dtype == torch.float32
        assert half.decoder.conv_in.weight.dtype == torch.float32  # it stays upcast
        # the same float16-rounded weights, in float32 from the start: tolerance 1e-5 relative
        vae.load_state_dict({k: v.float() for k, v in half.state_dict().items()})
        assert relative_error(image, vae_decode(vae, latent.half().float(), tile_size=tile_size)) <= 1e-5
        assert half.encoder.conv_in.weight.dtype == torch.float16  # only the decoding half is upcast


def test_float16_decode_without_overflow_stays_float16():
    torch.manual_seed(0)
    vae = perturbed(AutoencoderKL(VAEConfig.tiny())).half()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with torch.no_grad():
            image = vae_decode(vae, torch.randn(1, 4, 8, 8).half())
    assert image.dtype == torch.float16 and torch.isfinite(image).all()


def test_a_redo_that_is_not_finite_either_is_an_error():
    """NaN latents stay NaN in float32: the redo must not hand back a black image."""
    vae = perturbed(AutoencoderKL(VAEConfig.tiny())).half()
    latent = torch.randn(1, 4, 8, 8).half()
    latent[0, 0, 3, 3] = float("nan")
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")  # the overflow warning comes first
        with pytest.raises(MinidiffError, match="NaN/inf in float32 too"):
            vae_decode(vae, latent)
    assert vae.decoder.conv_in.weight.dtype == torch.float32  # the redo's side effect, as its warning says


def test_the_plain_decode_has_no_safety_net():
    """vae.decode is the decoder alone: a float16 overflow comes back as it is (vae_decode is the guarded one)."""
    half = overflowing_vae().half()
    with torch.no_grad():
        image = half.decode(torch.randn(1, 4, 12, 12).half())
    assert image.dtype == torch.float16 and not torch.isfinite(image).all()
