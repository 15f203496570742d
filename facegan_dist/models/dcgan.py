"""DCGAN (Radford et al. 2015) as in the PyTorch DCGAN tutorial, for 16-128 px.

Guidelines followed (lecture notes, section "DCGAN"): strided (transposed) convolutions instead of
pooling, BatchNorm in both nets except D's first layer (and the G output), ReLU in G with a tanh
output, LeakyReLU(0.2) in D, no fully connected hidden layers, weights drawn from N(0, 0.02).

The number of blocks follows from the resolution S: both nets work between 4x4 and S x S, so
there are n = log2(S) - 2 resolution doublings. At 64 px (n = 4) the layers, their order and the
state_dict keys are exactly those of the tutorial's `Generator` / `Discriminator` (`main.0` ...),
minus D's final Sigmoid: D returns logits and the sigmoid lives inside the loss.

    S=64, width 64   G                           D
                     z [B, 100] -> [B, 100, 1, 1]   x [B, 3, 64, 64]
                     [B, 512, 4, 4]                 [B, 64, 32, 32]    (no BN)
                     [B, 256, 8, 8]                 [B, 128, 16, 16]
                     [B, 128, 16, 16]               [B, 256, 8, 8]
                     [B, 64, 32, 32]                [B, 512, 4, 4]
                     [B, 3, 64, 64] tanh            [B, 1, 1, 1] -> logits [B]

All convolutions are bias-free (BatchNorm follows them, or, for the last D layer, the tutorial
has none); `dcgan_init_` draws the weights. The block builders `_up_block` / `_down_block` are
the single place where a later option (spectral norm, another upsampling) would change a layer.
"""

from __future__ import annotations

from torch import Tensor, nn

IMG_CHANNELS = 3
RESOLUTIONS = (16, 32, 64, 128)
LEAKY_SLOPE = 0.2
INIT_STD = 0.02


def n_doublings(resolution: int) -> int:
    """Number of 2x resolution steps between 4x4 and `resolution` (4 at 64 px)."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution {resolution} must be one of {RESOLUTIONS}")
    return resolution.bit_length() - 3  # log2(S) - 2 for a power of two


def _up_block(c_in: int, c_out: int, *, first: bool) -> list[nn.Module]:
    """ConvTranspose + BN + ReLU: 1x1 -> 4x4 when `first`, else doubles H and W."""
    kernel, stride, pad = (4, 1, 0) if first else (4, 2, 1)
    return [
        nn.ConvTranspose2d(c_in, c_out, kernel, stride, pad, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    ]


def _down_block(c_in: int, c_out: int, *, batchnorm: bool) -> list[nn.Module]:
    """Conv (halves H and W) [+ BN] + LeakyReLU(0.2)."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
    return layers


class DCGANGenerator(nn.Module):
    """z [B, z_dim] -> image [B, 3, S, S] in [-1, 1]."""

    def __init__(self, *, resolution: int, z_dim: int = 100, width: int = 64) -> None:
        super().__init__()
        n = n_doublings(resolution)
        self.resolution = resolution
        self.z_dim = z_dim
        # Channels at 4x4, 8x8, ..., S/2 x S/2: width * 2^(n-1), ..., width * 2, width.
        widths = [width * 2 ** (n - 1 - i) for i in range(n)]
        layers = _up_block(z_dim, widths[0], first=True)  # [B, width*2^(n-1), 4, 4]
        for i in range(1, n):
            # [B, width*2^(n-1-i), 4*2^i, 4*2^i]
            layers += _up_block(widths[i - 1], widths[i], first=False)
        layers += [
            nn.ConvTranspose2d(widths[-1], IMG_CHANNELS, 4, 2, 1, bias=False),  # [B, 3, S, S]
            nn.Tanh(),
        ]
        self.main = nn.Sequential(*layers)
        dcgan_init_(self)

    def forward(self, z: Tensor) -> Tensor:
        return self.main(z[:, :, None, None])  # [B, z, 1, 1] -> [B, 3, S, S]


class DCGANDiscriminator(nn.Module):
    """image [B, 3, S, S] -> logits [B] (no sigmoid)."""

    def __init__(self, *, resolution: int, width: int = 64) -> None:
        super().__init__()
        n = n_doublings(resolution)
        self.resolution = resolution
        # Channels at S/2, S/4, ..., 4x4: width, width * 2, ..., width * 2^(n-1).
        widths = [width * 2**i for i in range(n)]
        # No BN on the first layer (Radford et al.): it would normalise the input image.
        layers = _down_block(IMG_CHANNELS, widths[0], batchnorm=False)  # [B, width, S/2, S/2]
        for i in range(1, n):
            # [B, width*2^i, S/2^(i+1), S/2^(i+1)]
            layers += _down_block(widths[i - 1], widths[i], batchnorm=True)
        layers.append(nn.Conv2d(widths[-1], 1, 4, 1, 0, bias=False))  # [B, 1, 1, 1]
        self.main = nn.Sequential(*layers)
        dcgan_init_(self)

    def forward(self, x: Tensor) -> Tensor:
        return self.main(x).flatten()  # [B, 1, 1, 1] -> [B] logits


def dcgan_init_(module: nn.Module) -> nn.Module:
    """DCGAN init, in place, for every submodule: conv weights ~ N(0, 0.02), BN weight ~
    N(1, 0.02), biases 0. Call it on a whole model (`module.apply(dcgan_init_)` also works,
    but re-draws nested layers once per level)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, 0.0, INIT_STD)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, INIT_STD)
            nn.init.zeros_(m.bias)
    return module
