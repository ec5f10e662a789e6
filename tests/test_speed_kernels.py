"""Every CPU replacement of minidiff.speed against the plain module or kernel it replaces (outputs and input
gradients, float32 to 1e-5 or better unless a test says otherwise), and where they are put in place: per model,
by cpu_defaults (the loaders call it on a CPU), never by a global switch."""

import copy
import types

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from minidiff.attention import naive_attention
from minidiff.checkpoint import meta_model
from minidiff.clip import CLIPTextConfig, CLIPTextModel
from minidiff.errors import MinidiffError
from minidiff.load import built
from minidiff.speed import (
    BlockedFeedForward,
    FastUNet,
    MatmulConv3x3,
    OneDNNLinear,
    attention_kernels,
    blockwise_attention,
    cpu_attention,
    cpu_defaults,
    set_attention,
)
from minidiff.speed.attention_kernels import attention_kernel, tiles
from minidiff.speed.kernels import replace_modules
from minidiff.unet import Attention, FeedForward, UNet, UNetConfig
from minidiff.vae import AutoencoderKL, SpatialSelfAttention, VAEConfig


def relative_error(out, reference):
    return ((out - reference).abs().max() / reference.abs().max()).item()


def assert_same_with_gradients(fast, plain, x, tolerance):
    """fast(x) = plain(x), and so are the gradients of a random loss with respect to x."""
    x = x.detach().requires_grad_()
    out, ref = fast(x), plain(x)
    torch.testing.assert_close(out, ref, rtol=tolerance, atol=tolerance)
    grad = torch.randn_like(ref)
    torch.testing.assert_close(torch.autograd.grad(out, x, grad)[0], torch.autograd.grad(ref, x, grad)[0],
                               rtol=tolerance, atol=tolerance)


def perturbed_unet():
    torch.manual_seed(0)
    unet = UNet(UNetConfig.tiny()).eval()
    with torch.no_grad():
        for parameter in unet.parameters():
            if parameter.ndim == 1:
                parameter.add_(0.1 * torch.randn_like(parameter))
    return unet


# --- the modules: MatmulConv3x3, BlockedFeedForward, OneDNNLinear --------------------------------------------


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("shape", [(7, 48), (2, 77, 48), (2, 3, 5, 48)])
def test_onednn_linear_is_the_plain_linear(shape, bias):
    torch.manual_seed(0)
    plain = nn.Linear(48, 96, bias=bias)
    fast = OneDNNLinear.from_plain(plain)
    assert fast.weight is plain.weight and list(fast.state_dict()) == list(plain.state_dict())
    x = torch.randn(*shape)
    with torch.no_grad():
        out, ref = fast(x), plain(x)
    assert out.shape == ref.shape and relative_error(out, ref) <= 1e-6
    assert_same_with_gradients(fast, plain, x, 1e-5)  # with gradients: F.linear, which has them
    with torch.no_grad():  # another dtype: F.linear itself
        assert torch.equal(fast.bfloat16()(x.bfloat16()), plain.bfloat16()(x.bfloat16()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_the_cpu_kernels_compile_as_one_graph(dtype):
    """A graph break in a CPU kernel would compile every module apart, and TorchDynamo's recompile limit then
    leaves most of them eager: the compiled UNet must be one graph."""
    unet = cpu_defaults(perturbed_unet().to(dtype))
    x, context = torch.randn(2, 4, 16, 16, dtype=dtype), torch.randn(2, 7, 32, dtype=dtype)
    with torch.no_grad():
        explained = torch._dynamo.explain(unet)(x, torch.full((2,), 321.0), context)
    assert explained.graph_break_count == 0, [str(b.reason).splitlines()[0] for b in explained.break_reasons]


def test_onednn_linear_compiles_to_the_same_numbers():
    torch.manual_seed(0)
    plain = nn.Sequential(nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)).eval()
    fast = copy.deepcopy(plain)
    assert replace_modules(fast, OneDNNLinear) == 2
    x = torch.randn(2, 10, 32)
    with torch.no_grad():
        assert relative_error(torch.compile(fast)(x), plain(x)) <= 1e-6


@pytest.mark.parametrize("size", [(4, 4), (8, 8), (5, 9), (16, 16)])  # as a matmul (up to 64 px), then direct
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_matmul_conv3x3_is_the_plain_convolution(size, layout):
    torch.manual_seed(0)
    plain = nn.Conv2d(6, 5, 3, padding=1)
    fast = MatmulConv3x3.from_plain(plain)
    assert fast.weight is plain.weight and fast.bias is plain.bias  # the same parameters, not copies
    x = torch.randn(2, 6, *size).to(memory_format=layout)
    assert_same_with_gradients(fast, plain, x, 1e-5)  # with gradients: the product is F.linear's
    with torch.no_grad():  # without: oneDNN's
        assert relative_error(fast(x), plain(x)) <= 1e-6


def test_matmul_conv3x3_replaces_only_what_it_computes():
    assert MatmulConv3x3.replaces(nn.Conv2d(4, 4, 3, padding=1))
    others = (nn.Conv2d(4, 4, 3, stride=2, padding=1), nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 3, padding=1, bias=False),
              nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), MatmulConv3x3(4, 4, 3, padding=1))
    for other in others:
        assert not MatmulConv3x3.replaces(other), other


