"""Training runs in-process on tiny shards: artifacts, counters, exact resume, W&B files."""

from __future__ import annotations

import json
import math
import shutil
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from facegan_dist.config import merge_train_config
from facegan_dist.errors import TrainingError
from facegan_dist.train.loop import resolve_config, train
from tests.conftest import reset_accelerate
from tests.helpers.shards import write_tiny_shards

TINY = dict(g_width=8, d_width=8, batch=16, num_workers=0, log_every=5, sample_every=10,
            ckpt_every=10, n_samples=16, wandb_mode="disabled")  # fmt: skip


@pytest.fixture(scope="module")
def shards16(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("shards16"), n=96, size=16)


def run(shards: Path, out: Path, **flags):
    cfg, ckpt = resolve_config(flags.pop("preset", "demo"), None,
                               {"data": shards, "out": out, **TINY, **flags})  # fmt: skip
    return train(cfg, resume_from=ckpt)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("precision", ["no", "bf16"])
@pytest.mark.parametrize("loss", ["ns", "minimax"])
@pytest.mark.parametrize("arch", ["dcgan", "mlp"])
def test_each_model_loss_precision_trains(shards16, tmp_path, arch, loss, precision):
    res = run(shards16, tmp_path / "r", arch=arch, loss=loss, precision=precision, max_steps=10)
    assert res.step == 10 and not res.preempted
    metrics = rows(tmp_path / "r")
    assert [r["step"] for r in metrics] == [5, 10]
    for r in metrics:
        for k in ("loss_d", "loss_g", "d_real", "d_fake", "images_per_s"):
            assert math.isfinite(r[k]), (k, r)
        assert 0 < r["d_real"] < 1 and 0 < r["d_fake"] < 1
        assert r["images_seen"] == r["step"] * 16
    if loss == "minimax":
        assert all(r["loss_g"] <= 0 for r in metrics)  # E[log(1 - D(G(z)))]
    run_json = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run_json["precision"] == precision
    assert run_json["world_size"] == 1 and run_json["batch_per_device"] == 16
    cfg_json = json.loads((tmp_path / "r" / "config.json").read_text())
    assert cfg_json["arch"] == arch and cfg_json["loss"] == loss
    # the exported generator rebuilds and draws images
    from facegan_dist.artifacts import load_generator

    G, meta = load_generator(tmp_path / "r" / "export")
    assert meta["resolution"] == 16 and meta["arch"] == arch
    assert G(torch.randn(2, 100)).shape == (2, 3, 16, 16)


def test_run_folder_artifacts(shards16, tmp_path):
    res = run(shards16, tmp_path / "r", max_steps=20, keep=1)
    r = tmp_path / "r"
    samples = sorted(p.name for p in (r / "samples").glob("*.png"))
    assert samples == ["final-grid.png", "final-interp.png", "fixed-000000010.png",
                       "fixed-000000020.png", "real.png"]  # fmt: skip
    from PIL import Image

    grid = np.asarray(Image.open(r / "samples" / "fixed-000000020.png"))
    assert grid.shape == (2 + 4 * 18, 2 + 4 * 18, 3)  # 16 images of 16 px, 4x4 with padding 2
    assert grid.std() > 0
    ckpts = sorted(p.name for p in (r / "checkpoints").iterdir())
    assert ckpts == ["step-000000020"]  # --keep 1 rotated step 10 away
    state = json.loads((r / "checkpoints" / "step-000000020" / "trainer_state.json").read_text())
    assert state["step"] == 20 and state["images_seen"] == 320 and state["batches_seen"] == 20
    assert state["wandb_run_id"] and state["config"]["max_steps"] == 20
    assert len(state["rank_param_sha256"]) == 1
    files = {p.name for p in (r / "checkpoints" / "step-000000020").iterdir()}
    assert {"model.safetensors", "model_1.safetensors", "optimizer.bin", "optimizer_1.bin",
            "random_states_0.pkl", "fixed_noise.safetensors",
            "ema.safetensors"} <= files  # fmt: skip
    assert res.export_dir == r / "export"
    # the export: the EMA as generator.safetensors, G itself beside it
    from facegan_dist.artifacts import load_generator

    G_ema, meta = load_generator(r / "export")
    G_raw, _ = load_generator(r / "export", ema=False)
    assert meta["ema"] is True
    ema_ckpt = load_file(r / "checkpoints" / "step-000000020" / "ema.safetensors")
    g_ckpt = load_file(r / "checkpoints" / "step-000000020" / "model.safetensors")
    for k, v in G_ema.state_dict().items():
        assert torch.equal(v, ema_ckpt[k])
    for k, v in G_raw.state_dict().items():
        assert torch.equal(v, g_ckpt[k])
    assert any(not torch.equal(G_ema.state_dict()[k], g_ckpt[k]) for k in g_ckpt)


