"""The CLIP text encoder: token ids -> the (B, 77, width) states the UNet cross-attends to.

A causal pre-LayerNorm transformer (Radford et al. 2021, "Learning Transferable Visual Models From
Natural Language Supervision"; the layer of Vaswani et al. 2017 with the norm before each sublayer, as
in GPT-2). SD 1.x reads OpenAI's ViT-L/14 text tower; SD 2.x reads OpenCLIP's ViT-H/14 tower at its
penultimate layer, which diffusers ships as a 23-layer model whose output gets the final layer norm.

Notation:
    hidden_size          -> d, the width of the residual stream
    num_attention_heads  -> h; each head has d / h channels
    intermediate_size    -> the MLP width (4 d)
    skip_last_layers     -> "clip skip" k: stop after the first N - k layers, then apply the final norm
    projection_dim       -> SDXL's OpenCLIP ViT-bigG also has a text_projection (d -> projection_dim, no bias) of
                            the pooled state: the final-normed last layer at the end-of-text token

Attribute names are the keys of the published `text_encoder/` files (text_model.encoder.layers.0.self_attn.q_proj
...; transformers >= 5 drops "text_model." in memory and when saving), so they load with a plain `load_state_dict`.
"""

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minidiff.attention import attention
from minidiff.errors import MinidiffError

ACTIVATIONS = {
    "quick_gelu": lambda x: x * torch.sigmoid(1.702 * x),  # OpenAI CLIP's sigmoid approximation of GELU
    "gelu": F.gelu,  # exact GELU (Hendrycks & Gimpel 2016), OpenCLIP
}


@dataclass
class CLIPTextConfig:
    vocab_size: int = 49408  # BPE tokens, see tokenizer.py
    max_position_embeddings: int = 77  # context length: <|startoftext|> + 75 tokens + <|endoftext|>
    hidden_size: int = 768  # d, the width of every token's state
    intermediate_size: int = 3072  # width of the MLP inside each layer
    num_hidden_layers: int = 12  # N
    num_attention_heads: int = 12  # h
    hidden_act: str = "quick_gelu"  # quick_gelu (OpenAI) | gelu (OpenCLIP)
    layer_norm_eps: float = 1e-5
    projection_dim: int | None = None  # text_projection width (CLIPTextModelWithProjection, SDXL's 2nd); None: none

    def __post_init__(self):
        if self.hidden_act not in ACTIVATIONS:
            raise MinidiffError(f"unknown hidden_act {self.hidden_act!r}: use one of {', '.join(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise MinidiffError(
                f"hidden_size {self.hidden_size} is not a multiple of num_attention_heads {self.num_attention_heads}"
            )

    @classmethod
    def sd15(cls) -> "CLIPTextConfig":
        """SD 1.x: OpenAI CLIP ViT-L/14 text tower, 123M parameters."""
        return cls()

    @classmethod
    def sd21(cls) -> "CLIPTextConfig":
        """SD 2.x: OpenCLIP ViT-H/14 text tower without its last layer (23 of 24), 340M parameters."""
        return cls(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16, hidden_act="gelu"
        )

    @classmethod
    def sdxl_bigg(cls) -> "CLIPTextConfig":
        """SDXL's second encoder: OpenCLIP ViT-bigG/14's text tower, all 32 layers and its projection, 695M."""
        return cls(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
                   hidden_act="gelu", projection_dim=1280)

    @classmethod
    def tiny(cls) -> "CLIPTextConfig":
        """A few-layer model with the real vocabulary and context, for tests."""
        return cls(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=2)



class CLIPTextEmbeddings(nn.Module):
    """Learnt token embedding plus learnt absolute position embedding."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embedding = nn.Embedding(config.max_position_embeddings, config.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)
        return self.token_embedding(input_ids) + self.position_embedding(positions)


class CLIPAttention(nn.Module):
    """Multi-head self-attention (Vaswani et al. 2017) through minidiff's one attention function."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.heads = config.num_attention_heads
        width = config.hidden_size
        self.q_proj, self.k_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.v_proj, self.out_proj = nn.Linear(width, width), nn.Linear(width, width)
        self.kernel = None  # computes softmax(Q K^T / sqrt(d) + mask) V; None: SDPA (see minidiff.attention)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        return self.out_proj(attention(q, k, v, self.heads, mask, kernel=self.kernel))


