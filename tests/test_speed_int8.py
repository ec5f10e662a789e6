"""minidiff.speed.int8: the W8A8 layers compute their stated formula exactly, stay within 8-bit rounding of the
plain layers, and compile frozen as one graph (the +int8 rung of minidiff bench)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minidiff.errors import MinidiffError
from minidiff.measure import relative_error
from minidiff.speed import FastUNet, cpu_defaults
from minidiff.speed import int8 as int8_module
from minidiff.speed.fast_unet import AUTOTUNE_OPTIONS
from minidiff.speed.int8 import (
    INT8_TOLERANCE,
    Int8Conv2d,
    Int8GEGLU,
    Int8Linear,
    Int8Module,
    calibrate_int8,
    int8_available,
    per_channel_int8,
    quantize_int8,
)
from minidiff.unet import GEGLU
from tests.test_speed_kernels import perturbed_unet

pytestmark = pytest.mark.skipif(not int8_available(), reason="oneDNN's int8 kernels need an x86-64 CPU")

LAYERS = [  # (plain layer, input shape)
    (lambda: nn.Conv2d(32, 48, 3, padding=1), (2, 32, 12, 12)),
    (lambda: nn.Conv2d(32, 32, 3, stride=2, padding=1), (2, 32, 12, 12)),  # the UNet's downsampling
    (lambda: nn.Conv2d(64, 32, 1), (2, 64, 8, 8)),  # a skip's channel change
    (lambda: nn.Linear(40, 24), (2, 7, 40)),
]


def dequantized_reference(layer, x, scale=None):
    """The formula of minidiff.speed.int8 computed plainly in float64: both operands rounded as the module rounds
    them (with a calibrated `scale`, divided in float32 as the module divides; else x's own), then multiplied
    exactly (the kernel's integer products and sums are exact)."""
    if scale is None:
        scale = x.abs().amax().double() / 127
        x_rounded = (torch.clamp(torch.round(x.double() / scale) + 128, 0, 255) - 128) * scale
    else:
        x_rounded = (torch.clamp(torch.round(x.float() / scale) + 128, 0, 255) - 128).double() * scale
    q, w_scale = per_channel_int8(layer.weight)
    w_rounded = q.double() * w_scale.double().view(-1, *[1] * (q.dim() - 1))
    bias = layer.bias.double()
    if isinstance(layer, nn.Conv2d):
        return F.conv2d(x_rounded, w_rounded, bias, layer.stride, layer.padding)
    return F.linear(x_rounded, w_rounded, bias)


@pytest.mark.parametrize("make, shape", LAYERS)
def test_int8_layers_compute_the_rounded_product_exactly(make, shape):
    torch.manual_seed(0)
    plain = make().eval()
    x = torch.randn(shape) + 0.5  # off-centre, as after a SiLU
    int8 = (Int8Conv2d if isinstance(plain, nn.Conv2d) else Int8Linear)(plain)
    with torch.no_grad():
        assert relative_error(int8(x).double(), dequantized_reference(plain, x)) <= 1e-5


@pytest.mark.parametrize("make, shape", LAYERS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_layers_are_the_plain_layers_within_8_bit_rounding(make, shape, dtype):
    torch.manual_seed(0)
    plain = make().eval().to(dtype)
    x = (torch.randn(shape) + 0.5).to(dtype)
    int8 = (Int8Conv2d if isinstance(plain, nn.Conv2d) else Int8Linear)(plain)
    with torch.no_grad():
        out, expected = int8(x), plain(x)
    assert out.dtype == dtype and out.shape == expected.shape
    error = relative_error(out.float(), expected.float())
    assert 1e-4 < error <= 2e-2  # measured 0.7-1.1%: rounded, and by no more than 8 bits allow


@pytest.mark.parametrize("make, shape", LAYERS)
def test_int8_layers_moved_to_another_dtype_compute_as_before(make, shape):
    """module.to(dtype) on a quantized model: its scales and bias stay float32 (oneDNN refuses others) and the
    packed weight is made again; the numbers are those of the layer before the move."""
    torch.manual_seed(0)
    plain = make().eval()
    x = (torch.randn(shape) + 0.5).bfloat16()
    kind = Int8Conv2d if isinstance(plain, nn.Conv2d) else Int8Linear
    int8 = kind(plain)
    with torch.no_grad():
        before = int8(x)
        int8.to(torch.bfloat16)
        assert int8.packed == {} and int8.weight_scale.dtype == int8.bias.dtype == torch.float32
        assert torch.equal(int8(x), before)
        assert torch.equal(int8.to(torch.float32)(x.float()), kind(plain)(x.float()))


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_1x1_int8_convolution_is_a_matmul_over_the_pixels(channels_last):
    """Only 1x1 convolutions with stride 1 and no padding take the matmul path; it gives the convolution's numbers
    in either input layout, its output in channels_last."""
    torch.manual_seed(0)
    plain = nn.Conv2d(64, 32, 1).eval()
    int8 = Int8Conv2d(plain)
    assert int8.pointwise
    others = nn.Conv2d(8, 8, 1, stride=2), nn.Conv2d(8, 8, 1, padding=1), nn.Conv2d(8, 8, 3, padding=1)
    assert not any(Int8Conv2d(conv).pointwise for conv in others)
    x = torch.randn(2, 64, 8, 6) + 0.5
    x = x.contiguous(memory_format=torch.channels_last) if channels_last else x
    with torch.no_grad():
        out = int8(x)
    assert out.shape == (2, 32, 8, 6) and out.is_contiguous(memory_format=torch.channels_last)
    assert relative_error(out.double(), dequantized_reference(plain, x.contiguous())) <= 1e-5


def test_quantize_int8_keeps_the_first_and_last_convolutions_and_stays_within_the_rung_tolerance():
    plain = cpu_defaults(perturbed_unet())
    quantized = cpu_defaults(perturbed_unet())
    layers = sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in quantized.modules())
    geglus = sum(isinstance(m, GEGLU) for m in quantized.modules())
    quantize_int8(quantized)
    assert sum(isinstance(m, Int8GEGLU) for m in quantized.modules()) == geglus > 0
    # each GEGLU's projection becomes two int8 layers, its value and gate halves
    assert sum(isinstance(m, (Int8Conv2d, Int8Linear)) for m in quantized.modules()) == layers - 2 + geglus
    assert not isinstance(quantized.conv_in, Int8Conv2d) and not isinstance(quantized.conv_out, Int8Conv2d)
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    with torch.no_grad():
        error = relative_error(quantized(x, 321, context), plain(x, 321, context))
    assert 1e-4 < error <= INT8_TOLERANCE


@pytest.mark.parametrize("make, shape", [LAYERS[0], LAYERS[2], LAYERS[3]])
def test_frozen_int8_layers_compile_to_the_eager_numbers(make, shape):
    """The packing ops have shape functions (else TorchDynamo breaks the graph at each), and freezing folds them."""
    torch.manual_seed(0)
    plain = make().eval()
    int8 = (Int8Conv2d if isinstance(plain, nn.Conv2d) else Int8Linear)(plain)
    x = torch.randn(shape) + 0.5
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        eager, frozen = int8(x), torch.compile(int8)(x)
    torch._dynamo.reset()
    assert torch.equal(frozen, eager)


@pytest.mark.parametrize("calibrated", [False, True])
def test_a_3x3_convolution_on_a_small_map_is_a_matmul_of_the_unfolded_input(monkeypatch, calibrated):
    """At most UNFOLDED_MAX_PIXELS output pixels: one matmul of each pixel's 3x3 neighbourhood (stride 1,
    padding 1 only), the convolution's numbers, eager and frozen, its output in channels_last."""
    torch.manual_seed(0)
    plain = nn.Conv2d(32, 48, 3, padding=1).eval()
    int8 = Int8Conv2d(plain)
    assert int8.unfoldable and not any(Int8Conv2d(conv).unfoldable for conv in (
        nn.Conv2d(8, 8, 3, stride=2, padding=1), nn.Conv2d(8, 8, 3), nn.Conv2d(8, 8, 1), nn.Conv2d(8, 8, 5, padding=2)))
    x = torch.randn(2, 32, 5, 7) + 0.5  # 70 pixels
    if calibrated:
        calibrate_int8(nn.Sequential(int8), lambda model: model(x))
    calls, unfolded = [], Int8Conv2d.forward_unfolded
    monkeypatch.setattr(Int8Conv2d, "forward_unfolded", lambda self, *args: calls.append(1) or unfolded(self, *args))
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        out = int8(x)
        frozen = torch.compile(int8)(x)
        assert len(calls) == 2
        monkeypatch.setattr(int8_module, "UNFOLDED_MAX_PIXELS", 69)
        convolved = int8(x)  # oneDNN's convolution
    torch._dynamo.reset()
    assert len(calls) == 2 and out.shape == (2, 48, 5, 7) and out.is_contiguous(memory_format=torch.channels_last)
    reference = dequantized_reference(plain, x, int8.input_scale)
    assert relative_error(out.double(), reference) <= 1e-5 and relative_error(convolved.double(), reference) <= 1e-5
    assert torch.equal(frozen, out)


@pytest.mark.parametrize("calibrated", [False, True])
def test_padded_input_channels_give_the_numbers_of_the_unpadded_convolution(monkeypatch, calibrated):
    """A convolution whose input channel count oneDNN computes slowly (PADDED_INPUT_CHANNELS) gets zero weights
    and zero-point inputs on the added channels: the same numbers as the unpadded one, eager and frozen."""
    torch.manual_seed(0)
    plain = nn.Conv2d(32, 48, 3, padding=1).eval()
    x = (torch.randn(2, 32, 12, 12) + 0.5).contiguous(memory_format=torch.channels_last)
    unpadded = Int8Conv2d(plain)
    monkeypatch.setitem(int8_module.PADDED_INPUT_CHANNELS, 32, 40)
    padded = Int8Conv2d(plain)
    assert (unpadded.added_channels, padded.added_channels) == (0, 8) and padded.qweight.shape == (48, 40, 3, 3)
    assert not padded.qweight[:, 32:].any() and torch.equal(padded.qweight[:, :32], unpadded.qweight)
    assert Int8Conv2d(nn.Conv2d(32, 48, 1)).added_channels == 0  # the matmul path has no slow count
    if calibrated:
        for layer in (unpadded, padded):
            calibrate_int8(nn.Sequential(layer), lambda model: model(x))
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        expected = unpadded(x)
        assert torch.equal(padded(x), expected)
        assert torch.equal(torch.compile(padded)(x), expected)
    torch._dynamo.reset()


@pytest.mark.parametrize("calibrated", [False, True])
def test_a_frozen_int8_unet_is_one_graph_within_the_rung_tolerance(calibrated):
    """Not the eager int8 numbers: a rounding boundary crossed by a float's last bit (the compiled GroupNorm sums
    in another order) moves one activation by a whole step, and the next layers' roundings follow; measured on
    this model, an input changed by 1e-6 moves the int8 output 1.7% (the plain output 8e-7). Calibrated: its
    scales fixed by calibrate_int8 on three calls at other timesteps and noise."""
    plain, unet = perturbed_unet(), perturbed_unet().to(torch.bfloat16)
    quantize_int8(unet)
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    if calibrated:
        calibration = [(torch.randn(2, 4, 16, 16).bfloat16(), t) for t in (900, 500, 100)]
        calibrate_int8(unet, lambda model: [model(x_t, t, context.bfloat16()) for x_t, t in calibration])
        assert all(m.input_scale > 0 for m in unet.modules() if isinstance(m, Int8Module))
    half = x.bfloat16(), torch.full((2,), 321.0), context.bfloat16()
    with torch.no_grad():
        explained = torch._dynamo.explain(unet)(*half)
        assert explained.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explained.break_reasons]
        frozen = FastUNet(unet, channels_last=True, compile=True, freeze=True)(*half)
        expected = plain(x, 321, context)
    torch._dynamo.reset()
    assert relative_error(frozen.float(), expected) <= INT8_TOLERANCE


def test_quantize_int8_refuses_what_it_cannot_compute(monkeypatch):
    with pytest.raises(MinidiffError, match="on the CPU"):
        quantize_int8(nn.Sequential(nn.Linear(4, 4, device="meta")))
    monkeypatch.setattr("minidiff.speed.int8.int8_available", lambda: False)
    with pytest.raises(MinidiffError, match="x86-64"):
        quantize_int8(nn.Sequential(nn.Linear(4, 4)))


# --- static scales (calibrate_int8) ------------------------------------------------------------------------------


@pytest.mark.parametrize("make, shape", LAYERS)
def test_calibrated_layers_round_every_input_with_the_scale_they_saw(make, shape):
    """The largest |x| of the calibration calls fixes the scale: an input as large computes as the per-call scale
    would, a smaller one keeps the calibrated scale (not its own), a larger one saturates at uint8's range; oneDNN
    applies the scales and the bias itself."""
    torch.manual_seed(0)
    plain = make().eval()
    kind = Int8Conv2d if isinstance(plain, nn.Conv2d) else Int8Linear
    x = torch.randn(shape) + 0.5
    int8 = calibrate_int8(nn.Sequential(kind(plain)), lambda model: [model(x / 3), model(x), model(x / 2)])[0]
    assert int8.input_scale == pytest.approx(x.abs().max().item() / 127)
    with torch.no_grad():
        for factor in (1, 0.5, 2):  # within, below and beyond the calibrated range
            expected = dequantized_reference(plain, x * factor, int8.input_scale)
            assert relative_error(int8(x * factor).double(), expected) <= 1e-5, factor
        assert relative_error(int8(x * 2).double(), dequantized_reference(plain, x * 2)) > 1e-3  # it did saturate


def test_calibrate_int8_refuses_a_run_that_misses_layers_and_leaves_no_hook():
    model = quantize_int8(nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)))
    with pytest.raises(MinidiffError, match=r"1 of the 2 int8 layers were not called .*such as 1\)"):
        calibrate_int8(model, lambda m: m[0](torch.randn(2, 4)))
    assert not any(layer._forward_pre_hooks for layer in model)
    assert all(layer.input_scale is None for layer in model)  # still scaled at every call, as before
    x = torch.randn(2, 4)
    calibrate_int8(model, lambda m: m(x))
    first = [layer.input_scale for layer in model]
    calibrate_int8(model, lambda m: m(10 * x))  # again: the new calls replace the scales
    assert all(later > 5 * earlier for later, earlier in zip((layer.input_scale for layer in model), first))


