"""Model registry, shapes, the 64 px DCGAN against the PyTorch tutorial, and init statistics."""

from __future__ import annotations

import re

import pytest
import torch
from torch import nn

from facegan_dist.errors import ConfigError
from facegan_dist.models import (
    ARCHS,
    DCGANDiscriminator,
    DCGANGenerator,
    build_models,
    count_params,
    dcgan_init_,
)

CASES = [("mlp", 16), ("mlp", 32), ("mlp", 64)] + [("dcgan", s) for s in (16, 32, 64, 128)]


@pytest.mark.parametrize(("arch", "res"), CASES)
def test_shapes_range_and_logits(arch, res):
    torch.manual_seed(0)
    G, D = build_models(arch, resolution=res, z_dim=100, g_width=8, d_width=8)
    z = torch.randn(4, 100)
    x = G(z)
    assert x.shape == (4, 3, res, res)
    assert x.min() >= -1 and x.max() <= 1
    y = D(x)
    assert y.shape == (4,)
    assert y.dtype == torch.float32
    assert not any(isinstance(m, nn.Sigmoid) for m in D.modules())
    # Logits are unbounded: blow up the last layer and values leave [0, 1].
    last = [m for m in D.modules() if isinstance(m, nn.Linear | nn.Conv2d)][-1]
    with torch.no_grad():
        last.weight.mul_(-1e3)
        y = D(x)
    assert ((y < 0) | (y > 1)).any()
    # D accepts one concatenated real+fake batch (one BN call per D step).
    assert D(torch.cat([x.detach(), torch.rand_like(x) * 2 - 1])).shape == (8,)


def test_archs_listed():
    assert ARCHS == ("mlp", "dcgan")


@pytest.mark.parametrize("act", ["relu", "leaky"])
def test_mlp_layer_sizes_act_dropout(act):
    res = 16
    G, D = build_models("mlp", resolution=res, z_dim=100, g_width=64, d_width=64, act=act)
    n_pix = 3 * res * res
    g_lin = [(m.in_features, m.out_features) for m in G.modules() if isinstance(m, nn.Linear)]
    d_lin = [(m.in_features, m.out_features) for m in D.modules() if isinstance(m, nn.Linear)]
    assert g_lin == [(100, 256), (256, 512), (512, 1024), (1024, n_pix)]
    assert d_lin == [(n_pix, 1024), (1024, 512), (512, 256), (256, 1)]
    for net in (G, D):
        drops = [m.p for m in net.modules() if isinstance(m, nn.Dropout)]
        assert drops == [0.3, 0.3, 0.3]  # after every hidden layer, G included (paper 4.2.1)
        acts = [m for m in net.modules() if isinstance(m, nn.ReLU | nn.LeakyReLU)]
        assert len(acts) == 3
        if act == "relu":
            assert all(type(m) is nn.ReLU for m in acts)
        else:
            assert all(isinstance(m, nn.LeakyReLU) and m.negative_slope == 0.2 for m in acts)
    assert isinstance(list(G.modules())[-1], nn.Tanh)
    # Dropout is off in eval mode: sampling is deterministic.
    G.eval()
    z = torch.randn(2, 100)
    assert torch.equal(G(z), G(z))


def test_mlp_dropout_option():
    G, D = build_models("mlp", resolution=16, dropout=0.0)
    assert {m.p for m in D.modules() if isinstance(m, nn.Dropout)} == {0.0}


# The PyTorch DCGAN tutorial's networks, verbatim in structure (nz=100, ngf=ndf=64, nc=3).
class TutorialG(nn.Module):
    def __init__(self, nz=100, ngf=64, nc=3):
        super().__init__()
        self.main = nn.Sequential(
            nn.ConvTranspose2d(nz, ngf * 8, 4, 1, 0, bias=False),
            nn.BatchNorm2d(ngf * 8),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 8, ngf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 4),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 4, ngf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf * 2),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf * 2, ngf, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ngf),
            nn.ReLU(True),
            nn.ConvTranspose2d(ngf, nc, 4, 2, 1, bias=False),
            nn.Tanh(),
        )

    def forward(self, z):
        return self.main(z)