@pytest.mark.parametrize("data_cache", ["none", "device"])
def test_exact_resume_matches_straight_run(shards16, tmp_path, data_cache):
    kw = dict(max_steps=20, exact=True, data_cache=data_cache, hflip=True)
    run(shards16, tmp_path / "straight", **kw)
    run(shards16, tmp_path / "split", **{**kw, "max_steps": 10})
    reset_accelerate()
    # the resumed command names only the run folder, --resume and the new length
    cfg, ckpt = resolve_config(None, None, {"out": tmp_path / "split", "resume": "auto",
                                            "max_steps": 20})  # fmt: skip
    assert ckpt is not None and ckpt.name == "step-000000010"
    assert cfg.g_width == 8 and cfg.data == shards16  # restored from the checkpoint
    res = train(cfg, resume_from=ckpt)
    assert res.step == 20
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "straight" / "checkpoints" / "step-000000020" / name)
        b = load_file(tmp_path / "split" / "checkpoints" / "step-000000020" / name)
        assert a.keys() == b.keys()
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)
    assert rows(tmp_path / "straight") == [
        {**r, "images_per_s": rows(tmp_path / "straight")[i]["images_per_s"]}
        for i, r in enumerate(rows(tmp_path / "split"))
    ]


def test_lr_decay_falls_linearly_to_zero_and_resumes_exactly(shards16, tmp_path):
    """--lr-decay 0.5 over 20 steps: both rates stay at 2e-4 for steps 0-9, then the update at
    step s uses 2e-4 * (20 - s) / 10 (row k logs the rate of update k - 1). A copy of the run
    resumed from its step-10 checkpoint ends bit-identical to the straight run."""
    kw = dict(max_steps=20, exact=True, lr_decay=0.5, log_every=1)
    run(shards16, tmp_path / "straight", **kw)
    got = [(r["lr_g"], r["lr_d"]) for r in rows(tmp_path / "straight") if "lr_g" in r]
    want = [2e-4 * min(1.0, (20 - s) / 10) for s in range(20)]
    assert [g for g, _ in got] == pytest.approx(want, rel=1e-12, abs=0)
    assert [d for _, d in got] == pytest.approx(want, rel=1e-12, abs=0)
    # the same run stopped after its step-10 checkpoint and resumed
    split = tmp_path / "split"
    shutil.copytree(tmp_path / "straight", split)
    shutil.rmtree(split / "checkpoints" / "step-000000020")
    reset_accelerate()
    cfg, ckpt = resolve_config(None, None, {"out": split, "resume": "auto"})
    assert ckpt is not None and ckpt.name == "step-000000010" and cfg.lr_decay == 0.5
    assert train(cfg, resume_from=ckpt).step == 20
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "straight" / "checkpoints" / "step-000000020" / name)
        b = load_file(split / "checkpoints" / "step-000000020" / name)
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_schedules_count_images(shards16, tmp_path):
    run(shards16, tmp_path / "every", max_steps=10, d_every=3)
    # D trains on steps 0, 3, 6, 9: four real batches
    assert rows(tmp_path / "every")[-1]["images_seen"] == 4 * 16
    run(shards16, tmp_path / "steps", max_steps=10, d_steps=2)
    assert rows(tmp_path / "steps")[-1]["images_seen"] == 2 * 10 * 16


