"""Throughput measurement: `facegan bench data` and `facegan bench train`.

Benchmarks, not tests: they print numbers (and one JSON line) to quote in docs/PERFORMANCE.md.
Warm-up is excluded and the device is synchronised before the clock is read.

`bench train` times OUR training step (`train.steps.GANStep` under Accelerate, the code that
trains) against a plain eager PyTorch loop with the same models: the loop of pytorch/examples
`dcgan/main.py` (D on real, D on fake.detach(), G through D; `.item()` on its stats every step).
Rounds alternate between the two so that a noisy shared machine hurts both alike; the median round
is reported.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from facegan_dist.train.steps import GRAPH_WARMUP, PlainBackward

CELEBA_IMAGES = 202_599
PAPER_EPOCHS = 400


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def _peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


# ----------------------------------------------------------------------------------------------
# data


def bench_data(
    count: int = 2000,
    size: int = 64,
    workers: int | None = None,
    read_seconds: float = 5.0,
    fmt: str = "jpg",
    work_dir: Path | None = None,
) -> dict[str, Any]:
    """Sharding throughput (178x218 JPEG -> size px) and reading throughput per loader process,
    on a freshly drawn synthetic CelebA (Kaggle zip layout), in a temp folder under `work_dir`
    (removed afterwards). Flags and `work_dir` are checked first, each error naming its flag."""
    import zipfile

    from facegan_dist.config import (
        SHARD_FORMATS,
        SHARD_SIZES,
        ShardConfig,
        SynthConfig,
        default_workers,
    )
    from facegan_dist.data.shards import process_image, write_shards
    from facegan_dist.data.stream import bench_read
    from facegan_dist.data.synth import make_dataset
    from facegan_dist.errors import ConfigError
    from facegan_dist.paths import out_dir

    if fmt not in SHARD_FORMATS:
        raise ConfigError(f"--format {fmt!r} must be one of {', '.join(SHARD_FORMATS)}")
    if size not in SHARD_SIZES:
        raise ConfigError(f"--size {size} must be one of {', '.join(map(str, SHARD_SIZES))}")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers {workers} must be at least 1")
    if work_dir is not None:
        work_dir = out_dir(Path(work_dir), "--work-dir")
    workers = workers or default_workers()
    with tempfile.TemporaryDirectory(dir=work_dir) as tmp:
        root = Path(tmp)
        make_dataset(SynthConfig(out=root / "celeba", count=count, zip=True, workers=workers))
        archive = root / "celeba" / "archive.zip"

        # 1. one core: decode + crop + resize + encode of one JPEG, as the shard workers do it
        with zipfile.ZipFile(archive) as zf:
            names = [n for n in zf.namelist() if n.endswith(".jpg")][:500]
            blobs = [zf.read(n) for n in names]
        t0 = time.perf_counter()
        for b in blobs:
            process_image(b, size, "celeba", fmt, 95)
        per_core = len(blobs) / (time.perf_counter() - t0)

        # 2. the whole `facegan shard` on all workers (zip read, process pool, tar write, sha256)
        t0 = time.perf_counter()
        result = write_shards(
            ShardConfig(src=archive, out=root / "shards", size=size, format=fmt, workers=workers)
        )
        wall = time.perf_counter() - t0
        # 3. the training reader, one process (num_workers=0): decode to uint8 batches
        read = bench_read(root / "shards", batch=256, seconds=read_seconds, num_workers=0)
    return {
        "bench": "data",
        "images": count,
        "size": size,
        "format": fmt,
        "workers": workers,
        "cpu_count": os.cpu_count(),
        "shard_images_per_s_per_core": per_core,
        "shard_images_per_s": result.images_per_s,
        "shard_wall_s": wall,
        "celeba_shard_minutes_projected": CELEBA_IMAGES / result.images_per_s / 60,
        "read_images_per_s_per_process": read["images_per_s"],
        "read_images_per_cpu_s": read["images_per_cpu_s"],
    }


def bench_data_url(
    data: str,
    local: Path | None = None,
    cache_dir: Path | None = None,
    read_seconds: float = 5.0,
    rounds: int = 3,
    split: str = "all",
    retries: int = 3,
    timeout_s: float = 30.0,
) -> dict[str, Any]:
    """The training reader (one loader process, batches of 256) on a URL --data: streamed, and
    beside it the `local` folder (the same shards on disk) and/or the warm `cache_dir`.

    Each source is read as a fresh process would (no remembered shard layouts): one whole epoch
    is timed first (tar headers parsed, cache files hashed), then `read_seconds` of the epochs
    after it, which is what a training run spends its time in. The cache is filled first (all
    shards downloaded and checked, not timed as reading) so that its numbers are the warm ones.
    The sources take turns for `rounds` rounds, so that a noisy shared machine hurts them alike;
    each number is the median over the rounds.
    """
    from facegan_dist.config import SPLITS
    from facegan_dist.data.remote import Remote, is_url, locate
    from facegan_dist.data.stream import Manifest, bench_read
    from facegan_dist.errors import ConfigError, DataError

    if not is_url(data):
        raise ConfigError(f"--data {data}: give a URL (the local folder goes in --local)")
    if rounds < 1:
        raise ConfigError(f"--rounds {rounds} must be at least 1")
    if split not in SPLITS:
        raise ConfigError(f"--split {split!r} must be one of {', '.join(SPLITS)}")
    if local is not None and not (Path(local) / "manifest.json").is_file():
        raise DataError(f"--local {local}: no manifest.json there (the shard folder on disk)")
    # the --cache-dir folder is created and checked before any transfer (remote.locate)
    cached = None if cache_dir is None else locate(data, cache_dir, retries=retries,
                                                   timeout_s=timeout_s)  # fmt: skip
    remote = Remote(data, retries=retries, timeout_s=timeout_s)
    manifest = Manifest.read(remote)

    sources: dict[str, Any] = {"streamed": remote}
    if local is not None:
        sources["local"] = Path(local)
    if cached is not None:
        t0 = time.perf_counter()
        for shard in dataclasses.replace(manifest, shard_dir=cached).shards(split):
            cached.cached(shard.name, shard.sha256)  # downloaded once (or already there)
        fill_s = time.perf_counter() - t0
        sources["cache"] = cached
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in sources}
    for _ in range(rounds):
        for name, src in sources.items():
            runs[name].append(
                bench_read(src, batch=256, seconds=read_seconds, split=split, first_pass=True)
            )

    def median(name: str) -> dict[str, Any]:
        rows = runs[name]
        out = dict(rows[0])
        for k, v in rows[0].items():
            if isinstance(v, float):
                out[k] = statistics.median(r[k] for r in rows)
        return out

    result: dict[str, Any] = {
        "bench": "data-url",
        "data": data,
        "split": split,
        "num_samples": manifest.count(split),
        "image_size": manifest.image_size,
        "read_seconds": read_seconds,
        "rounds": rounds,
        "cpu_count": os.cpu_count(),
        "load_average": os.getloadavg()[0],
        "streamed": median("streamed"),
    }
    if local is not None:
        result["local"] = {"path": str(local), **median("local")}
    if cached is not None:
        result["cache"] = {"path": str(cached.cache_dir), "fill_s": fill_s, **median("cache")}
    base = result.get("local")
    for name in ("streamed", "cache"):
        if base and name in result:
            result[f"{name}_over_local"] = result[name]["images_per_s"] / base["images_per_s"]
            result[f"{name}_over_local_cpu"] = (
                result[name]["images_per_cpu_s"] / base["images_per_cpu_s"]
            )
    return result


# ----------------------------------------------------------------------------------------------
# train


def _plain_loop(G, D, opt_g, opt_d, reals, z_dim: int, steps: int, device) -> float:
    """pytorch/examples dcgan/main.py, with logits + BCEWithLogits; returns seconds."""
    B = reals[0].shape[0]
    ones = torch.ones(B, device=device)
    zeros = torch.zeros(B, device=device)
    _sync(device)
    t0 = time.perf_counter()
    for i in range(steps):
        real = reals[i % len(reals)].to(device).float().div_(127.5).sub_(1.0)
        D.zero_grad()
        out = D(real)
        err_real = F.binary_cross_entropy_with_logits(out, ones)
        err_real.backward()
        d_x = torch.sigmoid(out).mean().item()
        noise = torch.randn(B, z_dim, device=device)
        fake = G(noise)
        out = D(fake.detach())
        err_fake = F.binary_cross_entropy_with_logits(out, zeros)
        err_fake.backward()
        d_g_z1 = torch.sigmoid(out).mean().item()
        opt_d.step()
        G.zero_grad()
        out = D(fake)
        err_g = F.binary_cross_entropy_with_logits(out, ones)
        err_g.backward()
        d_g_z2 = torch.sigmoid(out).mean().item()
        opt_g.step()
        del d_x, d_g_z1, d_g_z2
    _sync(device)
    return time.perf_counter() - t0


class _EagerAcc(PlainBackward):
    """What GANStep asks of an Accelerator, for the eager fp32 reference step: one process,
    no autocast, no loss scaler, a plain backward."""

    num_processes, process_index = 1, 0

    def __init__(self, device: torch.device) -> None:
        self.device = device


AGREEMENT_KEYS = ("loss_d", "loss_g", "d_real", "d_fake")


def agreement_tolerance(precision: str, fast: dict[str, bool]) -> float:
    """The largest |loss difference| accepted between the configured step and the eager fp32
    step after the check's steps. bf16 keeps 8 mantissa bits and fp16 11 (activations, then
    logits); TF32 rounds matmul/conv inputs to 10; channels_last, fused Adam and compile only
    reorder float32 sums. tests/unit/test_fast.py holds the CPU values under these bounds."""
    if precision == "bf16":
        return 5e-2
    if precision == "fp16":
        return 2e-2
    return 1e-2 if fast["tf32"] else 1e-3


def step_agreement(
    fast_step, G_fast, G0, D0, cfg, batches: list[torch.Tensor], prep, *, precision: str,
    fast: dict[str, bool], resolution: int,
) -> dict[str, Any]:  # fmt: skip
    """Run len(batches) steps twice from the same initial weights (G0, D0: untouched copies)
    on the same uint8 batches and the same noise: `fast_step` (the configured step: precision,
    channels_last, TF32, fused Adam, compile) and the eager fp32 step (plain modules and Adam,
    TF32 off). Returns the largest loss difference and the weight difference relative to how
    far the reference moved (a ratio, so it does not depend on the learning rate)."""
    from facegan_dist.train.setup import gan_step_for
    from facegan_dist.train.steps import to_model_input

    device = fast_step.device
    for s, b in enumerate(batches):
        fast_step(s, lambda b=b: (prep(b), None))
    stats_fast = fast_step.take_stats(lambda t: t)
    w_fast = [p.detach().float() for p in G_fast.parameters()]

    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        G_ref, D_ref = copy.deepcopy(G0).to(device), copy.deepcopy(D0).to(device)
        opt_g = torch.optim.Adam(G_ref.parameters(), lr=cfg.lr_g, betas=cfg.betas_g)
        opt_d = torch.optim.Adam(D_ref.parameters(), lr=cfg.lr_d, betas=cfg.betas_d)
        ref = gan_step_for(_EagerAcc(device), G_ref, D_ref, opt_g, opt_d, cfg,
                           batch=batches[0].shape[0], resolution=resolution)  # fmt: skip
        for s, b in enumerate(batches):
            ref(s, lambda b=b: (to_model_input(b, device), None))
        stats_ref = ref.take_stats(lambda t: t)
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    w_ref = [p.detach().float() for p in G_ref.parameters()]
    w0 = [p.detach().float().to(device) for p in G0.parameters()]
    moved = torch.sqrt(sum(((r - i) ** 2).sum() for r, i in zip(w_ref, w0, strict=True)))
    diff = torch.sqrt(sum(((f - r) ** 2).sum() for f, r in zip(w_fast, w_ref, strict=True)))
    loss_diff = max(abs(stats_fast[k] - stats_ref[k]) for k in AGREEMENT_KEYS)
    tolerance = agreement_tolerance(precision, fast)
    return {
        "check_steps": len(batches),
        "check_max_loss_diff": loss_diff,
        "check_weight_rel_diff": float(diff / moved) if moved > 0 else float("nan"),
        "check_tolerance": tolerance,
        "check_ok": loss_diff <= tolerance,
    }


def bench_presets() -> tuple[str, ...]:
    """The presets `bench train` accepts: every unconditional one (config.PRESETS)."""
    from facegan_dist.config import PRESETS

    return tuple(name for name, p in PRESETS.items() if not p.get("condition"))


def bench_train(
    preset: str = "tutorial",
    batch: int = 64,
    resolution: int = 64,
    precision: str = "no",
    steps: int = 20,
    warmup: int = 3,
    rounds: int = 3,
    epochs: int = PAPER_EPOCHS,
    dataset_images: int = CELEBA_IMAGES,
    overrides: dict[str, Any] | None = None,
    data: Path | None = None,
    check_steps: int = 2,
) -> dict[str, Any] | None:
    """Images/s of our step vs a plain eager loop, same models and synthetic uint8 batches.
    Under `accelerate launch` (N processes), `batch` is per process, our step is the DDP step
    and every process runs the plain loop alone at the same time (no DDP): images/s are summed
    over processes, so N-process and 1-process runs give the scaling efficiency. Returns the
    result on the main process, None on the others.
    First, unless check_steps is 0, the configured step is checked against the eager fp32 step
    on the same inputs (`step_agreement`); those steps also warm it up.

    `overrides` are TrainConfig fields (compile, channels_last, tf32, fused_adam, data_cache,
    num_workers, widths...). With `data`, our step is also timed end to end on the real
    pipeline (the shard stream, or the device cache with data_cache="device")."""
    from facegan_dist.config import PRECISIONS, PRESETS, merge_train_config
    from facegan_dist.errors import ConfigError
    from facegan_dist.models import count_params
    from facegan_dist.train.run import build_run
    from facegan_dist.train.setup import build_gan, model_input

    if precision not in PRECISIONS:
        raise ConfigError(f"--precision {precision!r} must be one of {', '.join(PRECISIONS)}")
    if preset not in bench_presets():
        why = " (conditional presets are not benchmarked)" if preset in PRESETS else ""
        raise ConfigError(f"--preset {preset!r} must be one of {', '.join(bench_presets())}{why}")
    flags = {"data": data or Path("synthetic"), "batch": batch, "precision": precision}
    cfg = merge_train_config(preset, None, {**flags, **(overrides or {})}).validate()
    if cfg.condition:  # before any work
        raise ConfigError(f"--preset {preset}: bench train does not support conditional models")
    # The run `facegan train` builds (Accelerator, device checks, backend switches, data, seeded
    # models, optimizers, prepare, the step), without a run folder. Under `accelerate launch`,
    # `batch` is per process and the step is the DDP step.
    run = build_run(cfg, run_folder=False, batch_per_process=True,
                    resolution=None if data is not None else resolution)  # fmt: skip
    acc, device, fast, world = run.acc, run.device, run.fast, run.acc.num_processes
    resolution = run.resolution
    G, D, gan_step = run.G, run.D, run.gan_step
    real_iter = None if run.data is None else run.data.batches(pin_memory=device.type == "cuda")
    # the initial weights in plain eager modules: the agreement check's start, the plain loop
    G0, D0 = build_gan(cfg, resolution)
    G0.load_state_dict(acc.unwrap_model(G).state_dict())
    D0.load_state_dict(acc.unwrap_model(D).state_dict())
    G_plain, D_plain = copy.deepcopy(G0).to(device), copy.deepcopy(D0).to(device)
    opt_gp = torch.optim.Adam(G_plain.parameters(), lr=cfg.lr_g, betas=cfg.betas_g)
    opt_dp = torch.optim.Adam(D_plain.parameters(), lr=cfg.lr_d, betas=cfg.betas_d)
    gen = torch.Generator().manual_seed(0)
    reals = [torch.randint(0, 256, (batch, 3, resolution, resolution), dtype=torch.uint8,
                           generator=gen) for _ in range(4)]  # fmt: skip
    if device.type == "cuda":
        reals = [r.pin_memory() for r in reals]
    counter = {"i": 0}

    def prep(x: torch.Tensor) -> torch.Tensor:
        return model_input(x, device, fast)

    def next_synthetic() -> tuple[torch.Tensor, None]:
        counter["i"] += 1
        return prep(reals[counter["i"] % len(reals)]), None

    def next_data() -> tuple[torch.Tensor, None]:
        return prep(next(real_iter)[0]), None

    def ours(n: int, start: int, source=next_synthetic) -> float:
        _sync(device)
        t0 = time.perf_counter()
        for s in range(start, start + n):
            gan_step(s, source)
        _sync(device)
        return time.perf_counter() - t0

    plain_autocast = (
        torch.autocast(device.type, dtype=torch.bfloat16) if precision == "bf16" else None
    )

    def plain(n: int) -> float:
        if plain_autocast is None:
            return _plain_loop(G_plain, D_plain, opt_gp, opt_dp, reals, cfg.z_dim, n, device)
        with plain_autocast:
            return _plain_loop(G_plain, D_plain, opt_gp, opt_dp, reals, cfg.z_dim, n, device)

    check: dict[str, Any] = {"check_ok": None}
    if check_steps and world > 1:  # the reference is a one-process step: compare on one
        check["check_skipped"] = f"{world} processes (run the check with one)"
    elif check_steps:
        if fast["cuda_graphs"]:  # the check must reach the capture and a few replays
            check_steps = max(check_steps, GRAPH_WARMUP + 3)
        check = step_agreement(gan_step, acc.unwrap_model(G), G0, D0, cfg,
                               [reals[i % len(reals)] for i in range(check_steps)], prep,
                               precision=precision, fast=fast, resolution=resolution)  # fmt: skip
    del G0, D0
    ours(warmup, 0)
    plain(warmup)
    if real_iter is not None:
        ours(warmup, 0, next_data)
    ours_s, plain_s, e2e_s, ours_cpu, plain_cpu = [], [], [], [], []
    for r in range(rounds):
        c0 = time.process_time()
        ours_s.append(ours(steps, warmup + r * steps))
        c1 = time.process_time()
        plain_s.append(plain(steps))
        c2 = time.process_time()
        ours_cpu.append(c1 - c0)
        plain_cpu.append(c2 - c1)
        if real_iter is not None:
            e2e_s.append(ours(steps, warmup + r * steps, next_data))
    stats = gan_step.take_stats(lambda t: t)
    images = steps * batch * world * cfg.d_steps  # real images per round, all processes
    ours_ips = images / statistics.median(ours_s)
    plain_ips = steps * batch * world / statistics.median(plain_s)  # each process alone
    result = {
        "bench": "train",
        "preset": preset,
        "arch": cfg.arch,
        "resolution": resolution,
        "batch": batch * world,
        "batch_per_device": batch,
        "world_size": world,
        "precision": precision,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "params_g": count_params(acc.unwrap_model(G)),
        "params_d": count_params(acc.unwrap_model(D)),
        "steps_per_round": steps,
        "rounds": rounds,
        "fast": fast,
        "data": str(data) if data else None,
        "data_cache": cfg.data_cache if data else None,
        "ours_images_per_s": ours_ips,
        "ours_end_to_end_images_per_s": (images / statistics.median(e2e_s) if e2e_s else None),
        "plain_images_per_s": plain_ips,
        "ratio_ours_over_plain": ours_ips / plain_ips,
        # CPU seconds of this process per step: on a shared CPU machine the wall clock is noisy,
        # CPU time much less so (the ratio of CPU times is the fairer comparison there)
        "ours_cpu_ms_per_step": 1000 * statistics.median(ours_cpu) / steps,
        "plain_cpu_ms_per_step": 1000 * statistics.median(plain_cpu) / steps,
        "ratio_cpu_time_plain_over_ours": statistics.median(plain_cpu)
        / statistics.median(ours_cpu),
        "ours_step_ms": 1000 * statistics.median(ours_s) / steps,
        "plain_step_ms": 1000 * statistics.median(plain_s) / steps,
        "peak_memory_mb": _peak_memory_mb(device),
        "final_loss_d": stats["loss_d"],
        **check,
        "projected_epochs": epochs,
        "projected_dataset_images": dataset_images,
        "projected_hours": epochs
        * dataset_images
        / (images / statistics.median(e2e_s) if e2e_s else ours_ips)
        / 3600,
    }
    main = acc.is_main_process
    acc.end_training()
    return result if main else None


def to_json_line(result: dict[str, Any]) -> str:
    return json.dumps(result, sort_keys=False)
