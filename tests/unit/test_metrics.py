"""FID / KID maths against analytic values, the running sums, and the Inception weights rules."""

from __future__ import annotations

import math

import pytest
import torch

from facegan_dist.errors import CheckpointError
from facegan_dist.metrics import (
    INCEPTION_FILE,
    INCEPTION_URL,
    FeatureStats,
    fid_from_stats,
    inception_weights_path,
    kid,
    mean_cov,
)


def gaussian(n: int, mu: torch.Tensor, std: torch.Tensor, rot: torch.Tensor, seed: int):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, mu.shape[0], generator=g, dtype=torch.float64) * std) @ rot.T + mu


def analytic_fid(mu1, v1, mu2, v2) -> float:
    """Diagonal (in a shared basis) covariances: ||mu1-mu2||^2 + sum(v1 + v2 - 2 sqrt(v1 v2))."""
    return float(((mu1 - mu2) ** 2).sum() + (v1 + v2 - 2 * (v1 * v2).sqrt()).sum())


def test_fid_identical_is_zero_and_matches_the_analytic_value():
    d = 6
    rot, _ = torch.linalg.qr(torch.randn(d, d, generator=torch.Generator().manual_seed(0)).double())
    v1 = torch.linspace(0.5, 3.0, d).double()
    v2 = torch.linspace(2.0, 0.1, d).double()
    mu1, mu2 = torch.zeros(d).double(), torch.linspace(-1, 1, d).double()
    s1, s2 = rot @ torch.diag(v1) @ rot.T, rot @ torch.diag(v2) @ rot.T
    assert abs(fid_from_stats(mu1, s1, mu1, s1)) < 1e-9
    assert fid_from_stats(mu1, s1, mu2, s2) == pytest.approx(analytic_fid(mu1, v1, mu2, v2))
    # the same from samples through the float64 running sums
    x = gaussian(40000, mu1, v1.sqrt(), rot, 1)
    y = gaussian(40000, mu2, v2.sqrt(), rot, 2)
    stats = []
    for f in (x, y):
        st = FeatureStats(d)
        for chunk in f.split(7000):
            st.add(chunk)
        stats.append(mean_cov(st.n, st.sum, st.sum_outer))
    est = fid_from_stats(*stats[0], *stats[1])
    assert est == pytest.approx(analytic_fid(mu1, v1, mu2, v2), rel=0.03)
    same = FeatureStats(d)
    same.add(x)
    mu, cov = mean_cov(same.n, same.sum, same.sum_outer)
    torch.testing.assert_close(cov, torch.cov(x.T))
    assert abs(fid_from_stats(mu, cov, mu, cov)) < 1e-8


def test_kid_is_near_zero_for_one_distribution_and_positive_when_shifted():
    d = 16
    eye = torch.eye(d).double()
    a = gaussian(2000, torch.zeros(d).double(), torch.ones(d).double(), eye, 1)
    b = gaussian(2000, torch.zeros(d).double(), torch.ones(d).double(), eye, 2)
    c = gaussian(2000, torch.full((d,), 0.5).double(), torch.ones(d).double(), eye, 3)
    same, same_std = kid(a, b, subsets=20, subset_size=500)
    shifted, shifted_std = kid(a, c, subsets=20, subset_size=500)
    assert abs(same) < 3 * same_std + 1e-3  # unbiased: around 0, either sign
    assert shifted > 10 * max(shifted_std, abs(same)) and shifted > 0.05
    # unbiased estimator: identical sets do not give exactly 0 but close to it
    assert math.isfinite(kid(a, a, subsets=2, subset_size=100)[0])


def test_missing_inception_weights_name_the_file_and_where(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "th"))
    with pytest.raises(CheckpointError) as err:
        inception_weights_path(None)
    msg = str(err.value)
    assert "\n" not in msg
    assert str(tmp_path / "th" / "hub" / "checkpoints" / INCEPTION_FILE) in msg
    assert INCEPTION_URL in msg
    with pytest.raises(CheckpointError, match="--inception-weights"):
        inception_weights_path(tmp_path / "nope.pth")


def test_conditional_fakes_get_the_real_labels_row_by_row(tmp_path):
    """real_conditions: the condition columns of the first images, cycled to n rows; fake_stats:
    fake image i is drawn with row i, however the seeds are batched."""
    from facegan_dist.classifier import iter_split_once
    from facegan_dist.metrics import Extractor, fake_stats, real_conditions
    from tests.helpers.shards import write_tiny_shards

    shards = write_tiny_shards(tmp_path / "s", n=20, size=16, per_shard=8)
    attrs = torch.cat([a for _, a, _ in iter_split_once(shards, "train", 7)]).float()
    conds = real_conditions(shards, "train", 45, [3, 0])
    assert conds.shape == (45, 2)
    assert torch.equal(conds[:20], attrs[:, [3, 0]]) and torch.equal(conds[20:40], conds[:20])

    class LabelPainter(torch.nn.Module):  # image = its condition (c0 in channel 0, c1 in 1)
        z_dim = 4

        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(()))

        def forward(self, z, c):
            img = torch.stack([c[:, 0], c[:, 1], torch.zeros_like(c[:, 0])], 1)
            return (img * 2 - 1)[:, :, None, None].expand(-1, -1, 2, 2) + 0 * self.w

    ext = Extractor("test", "test", 2, lambda u8: u8[:, :2, 0, 0].float() / 255)
    for batch in (4, 45):
        mu, cov, feats = fake_stats(LabelPainter(), ext, list(range(45)), batch, conds=conds)
        assert torch.equal(feats, conds)  # row i of the features is condition row i
        assert torch.allclose(mu.float(), conds.mean(0).double().float())
