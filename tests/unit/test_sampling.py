"""Seed-addressed sampling and the latent space: determinism, truncation, interpolation,
arithmetic, edits and direction fitting (tiny 16 px models, CPU, no files unless needed)."""

from __future__ import annotations

import json

import pytest
import torch

from facegan_dist import latent
from facegan_dist.artifacts import find_generator, load_any_generator, newest_checkpoint
from facegan_dist.directions import fit_directions
from facegan_dist.errors import CheckpointError, ConfigError
from facegan_dist.images import seed_images, to_uint8
from facegan_dist.models import build_models
from facegan_dist.sampling import parse_grid

Z = 16


@pytest.fixture(scope="module")
def G():
    """A tiny DCGAN G in eval mode whose BatchNorm running statistics are not the defaults."""
    torch.manual_seed(0)
    g, _ = build_models("dcgan", resolution=16, z_dim=Z, g_width=8, d_width=8)
    g.train()
    with torch.no_grad():
        for _ in range(3):
            g(torch.randn(32, Z))
    return g.eval()


def test_parse_seeds():
    assert latent.parse_seeds("0-3") == [0, 1, 2, 3]
    assert latent.parse_seeds("1,5,7-9") == [1, 5, 7, 8, 9]
    assert latent.parse_seeds("3, 1-3") == [3, 1, 2]  # order kept, duplicates dropped
    for bad in ("", "a-b", "5-3", "1,,2", "-4", "1-2-3"):
        with pytest.raises(ConfigError, match="--seeds"):
            latent.parse_seeds(bad)


def test_parse_grid_pairs_and_arith():
    assert parse_grid("8x8") == (8, 8) and parse_grid("2X3") == (2, 3)
    for bad in ("0x3", "3x0", "8", "axb"):
        with pytest.raises(ConfigError, match="--grid"):
            parse_grid(bad)
    assert latent.parse_pairs("3-17,4-9") == [(3, 17), (4, 9)]
    assert latent.parse_pairs("3 17") == [(3, 17)]
    terms = latent.parse_arith("1,2,3 - 4,5,6 + 7-9")
    assert [t.sign for t in terms] == [1, -1, 1]
    assert [t.seeds for t in terms] == [(1, 2, 3), (4, 5, 6), (7, 8, 9)]
    with pytest.raises(ConfigError, match="--arith"):
        latent.parse_arith("1 * 2")


def test_seed_latent_depends_on_the_seed_only():
    z = latent.seed_z([1, 5, 9], Z)
    assert torch.equal(z[1], latent.seed_z([5], Z)[0])
    assert torch.equal(z[1], torch.randn(Z, generator=torch.Generator().manual_seed(5)))


def test_image_of_a_seed_does_not_depend_on_the_batch(G):
    seeds = list(range(10))
    one = seed_images(G, seeds, batch=1)
    seven = seed_images(G, seeds, batch=7)
    alone = seed_images(G, [4], batch=64)
    torch.testing.assert_close(one, seven, atol=1e-5, rtol=0)
    torch.testing.assert_close(alone[0], one[4], atol=1e-5, rtol=0)
    assert (to_uint8(one).int() - to_uint8(seven).int()).abs().max() <= 1


def test_truncation_shrink_psi0_is_one_face_and_diversity_grows(G):
    seeds = list(range(24))
    zero = seed_images(G, seeds, psi=0.0)
    assert torch.allclose(zero, zero[:1].expand_as(zero), atol=1e-6)
    stds = [float(seed_images(G, seeds, psi=p).std(0).mean()) for p in (0.0, 0.3, 0.7, 1.0)]
    assert stds == sorted(stds) and stds[0] < 1e-6 < stds[1], stds
    assert torch.equal(latent.truncated_z(seeds, Z, 1.0), latent.seed_z(seeds, Z))


def test_truncation_resample_keeps_a_fraction_psi_and_is_deterministic():
    u = latent.norm_quantile(0.5, 100)
    norms = torch.randn(20000, 100, generator=torch.Generator().manual_seed(1)).norm(dim=1)
    assert float((norms <= u).float().mean()) == pytest.approx(0.5, abs=0.02)
    seeds = list(range(50))
    z = latent.truncated_z(seeds, 100, 0.3, "resample")
    assert float(z.norm(dim=1).max()) <= latent.norm_quantile(0.3, 100) + 1e-4
    assert torch.equal(z, latent.truncated_z(seeds, 100, 0.3, "resample"))
    first = latent.seed_z(seeds, 100)
    kept = first.norm(dim=1) <= latent.norm_quantile(0.3, 100)
    assert kept.any() and torch.equal(z[kept], first[kept])  # accepted first draws unchanged
    with pytest.raises(ConfigError, match="--truncation"):
        latent.truncated_z(seeds, 100, 0.0, "resample")
    with pytest.raises(ConfigError, match="--truncation-mode"):
        latent.truncated_z(seeds, 100, 0.5, "clip")


@pytest.mark.parametrize("mode", ["lerp", "slerp"])
def test_interpolation_endpoints_are_the_seed_images(G, mode):
    za, zb = latent.seed_z([3, 17], Z)
    path = latent.interpolate(za, zb, 6, mode)
    assert path.shape == (6, Z)
    assert torch.equal(path[0], za) and torch.equal(path[-1], zb)
    from facegan_dist.images import generate

    strip = generate(G, path)
    ends = seed_images(G, [3, 17])
    torch.testing.assert_close(strip[[0, -1]], ends, atol=1e-5, rtol=0)


