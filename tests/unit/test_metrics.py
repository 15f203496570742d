"""FID / KID through torchmetrics against independent references (scipy's sqrtm, a brute-force
MMD loop), the real-statistics cache, and the one-line errors of `facegan evaluate`."""

from __future__ import annotations

import json
import os
import zipfile
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from typer.testing import CliRunner

from facegan_dist import metrics
from facegan_dist.metrics import (
    INCEPTION_FILE,
    INCEPTION_URL,
    EvaluateConfig,
    evaluate_generator,
    fake_features,
    real_conditions,
)
from tests.helpers.shards import write_tiny_shards

SIZE = 16


# ---- references, written without torchmetrics ----


def scipy_fid(f1: np.ndarray, f2: np.ndarray) -> float:
    """pytorch-fid's formula: ||mu1 - mu2||^2 + tr(S1 + S2 - 2 sqrtm(S1 S2))."""
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def brute_force_mmd2(x: list[list[float]], y: list[list[float]]) -> float:
    """Unbiased MMD^2 with k(a, b) = (a.b / d + 1)^3, one pair at a time."""
    d = len(x[0])

    def k(a, b):
        return (sum(ai * bi for ai, bi in zip(a, b, strict=True)) / d + 1) ** 3

    m, n = len(x), len(y)
    kxx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    kyy = sum(k(y[i], y[j]) for i in range(n) for j in range(n) if i != j) / (n * (n - 1))
    kxy = sum(k(a, b) for a in x for b in y) / (m * n)
    return kxx + kyy - 2 * kxy


def scores(real: torch.Tensor, fake: torch.Tensor, subsets: int = 1, subset_size: int = 2):
    m = metrics._Metrics.build(real.shape[1], subsets, subset_size, "cpu", 1)
    m.add(real, real=True)
    m.add(fake, real=False)
    return m.compute()[:3]


# ---- the maths ----


def test_fid_matches_scipy_sqrtm_on_non_commuting_covariances():
    d, n = 6, 3000
    g = torch.Generator().manual_seed(0)
    a = torch.randn(d, d, generator=g, dtype=torch.float64)
    b = torch.randn(d, d, generator=g, dtype=torch.float64)
    x = torch.randn(n, d, generator=g, dtype=torch.float64) @ a.T  # cov ~ A A^T
    y = torch.randn(n, d, generator=g, dtype=torch.float64) @ b.T + 0.3  # cov ~ B B^T
    s1, s2 = np.cov(x.numpy(), rowvar=False), np.cov(y.numpy(), rowvar=False)
    # not simultaneously diagonalisable: sqrt(S1 S2) != sqrt(S1) sqrt(S2), the case that a
    # shortcut formula gets wrong
    assert np.abs(s1 @ s2 - s2 @ s1).max() > 0.1 * np.abs(s1 @ s2).max()
    fid, _, _ = scores(x, y)
    ref = scipy_fid(x.numpy(), y.numpy())
    assert ref > 1
    assert fid == pytest.approx(ref, rel=1e-6)
    assert scores(x, x)[0] == pytest.approx(0.0, abs=1e-6)


def test_kid_matches_a_brute_force_loop():
    d, n = 5, 40
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, d, generator=g)  # float32: what the KID states hold
    y = torch.randn(n, d, generator=g) * 1.3 + 0.4
    ref = brute_force_mmd2(x.double().tolist(), y.double().tolist())
    # one subset of size n is the whole set (the unbiased estimate does not depend on the order)
    _, kid, kid_std = scores(x, y, subsets=3, subset_size=n)
    assert ref > 0.01
    assert kid == pytest.approx(ref, rel=1e-5)
    assert kid_std == pytest.approx(0.0, abs=1e-6 * ref)
    _, same, _ = scores(x, x, subsets=1, subset_size=n)
    assert same == pytest.approx(brute_force_mmd2(x.tolist(), x.tolist()), rel=1e-5, abs=1e-6)


# ---- evaluate_generator with a custom extractor ----