class TutorialD(nn.Module):
    def __init__(self, ndf=64, nc=3):
        super().__init__()
        self.main = nn.Sequential(
            nn.Conv2d(nc, ndf, 4, 2, 1, bias=False),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf, ndf * 2, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 2),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 2, ndf * 4, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 4),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 4, ndf * 8, 4, 2, 1, bias=False),
            nn.BatchNorm2d(ndf * 8),
            nn.LeakyReLU(0.2, inplace=True),
            nn.Conv2d(ndf * 8, 1, 4, 1, 0, bias=False),
            nn.Sigmoid(),
        )

    def forward(self, x):
        return self.main(x)


def test_dcgan_64_equals_pytorch_tutorial():
    torch.manual_seed(0)
    G, D = build_models("dcgan", resolution=64, z_dim=100, g_width=64, d_width=64)
    tG, tD = TutorialG(), TutorialD()
    assert count_params(tG) == count_params(G) == 3_576_704
    assert count_params(tD) == count_params(D) == 2_765_568
    # Same layers, same order, same state_dict keys: the tutorial's weights load strictly and
    # give the same outputs (D's up to the sigmoid it leaves to the loss).
    G.load_state_dict(tG.state_dict())
    D.load_state_dict(tD.state_dict())
    z = torch.randn(4, 100)
    x = tG(z[:, :, None, None])
    torch.testing.assert_close(G(z), x)
    torch.testing.assert_close(torch.sigmoid(D(x)), tD(x).view(-1))


@pytest.mark.parametrize("res", [16, 32, 128])
def test_dcgan_blocks_follow_resolution(res):
    G = DCGANGenerator(resolution=res, width=8)
    D = DCGANDiscriminator(resolution=res, width=8)
    n = res.bit_length() - 3  # doublings between 4x4 and res
    g_convs = [m for m in G.modules() if isinstance(m, nn.ConvTranspose2d)]
    d_convs = [m for m in D.modules() if isinstance(m, nn.Conv2d)]
    assert [c.out_channels for c in g_convs] == [8 * 2 ** (n - 1 - i) for i in range(n)] + [3]
    assert [c.out_channels for c in d_convs] == [8 * 2**i for i in range(n)] + [1]
    assert sum(isinstance(m, nn.BatchNorm2d) for m in G.modules()) == n
    assert sum(isinstance(m, nn.BatchNorm2d) for m in D.modules()) == n - 1
    assert not isinstance(list(D.main)[1], nn.BatchNorm2d)  # no BN after D's first conv


def test_dcgan_init_statistics():
    torch.manual_seed(0)
    G, D = build_models("dcgan", resolution=64, z_dim=100, g_width=64, d_width=64)
    convs, bns = [], []
    for net in (G, D):
        for m in net.modules():
            if isinstance(m, nn.Conv2d | nn.ConvTranspose2d):
                assert m.weight.std().item() == pytest.approx(0.02, rel=0.1)
                convs.append(m.weight.flatten())
            elif isinstance(m, nn.BatchNorm2d):
                assert torch.all(m.bias == 0)
                bns.append(m.weight.flatten())
    w = torch.cat(convs)
    assert w.mean().abs().item() < 1e-3
    assert w.std().item() == pytest.approx(0.02, rel=0.02)
    b = torch.cat(bns)
    assert b.mean().item() == pytest.approx(1.0, abs=3e-3)
    assert b.std().item() == pytest.approx(0.02, rel=0.1)


def test_dcgan_init_resets_any_module_and_zeroes_bias():
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(3, 256, 3, bias=True), nn.BatchNorm2d(256))
    with torch.no_grad():
        for p in net.parameters():
            p.fill_(5.0)
    assert dcgan_init_(net) is net
    assert net[0].weight.std().item() == pytest.approx(0.02, rel=0.1)
    assert torch.all(net[0].bias == 0)
    assert net[1].weight.mean().item() == pytest.approx(1.0, abs=0.01)
    assert torch.all(net[1].bias == 0)