def test_epochs_set_the_length(shards16, tmp_path):
    res = run(shards16, tmp_path / "e", epochs=2, max_steps=None)
    # 96 images / batch 16 = 6 batches per epoch -> 12 steps
    assert res.step == 12
    assert rows(tmp_path / "e")[-1]["epoch"] == pytest.approx(2.0)


def test_nonfinite_loss_stops_naming_the_step(shards16, tmp_path, monkeypatch):
    import facegan_dist.train.steps as steps

    real_g_loss, calls = steps.g_loss, {"n": 0}

    def poisoned(kind, logits):
        calls["n"] += 1
        loss, stats = real_g_loss(kind, logits)
        if calls["n"] == 4:  # the G update of step 3
            loss = loss * float("nan")
            stats = {**stats, "loss_g": loss.detach()}
        return loss, stats

    monkeypatch.setattr(steps, "g_loss", poisoned)
    with pytest.raises(TrainingError, match="non-finite at step 3"):
        run(shards16, tmp_path / "nan", max_steps=20, wandb_mode="offline")
    assert not (tmp_path / "nan" / "checkpoints").exists()  # nothing diverged was checkpointed
    # the W&B run was closed as failed, with the reason, before the error propagated
    from tests.helpers.wandb_reader import read_records

    [wandb_file] = list((tmp_path / "nan" / "wandb").glob("offline-run-*/run-*.wandb"))
    deadline = time.monotonic() + 20  # W&B's service process writes the file asynchronously
    while True:
        records = read_records(wandb_file)
        if any(r.HasField("exit") for r in records) or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert [r.exit.exit_code for r in records if r.HasField("exit")] == [1]
    summary = {i.key: json.loads(i.value_json) for r in records if r.HasField("summary")
               for i in r.summary.update}  # fmt: skip
    assert "non-finite at step 3" in summary["error"]


def test_wandb_offline_run_holds_scalars_and_images(shards16, tmp_path):
    from tests.helpers.wandb_reader import read_history

    res = run(shards16, tmp_path / "w", max_steps=10, wandb_mode="offline")
    assert res.wandb_dir is not None and res.wandb_dir.parent == tmp_path / "w" / "wandb"
    [wandb_file] = list(res.wandb_dir.glob("run-*.wandb"))
    assert res.wandb_dir.name.endswith(json.loads(
        (tmp_path / "w" / "checkpoints" / "step-000000010" / "trainer_state.json").read_text()
    )["wandb_run_id"])  # fmt: skip
    local = rows(tmp_path / "w")

    def complete(history: list[dict]) -> bool:
        n_scalars = sum("loss_d" in h for h in history)
        return (
            n_scalars >= len(local)
            and any("samples/fixed_noise/path" in h for h in history)
            and any("final/interpolation/path" in h for h in history)
        )

    # wandb-core flushes the .wandb file asynchronously, after run.finish() has returned
    deadline = time.time() + 60
    while not complete(history := read_history(wandb_file)):
        assert time.time() < deadline, f"{wandb_file} never got the logged rows"
        time.sleep(0.5)
    scalars = [h for h in history if "loss_d" in h]
    assert [h["step"] for h in scalars] == [r["step"] for r in local]  # our step is the x axis
    for h, r in zip(scalars, local, strict=True):
        for k in ("loss_d", "loss_g", "d_real", "d_fake", "images_seen", "epoch", "lr_g"):
            assert h[k] == pytest.approx(r[k]), k
    # images are logged as nested keys: samples/fixed_noise/{path,width,sha256,...}
    images = [h for h in history if "samples/fixed_noise/path" in h]
    assert [h["step"] for h in images] == [10]
    assert any("samples/real/path" in h for h in history)
    # the logged PNG is the same picture as the local grid
    from PIL import Image

    media = images[0]["samples/fixed_noise/path"]
    logged = np.asarray(Image.open(res.wandb_dir / "files" / media).convert("RGB"))
    local_png = np.asarray(Image.open(tmp_path / "w" / "samples" / "fixed-000000010.png"))
    assert np.array_equal(logged, local_png)
    # the final grid, the interpolation strip and the exported generator as a model artifact
    assert any("final/grid/path" in h for h in history)
    assert any("final/interpolation/path" in h for h in history)
    from tests.helpers.wandb_reader import read_records

    deadline = time.time() + 60
    while not (arts := [r.artifact for r in read_records(wandb_file) if r.HasField("artifact")]):
        assert time.time() < deadline, "no artifact record"
        time.sleep(0.5)
    assert arts[0].type == "model" and arts[0].name.startswith("generator-")
    files = {f.path for f in arts[0].manifest.contents}
    assert {"generator.safetensors", "generator.json"} <= files