class Projection(torch.nn.Module):
    """A fixed random projection of the pixels (features that depend on the image alone); counts
    the images it sees."""

    name = "projection"

    def __init__(self, dim: int = 6, seed: int = 0, identity: str = "projection-0") -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = torch.randn(3 * SIZE * SIZE, dim, generator=g, dtype=torch.float64)
        self.num_features = dim
        self.identity = identity
        self.images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        return ((x.double() / 255 - 0.5).flatten(1) @ self.w / 10).float()


class TinyG(torch.nn.Module):
    z_dim = 8

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.fc = torch.nn.Linear(self.z_dim, 3 * SIZE * SIZE)

    def forward(self, z):
        return torch.tanh(3 * self.fc(z)).view(-1, 3, SIZE, SIZE)


@pytest.fixture()
def shards(tmp_path) -> Path:
    return write_tiny_shards(tmp_path / "shards", n=40, size=SIZE, per_shard=16)


def reference_features(shards: Path, ext, n: int, count: int):
    from facegan_dist.data.readback import iter_split_once
    from facegan_dist.images import to_uint8
    from facegan_dist.latent import truncated_z

    real = torch.cat([ext(im) for im, _, _ in iter_split_once(shards, "train", 7, limit=count)])
    with torch.no_grad():
        fake = ext(to_uint8(TinyG()(truncated_z(list(range(n)), TinyG.z_dim, 1.0, "shrink"))))
    return real, fake


def test_evaluate_generator_with_an_extractor_equals_the_references(shards):
    ext = Projection()
    res = evaluate_generator(
        TinyG(), shards, n=30, batch=64, kid_subsets=4, extractor=ext, features="ignored"
    )
    real, fake = reference_features(shards, Projection(), 30, 30)
    assert ext.images == 60  # each image through the extractor once, for both metrics
    assert res["features"] == "projection" and res["n_real"] == 30
    assert res["kid_subset_size"] == 30
    assert res["fid"] == pytest.approx(scipy_fid(fake.double().numpy(), real.double().numpy()))
    ref_kid = brute_force_mmd2(fake.double().tolist(), real.double().tolist())
    assert res["kid"] == pytest.approx(ref_kid, rel=1e-4)


def test_real_stats_are_cached_reused_and_keyed_by_extractor(shards):
    from safetensors import safe_open

    from facegan_dist.data.readback import manifest_sha256

    kw = dict(n=24, batch=10, kid_subsets=3)
    first = Projection()
    a = evaluate_generator(TinyG(), shards, extractor=first, **kw)
    path = shards / "stats" / "projection-train-24.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        assert int(f.get_tensor("real_features_num_samples")) == 24
        assert f.get_tensor("real_features_cov_sum").shape == (6, 6)
        assert f.get_tensor("kid_real_features").shape == (24, 6)
    assert meta["extractor"] == "projection-0" and meta["manifest_sha256"] == manifest_sha256(
        shards
    )
    stamp = path.stat().st_mtime_ns
    again = Projection()
    b = evaluate_generator(TinyG(), shards, extractor=again, **kw)
    assert again.images == 24  # only the generated images: the real side came from the cache
    assert path.stat().st_mtime_ns == stamp
    assert (b["fid"], b["kid"]) == pytest.approx((a["fid"], a["kid"]), rel=1e-9)
    other = Projection(seed=1, identity="projection-1")  # another extractor: recomputed
    c = evaluate_generator(TinyG(), shards, extractor=other, **kw)
    assert other.images == 48 and c["fid"] != pytest.approx(a["fid"])
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["extractor"] == "projection-1"
    # another manifest: recomputed
    manifest = shards / "manifest.json"
    manifest.write_text(manifest.read_text() + "\n")
    third = Projection(seed=1, identity="projection-1")
    evaluate_generator(TinyG(), shards, extractor=third, **kw)
    assert third.images == 48


def test_a_failed_run_caches_nothing(shards):
    class Broken(TinyG):
        def forward(self, z):
            raise RuntimeError("G exploded")

    with pytest.raises(RuntimeError, match="exploded"):
        evaluate_generator(Broken(), shards, n=10, batch=4, extractor=Projection())
    assert not (shards / "stats").exists() or not any((shards / "stats").iterdir())


