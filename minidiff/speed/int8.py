"""int8 convolutions and linear layers for a CPU: 8-bit weights and 8-bit activations (W8A8), oneDNN's kernels.

The weights are rounded once to int8, one scale per output channel (the largest |w| of the channel maps to 127).
The activations are rounded at every call, one scale per tensor taken from that call's largest |x| (dynamic
quantization: no calibration data, and the scale follows the input as it changes over the sampling steps), to
uint8 with zero point 128. oneDNN multiplies the integers (AVX512-VNNI / AVX-VNNI: four int8 products per 32-bit
lane where bf16 has two) and applies the weight scales; the activation scale and the bias follow in the epilogue:

    y = s_x * (oneDNN(q_x, q_w) * s_w) + b,    q_x = round(x / s_x) + 128,    s_x = max|x| / 127

The activation scale reaches oneDNN as a constant 1 (and the zero point as a constant 128) so that its kernel,
built once per shape, is reused at every call; a scale that changes per call would rebuild it every time.

Static scales (`calibrate_int8`): each layer's scale fixed from the largest |x| it saw on calibration calls. The
largest value is then not computed at every call (one pass less over each input, and the rounding joins the pass
that computes the input), and oneDNN applies the activation scale and the bias itself: y = oneDNN(q_x, q_w; s_x,
s_w, b). An input beyond the calibrated range saturates (uint8's range: -128 to 127 steps).

Where oneDNN's int8 convolution is slow, the same sums go another way: a 3x3 convolution on a small map is one
matmul of each pixel's unfolded neighbourhood (UNFOLDED_MAX_PIXELS), and an input channel count with a slow path
is padded (PADDED_INPUT_CHANNELS: zero weights, zero-point inputs).

A GEGLU's projection becomes two int8 layers, its value and gate halves (Int8GEGLU): with calibrated scales oneDNN
applies the GELU in the gate's matmul epilogue.

Fast only compiled with freezing (`optimize(..., compile=True, freeze=True)` after `quantize_int8`): Inductor then
folds the weights' packing into the graph's constants. Eager calls pack once and keep the packed weight.
Inference only: the quantized modules have no gradients, and their state_dict holds int8 weights (load the
plain weights again to undo it). Measured with `minidiff bench --rungs int8` (the +int8 rung).
"""

import platform

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.errors import MinidiffError
from minidiff.speed.kernels import ONEDNN, replace_modules
from minidiff.unet import GEGLU

ZERO_POINT = 128  # uint8 activations: round(x / s) + 128 in [1, 255]
# max |out - out_fp32| / max |out_fp32| of the +int8 rung (minidiff bench): one rounding to 255 levels per tensor
# at every layer (measured 0.055-0.058 on sd15 at 256 px, 0.071 at 512 px, random weights; bf16 alone 0.012); on
# a trained model its cost is measured on the shapes model (python -m benchmarks.int8_quality; README)
INT8_TOLERANCE = 0.1
# Input channels on which oneDNN's int8 3x3 convolution takes a slow path, and the count to pad them to (zero
# weights on the added channels): SD 1.5's 1920 (the up blocks' concatenations), 1920 -> 1280 at 16x16, CFG batch 2,
# 14.3 ms a call, padded to 1984 5.4 ms; 1920 -> 640 at 32x32 16.1 -> 9.9 ms (2-core Intel Xeon with AMX; 2048
# channels are as fast as 1984, 2560 and 1280 padded are slower, so only this count)
PADDED_INPUT_CHANNELS = {1920: 1984}
# Most output pixels (batch x height x width) for which a 3x3 convolution runs as one int8 matmul of the unfolded
# input (each pixel's 3x3 neighbourhood as a row) rather than as oneDNN's int8 convolution: on the small maps the
# convolution reads its weights at half the matmul's rate. SD 1.5's 1280 channels, CFG batch 2, distinct weights a
# call (as in a step, which reads every weight once): 4x4 2.01 -> 1.19 ms, 8x8 2.41 -> 1.81; at 16x16 (512 pixels)
# the convolution is faster (4.00 against 5.10)
UNFOLDED_MAX_PIXELS = 128


