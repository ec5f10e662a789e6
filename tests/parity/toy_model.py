"""The smooth stand-in for a network that the sampler parity tests run minidiff and diffusers on."""

import torch


class ToyModel(torch.nn.Module):
    """A smooth function of both x and t, mixing the channels like a network: tanh(mix(x) + shift(t)) (1 + t) + x t
    / 10, its mixing matrix and shift drawn from `seed`."""

    def __init__(self, seed: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.mix = torch.nn.Parameter(torch.randn(4, 4, generator=g) * 0.5 + torch.eye(4), requires_grad=False)
        self.shift = torch.nn.Parameter(torch.randn(4, generator=g), requires_grad=False)

    def forward(self, x, t):
        t = float(t) / 1000
        mixed = torch.einsum("oc,bchw->bohw", self.mix, x)
        return torch.tanh((mixed + (t - 0.5) * self.shift[:, None, None]) * (1 + t)) + 0.1 * x * t