def test_fewer_real_images_than_n_warns_naming_both_counts(shards):
    lines: list[str] = []
    res = evaluate_generator(
        TinyG(), shards, n=50, batch=64, kid_subsets=2, extractor=Projection(), log=lines.append
    )
    warning = [line for line in lines if line.startswith("warning:")]
    assert len(warning) == 1, lines
    assert "--n 50" in warning[0] and "has 40 images" in warning[0] and "use 40" in warning[0]
    assert str(shards) in warning[0] and "'train'" in warning[0]
    assert res["n_real"] == 40 and res["n"] == 50 and res["kid_subset_size"] == 40
    assert np.isfinite(res["fid"])


def test_conditional_fakes_get_the_real_labels_row_by_row(tmp_path):
    """real_conditions: the condition columns of the first images, cycled to n rows;
    fake_features: fake image i is drawn with row i, however the seeds are batched."""
    from facegan_dist.data.readback import iter_split_once

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

    class Corner(torch.nn.Module):
        num_features = 2

        def forward(self, u8):
            return u8[:, :2, 0, 0].float() / 255

    for batch in (4, 45):
        feats = fake_features(LabelPainter(), Corner(), list(range(45)), batch, conds=conds)
        assert torch.equal(feats, conds)  # row i of the features is condition row i


# ---- `facegan evaluate`: defaults and one-line errors ----

runner = CliRunner()


def invoke(*args):
    from facegan_dist.cli import app

    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for n in needles:
        assert n in lines[0], (n, lines[0])


@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory):
    from tests.integration.test_sample_eval import tiny_run

    root = tmp_path_factory.mktemp("cli")
    shards = write_tiny_shards(root / "shards", n=12, size=16, per_shard=12)
    names = json.loads((shards / "manifest.json").read_text())["attribute_names"]
    return tiny_run(root / "run", names), shards


@pytest.fixture()
def no_download(monkeypatch, tmp_path):
    """Any attempt to download fails the test; torch hub's cache is an empty folder."""
    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    def refuse(*a, **k):
        raise AssertionError(f"tried to download {a}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", refuse)
    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)
    monkeypatch.setattr(tf_inception, "load_state_dict_from_url", refuse)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))


def test_inception_constants_match_torch_fidelity():
    from torch_fidelity.feature_extractor_inceptionv3 import URL_INCEPTION_V3

    assert INCEPTION_URL == URL_INCEPTION_V3 and INCEPTION_URL.endswith("/" + INCEPTION_FILE)


def test_evaluate_defaults_to_attributes_and_help_says_what_inception_needs():
    assert EvaluateConfig(source=Path("r"), data=Path("d")).features == "attributes"
    r = invoke("evaluate", "--help")
    assert r.exit_code == 0
    text = " ".join(r.stdout.replace("│", " ").split())
    assert "[default: attributes]" in text and "standard" in text and "published" in text


def test_unknown_features_is_one_line_naming_the_flag(cli_setup, tmp_path):
    run, shards = cli_setup
    r = invoke("evaluate", run, "--data", shards, "--features", "vgg", "--out", tmp_path / "o")
    assert_one_line_error(r, "--features", "vgg", "inception", "attributes")


def write_bad_weights(kind: str, path: Path) -> Path:
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "garbage":
        path.write_bytes(os.urandom(4096))
    elif kind == "truncated":
        torch.save({"fc.weight": torch.zeros(1008, 2048)}, path)
        path.write_bytes(path.read_bytes()[:5000])
    elif kind == "torchvision":  # the file the previous version of this command used
        from torchvision.models.inception import Inception3

        torch.save(Inception3(aux_logits=True, init_weights=False).state_dict(), path)
    elif kind == "other-net":
        torch.save(torch.nn.Linear(3, 2).state_dict(), path)
    elif kind == "pickled-module":
        torch.save(torch.nn.Linear(3, 2), path)
    elif kind == "missing-tensor":  # right fingerprint, incomplete state_dict
        sd = {
            "fc.weight": torch.zeros(1008, 2048),
            "Mixed_7c.branch_pool.conv.weight": torch.zeros(1),
        }
        torch.save(sd, path)
    return path


