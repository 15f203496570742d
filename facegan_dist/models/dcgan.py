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
the single place where an option changes a layer. Options (defaults = the tutorial net):

- `upsample` (G): `convtranspose` (the tutorial), or `nearest` / `bilinear`: resize x2 then a 3x3
  convolution, which removes the checkerboard artefacts of strided transposed convolutions
  (Odena et al. 2016, cited in the Italian notes). A 3x3 conv after a resize costs 9/4 = 2.25x
  the multiply-adds of a 4x4 stride-2 transposed conv, and every hidden doubling costs about the
  same, so `nearest` makes G's upsampling 2.25x dearer. `nearest-last` resizes only for the RGB
  output layer (the one with 3 output channels, so the cheapest) and keeps transposed convs
  inside: the output pixels lose the stride-2 pattern at a few percent of the cost.
- `norm` (D): `batch` (the tutorial) or `none`: a WGAN-GP penalty is per sample and BatchNorm
  couples the samples of a batch, so gradient-penalty and spectral-norm critics go without it.
- `mbstd` (D): minibatch standard deviation (Karras et al. 2018, ProGAN): before the last
  layer, the standard deviation of each feature over groups of up to 4 samples, averaged into
  one extra 4x4 channel, lets D see a batch's variety and so penalise mode collapse.
- `n_cond` (both): a conditional GAN (Mirza & Osindero) on `n_cond` binary attributes c in
  {0, 1}: G reads [z, 2c-1]; D is a projection discriminator (Miyato & Koyama 2018): logit =
  final_conv(h) + <W (2c-1), sum_xy h> with h the 4x4 features.
Spectral normalisation is applied by the registry (`models/__init__.py`) on top of any net.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

# The option values are declared with the options (config.py); `build_models` checks them, so
# the classes below trust their `upsample` / `norm` strings.
from facegan_dist.config import D_NORMS
from facegan_dist.config import UPSAMPLE_CHOICES as UPSAMPLES

__all__ = ["D_NORMS", "UPSAMPLES", "DCGANDiscriminator", "DCGANGenerator", "MinibatchStd",
           "RESOLUTIONS", "dcgan_init_", "n_doublings"]  # fmt: skip

IMG_CHANNELS = 3
RESOLUTIONS = (16, 32, 64, 128)
LEAKY_SLOPE = 0.2
INIT_STD = 0.02


def n_doublings(resolution: int) -> int:
    """Number of 2x resolution steps between 4x4 and `resolution` (4 at 64 px)."""
    if resolution not in RESOLUTIONS:
        raise ValueError(f"resolution {resolution} must be one of {RESOLUTIONS}")
    return resolution.bit_length() - 3  # log2(S) - 2 for a power of two