def test_count_params():
    assert count_params(nn.Linear(3, 2)) == 8
    assert count_params(nn.BatchNorm2d(4)) == 8  # running stats are buffers, not counted


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"arch": "foo", "resolution": 64}, "--arch 'foo' must be one of mlp, dcgan"),
        ({"arch": "dcgan", "resolution": 48}, "--resolution 48 is not supported by dcgan"),
        ({"arch": "mlp", "resolution": 256}, "--resolution 256 is not supported by mlp"),
        ({"arch": "mlp", "resolution": 16, "act": "tanh"}, "--act 'tanh'"),
        ({"arch": "mlp", "resolution": 16, "dropout": 1.0}, "--dropout 1.0"),
        ({"arch": "dcgan", "resolution": 16, "z_dim": 0}, "--z-dim 0"),
        ({"arch": "dcgan", "resolution": 16, "g_width": 0}, "--g-width 0"),
        ({"arch": "dcgan", "resolution": 16, "d_width": -1}, "--d-width -1"),
    ],
)
def test_build_models_errors_name_the_flag(kwargs, flag):
    arch = kwargs.pop("arch")
    with pytest.raises(ConfigError) as exc:
        build_models(arch, **kwargs)
    msg = str(exc.value)
    assert msg.startswith(flag)
    assert "\n" not in msg


def test_dcgan_resolution_message_lists_sizes():
    with pytest.raises(ConfigError, match=r"\(16, 32, 64, 128\)$"):
        build_models("dcgan", resolution=48)


def test_minibatch_std_channel_is_the_group_std_of_the_features():
    from facegan_dist.models.dcgan import MinibatchStd

    x = torch.randn(8, 5, 4, 4)
    y = MinibatchStd(group=4)(x)
    assert y.shape == (8, 6, 4, 4)
    assert torch.equal(y[:, :5], x)
    # sample i is in group i % 2 (groups of 4 over a batch of 8)
    for j in range(2):
        members = x[j::2]
        want = members.std(dim=0, unbiased=False).mean()
        assert torch.allclose(y[j::2, 5], want.expand(4, 4, 4), atol=1e-5)
    assert MinibatchStd(group=4)(torch.randn(3, 2, 4, 4)).shape == (3, 3, 4, 4)  # 3: groups of 3


def test_mbstd_discriminator_sees_the_batch_and_rebuilds_from_meta():
    from facegan_dist.artifacts import build_from_meta

    torch.manual_seed(0)
    _, D = build_models("dcgan", resolution=16, d_width=8, mbstd=True)
    D.eval()
    x = torch.randn(4, 3, 16, 16)
    a = D(x)
    x2 = x.clone()
    x2[1:] = x[0]  # same first image, no variety in its group
    assert a.shape == (4,) and not torch.allclose(a[0], D(x2)[0])
    _, plain = build_models("dcgan", resolution=16, d_width=8)
    plain.eval()
    assert torch.allclose(plain(x)[:1], plain(x2)[:1])  # without mbstd: per sample
    meta = {"arch": "dcgan", "resolution": 16, "z_dim": 100, "g_width": 8, "d_width": 8,
            "act": "relu", "dropout": 0.3, "mbstd": True}  # fmt: skip
    _, D2 = build_from_meta(meta)
    D2.load_state_dict(D.state_dict())
    _, Dc = build_models("dcgan", resolution=16, d_width=8, mbstd=True, n_cond=3)
    assert Dc(x, torch.ones(4, 3)).shape == (4,)


def test_paper_and_tutorial_presets_are_unchanged_and_quality_is_the_default():
    """The study's winner is added beside the reproductions; it never edits them."""
    from facegan_dist.config import DEFAULT_PRESET, PRESETS, merge_train_config

    assert PRESETS["tutorial"] == dict(arch="dcgan", loss="ns", lr_g=2e-4, lr_d=2e-4,
                                       betas_g=(0.5, 0.999), betas_d=(0.5, 0.999), epochs=5,
                                       batch=128)  # fmt: skip
    assert PRESETS["paper-final"] == dict(arch="dcgan", loss="minimax", lr_g=1e-4, lr_d=1e-4,
                                          betas_g=(0.5, 0.999), betas_d=(0.5, 0.999),
                                          epochs=400, batch=128)  # fmt: skip
    assert PRESETS["paper-dcgan"] == {**PRESETS["paper-final"], "epochs": 50}
    assert DEFAULT_PRESET == "quality"
    cfg = merge_train_config(None, None, {"data": "x"})
    assert cfg.preset == "quality" and cfg.upsample == "nearest-last"
    assert cfg.betas_g == (0.0, 0.99) and cfg.ema_kimg == 2.0
    tut = merge_train_config("tutorial", None, {"data": "x"})
    assert tut.upsample == "convtranspose" and tut.betas_g == (0.5, 0.999) and tut.ema_kimg == 10