@pytest.mark.parametrize(
    "kind",
    ["absent", "empty", "garbage", "truncated", "torchvision", "other-net", "pickled-module",
     "missing-tensor"],
)  # fmt: skip
def test_bad_inception_weights_are_one_line_and_write_nothing(
    kind, cli_setup, tmp_path, no_download
):
    run, shards = cli_setup
    weights = tmp_path / "w.pth"
    if kind != "absent":
        write_bad_weights(kind, weights)
    r = invoke("evaluate", run, "--data", shards, "--features", "inception", "--n", 50,
               "--inception-weights", weights, "--out", tmp_path / "o.json")  # fmt: skip
    assert_one_line_error(r, str(weights), INCEPTION_URL)
    assert not (shards / "stats").exists() and not (tmp_path / "o.json").exists()


def test_inception_weights_absent_from_the_hub_cache_is_one_line(cli_setup, tmp_path, no_download):
    run, shards = cli_setup
    r = invoke("evaluate", run, "--data", shards, "--features", "inception", "--n", 50)
    expected = tmp_path / "torch" / "hub" / "checkpoints" / INCEPTION_FILE
    assert_one_line_error(r, str(expected), INCEPTION_URL, "--inception-weights")
    assert not (shards / "stats").exists()


@pytest.fixture(scope="module")
def random_inception_weights(tmp_path_factory) -> Path:
    """torch-fidelity's Inception layout with random weights (the real file cannot be
    downloaded here)."""
    from unittest import mock

    import torch_fidelity.feature_extractor_inceptionv3 as tf_inception

    cls = tf_inception.FeatureExtractorInceptionV3
    with (
        mock.patch.object(cls, "load_state_dict", lambda self, *a, **k: None),
        mock.patch.object(tf_inception, "load_state_dict_from_url", lambda *a, **k: {}),
    ):
        torch.manual_seed(0)
        net = cls("inception-v3-compat", ["2048"])
    path = tmp_path_factory.mktemp("inception") / "random-inception.pth"
    torch.save(net.state_dict(), path)
    assert zipfile.is_zipfile(path)
    return path


def test_inception_is_torchmetrics_network_without_antialias(random_inception_weights):
    from torchmetrics.image.fid import NoTrainInceptionV3

    lines: list[str] = []
    ext = metrics.make_extractor(
        "inception", Path("unused"), "cpu", inception_weights=random_inception_weights,
        log=lines.append,
    )  # fmt: skip
    assert isinstance(ext.net, NoTrainInceptionV3) and ext.net.use_antialias is False
    assert ext.num_features == 2048 and ext.identity.startswith(metrics.INCEPTION_ID)
    assert any("not the published" in line for line in lines)  # random weights: other sha256
    out = ext(torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8))
    assert out.shape == (2, 2048) and out.dtype == torch.float32


@pytest.mark.slow
def test_evaluate_inception_end_to_end_from_a_weights_file(
    cli_setup, tmp_path, random_inception_weights, no_download
):
    from safetensors import safe_open

    run, _ = cli_setup
    shards = write_tiny_shards(tmp_path / "shards", n=12, size=16, per_shard=12)
    r = invoke("evaluate", run, "--data", shards, "--features", "inception", "--n", 4,
               "--kid-subsets", 2, "--inception-weights", random_inception_weights,
               "--out", tmp_path / "inc.json")  # fmt: skip
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "inc.json").read_text())
    assert res["features"] == "inception" and res["n_real"] == 4 and np.isfinite(res["fid"])
    with safe_open(str(shards / "stats" / "inception-train-4.safetensors"), "pt") as f:
        assert f.get_tensor("real_features_sum").shape == (2048,)
        assert f.metadata()["extractor"].startswith(metrics.INCEPTION_ID)