def test_autotune_asks_inductor_for_its_tuned_cpu_kernels(monkeypatch):
    """optimize(..., autotune=True) reaches torch.compile as Inductor's options (AUTOTUNE_OPTIONS["cpu"]), beside
    freezing and under options the caller gave; another backend gets none."""
    seen = []
    monkeypatch.setattr(torch, "compile", lambda function, **options: seen.append(options) or function)
    unet = perturbed_unet()
    FastUNet(unet, compile=True, freeze=True, autotune=True)
    FastUNet(unet, compile=True, autotune=True, compile_options={"options": {"cpp_wrapper": False}})
    FastUNet(unet, compile=True, autotune=True, compile_options={"backend": "eager"})
    assert seen[0] == {"options": {"max_autotune": True, "max_autotune_gemm_backends": "CPP,ATEN", "cpp_wrapper": True,
                                   "freezing": True}}
    assert seen[1]["options"]["cpp_wrapper"] is False and seen[1]["options"]["max_autotune"] is True
    assert seen[2] == {"backend": "eager"}


def test_int8_layers_compile_with_the_autotuned_kernels():
    """The +autotune rung's compile (AUTOTUNE_OPTIONS["cpu"], frozen) of calibrated int8 layers, the 3x3
    convolution on a small map as a matmul of its unfolded input, equals the frozen compile without it within one
    rounding step of the output's bf16 (whichever kernel Inductor's timing picks: its C++ GEMM or oneDNN's)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(32, 64, 3, padding=1), nn.SiLU(), nn.Conv2d(64, 32, 1)).to(torch.bfloat16)
    x = torch.randn(2, 32, 8, 8).bfloat16().contiguous(memory_format=torch.channels_last)
    calibrate_int8(quantize_int8(model, keep=()), lambda m: m(x))
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        expected = torch.compile(model)(x)
        torch._dynamo.reset()
        tuned = torch.compile(model, options=AUTOTUNE_OPTIONS["cpu"])(x)
    torch._dynamo.reset()
    assert relative_error(tuned.float(), expected.float()) <= 1e-2


# --- GEGLU: the projection's two halves, GELU in the gate's epilogue ---------------------------------------------


def geglu_reference(plain: GEGLU, x, scale=None):
    """value * GELU(gate) of the int8 projection's exact product (dequantized_reference), in float64."""
    value, gate = dequantized_reference(plain.proj, x, scale).chunk(2, dim=-1)
    return value * F.gelu(gate)