def _declared_choices():
    from facegan_dist import config

    for act in config.ACT_CHOICES:
        yield "mlp", {"act": act}
    for upsample in config.UPSAMPLE_CHOICES:
        yield "dcgan", {"upsample": upsample}
    for d_norm in config.D_NORMS:
        yield "dcgan", {"d_norm": d_norm}
    for sn in config.SPECTRAL_NORM_CHOICES:
        yield "dcgan", {"spectral_norm": sn}


@pytest.mark.parametrize(("arch", "kwargs"), list(_declared_choices()))
def test_every_declared_model_choice_builds(arch, kwargs):
    """The model choices are declared with the options (config.py); each one builds a G and D."""
    G, D = build_models(arch, resolution=16, z_dim=8, g_width=8, d_width=8, **kwargs)
    assert D(G(torch.randn(2, 8))).shape == (2,)


@pytest.mark.parametrize(
    ("kwargs", "flag"),
    [
        ({"upsample": "cubic"}, "--upsample 'cubic' must be one of convtranspose"),
        ({"d_norm": "auto"}, "--d-norm 'auto' must be one of batch, none"),  # resolved before
        ({"spectral_norm": "all"}, "--spectral-norm 'all' must be one of none"),
    ],
)
def test_build_models_is_the_models_one_check(kwargs, flag):
    """The DCGAN classes trust their strings: build_models (the entry point for a generator
    meta read from a file) refuses an unknown one, naming the flag."""
    with pytest.raises(ConfigError, match=f"^{re.escape(flag)}"):
        build_models("dcgan", resolution=16, g_width=8, d_width=8, **kwargs)


@pytest.mark.parametrize("shape", [(2, 5, 6, 9), (1, 3, 1, 1)])
def test_nearest_upconv_is_upsample_then_conv(shape):
    """The fused layer computes Upsample(x2, nearest) + Conv2d(3x3, pad 1) exactly, gradients
    included (a wrong phase or tap order fails at every pixel)."""
    from torch.nn import functional as F

    from facegan_dist.models.dcgan import NearestUpConv3x3

    torch.manual_seed(0)
    layer = NearestUpConv3x3(shape[1], 7)
    x = torch.randn(shape, requires_grad=True)
    ref = F.conv2d(F.interpolate(x, scale_factor=2, mode="nearest"), layer.weight, padding=1)
    out = layer(x)
    assert out.shape == ref.shape == (shape[0], 7, 2 * shape[2], 2 * shape[3])
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    g_out = torch.autograd.grad(out.square().sum(), (x, layer.weight))
    g_ref = torch.autograd.grad(ref.square().sum(), (x, layer.weight))
    for a, b in zip(g_out, g_ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def test_nearest_generators_keep_the_upsample_conv_state_dict_keys():
    """Exports written before the fused layer (Upsample at index k, Conv2d at k + 1) still load."""
    from facegan_dist.models.dcgan import DCGANGenerator

    for up in ("nearest", "nearest-last"):
        G = DCGANGenerator(resolution=32, width=8, upsample=up)
        bil = DCGANGenerator(resolution=32, width=8, upsample="bilinear" if up == "nearest" else up)
        assert list(G.state_dict()) == list(bil.state_dict())
    G = DCGANGenerator(resolution=32, width=8, upsample="nearest")
    assert [k for k in G.state_dict() if k.endswith("weight")][:3] == [
        "main.0.weight", "main.1.weight", "main.4.weight"]  # fmt: skip