class NearestUpConv3x3(nn.Conv2d):
    """`Conv2d(3x3, padding 1)` applied to the x2 nearest-neighbour upsampled input, computed
    without building the upsampled tensor: [B, c_in, H, W] -> [B, c_out, 2H, 2W].

    Output pixel (2i + a, 2j + b) sees input rows i-1, i (a = 0) or i, i+1 (a = 1), and the same
    for columns, so each of the 4 phases (a, b) is a 3x3 conv of the input with the weight's rows
    and columns summed in pairs; the 4 phases are one conv with 4 c_out channels and a pixel
    shuffle. Same function and the same `weight` (state_dict keys are those of Upsample +
    Conv2d); on CPU it takes about a tenth of the time of the two layers (nearest upsampling's
    backward and a conv at 4x the pixels dominate there).
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(c_in, c_out, 3, 1, 1, bias=False)

    @staticmethod
    def _phases(w: Tensor, dim: int) -> tuple[Tensor, Tensor]:
        """Along `dim` (a 3-tap axis of w): the kernels of phase 0 (taps at offsets -1, 0) and
        phase 1 (offsets 0, +1), as 3-tap kernels with a zero tap."""
        w0, w1, w2 = w.unbind(dim)
        zero = torch.zeros_like(w0)
        return torch.stack([w0, w1 + w2, zero], dim), torch.stack([zero, w0 + w1, w2], dim)

    def forward(self, x: Tensor) -> Tensor:
        rows = self._phases(self.weight, 2)  # 2 x [c_out, c_in, 3, 3]
        phases = [k for r in rows for k in self._phases(r, 3)]  # order (a, b) = 00, 01, 10, 11
        w = torch.stack(phases, 1).flatten(0, 1)  # [c_out * 4, c_in, 3, 3], pixel-shuffle order
        return F.pixel_shuffle(F.conv2d(x, w, padding=1), 2)  # [B, c_out, 2H, 2W]


def _resize_conv(c_in: int, c_out: int, mode: str) -> list[nn.Module]:
    """Resize x2 + 3x3 conv. Two modules so that state_dict keys stay those of
    [Upsample, Conv2d]; for `nearest` the first is a placeholder and the conv does both."""
    if mode == "nearest":
        return [nn.Identity(), NearestUpConv3x3(c_in, c_out)]  # [B, c_out, 2H, 2W]
    return [nn.Upsample(scale_factor=2, mode=mode),  # [B, c_in, 2H, 2W]
            nn.Conv2d(c_in, c_out, 3, 1, 1, bias=False)]  # fmt: skip


def _up_block(c_in: int, c_out: int, *, first: bool, upsample: str = "convtranspose"):
    """[upsample] + BN + ReLU: 1x1 -> 4x4 when `first` (always a 4x4 transposed conv), else
    doubles H and W with a strided transposed conv or resize + 3x3 conv."""
    if first or upsample in ("convtranspose", "nearest-last"):
        kernel, stride, pad = (4, 1, 0) if first else (4, 2, 1)
        layers: list[nn.Module] = [nn.ConvTranspose2d(c_in, c_out, kernel, stride, pad, bias=False)]
    else:
        layers = _resize_conv(c_in, c_out, upsample)  # [B, c_out, 2H, 2W]
    return [*layers, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True)]


def _down_block(c_in: int, c_out: int, *, batchnorm: bool) -> list[nn.Module]:
    """Conv (halves H and W) [+ BN] + LeakyReLU(0.2)."""
    layers: list[nn.Module] = [nn.Conv2d(c_in, c_out, 4, 2, 1, bias=False)]
    if batchnorm:
        layers.append(nn.BatchNorm2d(c_out))
    layers.append(nn.LeakyReLU(LEAKY_SLOPE, inplace=True))
    return layers


class DCGANGenerator(nn.Module):
    """z [B, z_dim] (+ c [B, n_cond] in {0, 1}) -> image [B, 3, S, S] in [-1, 1]."""

    def __init__(
        self,
        *,
        resolution: int,
        z_dim: int = 100,
        width: int = 64,
        upsample: str = "convtranspose",
        n_cond: int = 0,
    ) -> None:
        super().__init__()
        n = n_doublings(resolution)
        self.resolution, self.z_dim, self.n_cond = resolution, z_dim, n_cond
        # Channels at 4x4, 8x8, ..., S/2 x S/2: width * 2^(n-1), ..., width * 2, width.
        widths = [width * 2 ** (n - 1 - i) for i in range(n)]
        layers = _up_block(z_dim + n_cond, widths[0], first=True)  # [B, width*2^(n-1), 4, 4]
        for i in range(1, n):
            # [B, width*2^(n-1-i), 4*2^i, 4*2^i]
            layers += _up_block(widths[i - 1], widths[i], first=False, upsample=upsample)
        if upsample == "convtranspose":
            last: list[nn.Module] = [
                nn.ConvTranspose2d(widths[-1], IMG_CHANNELS, 4, 2, 1, bias=False)
            ]
        else:
            mode = "nearest" if upsample == "nearest-last" else upsample
            last = _resize_conv(widths[-1], IMG_CHANNELS, mode)
        layers += [*last, nn.Tanh()]  # [B, 3, S, S]
        self.main = nn.Sequential(*layers)
        dcgan_init_(self)

    def forward(self, z: Tensor, c: Tensor | None = None) -> Tensor:
        if self.n_cond:
            z = torch.cat([z, 2 * c.to(z.dtype) - 1], dim=1)  # [B, z + n_cond]
        return self.main(z[:, :, None, None])  # [B, z(+c), 1, 1] -> [B, 3, S, S]


class MinibatchStd(nn.Module):
    """[B, C, H, W] -> [B, C + 1, H, W]: appends the mean standard deviation of the features over
    groups of `group` consecutive samples (the largest size <= group dividing B), one value per
    group broadcast over its samples and positions."""

    def __init__(self, group: int = 4) -> None:
        super().__init__()
        self.group = group

    def forward(self, x: Tensor) -> Tensor:
        B, C, H, W = x.shape
        g = next(k for k in range(min(self.group, B), 0, -1) if B % k == 0)
        y = x.float().reshape(g, B // g, C, H, W)  # sample i is in group i % (B // g)
        y = (y.var(dim=0, unbiased=False) + 1e-8).sqrt()  # [B/g, C, H, W]
        y = y.mean(dim=(1, 2, 3)).to(x.dtype)  # [B/g]
        y = y.repeat(g)[:, None, None, None].expand(B, 1, H, W)  # [B, 1, H, W]
        return torch.cat([x, y], dim=1)


class DCGANDiscriminator(nn.Module):
    """image [B, 3, S, S] (+ c [B, n_cond]) -> logits [B] (no sigmoid)."""

    def __init__(
        self,
        *,
        resolution: int,
        width: int = 64,
        norm: str = "batch",
        n_cond: int = 0,
        mbstd: bool = False,
    ) -> None:
        super().__init__()
        n = n_doublings(resolution)
        self.resolution, self.n_cond = resolution, n_cond
        # Channels at S/2, S/4, ..., 4x4: width, width * 2, ..., width * 2^(n-1).
        widths = [width * 2**i for i in range(n)]
        # No BN on the first layer (Radford et al.): it would normalise the input image.
        layers = _down_block(IMG_CHANNELS, widths[0], batchnorm=False)  # [B, width, S/2, S/2]
        for i in range(1, n):
            # [B, width*2^i, S/2^(i+1), S/2^(i+1)]
            layers += _down_block(widths[i - 1], widths[i], batchnorm=norm == "batch")
        if mbstd:
            layers.append(MinibatchStd())  # [B, width*2^(n-1) + 1, 4, 4]
        layers.append(nn.Conv2d(widths[-1] + mbstd, 1, 4, 1, 0, bias=False))  # [B, 1, 1, 1]
        self.main = nn.Sequential(*layers)
        self.mbstd = mbstd
        if n_cond:
            self.embed = nn.Linear(n_cond, widths[-1], bias=False)  # projection of c
        dcgan_init_(self)

    def forward(self, x: Tensor, c: Tensor | None = None) -> Tensor:
        if not self.n_cond:
            return self.main(x).flatten()  # [B, 1, 1, 1] -> [B] logits
        h = self.main[: -1 - self.mbstd](x)  # [B, C, 4, 4]
        out = self.main[-1 - self.mbstd :](h).flatten()  # [B] (through MinibatchStd if any)
        proj = self.embed(2 * c.to(h.dtype) - 1)  # [B, C]
        return out + (proj * h.sum(dim=(2, 3))).sum(dim=1)  # [B]


def dcgan_init_(module: nn.Module) -> nn.Module:
    """DCGAN init, in place, for every submodule: conv weights ~ N(0, 0.02), BN weight ~
    N(1, 0.02), biases 0. Call it on a whole model (`module.apply(dcgan_init_)` also works,
    but re-draws nested layers once per level)."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
            nn.init.normal_(m.weight, 0.0, INIT_STD)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, INIT_STD)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.normal_(m.weight, 1.0, INIT_STD)
            nn.init.zeros_(m.bias)
    return module
