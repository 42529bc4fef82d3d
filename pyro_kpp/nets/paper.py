"""The networks of K++ Appendix E ("Model Architecture & Training"), used by ``--preset paper``.

* ``TSMResNet18Encoder``: torchvision's ResNet18 with a Temporal Shift Module (Lin et al.,
  2019) in every residual block, batch norm and ReLU (App. E "Encoder", §3.3). The shift
  runs along the episode: the T images of an episode play the role of TSM's video frames,
  so e_t depends on its neighbours in the episode.
* ``EvoNormS0`` and ``EvoNormDecoder``: a conv-transpose decoder with EvoNorm-S0
  (Liu et al., 2020) between its layers (App. E "Decoder").

The dense nets (3 linear layers of 512 units with spectral normalisation) are
``pyro_kpp.nets.conv.DenseNet``/``GaussianHead`` with ``spectral_norm=True``; the memory writer
is ``pyro_kpp.nets.conv.MemoryWriter`` with 256 base channels (``pyro_kpp.config.PRESET_DEFAULTS``).

Choices where the paper is silent:

* Shift fraction: "a fractional shift of the feature maps by 0.125 as suggested by the
  authors" is read as TSM's own default (its ``shift_div=8``): 1/8 of the channels move one
  image forward along the episode and another 1/8 one image backward (1/4 in all), with
  zeros shifted in at the episode's ends. ``shift_fraction`` sets the per-direction fraction.
* The shift is TSM's "residual shift": inside each BasicBlock, before its first conv, so
  the block's identity path keeps the unshifted features.
* Small-image stem: a 3x3 stride-1 conv and no max-pool (ResNet18's 7x7 stride-2 stem and
  max-pool would shrink a 28x28 image to 7x7 before the first block); the final fc maps
  ResNet18's 512 pooled features linearly to the embedding size D.
* Decoder: a linear map of z to a (2c, H/4, W/4) map, then EvoNormS0 before each of three
  conv-transposes (2c -> c, stride 2; c -> c, stride 1; c -> C', stride 2), c = 64;
  EvoNorm groups of 32 as Liu et al. (GroupNorm's default), eps 1e-5.
"""
from __future__ import annotations

import math

import torch
import torchvision
from torch import nn
from torch.nn import functional as F

from pyro_kpp.nets.conv import decoder_start

EVONORM_EPS = 1e-5


def temporal_shift(x: torch.Tensor, shift_fraction: float = 1 / 8) -> torch.Tensor:
    """Shift channels along the episode dim of x (B, T, C, H, W); returns a new tensor.

    Channels [0, f) of image t take the values of image t+1 (shifted backward in the
    episode), channels [f, 2f) those of image t-1 (shifted forward), f = floor(C * fraction);
    the positions shifted in at the ends are zero; the other C - 2f channels are untouched.
    """
    if x.dim() != 5:
        raise ValueError(f"x: expected an episode batch (B, T, C, H, W), got shape {tuple(x.shape)}")
    fold = int(x.shape[2] * shift_fraction)
    # One concatenation writes each output element once; zero-filling a full-size output and
    # copying three slices into it cost twice as much (fwd + bwd, measured on 28x28 maps).
    from_next = F.pad(x[:, 1:, :fold], (0, 0, 0, 0, 0, 0, 0, 1))              # image t <- image t+1
    from_previous = F.pad(x[:, :-1, fold:2 * fold], (0, 0, 0, 0, 0, 0, 1, 0))  # image t <- image t-1
    return torch.cat([from_next, from_previous, x[:, :, 2 * fold:]], dim=2)


class TemporalShift(nn.Module):
    """``temporal_shift`` for the (B*T, C, H, W) feature maps inside a 2-D network.

    The episode length T is set by the owning encoder for the duration of a forward pass
    (``TSMResNet18Encoder.forward``), since the 2-D network only sees B*T images.
    """

    def __init__(self, shift_fraction: float = 1 / 8):
        super().__init__()
        if not 0 < shift_fraction <= 0.5:
            raise ValueError(f"shift_fraction: expected a fraction in (0, 1/2] per direction, got {shift_fraction}")
        self.shift_fraction = shift_fraction
        self.episode_length: int | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.episode_length is None:
            raise RuntimeError("TemporalShift: the episode length is unknown; call it through TSMResNet18Encoder "
                               "with a (B, T, C, H, W) episode batch")
        episodes = x.unflatten(0, (-1, self.episode_length))                 # (B, T, C, H, W)
        return temporal_shift(episodes, self.shift_fraction).flatten(0, 1)   # (B*T, C, H, W)