def test_blocked_feed_forward_is_the_plain_feed_forward(monkeypatch):
    torch.manual_seed(0)
    plain = FeedForward(8).eval()
    blocked = BlockedFeedForward.from_plain(plain)
    assert blocked.net is plain.net and list(blocked.state_dict()) == list(plain.state_dict())
    monkeypatch.setattr(BlockedFeedForward, "block_tokens", 4)  # 21 tokens: 6 blocks, the last one short
    assert_same_with_gradients(blocked, plain, torch.randn(2, 21, 8), 1e-6)


def test_blocked_feed_forward_goes_whole_under_torch_compile(monkeypatch):
    """The compiled graph computes the sequence at once: no split, no concatenation (see the class docstring)."""
    torch.manual_seed(0)
    plain = FeedForward(8).eval()
    blocked = BlockedFeedForward.from_plain(plain)
    monkeypatch.setattr(BlockedFeedForward, "block_tokens", 4)
    graphs = []
    record = lambda graph, inputs: graphs.append(graph) or graph.forward
    x = torch.randn(2, 21, 8)
    with torch.no_grad():
        out = torch.compile(blocked, backend=record, fullgraph=True)(x)
        torch.testing.assert_close(out, plain(x), rtol=1e-6, atol=1e-6)
    calls = [str(node.target) for node in graphs[0].graph.nodes if node.op == "call_function"]
    assert not any("cat" in call or "split" in call for call in calls), calls


# --- the attention kernels -----------------------------------------------------------------------------------


MASKS = {None: None, "bool": torch.ones(33, 33, dtype=torch.bool).tril(), "additive": torch.randn(2, 1, 33, 33),
         "one row": torch.randn(2, 1, 1, 33), "per head": torch.randn(4, 33, 33), "per entry and head":
         torch.randn(2, 4, 1, 33)}