@pytest.mark.parametrize("calibrated", [False, True])
def test_an_int8_geglu_is_the_int8_projection_then_the_exact_gelu(calibrated):
    """Scaled at every call, the two halves are Int8Linear layers and torch's GELU; calibrated, one rounding of the
    input and oneDNN's GELU (its erf) in the gate's epilogue: both the formula of the plain module on the int8
    product, within float32 rounding (the tanh GELU, or the halves swapped, are 1e-3 and more away)."""
    torch.manual_seed(0)
    plain = GEGLU(40, 24).eval()
    x = torch.randn(2, 9, 40) + 0.5
    int8 = Int8GEGLU.from_plain(plain)
    scale = None
    if calibrated:
        calibrate_int8(nn.Sequential(int8), lambda model: model(x))
        scale = int8.value.input_scale
        assert int8.gate.input_scale == scale == pytest.approx(x.abs().max().item() / 127)
    with torch.no_grad():
        out = int8(x)
        assert out.shape == (2, 9, 24) and relative_error(out.double(), geglu_reference(plain, x, scale)) <= 1e-5
        bf16 = Int8GEGLU.from_plain(plain.bfloat16())
        bf16.value.input_scale = bf16.gate.input_scale = scale
        error = relative_error(bf16(x.bfloat16()).float(), plain.float()(x))
    assert 1e-4 < error <= 2e-2  # within 8-bit rounding of the plain module