def int8_available() -> bool:
    """Whether this PyTorch has oneDNN's int8 kernels for this CPU (x86-64; fast with VNNI instructions)."""
    return ONEDNN and platform.machine().lower() in ("x86_64", "amd64")


def quantize_activation(x):
    """(uint8 tensor, its fp32 scale): x ~ scale * (q - 128), one scale for the whole tensor."""
    scale = x.detach().abs().amax().float().clamp(min=1e-12) / 127
    q = torch.clamp(torch.round(x.float() / scale) + ZERO_POINT, 0, 255).to(torch.uint8)
    return q, scale


def per_channel_int8(weight):
    """(int8 weight, fp32 scale per output channel): weight ~ scale * q, |q| <= 127."""
    w = weight.detach().float()
    scale = w.abs().amax(dim=tuple(range(1, w.dim()))).clamp(min=1e-12) / 127
    q = torch.round(w / scale.view(-1, *[1] * (w.dim() - 1))).clamp(-127, 127).to(torch.int8)
    return q, scale


class Int8Module(nn.Module):
    """What Int8Conv2d and Int8Linear share: the int8 weight, its scales, the fp32 bias, the packed weight."""

    def __init__(self, weight, bias):
        super().__init__()
        q, scale = per_channel_int8(weight)
        self.register_buffer("qweight", q)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("weight_zero_point", torch.zeros(len(scale), dtype=torch.int64))
        self.register_buffer("bias", None if bias is None else bias.detach().float())
        self.packed = {}  # eager calls: the packed weights, each made at its first call
        self.input_scale = None  # calibrate_int8: the activation scale, fixed; None: taken at every call

    def _apply(self, fn, recurse=True):
        # module.to(dtype) casts every floating buffer: the scales and the bias stay as they were, float32, as
        # oneDNN's int8 kernels take them (moved only), and the packed weight is made again from the buffers
        scale, bias = self.weight_scale, self.bias
        super()._apply(fn, recurse)
        self.weight_scale = scale.to(self.weight_scale.device)
        if bias is not None:
            self.bias = bias.to(self.bias.device)
        self.packed = {}
        return self

    def packed_weight(self, pack=None):
        """The weight as oneDNN's kernel takes it: pack() (default self.pack), made once."""
        pack = pack or self.pack
        if torch.compiler.is_compiling():  # in the graph: frozen, Inductor folds it into a constant
            return pack()
        if pack.__name__ not in self.packed:
            self.packed[pack.__name__] = pack()
        return self.packed[pack.__name__]

    def quantize(self, x):
        """(uint8 input, the scale the epilogue applies): None where oneDNN applies the calibrated scale."""
        if self.input_scale is None:
            return quantize_activation(x)
        return torch.clamp(torch.round(x.float() / self.input_scale) + ZERO_POINT, 0, 255).to(torch.uint8), None

    def onednn_scale_and_bias(self, scale) -> tuple:
        """What oneDNN applies: the calibrated activation scale and the bias, or neither (a constant 1)."""
        return (1.0, None) if scale is not None else (self.input_scale, self.bias)

    def matmul(self, q, scale, dtype, pack=None, activation: str = "none", algorithm: str = ""):
        """oneDNN's int8 matmul of the rows of q with the weight (the linear layer, a 1x1 convolution; an unfolded
        3x3 convolution with pack), and `activation` in its epilogue (oneDNN's name, such as "gelu" with algorithm
        "none": the erf GELU; only where oneDNN applies the scale and the bias, so scale None)."""
        x_scale, bias = self.onednn_scale_and_bias(scale)
        return torch.ops.onednn.qlinear_pointwise(q, x_scale, ZERO_POINT, self.packed_weight(pack), self.weight_scale,
                                                  self.weight_zero_point, bias, 1.0, 0, dtype, activation, [],
                                                  algorithm)

    def finish(self, out, scale, dtype):
        """The epilogue: the activation scale, the bias, the input's dtype (only the dtype where oneDNN applied
        the calibrated scale and the bias)."""
        if scale is None:
            return out.to(dtype)
        out = out * scale
        if self.bias is not None:
            out = out + (self.bias if out.dim() != 4 else self.bias.view(-1, 1, 1))
        return out.to(dtype)