class TSMResNet18Encoder(nn.Module):
    """f_enc: episodes (B, T, C, H, W) -> embeddings (B, T, D), mixing images of one episode."""

    #: the encoder needs the episode structure: ``EpisodicModel.embed`` passes (B, T, C, H, W)
    mixes_episode = True

    def __init__(self, image_shape: tuple[int, int, int], embed_size: int, shift_fraction: float = 1 / 8):
        super().__init__()
        c = image_shape[0]
        net = torchvision.models.resnet18(weights=None, num_classes=embed_size)
        net.conv1 = nn.Conv2d(c, net.conv1.out_channels, 3, 1, 1, bias=False)   # small-image stem
        net.maxpool = nn.Identity()
        for layer in (net.layer1, net.layer2, net.layer3, net.layer4):
            for block in layer:                  # residual shift: the identity path is not shifted
                block.conv1 = nn.Sequential(TemporalShift(shift_fraction), block.conv1)
        self.net = net
        self.image_shape = tuple(image_shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 5 or tuple(x.shape[2:]) != self.image_shape:
            raise ValueError(f"x: expected episodes (B, T, {', '.join(map(str, self.image_shape))}), "
                             f"got shape {tuple(x.shape)}")
        B, T = x.shape[:2]
        shifts = [m for m in self.modules() if isinstance(m, TemporalShift)]
        for shift in shifts:
            shift.episode_length = T
        try:
            E = self.net(x.flatten(0, 1))                                   # (B*T, D)
        finally:
            for shift in shifts:
                shift.episode_length = None
        return E.unflatten(0, (B, T))                                       # (B, T, D)


class EvoNormS0(nn.Module):
    """EvoNorm-S0 (Liu et al., 2020): y = x * sigmoid(v x) / group_std(x) * gamma + beta.

    group_std is the (biased) standard deviation over each group of C/groups channels and
    all pixels of one image, sqrt(var + eps). v, gamma, beta are per-channel (C,) vectors.
    """

    def __init__(self, channels: int, groups: int = 32, eps: float = EVONORM_EPS):
        super().__init__()
        groups = min(groups, channels)
        if channels % groups:
            raise ValueError(f"groups: {groups} groups do not divide {channels} channels")
        self.groups, self.eps = groups, eps
        self.v = nn.Parameter(torch.ones(channels))
        self.gamma = nn.Parameter(torch.ones(channels))
        self.beta = nn.Parameter(torch.zeros(channels))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        N, C = x.shape[:2]
        per_channel = (1, C, 1, 1)
        grouped = x.reshape(N, self.groups, -1)                             # (N, G, C/G * H * W)
        std = (grouped.var(dim=-1, unbiased=False, keepdim=True) + self.eps).sqrt()
        std = std.expand(N, self.groups, C // self.groups).reshape(N, C, 1, 1)
        swish = x * torch.sigmoid(self.v.view(per_channel) * x)
        return swish / std * self.gamma.view(per_channel) + self.beta.view(per_channel)


class EvoNormDecoder(nn.Module):
    """p(x | z)'s network with EvoNormS0 between conv-transposes: (N, L) -> (N, C', H, W).

    Same contract as ``pyro_kpp.nets.conv.ConvDecoder`` (H and W multiples of 4).
    """

    def __init__(self, code_size: int, image_shape: tuple[int, int, int], out_channels: int,
                 channels: int = 64):
        super().__init__()
        self.start = decoder_start(image_shape, channels)
        self.fc = nn.Linear(code_size, math.prod(self.start))
        self.deconvs = nn.Sequential(
            EvoNormS0(2 * channels), nn.ConvTranspose2d(2 * channels, channels, 4, 2, 1),   # H/2
            EvoNormS0(channels), nn.ConvTranspose2d(channels, channels, 3, 1, 1),
            EvoNormS0(channels), nn.ConvTranspose2d(channels, out_channels, 4, 2, 1),        # H
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.deconvs(self.fc(z).reshape(-1, *self.start))