@pytest.mark.parametrize("shape, width, budget, expected", [
    ((2, 8, 4096, 4096), 40, None, (1, 2, 512)),  # SD 1.5 at 512 px: the top level's self-attention
    ((2, 8, 1024, 1024), 40, None, (1, 4, 1024)),
    ((2, 8, 256, 256), 40, None, (2, 8, 256)),  # one block
    ((2, 8, 4096, 77), 40, None, (1, 8, 4096)),  # a cross-attention
    ((1, 1, 4096, 4096), 512, None, (1, 1, 4096)),  # the VAE's single wide head: a larger budget
    ((2, 5, 9216, 9216), 64, None, (1, 2, 225)),  # SD 2.x at 768 px: 41 blocks of queries, 3 of heads
    ((2, 4, 33, 33), 8, 2 * 17 * 33, (1, 2, 17)),  # equal blocks, the last shorter
    ((3, 2, 5, 7), 8, 2 * 2 * 5 * 7, (2, 2, 5)),  # batch entries together, the last alone
])
def test_tiles_cover_the_scores_once_within_the_budget(shape, width, budget, expected, monkeypatch):
    """Every (batch entry, head, query) in exactly one block, each block within the budget and no larger than the
    first (the eager path's buffers are its size), and the blocks measured fastest for SD 1.5 (attention_kernels'
    comment)."""
    if budget is not None:
        monkeypatch.setattr(attention_kernels, "CPU_SCORES_PER_BLOCK", budget)
    batch, heads, length_q, length_k = shape
    blocks = tiles(batch, heads, length_q, length_k, width)
    sizes = [tuple(part.stop - part.start for part in block) for block in blocks]
    assert sizes[0] == expected
    assert all(size <= first for block in sizes for size, first in zip(block, expected))
    most = attention_kernels.CPU_SCORES_PER_BLOCK * max(1, width // 64)
    assert all(b * h * r * length_k <= most for b, h, r in sizes)
    covered = torch.zeros(batch, heads, length_q, dtype=torch.int64)
    for block in blocks:
        covered[block] += 1
    assert bool((covered == 1).all())


# blocks of 5 queries of every head, or `tiles`' default with a budget that splits the heads and the batch: blocks
# of 2 heads x 17 queries, the last 16 (the masks' parts per batch entry, head and query)
BLOCKS = {"5 queries": 5, "2 heads x 17 queries": None}


@pytest.mark.parametrize("width", [8, 40, 64])
@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("blocks", list(BLOCKS))
def test_blockwise_attention_is_naive_attention(blocks, mask_kind, width, monkeypatch):
    """The BLOCKS of 33 queries (the last ones short), each in the same score buffers: float32, to 1e-6; values of
    8 and 40 columns (padded to 16 and 48 inside) and 64. (Inference only: its matmuls write into buffers, which
    autograd refuses; cpu_attention does not use it for gradients.)"""
    monkeypatch.setattr(attention_kernels, "CPU_SCORES_PER_BLOCK", 2 * 17 * 33)
    torch.manual_seed(0)
    q, k, v = torch.randn(2, 4, 33, 8), torch.randn(2, 4, 33, 8), torch.randn(2, 4, 33, width)
    mask = MASKS[mask_kind]
    torch.testing.assert_close(blockwise_attention(q, k, v, mask, block=BLOCKS[blocks]),
                               naive_attention(q, k, v, mask), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("mask_kind", list(MASKS))
@pytest.mark.parametrize("blocks", list(BLOCKS))
def test_blockwise_attention_compiles_into_one_graph(blocks, mask_kind, monkeypatch):
    """Inside the compiled UNet (the +int8 rung on a CPU without AMX) a graph break in the blockwise loop splits the
    UNet into pieces that recompile for each shape; fullgraph=True fails on any break. Traced, each block is
    base2_block (exp2 of scores in base 2, the additive masks scaled to match): float32, to 1e-5."""
    monkeypatch.setattr(attention_kernels, "CPU_SCORES_PER_BLOCK", 2 * 17 * 33)
    torch._dynamo.reset()  # the lambda's code object is each case's: a compile per case, not recompiles
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 33, 40) for _ in range(3))
    mask = MASKS[mask_kind]
    compiled = torch.compile(lambda q, k, v: blockwise_attention(q, k, v, mask, block=BLOCKS[blocks]),
                             fullgraph=True, backend="eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(q, k, v), naive_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


def test_blockwise_attention_compiled_by_inductor_in_bf16():
    """The kernels Inductor writes for base2_block, in bf16 as the +int8 rung runs them: within bf16's rounding of
    float32 naive attention on the same (bf16) numbers, and at most about twice as far from it as the eager bf16
    path (ATen's softmax; the base-2 path rounds once more: the product to bf16 before the sums divide it)."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(2, 4, 33, 40, dtype=torch.bfloat16) for _ in range(3))
    mask = MASKS["additive"]
    reference = naive_attention(q.float(), k.float(), v.float(), mask)
    compiled = torch.compile(lambda q, k, v: blockwise_attention(q, k, v, mask, block=5), fullgraph=True)
    with torch.no_grad():
        out = compiled(q, k, v)
        error = (out.float() - reference).abs().max().item()
        eager_error = (blockwise_attention(q, k, v, mask, block=5).float() - reference).abs().max().item()
    assert out.dtype == torch.bfloat16
    assert error < 2 * eager_error + 1e-3 and error < 0.02, (error, eager_error)


def test_cpu_attention_in_float32_is_sdpa():
    q, k, v = (torch.randn(2, 4, 33, 8) for _ in range(3))
    assert torch.equal(cpu_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_cpu_attention_in_half_precision_is_computed_in_float32(dtype, monkeypatch):
    """float16 always, bfloat16 on a CPU without bf16 instructions."""
    monkeypatch.setattr(attention_kernels, "CPU_BF16_MATMUL", False)
    q, k, v = (torch.randn(2, 4, 33, 8).to(dtype) for _ in range(3))
    out = cpu_attention(q, k, v)
    assert out.dtype == dtype
    # float32 attention of the same half-precision numbers, rounded once at the end
    assert torch.equal(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float()).to(dtype))


def bf16_cpu_attention_case(monkeypatch, amx: bool, causal: bool):
    """A CPU with bf16 instructions (with or without AMX), the blockwise calls recorded (their block argument),
    and bf16 (q, k, v) with a causal mask or none."""
    monkeypatch.setattr(attention_kernels, "CPU_BF16_MATMUL", True)
    monkeypatch.setattr(attention_kernels, "CPU_AMX", amx)
    calls = []
    monkeypatch.setattr(attention_kernels, "blockwise_attention",
                        lambda *args: calls.append(args[-1]) or blockwise_attention(*args))
    q, k, v = (torch.randn(2, 4, 33, 8).bfloat16() for _ in range(3))
    return calls, q, k, v, torch.ones(33, 33, dtype=torch.bool).tril() if causal else None


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_attention_in_bf16_with_bf16_instructions_goes_in_blocks(causal, monkeypatch):
    """The bf16 path without AMX (written-out formula, blocks of queries) agrees with float32 attention to bf16's
    precision."""
    monkeypatch.setattr(attention_kernels, "CPU_SCORES_PER_BLOCK", 2 * 4 * 33 * 5)  # 8 blocks of 2 heads x 17
    calls, q, k, v, mask = bf16_cpu_attention_case(monkeypatch, amx=False, causal=causal)
    out = cpu_attention(q, k, v, mask)
    assert out.dtype == torch.bfloat16 and calls == [None]
    reference = naive_attention(q.float(), k.float(), v.float(), mask)
    torch.testing.assert_close(out.float(), reference, rtol=2e-2, atol=2e-2)
    q.requires_grad_()  # a gradient is asked for: SDPA (in float32), which autograd goes through
    cpu_attention(q, k, v, mask).float().sum().backward()
    assert calls == [None] and q.grad is not None


@pytest.mark.parametrize("causal", [False, True])
def test_cpu_attention_in_bf16_with_amx_is_bf16_sdpa(causal, monkeypatch):
    """With AMX, bf16 goes to SDPA in bf16 (PyTorch's flash kernel on the tiles); a slice size still gives blocks,
    and a gradient the float32 path."""
    calls, q, k, v, mask = bf16_cpu_attention_case(monkeypatch, amx=True, causal=causal)
    out = cpu_attention(q, k, v, mask)
    assert out.dtype == torch.bfloat16 and calls == []
    assert torch.equal(out, F.scaled_dot_product_attention(q, k, v, mask))
    torch.testing.assert_close(out.float(), naive_attention(q.float(), k.float(), v.float(), mask),
                               rtol=2e-2, atol=2e-2)
    cpu_attention(q, k, v, mask, slice_size=5)
    assert calls == [5]
    q.requires_grad_()
    out = cpu_attention(q, k, v, mask)
    assert calls == [5] and torch.equal(out, F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                                          mask).bfloat16())


@pytest.mark.parametrize("name", ["sdpa", "naive", "blockwise", "cpu"])
@pytest.mark.parametrize("slice_size", [None, 7])
def test_every_named_kernel_is_the_attention_formula(name, slice_size):
    q, k, v = (torch.randn(2, 4, 33, 8) for _ in range(3))
    mask = MASKS["additive"]
    kernel = attention_kernel(name, slice_size) or F.scaled_dot_product_attention
    torch.testing.assert_close(kernel(q, k, v, mask), naive_attention(q, k, v, mask), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("name, slice_size, message", [("flash3", None, "unknown attention backend 'flash3'.*'sdpa'"),
                                                       ("sdpa", 0, "slice_size"), ("naive", 2.5, "slice_size")])
def test_bad_kernel_names_and_slices_say_what_to_use(name, slice_size, message):
    with pytest.raises(MinidiffError, match=message):
        set_attention(UNet(UNetConfig.tiny()), name, slice_size)


# --- where they are put in place ----------------------------------------------------------------------------


def kernels(model):
    return {module.kernel for module in model.modules() if isinstance(module, (Attention, SpatialSelfAttention))}


def test_set_attention_is_per_model():
    plain, naive = perturbed_unet(), perturbed_unet()
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    set_attention(naive, "naive")
    assert kernels(naive) == {naive_attention} and kernels(plain) == {None}  # the other model is untouched
    with torch.no_grad():
        assert relative_error(naive(x, 321, context), plain(x, 321, context)) <= 1e-5
    set_attention(naive)  # the default where the weights are: the CPU kernel here
    assert kernels(naive) == {cpu_attention}


def test_set_attention_on_a_pipeline_reaches_every_model():
    unet, vae, text_encoder = UNet(UNetConfig.tiny()), AutoencoderKL(VAEConfig.tiny()), CLIPTextModel(
        CLIPTextConfig.tiny())
    pipe = types.SimpleNamespace(unet=FastUNet(unet), vae=vae, text_encoder=text_encoder, taesd=None)
    set_attention(pipe, "blockwise", 16)
    for model in (unet, vae, text_encoder):
        chosen = [module.kernel for module in model.modules() if hasattr(module, "kernel")]
        assert chosen and all(k.func is blockwise_attention and k.keywords == {"block": 16} for k in chosen)


def test_a_model_built_from_its_class_is_plain_and_cpu_defaults_swaps_in_place():
    unet = perturbed_unet()
    plain = copy.deepcopy(unet)
    assert not any(isinstance(m, (MatmulConv3x3, BlockedFeedForward)) for m in unet.modules())
    state = unet.state_dict()
    assert cpu_defaults(unet) is unet
    convs = [m for m in plain.modules() if MatmulConv3x3.replaces(m)]
    assert sum(isinstance(m, MatmulConv3x3) for m in unet.modules()) == len(convs) > 10
    feed_forwards = sum(isinstance(m, FeedForward) for m in plain.modules())
    assert sum(isinstance(m, BlockedFeedForward) for m in unet.modules()) == feed_forwards > 1
    linears = sum(type(m) is nn.Linear for m in plain.modules())
    assert sum(isinstance(m, OneDNNLinear) for m in unet.modules()) == linears > 10
    assert isinstance(unet.down_blocks[0].downsamplers[0].conv, nn.Conv2d)  # stride 2: stays plain
    assert kernels(unet) == {cpu_attention}
    after = unet.state_dict()  # the same keys and the same tensors: nothing copied
    assert list(after) == list(state) and all(after[key].data_ptr() == state[key].data_ptr() for key in state)
    x, context = torch.randn(2, 4, 16, 16), torch.randn(2, 7, 32)
    with torch.no_grad():
        assert relative_error(unet(x, 321, context), plain(x, 321, context)) <= 1e-5


def test_cpu_defaults_leave_models_elsewhere_alone():
    with torch.device("meta"):
        unet = UNet(UNetConfig.tiny())
    cpu_defaults(unet)
    assert not any(isinstance(m, (MatmulConv3x3, BlockedFeedForward)) for m in unet.modules())
    assert kernels(unet) == {None}


def test_the_loaders_put_the_cpu_defaults_in_place():
    """minidiff.load.build (every loader's last step) on a CPU: the CPU kernels, the same numbers."""
    torch.manual_seed(0)
    vae = AutoencoderKL(VAEConfig.tiny()).eval()
    loaded_unet = built(meta_model(UNet, UNetConfig.tiny()), perturbed_unet().state_dict(), "test", device="cpu")
    loaded_vae = built(meta_model(AutoencoderKL, VAEConfig.tiny()), vae.state_dict(), "test", device="cpu")
    assert any(isinstance(m, MatmulConv3x3) for m in loaded_unet.modules()) and kernels(loaded_vae) == {cpu_attention}
    latent = torch.randn(1, 4, 8, 8)
    with torch.no_grad():
        # float32: the CPU attention kernel is SDPA, the linear layers oneDNN's matmul (another summation order)
        assert relative_error(loaded_vae.decode(latent), vae.decode(latent)) <= 1e-5