def test_a_calibrated_int8_geglu_rounds_its_input_once_and_applies_gelu_in_the_matmul(monkeypatch):
    plain = GEGLU(16, 8).eval()
    int8 = Int8GEGLU.from_plain(plain)
    x = torch.randn(3, 16)
    calibrate_int8(nn.Sequential(int8), lambda model: model(x))
    calls = []
    for name in ("quantize", "matmul"):
        original = getattr(Int8Module, name)
        monkeypatch.setattr(Int8Module, name, lambda self, *args, original=original, name=name, **kwargs: (
            calls.append((name, self, kwargs.get("activation", "none"))) or original(self, *args, **kwargs)))
    with torch.no_grad():
        int8(x)
    assert calls == [("quantize", int8.value, "none"), ("matmul", int8.value, "none"), ("matmul", int8.gate, "gelu")]


def test_a_frozen_int8_geglu_compiles_to_the_eager_numbers():
    torch.manual_seed(0)
    int8 = Int8GEGLU.from_plain(GEGLU(32, 48).eval())
    x = torch.randn(2, 5, 32).bfloat16()
    calibrate_int8(nn.Sequential(int8), lambda model: model(x))
    with torch.no_grad(), torch._inductor.config.patch(freezing=True):
        eager, frozen = int8(x), torch.compile(int8)(x)
    torch._dynamo.reset()
    assert torch.equal(frozen, eager)
