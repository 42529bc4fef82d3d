"""Neural networks shared by every model: encoder, decoder, dense heads, memory writer.

The CPU defaults (``Config.preset == "cpu"``) are small convolutional stacks (ELU
activations). The paper's TSM-ResNet18 encoder and EvoNormS0 decoder (K++ Appendix E,
``pyro_kpp.nets.paper``) are far too slow for a 2-core CPU and come with ``preset="paper"``.
Every model in this package builds its encoder and decoder with ``pyro_kpp.nets.build``, so
comparisons between K++, KM, DKM and the VAE isolate the memory.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

SCALE_FLOOR = 1e-3  # lower bound on every predicted standard deviation (numerical safety)


def over_leading(net: nn.Module, x: torch.Tensor, event_dim: int) -> torch.Tensor:
    """Apply ``net`` to the last ``event_dim`` dims of ``x``, flattening any leading dims.

    ``net`` may return a tensor or a tuple of tensors; each gets the leading dims back.
    """
    lead = x.shape[: x.dim() - event_dim]
    y = net(x.reshape(-1, *x.shape[x.dim() - event_dim:]))
    if isinstance(y, tuple):
        return tuple(t.reshape(*lead, *t.shape[1:]) for t in y)
    return y.reshape(*lead, *y.shape[1:])


def positive_scale(raw: torch.Tensor) -> torch.Tensor:
    """Standard deviation from an unconstrained output: softplus plus a small floor."""
    return F.softplus(raw) + SCALE_FLOOR


class ConvEncoder(nn.Module):
    """f_enc for one image: (N, C, H, W) -> (N, D). Works for 28x28 and 32x32 inputs."""

    #: each image is embedded on its own (``EpisodicModel.embed`` flattens the episode dims)
    mixes_episode = False

    def __init__(self, image_shape: tuple[int, int, int], embed_size: int, channels: int = 32):
        super().__init__()
        c, h, w = image_shape
        self.convs = nn.Sequential(
            nn.Conv2d(c, channels, 4, 2, 1), nn.ELU(),                 # H/2
            nn.Conv2d(channels, 2 * channels, 4, 2, 1), nn.ELU(),      # H/4
            nn.Conv2d(2 * channels, 4 * channels, 3, 2, 1), nn.ELU(),  # ceil(H/8)
        )
        flat = 4 * channels * math.ceil(h / 8) * math.ceil(w / 8)
        self.out = nn.Sequential(nn.Flatten(), nn.Linear(flat, embed_size), nn.ELU())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.convs(x))


def decoder_start(image_shape: tuple[int, int, int], channels: int) -> tuple[int, int, int]:
    """(2c, H/4, W/4): the feature map a decoder grows to H x W with two stride-2 layers."""
    _, h, w = image_shape
    if h % 4 or w % 4:
        raise ValueError(f"image_shape: height and width must be multiples of 4, got {image_shape}")
    return (2 * channels, h // 4, w // 4)


class ConvDecoder(nn.Module):
    """The decoder's network for p(x | z): (N, L) -> (N, out_channels, H, W) likelihood parameters."""

    def __init__(self, code_size: int, image_shape: tuple[int, int, int], out_channels: int,
                 channels: int = 32):
        super().__init__()
        self.start = decoder_start(image_shape, channels)
        self.fc = nn.Sequential(nn.Linear(code_size, math.prod(self.start)), nn.ELU())
        self.deconvs = nn.Sequential(
            nn.ConvTranspose2d(2 * channels, channels, 4, 2, 1), nn.ELU(),   # H/2
            nn.Conv2d(channels, channels, 3, 1, 1), nn.ELU(),
            nn.ConvTranspose2d(channels, out_channels, 4, 2, 1),             # H
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.deconvs(self.fc(z).reshape(-1, *self.start))


class DenseNet(nn.Module):
    """A dense network: ``layers`` hidden layers of ``hidden`` units with ELU, then a linear map.

    ``spectral_norm=True`` puts spectral normalisation (Miyato et al., 2018) on every linear
    layer, the output layer included (K++ App. E "Dense models").
    """

    def __init__(self, in_size: int, out_size: int, hidden: int, layers: int = 2, spectral_norm: bool = False):
        super().__init__()
        def linear(n_in: int, n_out: int) -> nn.Module:
            layer = nn.Linear(n_in, n_out)
            return nn.utils.parametrizations.spectral_norm(layer) if spectral_norm else layer

        mods, size = [], in_size
        for _ in range(layers):
            mods += [linear(size, hidden), nn.ELU()]
            size = hidden
        mods.append(linear(size, out_size))
        self.net = nn.Sequential(*mods)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class GaussianHead(nn.Module):
    """(..., in) -> (loc, scale) of a diagonal Gaussian over ``out_size`` dims."""

    def __init__(self, in_size: int, out_size: int, hidden: int, layers: int = 2, spectral_norm: bool = False):
        super().__init__()
        self.net = DenseNet(in_size, 2 * out_size, hidden, layers, spectral_norm)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw = self.net(x).chunk(2, dim=-1)
        return loc, positive_scale(raw)


class ConvGaussianHead(nn.Module):
    """(N, C, h, w) -> (loc, scale), each (N, out_size): the learned prior's conv net."""

    def __init__(self, in_channels: int, window: tuple[int, int], out_size: int, channels: int = 32):
        super().__init__()
        h, w = window
        self.convs = nn.Sequential(
            nn.Conv2d(in_channels, channels, 4, 2, 1), nn.ELU(),
            nn.Conv2d(channels, 2 * channels, 4, 2, 1), nn.ELU(),
            nn.Flatten(),
        )
        flat = 2 * channels * (h // 4) * (w // 4)
        self.out = nn.Linear(flat, 2 * out_size)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        loc, raw = self.out(self.convs(x)).chunk(2, dim=-1)
        return loc, positive_scale(raw)


class MemoryWriter(nn.Module):
    """f_mem: pooled embedding (B, D) -> memory (B, C, H, W) (K++ §3.3, Appendix E).

    A linear projection to a small feature map followed by conv-transpose layers that
    double the resolution and halve the channels (Appendix E: "base feature map
    projection ... with a division by 2 per layer"); the last layer maps to C channels
    with no activation, so memory cells are unconstrained reals.
    """

    def __init__(self, embed_size: int, memory_shape: tuple[int, int, int], base_channels: int = 64):
        super().__init__()
        c, h, w = memory_shape
        ups = 0
        while ups < 4 and h % (2 ** (ups + 1)) == 0 and w % (2 ** (ups + 1)) == 0 \
                and h // 2 ** (ups + 1) >= 4 and w // 2 ** (ups + 1) >= 4:
            ups += 1
        self.start = (base_channels, h // 2 ** ups, w // 2 ** ups)
        self.fc = nn.Sequential(nn.Linear(embed_size, math.prod(self.start)), nn.ELU())
        layers, ch = [], base_channels
        for _ in range(ups):
            layers += [nn.ConvTranspose2d(ch, max(ch // 2, 8), 4, 2, 1), nn.ELU()]
            ch = max(ch // 2, 8)
        layers.append(nn.Conv2d(ch, c, 3, 1, 1))
        self.deconvs = nn.Sequential(*layers)

    def forward(self, pooled: torch.Tensor) -> torch.Tensor:
        return self.deconvs(self.fc(pooled).reshape(-1, *self.start))