class CLIPMLP(nn.Module):
    """Two linear layers with (quick) GELU between them."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)
        self.activation = ACTIVATIONS[config.hidden_act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.activation(self.fc1(x)))


class CLIPEncoderLayer(nn.Module):
    """Pre-norm transformer layer: x + attention(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.self_attn = CLIPAttention(config)
        self.layer_norm1 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.mlp = CLIPMLP(config)
        self.layer_norm2 = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), mask)
        return x + self.mlp(self.layer_norm2(x))


class CLIPEncoder(nn.Module):
    """The stack of N layers."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(CLIPEncoderLayer(config) for _ in range(config.num_hidden_layers))


class CLIPTextTransformer(nn.Module):
    """Embeddings, N causal layers, final layer norm."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.embeddings = CLIPTextEmbeddings(config)
        self.encoder = CLIPEncoder(config)
        self.final_layer_norm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def forward(self, input_ids: torch.Tensor, skip_last_layers: int = 0) -> torch.Tensor:
        x = self.embeddings(input_ids)
        length = input_ids.shape[1]
        causal_mask = torch.ones(length, length, dtype=torch.bool, device=x.device).tril()  # token i sees 0..i
        for layer in self.encoder.layers[: len(self.encoder.layers) - skip_last_layers]:
            x = layer(x, causal_mask)
        return self.final_layer_norm(x)

    def hidden_states(self, input_ids: torch.Tensor) -> list:
        """The embeddings' output and every layer's, without the final norm (transformers' hidden_states)."""
        states = [self.embeddings(input_ids)]
        length = input_ids.shape[1]
        causal_mask = torch.ones(length, length, dtype=torch.bool, device=input_ids.device).tril()
        for layer in self.encoder.layers:
            states.append(layer(states[-1], causal_mask))
        return states


class CLIPTextModel(nn.Module):
    """CLIP's text transformer (Radford et al. 2021) with the checkpoint layout of transformers."""

    def __init__(self, config: CLIPTextConfig):
        super().__init__()
        self.config = config
        self.text_model = CLIPTextTransformer(config)
        if config.projection_dim is not None:  # CLIPTextModelWithProjection's key: text_projection.weight
            self.text_projection = nn.Linear(config.hidden_size, config.projection_dim, bias=False)

    def forward(self, input_ids: torch.Tensor, skip_last_layers: int = 0) -> torch.Tensor:
        """(B, L) token ids -> (B, L, hidden_size) last_hidden_state, final layer norm applied.

        skip_last_layers: "clip skip" k, the output of layer N - k instead of N (k = 1: the penultimate).
        """
        self.check(input_ids, skip_last_layers)
        return self.text_model(input_ids, skip_last_layers)

    def penultimate_and_pooled(self, input_ids: torch.Tensor) -> tuple:
        """SDXL's conditioning: (B, L, d) the output of layer N - 1 (no final norm), and the pooled (B, d) state,
        the final-normed last layer at the end-of-text token (the largest id, as transformers finds it for these
        configs), through text_projection when the model has one (B, projection_dim)."""
        self.check(input_ids, 0)
        states = self.text_model.hidden_states(input_ids)
        last = self.text_model.final_layer_norm(states[-1])
        pooled = last[torch.arange(len(input_ids), device=last.device), input_ids.argmax(dim=-1)]
        return states[-2], (pooled if self.config.projection_dim is None else self.text_projection(pooled))

    def check(self, input_ids: torch.Tensor, skip_last_layers: int) -> None:
        """MinidiffError unless input_ids are (B, L) token ids this encoder can read."""
        config = self.config
        if input_ids.ndim != 2 or input_ids.is_floating_point() or input_ids.is_complex():
            raise MinidiffError(
                f"input_ids must be a (batch, length) integer tensor, got {input_ids.dtype} {tuple(input_ids.shape)}:"
                " make it with minidiff.tokenizer.CLIPTokenizer"
            )
        if input_ids.shape[1] > config.max_position_embeddings:
            raise MinidiffError(
                f"{input_ids.shape[1]} tokens do not fit the text encoder's {config.max_position_embeddings} "
                f"positions: tokenize with max_length={config.max_position_embeddings}"
            )
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= config.vocab_size):
            raise MinidiffError(f"token ids must lie in 0..{config.vocab_size - 1}: was the right tokenizer used?")
        if not 0 <= skip_last_layers < config.num_hidden_layers:
            raise MinidiffError(
                f"skip_last_layers={skip_last_layers} must lie in 0..{config.num_hidden_layers - 1} for this "
                f"{config.num_hidden_layers}-layer text encoder (1 = penultimate layer)"
            )
