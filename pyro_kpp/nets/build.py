"""The networks of a preset (``Config.preset``): the CPU defaults of ``conv.py`` or the paper's
networks of ``paper.py`` (K++ Appendix E). Every model builds its encoder and decoder here, so
comparisons between K++, KM, DKM and the VAE isolate the memory."""
from __future__ import annotations

from torch import nn

from pyro_kpp.nets.conv import ConvDecoder, ConvEncoder


def build_encoder(cfg) -> nn.Module:
    """f_enc for ``cfg.preset``: ConvEncoder ("cpu") or the TSM-ResNet18 of K++ App. E ("paper")."""
    if cfg.preset == "paper":
        from pyro_kpp.nets.paper import TSMResNet18Encoder   # torchvision is imported only when needed (~1 s)
        return TSMResNet18Encoder(cfg.image_shape, cfg.embed_size)
    return ConvEncoder(cfg.image_shape, cfg.embed_size)


def build_decoder(cfg, out_channels: int) -> nn.Module:
    """p(x | z)'s network for ``cfg.preset``: ConvDecoder ("cpu") or EvoNormDecoder ("paper")."""
    if cfg.preset == "paper":
        from pyro_kpp.nets.paper import EvoNormDecoder
        return EvoNormDecoder(cfg.code_size, cfg.image_shape, out_channels)
    return ConvDecoder(cfg.code_size, cfg.image_shape, out_channels)


def dense_spectral_norm(cfg) -> bool:
    """Whether the dense heads use spectral normalisation: only in the paper preset (App. E)."""
    return cfg.preset == "paper"