def test_slerp_keeps_the_norm_typical():
    za, zb = latent.seed_z([0, 1], 512)
    mid_l = latent.lerp(za, zb, 3)[1].norm()
    mid_s = latent.slerp(za, zb, 3)[1].norm()
    assert mid_l < 0.8 * za.norm() and mid_s > 0.95 * min(za.norm(), zb.norm())


def test_arithmetic_single_seed_groups(G):
    from facegan_dist.images import generate

    lat = dict(zip([1, 2, 3], latent.seed_z([1, 2, 3], Z), strict=True))
    _, r = latent.arith_z(latent.parse_arith("1 - 2 + 2"), lat)
    _, c = latent.arith_z(latent.parse_arith("1 - 1 + 3"), lat)
    imgs = generate(G, torch.stack([r, c]))
    torch.testing.assert_close(imgs, seed_images(G, [1, 3]), atol=1e-5, rtol=0)
    means, res = latent.arith_z(latent.parse_arith("1,2 - 3"), lat)
    torch.testing.assert_close(means[0], (lat[1] + lat[2]) / 2)
    torch.testing.assert_close(res, (lat[1] + lat[2]) / 2 - lat[3])


def test_edit_parsing_and_application():
    names = ["Smiling", "Eyeglasses"]
    assert latent.parse_edit("smiling=2,Eyeglasses=-1.5", names) == {
        "Smiling": 2.0,
        "Eyeglasses": -1.5,
    }
    with pytest.raises(ConfigError, match="'Beard'"):
        latent.parse_edit("Beard=1", names)
    with pytest.raises(ConfigError, match="ATTR=AMOUNT"):
        latent.parse_edit("Smiling", names)
    d = torch.eye(2, Z)
    z = torch.zeros(3, Z)
    out = latent.apply_edit(z, {"Eyeglasses": 2.0}, d, names)
    assert torch.equal(out[:, 1], torch.full((3,), 2.0)) and float(out[:, 0].abs().sum()) == 0


@pytest.mark.parametrize("method", ["mean-diff", "linear"])
def test_fitted_directions_are_unit_and_move_a_linear_classifier_the_right_way(method):
    """Toy: 'classifier' p_a(z) = sigmoid(3 z.u_a) for known unit u_a. The fitted direction must
    be close to u_a, of unit norm, and an edit along it must raise p_a on held-out latents."""
    g = torch.Generator().manual_seed(0)
    u = torch.nn.functional.normalize(torch.randn(3, Z, generator=g), dim=1)
    z = torch.randn(1500, Z, generator=g)
    probs = torch.sigmoid(3 * z @ u.T)
    labels = probs > 0.5
    labels[:, 2] = False  # an attribute nobody shows: no direction
    dirs, stats = fit_directions(z, labels, method)
    assert dirs.shape == (3, Z)
    torch.testing.assert_close(dirs[:2].norm(dim=1), torch.ones(2))
    assert float(dirs[2].norm()) == 0 and stats[2]["usable"] is False
    assert all(float(torch.dot(dirs[a], u[a])) > 0.9 for a in range(2))
    assert all(stats[a]["separation"] > 1.0 for a in range(2))
    held = latent.seed_z(range(100, 164), Z)
    for a in range(2):
        before = torch.sigmoid(3 * held @ u[a]).mean()
        after = torch.sigmoid(3 * (held + 2.0 * dirs[a]) @ u[a]).mean()
        assert after > before + 0.2


def test_newest_checkpoint_agrees_with_the_trainer(tmp_path):
    from facegan_dist.train.checkpoint import STATE_NAME, ckpt_name, list_checkpoints

    root = tmp_path / "checkpoints"
    for step in (5, 1000, 20):
        (root / ckpt_name(step)).mkdir(parents=True)
        (root / ckpt_name(step) / STATE_NAME).write_text("{}")
    (root / ".tmp-step-000002000").mkdir()  # incomplete: never picked
    (root / ckpt_name(3000)).mkdir()  # no trainer_state.json: incomplete
    assert newest_checkpoint(tmp_path) == list_checkpoints(root)[-1] == root / ckpt_name(1000)


def test_checkpoint_folder_loads_ema_or_raw(tmp_path, G):
    from safetensors.torch import save_file

    from facegan_dist.artifacts import generator_meta

    cfg = {"arch": "dcgan", "act": "relu", "dropout": 0.0, "z_dim": Z, "g_width": 8, "d_width": 8}
    ckpt = tmp_path / "run" / "checkpoints" / "step-000000010"
    ckpt.mkdir(parents=True)
    raw = {k: v.clone() for k, v in G.state_dict().items()}
    ema = {k: (v * 0.5 if v.is_floating_point() else v.clone()) for k, v in raw.items()}
    save_file(raw, str(ckpt / "model.safetensors"))
    save_file(ema, str(ckpt / "ema.safetensors"))
    state = {"step": 10, "generator": generator_meta(cfg, 16, ["A"])}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    assert find_generator(tmp_path / "run")[:2] == ("checkpoint", ckpt)
    g_ema, meta, info = load_any_generator(tmp_path / "run", ema=True)
    g_raw, meta_raw, _ = load_any_generator(ckpt, ema=False)
    assert meta["ema"] is True and meta_raw["ema"] is False
    assert info["run_dir"] == tmp_path / "run"
    torch.testing.assert_close(seed_images(g_raw, [0, 1]), seed_images(G, [0, 1]))
    assert not torch.allclose(seed_images(g_ema, [0, 1]), seed_images(G, [0, 1]))
    with pytest.raises(CheckpointError, match="no such"):
        find_generator(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no export"):
        find_generator(tmp_path / "empty")
