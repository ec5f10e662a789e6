"""CPU modules that replace the UNet's plain ones: the same weights, keys and numbers, computed faster on a CPU.

Each subclasses the module it replaces, takes over that module's parameters (`from_plain`), and falls back to the
plain computation wherever it does not win; minidiff.speed.cpu_defaults puts them in place. Measured on a 2-core
AVX-512 CPU (the docstrings give the numbers).
"""

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.unet import FeedForward


class MatmulConv3x3(nn.Conv2d):
    """A 3x3, stride-1, padding-1 convolution; on a CPU, in float32, outside torch.compile, a small feature map (at
    most `matmul_max_pixels`: SD's 1280-channel stages) is convolved as one matmul of the weight with its unfolded
    3x3 patches (im2col).

    oneDNN's direct convolution is slower there (batch 2, 1280 channels: 4x4 23.5 ms vs 9.1 ms, 8x8 30.4 ms vs
    23.9 ms) and faster on larger maps, in bf16, and compiled. The matmul is cpu_linear's (oneDNN's, see
    OneDNNLinear), and the output comes in the channels_last layout.
    """

    matmul_max_pixels = 64

    @staticmethod
    def replaces(module: nn.Module) -> bool:
        """Whether `module` is a plain convolution this one computes: 3x3, stride 1, zero padding 1, with a bias."""
        return (type(module) is nn.Conv2d and module.kernel_size == (3, 3) and module.stride == (1, 1)
                and module.padding == (1, 1) and module.dilation == (1, 1) and module.groups == 1
                and module.padding_mode == "zeros" and module.bias is not None)

    @classmethod
    def from_plain(cls, conv: nn.Conv2d) -> "MatmulConv3x3":
        with torch.device("meta"):
            module = cls(conv.in_channels, conv.out_channels, 3, padding=1)
        module.weight, module.bias = conv.weight, conv.bias  # the same Parameters: nothing is copied
        return module.train(conv.training)

    def forward(self, x):
        batch, _, height, width = x.shape
        if (x.device.type != "cpu" or x.dtype != torch.float32 or height * width > self.matmul_max_pixels
                or torch.compiler.is_compiling()):
            return super().forward(x)
        patches = F.unfold(x, 3, padding=1)  # (B, C_in * 9, H * W)
        out = cpu_linear(patches.transpose(1, 2), self.weight.flatten(1), self.bias)  # (B, H * W, C_out)
        return out.transpose(1, 2).view(batch, -1, height, width)  # in the channels_last layout


class BlockedFeedForward(FeedForward):
    """The transformer's feed-forward, on a CPU a long sequence in blocks of `block_tokens` tokens.

    It acts on each token alone, so the output is the same. The widest intermediate, (B, tokens, 8 x dim), then
    stays small enough for the allocator to reuse its memory rather than map fresh pages for it every call (SD 1.5
    at 512 px, 4096 tokens, float32: 160 ms -> 130 ms a block). On a GPU the caching allocator already reuses
    memory, and the sequence goes through whole; so it does under torch.compile, whose graph plans its buffers
    itself (frozen SD 1.5 at 512 px, bf16, 2-core Intel Xeon: +freeze 1550 ms a step in blocks, 1554 whole; +int8
    1368 and 1360) and whose GEMM templates (optimize's autotune) fail on blocks that share one frozen weight.
    """

    block_tokens = 1024

    @staticmethod
    def replaces(module: nn.Module) -> bool:
        return type(module) is FeedForward

    @classmethod
    def from_plain(cls, plain: FeedForward) -> "BlockedFeedForward":
        with torch.device("meta"):
            module = cls(plain.net[2].out_features)
        module.net = plain.net  # the same submodules and keys
        return module.train(plain.training)

    def forward(self, x):
        if x.device.type != "cpu" or x.shape[1] <= self.block_tokens or torch.compiler.is_compiling():
            return super().forward(x)
        feed_forward = super().forward
        return torch.cat([feed_forward(block) for block in x.split(self.block_tokens, dim=1)], dim=1)


ONEDNN = torch.backends.mkldnn.is_available()  # read once: TorchDynamo breaks the graph at the call


class OneDNNLinear(nn.Linear):
    """A linear layer whose float32 product on a CPU is oneDNN's matmul (the library behind PyTorch's CPU
    convolutions and bf16 matmuls) instead of the BLAS sgemm behind F.linear.

    Where the BLAS takes a slow path this matters: on the 2-core AMD EPYC (Zen 5, AVX-512) oneDNN computes SD 1.5's
    nine linear shapes at 256 px 2.25x faster than F.linear's sgemm, one thread (python -m benchmarks.linear_kernels;
    2048 x 320 @ 320 x 2560: 43.1 ms vs 19.6 ms), and Inductor's frozen float32 graph calls the same sgemm.
    Inference only: with gradients (training), and in other dtypes or off a CPU, it is F.linear.
    """

    @staticmethod
    def replaces(module: nn.Module) -> bool:
        return type(module) is nn.Linear and ONEDNN

    @classmethod
    def from_plain(cls, linear: nn.Linear) -> "OneDNNLinear":
        with torch.device("meta"):
            module = cls(linear.in_features, linear.out_features, bias=linear.bias is not None)
        module.weight, module.bias = linear.weight, linear.bias  # the same Parameters: nothing is copied
        return module.train(linear.training)

    def forward(self, x):
        return cpu_linear(x, self.weight, self.bias)


def cpu_linear(x, weight, bias=None):
    """F.linear(x, weight, bias); in float32 on a CPU without gradients, by oneDNN's matmul (see OneDNNLinear)."""
    gradients = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    if (x.device.type != "cpu" or x.dtype != torch.float32 or weight.dtype != torch.float32 or gradients
            or not ONEDNN or torch.compiler.is_exporting()):
        return F.linear(x, weight, bias)  # an exported graph (ONNX) holds the plain operator
    if torch.compiler.is_compiling():  # an opaque call for Inductor, which lowers the oneDNN op only when frozen
        return onednn_linear(x, weight, bias)
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@torch.library.custom_op("minidiff::onednn_linear", mutates_args=())
def onednn_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ weight.T + bias by oneDNN's matmul (OneDNNLinear's product), as one operator torch.compile calls as is."""
    return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")


@onednn_linear.register_fake
def _(x, weight, bias):
    return x.new_empty(*x.shape[:-1], weight.shape[0])


def replace_modules(model: nn.Module, replacement, keep: tuple = ()) -> int:
    """Put `replacement.from_plain(m)` in place of every submodule m that `replacement.replaces`, but those whose
    own name (the last part of the dotted path) is in `keep`; returns the count."""
    found = [(name, module) for name, module in model.named_modules()
             if name and name.rpartition(".")[2] not in keep and replacement.replaces(module)]
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, replacement.from_plain(module))
    return len(found)