def test_config_merge_order(tmp_path):
    f = tmp_path / "c.toml"
    f.write_text('lr-g = 0.001\nbatch = 32\npreset = "paper-dcgan"\n')
    cfg = merge_train_config(None, f, {"batch": 8, "data": tmp_path})
    assert cfg.preset == "paper-dcgan" and cfg.loss == "minimax"  # from the preset in the file
    assert cfg.lr_g == 0.001 and cfg.lr_d == 1e-4  # file over preset
    assert cfg.batch == 8  # flag over file


def test_loader_workers_auto_and_explicit(tmp_path, monkeypatch):
    from facegan_dist import dist

    cfg = merge_train_config("tutorial", None, {"data": tmp_path})
    assert cfg.num_workers is None  # auto
    assert cfg.loader_workers("cpu", 16) == 2 and cfg.loader_workers("mps", 16) == 2
    assert cfg.loader_workers("cuda", 16) == 8 and cfg.loader_workers("cuda", 4) == 3
    assert cfg.loader_workers("cuda", 1) == 2  # never fewer than 2 decoders for a GPU
    explicit = merge_train_config("tutorial", None, {"data": tmp_path, "num_workers": 0})
    assert explicit.loader_workers("cuda", 16) == 0
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(16)))
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert dist.cpus_per_process() == 4  # 16 CPUs shared by 4 processes of this machine


def poison_g_loss(monkeypatch, bad_calls):
    """Make the G loss NaN on the given (1-based) calls of g_loss."""
    import facegan_dist.train.steps as steps

    real_g_loss, calls = steps.g_loss, {"n": 0}

    def poisoned(kind, logits):
        calls["n"] += 1
        loss, stats = real_g_loss(kind, logits)
        if bad_calls(calls["n"]):
            loss = loss * float("nan")
            stats = {**stats, "loss_g": loss.detach()}
        return loss, stats

    monkeypatch.setattr(steps, "g_loss", poisoned)


def test_rollback_restores_last_checkpoint_and_lowers_lrs(shards16, tmp_path, monkeypatch):
    poison_g_loss(monkeypatch, lambda n: n == 6)  # step 5, once
    res = run(shards16, tmp_path / "rb", max_steps=12, log_every=2, ckpt_every=4,
              on_nonfinite="rollback", rollback_lr_factor=0.5)  # fmt: skip
    assert res.step == 12
    metrics = rows(tmp_path / "rb")
    events = [r for r in metrics if r.get("event") == "rollback"]
    assert len(events) == 1 and events[0]["step"] == 4 and events[0]["nonfinite_step"] == 5
    scalar_steps = [r["step"] for r in metrics if "event" not in r]
    assert scalar_steps == [2, 4, 6, 8, 10, 12]  # the diverged rows were dropped, then redone
    after = [r for r in metrics if "event" not in r and r["step"] > 4]
    assert all(r["lr_g"] == pytest.approx(1e-4) for r in after)  # 2e-4 x 0.5
    state = json.loads((tmp_path / "rb" / "checkpoints" / "step-000000012" /
                        "trainer_state.json").read_text())  # fmt: skip
    assert state["rollbacks"] == 1 and state["lr_scale"] == 0.5
    assert all(math.isfinite(r["loss_g"]) for r in metrics if "event" not in r)


def test_rollback_gives_up_after_max_rollbacks(shards16, tmp_path, monkeypatch):
    poison_g_loss(monkeypatch, lambda n: n > 5)  # always diverges after step 4
    with pytest.raises(TrainingError, match="again after 2 rollbacks"):
        run(shards16, tmp_path / "rb", max_steps=12, log_every=2, ckpt_every=4,
            on_nonfinite="rollback", max_rollbacks=2)  # fmt: skip
    ckpts = sorted(p.name for p in (tmp_path / "rb" / "checkpoints").iterdir())
    assert ckpts == ["step-000000004"]  # only the good checkpoint exists