class Int8Conv2d(Int8Module):
    """nn.Conv2d (zero padding, one group) in W8A8 int8 through oneDNN's quantized convolution.

    A 1x1 convolution with stride 1 and no padding is a matmul of the weight with every pixel's channels: it goes
    through oneDNN's int8 matmul instead (the pixels as rows, read in place from a channels_last input), which
    runs SD 1.5's 1x1 convolutions several times faster than its int8 convolution on the small maps (1280
    channels at 8x8, CFG batch 2: about 190 against 1000 GOP/s; torch.profiler of the +int8 rung at 256 px).
    """

    @staticmethod
    def replaces(module: nn.Module) -> bool:
        return isinstance(module, nn.Conv2d) and module.groups == 1 and module.padding_mode == "zeros"

    @classmethod
    def from_plain(cls, conv: nn.Conv2d) -> "Int8Conv2d":
        return cls(conv)

    def __init__(self, conv: nn.Conv2d):
        super().__init__(conv.weight, conv.bias)
        self.stride, self.padding, self.dilation = list(conv.stride), list(conv.padding), list(conv.dilation)
        self.pointwise = conv.kernel_size == (1, 1) and self.stride == [1, 1] and self.padding == [0, 0]
        self.unfoldable = (conv.kernel_size == (3, 3) and self.stride == [1, 1] and self.padding == [1, 1]
                           and self.dilation == [1, 1])
        padded_channels = PADDED_INPUT_CHANNELS.get(conv.in_channels, conv.in_channels)
        self.added_channels = 0 if self.pointwise else padded_channels - conv.in_channels
        if not self.pointwise:  # zero weights on the added input channels: they add nothing to the sums
            self.qweight = F.pad(self.qweight, (0, 0, 0, 0, 0, self.added_channels)).contiguous(
                memory_format=torch.channels_last)

    def pack(self):
        if self.pointwise:
            return torch.ops.onednn.qlinear_prepack(self.qweight.flatten(1), None)
        return torch.ops.onednn.qconv_prepack(self.qweight, self.weight_scale, 1.0, ZERO_POINT, self.stride,
                                              self.padding, self.dilation, 1, None)

    def pack_unfolded(self):
        """The weight as the matmul of forward_unfolded takes it: (C_out, 3 x 3 x C_in), a row's order."""
        return torch.ops.onednn.qlinear_prepack(self.qweight.permute(0, 2, 3, 1).flatten(1).contiguous(), None)

    def forward(self, x):
        if self.pointwise:
            return self.forward_pointwise(x)
        q, scale = self.quantize(x)
        if self.added_channels:  # the zero point: (q - 128) = 0 on the added channels
            q = F.pad(q, (0, 0, 0, 0, 0, self.added_channels), value=ZERO_POINT)
        if self.unfoldable and x.shape[0] * x.shape[2] * x.shape[3] <= UNFOLDED_MAX_PIXELS:
            return self.forward_unfolded(q, scale, x.dtype)
        x_scale, bias = self.onednn_scale_and_bias(scale)
        # float32 out, whatever x's dtype (finish casts): with a bf16 destination oneDNN's int8 convolution took
        # 2.5x as long on SD 1.5's 1280 channels at 16x16 (7.3 vs 2.9 ms a call, CFG batch 2, Intel Xeon with AMX)
        out = torch.ops.onednn.qconv_pointwise(q, x_scale, ZERO_POINT, self.packed_weight(), self.weight_scale,
                                               self.weight_zero_point, bias, self.stride, self.padding,
                                               self.dilation, 1, 1.0, 0, torch.float32, "none", [], "")
        return self.finish(out, scale, x.dtype)

    def forward_pointwise(self, x):
        """The 1x1 convolution as a matmul: (B * H * W, C_in) pixels -> (B * H * W, C_out), in channels_last."""
        batch, channels, height, width = x.shape
        q, scale = self.quantize(x.permute(0, 2, 3, 1).reshape(-1, channels))
        return self.matmul_over_pixels(q, scale, x.dtype, (batch, height, width))

    def forward_unfolded(self, q, scale, dtype):
        """The 3x3 convolution (stride 1, padding 1) as one matmul: each pixel's 3x3 neighbourhood of the quantized
        input, its channels last, as a row of 9 x C_in, padded with the zero point; out in channels_last."""
        batch, channels, height, width = q.shape
        padded = F.pad(q.permute(0, 2, 3, 1), (0, 0, 1, 1, 1, 1), value=ZERO_POINT)  # (B, H + 2, W + 2, C)
        rows = torch.cat([padded[:, i:i + height, j:j + width] for i in range(3) for j in range(3)], dim=-1)
        return self.matmul_over_pixels(rows.reshape(-1, 9 * channels), scale, dtype, (batch, height, width),
                                       self.pack_unfolded)

    def matmul_over_pixels(self, rows, scale, dtype, size, pack=None):
        """The int8 matmul of one row per output pixel, (B * H * W, ...) -> the (B, C_out, H, W) map of
        size = (B, H, W), in channels_last."""
        out = self.finish(self.matmul(rows, scale, dtype, pack), scale, dtype)  # (B * H * W, C_out)
        return out.view(*size, -1).permute(0, 3, 1, 2)


