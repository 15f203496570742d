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