def test_eval_every_logs_fid_and_keeps_best(shards16, tmp_path):
    res = run(shards16, tmp_path / "ev", max_steps=10, eval_every=5, eval_n=16)
    metrics = rows(tmp_path / "ev")
    evals = [r for r in metrics if "fid" in r]
    assert [r["step"] for r in evals] == [5, 10]
    assert all(math.isfinite(r["fid"]) and r["eval_features"] == "attributes" for r in evals)
    best = json.loads((tmp_path / "ev" / "best" / "best.json").read_text())
    assert best["fid"] == min(r["fid"] for r in evals)
    assert best["step"] in (5, 10)
    from facegan_dist.artifacts import load_generator

    G, meta = load_generator(tmp_path / "ev" / "best")
    assert meta["resolution"] == 16
    # the end of the run: a grid of seeds 0-63 and an interpolation strip
    assert (tmp_path / "ev" / "samples" / "final-grid.png").is_file()
    assert (tmp_path / "ev" / "samples" / "final-interp.png").is_file()
    assert res.step == 10


def test_ema_export_and_checkpoint_carry_bn_statistics_of_the_ema_weights(shards16, tmp_path):
    """The EMA's BatchNorm statistics are re-estimated from its own weights before it is saved
    (models/bn.py): the export and the checkpoint hold exactly what a recalibration of their
    weights gives, and not the raw G's statistics; a seed's image is the same for any batch."""
    from facegan_dist.artifacts import CKPT_EMA_NAME, load_any_generator, load_generator
    from facegan_dist.images import generate
    from facegan_dist.latent import seed_z
    from facegan_dist.models.bn import recalibrate_bn

    run(shards16, tmp_path / "r", max_steps=20, ema_kimg=0.2, ema_rampup=None)
    r = tmp_path / "r"
    meta = json.loads((r / "export" / "generator.json").read_text())
    assert meta["ema"] and meta["ema_bn_calibration"]["images"] > 0
    G, _ = load_generator(r / "export")
    saved = {k: v.clone() for k, v in G.state_dict().items()}
    recalibrate_bn(G)
    mean_keys = [k for k in saved if k.endswith("running_mean")]
    assert mean_keys
    for k in saved:  # float noise only: training ran channels_last, this is NCHW
        torch.testing.assert_close(saved[k], G.state_dict()[k], rtol=1e-4, atol=1e-6)
    raw = load_file(str(r / "export" / "generator_raw.safetensors"))
    assert not torch.allclose(raw[mean_keys[-1]], saved[mean_keys[-1]])
    ckpt_ema = load_file(str(r / "checkpoints" / "step-000000020" / CKPT_EMA_NAME))
    for k in mean_keys:
        assert torch.equal(ckpt_ema[k], saved[k]), k
    # loading a calibrated export does not touch it again; a seed's image ignores the batch
    G2, _, info = load_any_generator(r / "export")
    assert info["bn_recalibrated"] is False
    z = seed_z(range(7), G2.z_dim)
    assert torch.equal(generate(G2, z, batch=1), generate(G2, z, batch=7))


def test_old_ema_export_without_calibration_is_recalibrated_on_load(shards16, tmp_path):
    from facegan_dist.artifacts import load_any_generator
    from facegan_dist.models.bn import recalibrate_bn

    run(shards16, tmp_path / "r", max_steps=10)
    meta_path = tmp_path / "r" / "export" / "generator.json"
    meta = json.loads(meta_path.read_text())
    del meta["ema_bn_calibration"]  # as written before the fix: statistics copied from raw G
    meta_path.write_text(json.dumps(meta))
    G, _, info = load_any_generator(tmp_path / "r" / "export")
    assert info["bn_recalibrated"] is True
    want = {k: v.clone() for k, v in G.state_dict().items()}
    recalibrate_bn(G)
    assert all(torch.equal(want[k], v) for k, v in G.state_dict().items())