class Int8Linear(Int8Module):
    """nn.Linear in W8A8 int8 through oneDNN's quantized matmul."""

    @staticmethod
    def replaces(module: nn.Module) -> bool:
        return isinstance(module, nn.Linear)

    @classmethod
    def from_plain(cls, linear: nn.Linear) -> "Int8Linear":
        return cls(linear)

    def __init__(self, linear: nn.Linear, rows: slice = slice(None)):
        """The layer's output features `rows` (default all)."""
        super().__init__(linear.weight[rows], None if linear.bias is None else linear.bias[rows])

    def pack(self):
        return torch.ops.onednn.qlinear_prepack(self.qweight, None)

    def forward(self, x):
        q, scale = self.quantize(x)
        return self.finish(self.matmul(q, scale, x.dtype), scale, x.dtype)


class Int8GEGLU(nn.Module):
    """GEGLU (minidiff.unet: value * GELU(gate), [value, gate] = x W + b) with its projection in W8A8 int8, as two
    Int8Linear layers, `value` and `gate` (the two halves of W's rows); with calibrated scales the input is rounded
    once and oneDNN applies the GELU in the gate's matmul epilogue.

    The plain module's GELU runs over the whole (tokens, 2 x inner) product after it is written to memory, and its
    erf is most of that pass; in the epilogue it runs on results still in registers. SD 1.5's widest, 4096 tokens,
    320 -> 2 x 1280, CFG batch 2, calibrated scales, the product with the value and the next layer's rounding
    compiled (2-core Intel Xeon with AMX, medians of 20 calls in turns): 16.3 ms -> 11.3 ms; the frozen +int8 SD 1.5
    step at 512 px, processes alternating, medians of 10 calls: 1276 -> 1254 and 1350 -> 1333 ms (a busy machine
    that slowed down between the pairs). oneDNN's erf is not PyTorch's: one output in 100 was one rounding step
    apart after the next layer's rounding to uint8.
    """

    @staticmethod
    def replaces(module: nn.Module) -> bool:
        return type(module) is GEGLU and isinstance(module.proj, nn.Linear)

    @classmethod
    def from_plain(cls, geglu: GEGLU) -> "Int8GEGLU":
        return cls(geglu.proj)

    def __init__(self, proj: nn.Linear):
        super().__init__()
        inner = proj.out_features // 2
        self.value, self.gate = Int8Linear(proj, slice(None, inner)), Int8Linear(proj, slice(inner, None))

    def forward(self, x):
        value, gate = self.value, self.gate
        if value.input_scale is None or gate.input_scale != value.input_scale:
            return value(x) * F.gelu(gate(x))  # scaled at every call (or calibrating): the layers as they are
        q, _ = value.quantize(x)  # both saw the same inputs when calibrated: one scale, one rounding
        return value.matmul(q, None, x.dtype) * gate.matmul(q, None, x.dtype, activation="gelu", algorithm="none")


# TorchDynamo traces a call only with a shape function for it; PyTorch registers none for the two packing ops
# (Inductor inserts them itself, after tracing). The packed weights keep the int8 weight's elements.
for _name, _shape in (("onednn::qlinear_prepack", lambda weight, x_shape: weight.new_empty(weight.shape[::-1])),
                      ("onednn::qconv_prepack", lambda weight, *args, **kwargs: weight.new_empty(weight.shape))):
    try:
        torch.library.register_fake(_name)(_shape)
    except RuntimeError:  # a PyTorch that has its own
        pass


def quantize_int8(model: nn.Module, keep: tuple = ("conv_in", "conv_out")) -> nn.Module:
    """Put Int8Conv2d / Int8GEGLU / Int8Linear in place of the convolutions, GEGLUs and other linear layers of
    `model` (on a CPU), except those named in `keep` (the UNet's first and last convolutions: 4 channels, where
    one rounding step is a large share of the signal). In place (returns model) and one way: load the weights
    again to undo."""
    if not int8_available():
        raise MinidiffError("int8 needs PyTorch's oneDNN on an x86-64 CPU: use the bf16 or fp32 rungs here")
    device = next((p.device for p in model.parameters() if p.device.type != "cpu"), None)
    if device is not None:
        raise MinidiffError(f"int8 computes on a CPU; the model is on {device}: quantize the model on the CPU")
    replace_modules(model, Int8Conv2d, keep)
    replace_modules(model, Int8GEGLU, keep)
    replace_modules(model, Int8Linear, keep)
    return model


@torch.no_grad()
def calibrate_int8(model: nn.Module, run) -> nn.Module:
    """Static activation scales for a quantize_int8 model: `run(model)` calls it on inputs like those it will see
    (eager calls; in SD, the sampler's timesteps and guidance), and each int8 layer keeps the largest |x| it saw
    as its fixed scale (module docstring). Calibrate again to replace them. In place; returns model."""
    layers = {name: module for name, module in model.named_modules() if isinstance(module, Int8Module)}
    if not layers:
        raise MinidiffError("calibrate_int8 needs int8 layers: call quantize_int8(model) first")
    if not callable(run):
        raise MinidiffError(f"calibrate_int8 takes run(model), a function that calls the model; got {run!r}")
    largest = {}
    observe = lambda name: lambda module, inputs: largest.__setitem__(
        name, max(largest.get(name, 0.0), inputs[0].detach().abs().amax().float().item()))
    for module in layers.values():
        module.input_scale = None  # scaled at every call while the calls are observed
    hooks = [module.register_forward_pre_hook(observe(name)) for name, module in layers.items()]
    try:
        run(model)
    finally:
        for hook in hooks:
            hook.remove()
    if len(largest) < len(layers):
        unseen = next(name for name in layers if name not in largest)
        raise MinidiffError(f"{len(layers) - len(largest)} of the {len(layers)} int8 layers were not called while "
                            f"calibrating (such as {unseen}): run(model) must call the model on its usual inputs")
    for name, module in layers.items():
        module.input_scale = max(largest[name], 1e-12) / 127
    return model
