"""Frozen configs, one per command, with validation that names the offending flag.

Flow: dataclass defaults -> optional `--config FILE` -> explicit
flags, merged by `merge()`; `validate()` once; core entry points take the config and nothing else.
Runtime-derived values (world size, per-device batch) are never written back into a config.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from facegan_dist.data.remote import check_retry_policy, is_url
from facegan_dist.errors import ConfigError

SHARD_SIZES = (16, 32, 64, 128, 256)
SHARD_CROPS = ("auto", "celeba", "center", "none")
SHARD_FORMATS = ("jpg", "png", "webp")
SPLITS = ("train", "val", "test", "all")
SYNTH_LAYOUTS = ("kaggle", "official")


def default_workers() -> int:
    return max(1, os.cpu_count() or 1)


@dataclass(frozen=True)
class SynthConfig:
    """`facegan synth`: a deterministic cartoon-face dataset in the CelebA layout."""

    out: Path
    count: int = 2000  # number of images (ids 000001..count)
    seed: int = 0  # the whole dataset is a pure function of (count, seed)
    layout: str = "kaggle"  # kaggle: CSVs + img_align_celeba/...; official: Img/Anno/Eval
    zip: bool = False  # kaggle: write archive.zip; official: Img/img_align_celeba.zip
    workers: int = dataclasses.field(default_factory=default_workers)

    def validate(self) -> SynthConfig:
        if self.count < 1:
            raise ConfigError(f"--count {self.count} must be at least 1")
        if self.count > 999_999:
            raise ConfigError(f"--count {self.count} must be at most 999999 (6-digit CelebA ids)")
        if self.layout not in SYNTH_LAYOUTS:
            raise ConfigError(f"--layout {self.layout!r} must be one of {', '.join(SYNTH_LAYOUTS)}")
        if self.workers < 1:
            raise ConfigError(f"--workers {self.workers} must be at least 1")
        return self


@dataclass(frozen=True)
class ShardConfig:
    """`facegan shard`: crop/resize a source once and write WebDataset tar shards + manifest."""

    src: Path  # Kaggle archive.zip or its extraction, official CelebA dir, or any image folder
    out: Path  # output folder (manifest.json + {split}-{index:06d}.tar)
    size: int = 64  # output side in pixels (square)
    crop: str = "auto"  # auto = celeba for CelebA sources, center for plain folders
    format: str = "jpg"  # image encoding inside the shards
    quality: int = 95  # jpg/webp quality (ignored for png)
    limit: int | None = None  # keep at most N images per split (random subset by --seed)
    split: str = "all"  # which CelebA partition(s) to write; plain folders are all "train"
    shard_size: int = 5000  # samples per tar shard
    workers: int = dataclasses.field(default_factory=default_workers)
    seed: int = 0  # write-time shuffle (and --limit subset)
    strict: bool = False  # a single bad image is fatal instead of skipped-and-reported

    def validate(self) -> ShardConfig:
        if self.size not in SHARD_SIZES:
            raise ConfigError(f"--size {self.size} must be one of {SHARD_SIZES}")
        if self.crop not in SHARD_CROPS:
            raise ConfigError(f"--crop {self.crop!r} must be one of {', '.join(SHARD_CROPS)}")
        if self.format not in SHARD_FORMATS:
            raise ConfigError(f"--format {self.format!r} must be one of {', '.join(SHARD_FORMATS)}")
        if not 1 <= self.quality <= 100:
            raise ConfigError(f"--quality {self.quality} must be in 1..100")
        if self.limit is not None and self.limit < 1:
            raise ConfigError(f"--limit {self.limit} must be at least 1")
        if self.split not in SPLITS:
            raise ConfigError(f"--split {self.split!r} must be one of {', '.join(SPLITS)}")
        if self.shard_size < 1:
            raise ConfigError(f"--shard-size {self.shard_size} must be at least 1")
        if self.workers < 1:
            raise ConfigError(f"--workers {self.workers} must be at least 1")
        return self


def to_jsonable(cfg: Any) -> dict[str, Any]:
    """A config as plain JSON types (Paths become strings)."""

    def conv(v: Any) -> Any:
        if isinstance(v, Path):
            return str(v)
        if isinstance(v, tuple | list):
            return [conv(x) for x in v]
        if isinstance(v, dict):
            return {k: conv(x) for k, x in v.items()}
        return v

    return {f.name: conv(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}


def dumps(cfg: Any) -> str:
    return json.dumps(to_jsonable(cfg), indent=2, sort_keys=False)


# ----------------------------------------------------------------------------------------------
# Training
#
# Each `facegan train` option is declared once, here: its TrainConfig field carries the type and
# default, and `option()` adds the help text, the help panel and the accepted values. The CLI
# (cli/train.py) builds its options from these fields, validate() checks the choices, config
# files are read against them and --dry-run prints them. Everything here is torch-free, so that
# `facegan --help` starts in milliseconds; the models, losses and augmentations import their
# choice tuples from here.

PRECISIONS = ("no", "bf16", "fp16")
WANDB_MODES = ("online", "offline", "disabled")
ARCH_CHOICES = ("mlp", "dcgan")  # models.build_models
ACT_CHOICES = ("relu", "leaky")  # models.mlp: relu = paper T1, leaky = T2 (LeakyReLU 0.2)
UPSAMPLE_CHOICES = ("convtranspose", "nearest", "bilinear", "nearest-last")  # models.dcgan
D_NORMS = ("batch", "none")  # what models.dcgan's D builds; "auto" resolves to one of them
D_NORM_CHOICES = (*D_NORMS, "auto")
SPECTRAL_NORM_CHOICES = ("none", "d", "g", "both")  # models.apply_spectral_norm on G and/or D
LOSS_CHOICES = ("ns", "minimax", "wgan", "wgan-gp", "hinge")  # losses.LOSSES
WASSERSTEIN = ("wgan", "wgan-gp")  # losses whose default is 5 critic steps per G step
AUGMENT_CHOICES = ("color", "translation", "cutout")  # train.augment (a subset, comma-separated)
EVAL_FEATURES = ("attributes", "inception")  # metrics.FEATURES
DATA_CACHES = ("none", "device")
ON_NONFINITE = ("stop", "rollback")


def parse_policy(text: str | None) -> tuple[str, ...]:
    """--augment: 'color,translation,cutout' -> a tuple; '' / None / 'none' -> () (off)."""
    if not text or text == "none":
        return ()
    parts = tuple(p.strip() for p in text.split(",") if p.strip())
    for p in parts:
        if p not in AUGMENT_CHOICES:
            raise ConfigError(
                f"--augment {p!r}: each policy must be one of {', '.join(AUGMENT_CHOICES)}"
            )
    return parts


# Presets reproduce the paper's experiments ("Usando GANs para geração automática de imagens de
# rostos humanos", section 6) and the PyTorch DCGAN tutorial the paper's final networks follow.
# Values not listed keep the TrainConfig default. The paper used Adam with lr 1e-4 and BCE on the
# minimax game.
DEFAULT_PRESET = "quality"  # the quality study's winner (docs/QUALITY.md)
# `quality`, the study's winner: the tutorial DCGAN with resize-conv upsampling for G's RGB layer
# (all layers: 1.3-1.5x the time per image, no better), Adam betas (0, 0.99), a 2 kimg EMA
# half-life (BatchNorm re-estimated for the EMA), D's minibatch standard deviation and mirrored
# real images (faces are left-right symmetric; --no-hflip for data that is not, such as text).
# The four switches the study measured on top of an optimiser; sngan-hinge carries them too.
_QUALITY_SWITCHES = dict(upsample="nearest-last", mbstd=True, hflip=True, ema_kimg=2.0)
_QUALITY = dict(arch="dcgan", loss="ns", lr_g=2e-4, lr_d=2e-4, betas_g=(0.0, 0.99),
                betas_d=(0.0, 0.99), epochs=5, batch=128, **_QUALITY_SWITCHES)  # fmt: skip
PRESETS: dict[str, dict[str, Any]] = {
    "paper-mlp-relu": dict(arch="mlp", act="relu", loss="minimax", lr_g=1e-4, lr_d=1e-4,
                           betas_g=(0.9, 0.999), betas_d=(0.9, 0.999), epochs=50, batch=128),
    "paper-mlp-leaky": dict(arch="mlp", act="leaky", loss="minimax", lr_g=1e-4, lr_d=1e-4,
                            betas_g=(0.9, 0.999), betas_d=(0.9, 0.999), epochs=50, batch=128),
    "paper-dcgan": dict(arch="dcgan", loss="minimax", lr_g=1e-4, lr_d=1e-4,
                        betas_g=(0.5, 0.999), betas_d=(0.5, 0.999), epochs=50, batch=128),
    "paper-final": dict(arch="dcgan", loss="minimax", lr_g=1e-4, lr_d=1e-4,
                        betas_g=(0.5, 0.999), betas_d=(0.5, 0.999), epochs=400, batch=128),
    "tutorial": dict(arch="dcgan", loss="ns", lr_g=2e-4, lr_d=2e-4, betas_g=(0.5, 0.999),
                     betas_d=(0.5, 0.999), epochs=5, batch=128),
    "quality": _QUALITY,
    # Small and fast on 2 CPU cores: 32 px shards, narrow nets, a few minutes.
    "demo": dict(arch="dcgan", loss="ns", g_width=32, d_width=32, lr_g=2e-4, lr_d=2e-4,
                 betas_g=(0.5, 0.999), betas_d=(0.5, 0.999), batch=64, epochs=None,
                 max_steps=3000, log_every=50, sample_every=500, ckpt_every=1000, n_samples=64,
                 num_workers=1),
    # WGAN-GP (Gulrajani et al. 2017): no BN in the critic, 5 critic steps, Adam(1e-4, 0, 0.9).
    "wgan-gp": dict(arch="dcgan", loss="wgan-gp", d_steps=5, lr_g=1e-4, lr_d=1e-4,
                    betas_g=(0.0, 0.9), betas_d=(0.0, 0.9), batch=64, epochs=20),
    # SNGAN with the hinge loss (Miyato et al. 2018), one D step. Adam betas (0, 0.9), as the
    # hinge-loss GANs after SNGAN use: with (0.5, 0.999) the quality study's run collapsed after
    # 96 kimg (FID 986 at 160 kimg); with (0, 0.9) it kept improving (218; docs/QUALITY.md).
    # Plus the default's measured switches (resize-conv RGB layer, D's minibatch stddev,
    # mirrors, a 2 kimg EMA): without them it lost to the PyTorch example at 160 kimg (1.16x on
    # 2,000 emoji, 2 seeds), with them it is better at every point for both seeds (0.92x).
    "sngan-hinge": dict(arch="dcgan", loss="hinge", spectral_norm="d", lr_g=2e-4, lr_d=2e-4,
                        betas_g=(0.0, 0.9), betas_d=(0.0, 0.9), batch=64, epochs=20,
                        **_QUALITY_SWITCHES),
    # Conditional DCGAN on every attribute of the shards (projection D) with the `quality`
    # recipe. Retuned by the quality study (docs/QUALITY.md): with the tutorial optimiser it
    # drew no better than the unconditional baseline (0.92x at 64 kimg, 2 seeds); with this
    # recipe 0.27x.
    "cgan": dict(_QUALITY, condition="all"),
}  # fmt: skip

# The panels of `facegan train --help`, in the order the fields below first use them.
DATA = "Data and output"
MODEL = "Model"
OBJ = "Objective and schedule"
RUN = "Length, batch and numerics"
LOG = "Logging, samples and checkpoints"


def option(
    default: Any,
    help: str,
    *,
    panel: str,
    choices: tuple[str, ...] | None = None,
    shown: str | None = None,
    none: str = "none",
    flag: str | None = None,
) -> Any:
    """A TrainConfig field together with its `facegan train` option.

    `help` lists the choices where it says `{choices}` (at its start when it does not say it);
    validate() accepts exactly `choices`. The help ends with the default: the field's value and
    each preset's, or `shown` where the default is not a value (`shown=""`: no default), with
    `none` naming a None value. `flag` is the option's declaration when it is not `--name`
    (`--name/--no-name` for a boolean)."""
    meta = dict(help=help, panel=panel, choices=choices, shown=shown, none=none, flag=flag)
    return dataclasses.field(default=default, metadata=meta)


@dataclass(frozen=True)
class TrainConfig:
    """`facegan train`: every knob of a training run, with the default where it lives.

    Steps count G updates. With `d_every=K` D is updated on one step in K (the paper's "D critiques
    only every 5"); with `d_steps=K` D is updated K times (on K real batches) per G update.
    Image size, attribute names and dataset size come from the shard manifest, not from here.
    """

    # data and output
    data: Path | str | None = option(  # str: a URL (data/remote.py), kept as given
        None, "Shard folder from `facegan shard` (size/attributes from its manifest), or its URL "
        "prefix (https://, s3://, gs://, hf://, pipe:CMD with {name}; docs/SHARDS.md). Required "
        "(or taken from the checkpoint with --resume).", panel=DATA, shown="")  # fmt: skip
    data_retries: int = option(  # then one line naming the URL and the cause
        3, "Retries, with backoff, of a failed transfer from a URL --data.", panel=DATA
    )
    data_timeout: float = option(  # seconds without a byte: a stalled server
        30.0, "Read timeout (s) of a transfer from a URL --data.", panel=DATA
    )
    cache_dir: Path | None = option(  # data/remote.py Remote.cached; one copy per machine
        None, "URL --data: download each shard once into this folder (per machine, checked "
        "against the manifest's sha256) and read it from there.", panel=DATA,
        none="none (stream every read)")  # fmt: skip
    out: Path | None = option(
        None, "Run folder. A fresh run refuses one that holds a run: continue it with --resume "
        "auto, or see --restart.", panel=DATA, shown="runs/<preset>")  # fmt: skip
    split: str = option("train", "Shard split: {choices}.", panel=DATA, choices=SPLITS)
    preset: str = option(  # the preset this config started from (informational once merged)
        DEFAULT_PRESET, "{choices}. quality: the measured best (resize-conv G, Adam betas 0,0.99, "
        "2 kimg EMA, minibatch-stddev D, mirrored images; docs/QUALITY.md). Options marked "
        "'with --preset' take their default from it.", panel=DATA,
        choices=tuple(PRESETS))  # fmt: skip
    # model
    arch: str = option("dcgan", "{choices}.", panel=MODEL, choices=ARCH_CHOICES)
    act: str = option(
        "relu", "MLP activation: {choices} (paper T1 | T2).", panel=MODEL, choices=ACT_CHOICES
    )
    dropout: float = option(0.3, "MLP dropout (the paper's networks).", panel=MODEL)
    z_dim: int = option(100, "Latent size.", panel=MODEL)
    g_width: int = option(  # channels of G's last hidden block (doubling towards the input)
        64, "DCGAN G width.", panel=MODEL)  # fmt: skip
    d_width: int = option(64, "DCGAN D width.", panel=MODEL)  # channels of D's first block
    upsample: str = option(
        "convtranspose", "DCGAN G upsampling: {choices} (nearest, bilinear: resize + 3x3 conv, "
        "no checkerboard; nearest-last: resize-conv for the RGB layer only).", panel=MODEL,
        choices=UPSAMPLE_CHOICES)  # fmt: skip
    d_norm: str = option(
        "auto", "DCGAN D norm: {choices} (auto: none for wgan-gp or a spectral-norm D, else "
        "batch).", panel=MODEL, choices=D_NORM_CHOICES)  # fmt: skip
    mbstd: bool = option(
        False, "DCGAN D: minibatch standard deviation channel before its last layer (ProGAN); "
        "shows D a batch's variety.", panel=MODEL)  # fmt: skip
    spectral_norm: str = option(
        "none", "Spectral normalisation of: {choices}.", panel=MODEL, choices=SPECTRAL_NORM_CHOICES
    )
    condition: str | None = option(
        None, "Conditional GAN on shard attributes: all, or names like Smiling,Male.",
        panel=MODEL, none="off")  # fmt: skip
    # objective and schedule
    loss: str = option(
        "ns", "{choices}: ns = non-saturating, minimax = the paper's log(1 - D(G(z))), wgan = "
        "weight clipping (--clip), wgan-gp = gradient penalty (--gp-lambda), hinge = SNGAN's.",
        panel=OBJ, choices=LOSS_CHOICES)  # fmt: skip
    gp_lambda: float = option(10.0, "wgan-gp penalty weight.", panel=OBJ)
    clip: float = option(0.01, "wgan weight clipping.", panel=OBJ)  # to [-clip, clip]
    r1: float = option(0.0, "R1 gamma on real data, lazy every 16 D steps (0 = off).", panel=OBJ)
    augment: str = option(  # "" = off; checked by parse_policy (a subset, not one choice)
        "", "DiffAugment policy: a comma-separated subset of {choices}, or none.", panel=OBJ,
        choices=AUGMENT_CHOICES)  # fmt: skip
    d_every: int = option(
        1, "Update D on one step in K (the paper's 'D critiques every 5').", panel=OBJ
    )
    d_steps: int = option(  # merge_train_config: 5 for the Wasserstein losses unless given
        1, "D updates per G update.", panel=OBJ, shown="1; 5 with --loss wgan or wgan-gp"
    )
    lr_g: float = option(2e-4, "Adam lr of G.", panel=OBJ)
    lr_d: float = option(2e-4, "Adam lr of D.", panel=OBJ)
    lr_decay: float = option(  # train.run.lr_factor
        0.0, "Fraction of the run, at its end, over which both lrs fall linearly to 0 (0: "
        "constant; 1: from the first step). Follows the run's length (--max-steps/--epochs).",
        panel=OBJ)  # fmt: skip
    betas_g: tuple[float, float] = option(
        (0.5, 0.999), "Adam betas of G, e.g. 0.5,0.999.", panel=OBJ
    )
    betas_d: tuple[float, float] = option(
        (0.5, 0.999), "Adam betas of D, e.g. 0.5,0.999.", panel=OBJ
    )
    # length and batch
    batch: int = option(128, "GLOBAL batch; each process gets batch / processes.", panel=RUN)
    epochs: float | None = option(  # ignored when max_steps is set
        5, "Passes over the split.", panel=RUN, none="off (--max-steps)"
    )
    max_steps: int | None = option(
        None, "G updates; overrides --epochs.", panel=RUN, none="none (from --epochs)"
    )
    # EMA of G (used for samples, grids, evaluation and the export)
    ema_kimg: float = option(10.0, "EMA of G: half-life in kimg (0 = off).", panel=RUN)
    ema_rampup: float | None = option(
        0.05, "EMA ramp-up: half-life <= this x images seen.", panel=RUN, none="off"
    )
    # numerics and devices
    precision: str = option(  # fp16 uses loss scaling; ignored on CPU
        "no", "{choices} (fp16: GPU only).", panel=RUN, choices=PRECISIONS
    )
    seed: int = option(0, "Seed.", panel=RUN)
    sync_bn: bool = option(False, "SyncBatchNorm under DDP (CUDA).", panel=RUN)
    deterministic: bool = option(  # tests, exact resume on GPU
        False, "Deterministic torch kernels.", panel=RUN
    )
    data_cache: str = option(
        "none", "{choices}: none streams the shards; device decodes the split once into GPU "
        "memory.", panel=RUN, choices=DATA_CACHES)  # fmt: skip
    hflip: bool = option(False, "Random horizontal flips of real images.", panel=RUN)
    compile: bool = option(  # D only without gradient penalties
        False, "torch.compile G and D.", panel=RUN
    )
    cuda_graphs: bool = option(
        False, "Replay the whole step as one CUDA graph (one CUDA device; one D step per G step, "
        "no penalty/augmentation; not with --compile or fp16). Experimental.", panel=RUN,
    )  # fmt: skip
    # None = auto, resolved per device by fast_settings()
    channels_last: bool | None = option(None, "NHWC.", panel=RUN, shown="on for CUDA and CPU")
    tf32: bool | None = option(None, "TF32 math.", panel=RUN, shown="on for CUDA")  # Ampere+
    fused_adam: bool | None = option(None, "Fused Adam.", panel=RUN, shown="on for CUDA")
    exact: bool = option(  # deterministic, fp32 math, no compile/fusion
        False, "Bit-reproducible: deterministic, no fast paths.", panel=RUN
    )
    num_workers: int | None = option(  # None: see loader_workers()
        None, "Loader workers per process.", panel=RUN,
        none="2, on CUDA min(8, CPUs per process - 1)")  # fmt: skip
    shuffle_buffer: int = option(1000, "Shuffle buffer per loader worker.", panel=RUN)
    # evaluation during training (FID/KID of the EMA of G; the best one is exported to best/)
    eval_every: int = option(  # 0 = never (evaluate later: facegan evaluate)
        0, "Steps between FID/KID evaluations (0 = off); the best G goes to RUN/best/.",
        panel=LOG)  # fmt: skip
    eval_n: int = option(2000, "Images per evaluation.", panel=LOG)  # generated and real each
    eval_features: str = option(
        "attributes", "{choices}: attributes = the shards' label classifier (offline); "
        "inception = the standard TF-FID network (needs its weights file: see "
        "--inception-weights below).", panel=LOG, choices=EVAL_FEATURES)  # fmt: skip
    inception_weights: Path | None = option(
        None, "--eval-features inception: the torch-fidelity TF-FID weights file "
        "(docs/SAMPLING.md names it and where to get it).", panel=LOG,
        none="torch hub's cache")  # fmt: skip
    # faults
    on_nonfinite: str = option(
        "stop", "On a NaN/inf loss: {choices} (rollback: to the last checkpoint, lrs lowered).",
        panel=LOG, choices=ON_NONFINITE)  # fmt: skip
    max_rollbacks: int = option(3, "Rollbacks before giving up.", panel=LOG)
    rollback_lr_factor: float = option(  # learning rates are multiplied by this at each rollback
        0.5, "lr multiplier per rollback.", panel=LOG
    )
    skip_bad_samples: bool = option(
        False, "Replace undecodable images (counted, logged) instead of stopping.", panel=LOG,
        flag="--skip-bad-samples")  # fmt: skip
    # logging, samples, checkpoints
    log_every: int = option(50, "Steps between metric rows.", panel=LOG)  # metrics.jsonl / W&B
    sample_every: int = option(500, "Steps between fixed-noise grids.", panel=LOG)
    n_samples: int = option(64, "Images in the fixed-noise grid.", panel=LOG)
    ckpt_every: int = option(  # one is always written at the end
        1000, "Steps between checkpoints.", panel=LOG
    )
    keep: int = option(3, "Checkpoints to keep.", panel=LOG)  # the oldest are deleted
    resume: str | None = option(
        None, "auto (the newest intact checkpoint in --out; a damaged newer one is skipped with a "
        "warning and kept) or a checkpoint folder.", panel=LOG,
        none="none: a fresh run")  # fmt: skip
    # A fresh run into a folder holding a run is refused; restart=True moves that run aside to
    # OUT.old-<date>-<time> first (nothing is deleted). Never inherited by a resume.
    restart: bool = option(
        False, "Start over in an --out that holds a run: its files are first MOVED to "
        "a new folder OUT.old-DATE-TIME beside it (nothing is deleted). Not with --resume.",
        panel=LOG, flag="--restart")  # fmt: skip
    wandb_mode: str | None = option(
        None, "{choices}.", panel=LOG, choices=WANDB_MODES, none="offline without an API key"
    )
    wandb_project: str = option("facegan", "W&B project.", panel=LOG)
    run_name: str | None = option(None, "W&B run name.", panel=LOG, none="run folder name")

    def validate(self) -> TrainConfig:
        def bad(flag: str, why: str) -> ConfigError:
            return ConfigError(f"{flag} {why}")

        if self.data is None:
            raise bad("--data", "is required: a shard folder written by `facegan shard`")
        for f in dataclasses.fields(self):  # every choice, from its declaration
            choices, value = f.metadata.get("choices"), getattr(self, f.name)
            if choices and value is not None and f.name != "augment" and value not in choices:
                flag = "--" + f.name.replace("_", "-")
                raise bad(flag, f"{value!r} must be one of {', '.join(choices)}")
        parse_policy(self.augment)
        if not 0 <= self.dropout < 1:
            raise bad("--dropout", f"{self.dropout} must be in [0, 1)")
        for flag, v in (("--z-dim", self.z_dim), ("--g-width", self.g_width),
                        ("--d-width", self.d_width), ("--d-every", self.d_every),
                        ("--d-steps", self.d_steps), ("--batch", self.batch),
                        ("--log-every", self.log_every), ("--sample-every", self.sample_every),
                        ("--ckpt-every", self.ckpt_every), ("--keep", self.keep),
                        ("--n-samples", self.n_samples)):  # fmt: skip
            if v < 1:
                raise bad(flag, f"{v} must be at least 1")
        if self.mbstd and self.arch != "dcgan":
            raise bad("--mbstd", f"is a DCGAN discriminator layer (got --arch {self.arch})")
        if self.r1 < 0:
            raise bad("--r1", f"{self.r1} must be >= 0")
        if self.r1 and self.loss in WASSERSTEIN:
            raise bad("--r1", f"is for the ns/minimax/hinge losses, not --loss {self.loss}")
        if not self.gp_lambda >= 0:
            raise bad("--gp-lambda", f"{self.gp_lambda} must be >= 0")
        if not self.clip > 0:
            raise bad("--clip", f"{self.clip} must be > 0")
        if self.condition is not None and not self.condition.strip():
            raise bad("--condition", "must be 'all' or a comma-separated list of attributes")
        if self.d_steps > 32:
            raise bad("--d-steps", f"{self.d_steps} must be at most 32")
        if self.d_every > 1 and self.d_steps > 1:
            raise bad("--d-steps", "must be 1 when --d-every > 1 (pick one schedule)")
        for flag, v in (("--lr-g", self.lr_g), ("--lr-d", self.lr_d)):
            if not v > 0:
                raise bad(flag, f"{v} must be > 0")
        if not 0 <= self.lr_decay <= 1:
            raise bad("--lr-decay", f"{self.lr_decay} must be in [0, 1] (a fraction of the run)")
        for flag, b in (("--betas-g", self.betas_g), ("--betas-d", self.betas_d)):
            if len(b) != 2 or not all(0 <= x < 1 for x in b):
                raise bad(flag, f"{b} must be two numbers in [0, 1), e.g. 0.5,0.999")
        if self.ema_kimg < 0:
            raise bad("--ema-kimg", f"{self.ema_kimg} must be >= 0 (0 turns the EMA off)")
        if self.ema_rampup is not None and not self.ema_rampup > 0:
            raise bad("--ema-rampup", f"{self.ema_rampup} must be > 0")
        if self.max_steps is None and (self.epochs is None or not self.epochs > 0):
            raise bad("--epochs", "must be > 0 (or give --max-steps)")
        if self.max_steps is not None and self.max_steps < 1:
            raise bad("--max-steps", f"{self.max_steps} must be at least 1")
        if self.eval_every < 0:
            raise bad("--eval-every", f"{self.eval_every} must be >= 0 (0 = off)")
        if self.eval_every and isinstance(self.data, str) and self.cache_dir is None:
            # the attribute classifier and the real statistics go there (readback.derived_dir)
            raise bad("--eval-every", "needs a local --data folder, or --cache-dir DIR with a "
                      "URL --data: the attribute classifier and FID's real statistics are kept "
                      "there")  # fmt: skip
        if self.eval_every and self.eval_n < 2:
            raise bad("--eval-n", f"{self.eval_n} must be at least 2")
        if self.max_rollbacks < 0:
            raise bad("--max-rollbacks", f"{self.max_rollbacks} must be >= 0")
        if not 0 < self.rollback_lr_factor <= 1:
            raise bad("--rollback-lr-factor", f"{self.rollback_lr_factor} must be in (0, 1]")
        if self.exact and (self.compile or self.cuda_graphs or self.tf32 or self.precision != "no"):
            raise bad(
                "--exact", "excludes --compile, --cuda-graphs, --tf32 and --precision bf16/fp16"
            )
        if self.cuda_graphs and (
            self.d_steps != 1 or self.d_every != 1 or self.augment or self.loss == "wgan-gp"
            or self.r1
        ):  # fmt: skip
            raise bad(
                "--cuda-graphs",
                "needs one D step per G step (--d-steps 1 --d-every 1) and no --augment, "
                "wgan-gp or --r1 (their work changes from step to step)",
            )
        if self.cuda_graphs and self.lr_decay:
            raise bad("--cuda-graphs", "captures the learning rate: not with --lr-decay")
        if self.cuda_graphs and self.compile:
            raise bad("--cuda-graphs", "and --compile are alternatives: pick one")
        if self.cuda_graphs and self.precision == "fp16":
            raise bad("--cuda-graphs", "cannot capture fp16 loss scaling (host-side); use bf16")
        if self.num_workers is not None and self.num_workers < 0:
            raise bad("--num-workers", f"{self.num_workers} must be >= 0")
        if self.shuffle_buffer < 1:
            raise bad("--shuffle-buffer", f"{self.shuffle_buffer} must be at least 1")
        check_retry_policy(self.data_retries, self.data_timeout)
        if self.cache_dir is not None and not isinstance(self.data, str):
            raise bad(
                "--cache-dir", f"caches the shards of a URL --data; --data {self.data} is a "
                "local folder (read in place): drop --cache-dir")  # fmt: skip
        if self.restart and self.resume is not None:
            raise bad("--restart", f"starts the run over: it cannot go with --resume {self.resume}")
        return self

    def fast_settings(self, device_type: str) -> dict[str, bool]:
        """Speed settings with auto (None) resolved for the device: on for CUDA, where they
        are standard practice, and channels_last on CPU too (oneDNN's NHWC convolutions: +20-30 %
        per step on the DCGANs, docs/PERFORMANCE.md); everything off under --exact."""
        cuda = device_type == "cuda"

        def pick(v: bool | None, auto: bool) -> bool:
            return (auto if v is None else v) and not self.exact

        return {
            "channels_last": pick(self.channels_last, cuda or device_type == "cpu"),
            "tf32": pick(self.tf32, cuda),
            "fused_adam": pick(self.fused_adam, cuda),
            "compile": self.compile and not self.exact,
            "cuda_graphs": self.cuda_graphs and not self.exact,
            "deterministic": self.deterministic or self.exact,
        }

    def loader_workers(self, device_type: str, cpus_per_process: int) -> int:
        """--num-workers, or auto: 2 off CUDA (the cores also run the step); on CUDA enough JPEG
        decoders to feed the GPU, min(8, the process's share of CPUs - 1), at least 2. One
        worker decodes ~16,000 64 px images/s (docs/PERFORMANCE.md), so 30,000 images/s needs
        2 or more, plus collation and pinning. `--data-cache device` uses none."""
        if self.num_workers is not None:
            return self.num_workers
        if device_type != "cuda":
            return 2
        return max(2, min(8, cpus_per_process - 1))

    @property
    def resolved_d_norm(self) -> str:
        """auto: no BatchNorm in D under a gradient penalty (per-sample gradients) or a
        spectral-norm D, as the WGAN-GP and SNGAN papers do; else BatchNorm (DCGAN)."""
        if self.d_norm != "auto":
            return self.d_norm
        if self.loss == "wgan-gp" or self.spectral_norm in ("d", "both"):
            return "none"
        return "batch"

    @property
    def run_dir(self) -> Path:
        return self.out if self.out is not None else Path("runs") / self.preset


def load_config_file(path: Path) -> dict[str, Any]:
    """Read a TOML/YAML/JSON file of TrainConfig fields (flag names with - or _ both accepted)."""
    if not path.is_file():
        raise ConfigError(f"--config {path}: file not found")
    text = path.read_text()
    try:
        if path.suffix == ".toml":
            import tomllib

            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise ConfigError(f"--config {path}: use a .toml, .yaml/.yml or .json file")
    except ConfigError:
        raise
    except Exception as exc:  # parse errors of three libraries; keep the first line
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ConfigError(f"--config {path}: cannot parse: {first}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"--config {path}: expected a table/mapping of options at the top level")
    return {str(k).replace("-", "_"): v for k, v in data.items()}


def _coerce(name: str, value: Any, field_type: Any) -> Any:
    """Coerce JSON/TOML/YAML values to the field's type (paths, tuples, numbers)."""
    if value is None:
        return None
    t, given = str(field_type), value
    try:
        if "Path" in t:  # `Path | str`: a URL stays the string it is (Path folds its "//")
            return str(value) if "str" in t and is_url(value) else Path(value)
        if "tuple" in t:
            if isinstance(value, str):
                value = [x for x in value.replace(" ", "").split(",") if x]
            return tuple(float(x) for x in value)
        if t.startswith("float") or t == "<class 'float'>":
            return float(value)
        if t.startswith("int") or t == "<class 'int'>":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError
            return int(value)
        if t.startswith("bool") or t == "<class 'bool'>":
            if isinstance(value, str):  # a typo ("ture") is refused, not read as False
                words = {"1": True, "true": True, "yes": True, "on": True}
                words |= {"0": False, "false": False, "no": False, "off": False}
                return words[value.lower()]
            if not isinstance(value, (bool, int)):
                raise ValueError
            return bool(value)
        if "float" in t:  # float | None
            return float(value)
        if "int" in t:  # int | None
            return int(value)
        if t in ("str", "str | None", "<class 'str'>"):
            if isinstance(value, (list, tuple)):  # YAML/TOML `augment: [color, cutout]`
                value = ",".join(str(x) for x in value)
            if not isinstance(value, str):
                raise ValueError
            return value
    except (TypeError, ValueError, KeyError):
        flag = "--" + name.replace("_", "-")
        raise ConfigError(f"{flag} {given!r} is not a valid {t}") from None
    return value


def merge_train_config(
    preset: str | None = None,
    config_file: Path | None = None,
    flags: dict[str, Any] | None = None,
    base: dict[str, Any] | None = None,
) -> TrainConfig:
    """defaults -> base (a resumed run's saved config) -> preset -> file -> explicit flags.

    `flags` holds only what was given on the command line (None values are dropped), so a flag
    always wins and an omitted flag never clobbers the file, the preset or the saved config.
    """
    fields = {f.name: f for f in dataclasses.fields(TrainConfig)}
    values: dict[str, Any] = dict(base or {})
    file_values = load_config_file(config_file) if config_file is not None else {}
    # A preset named anywhere (the argument, else a flag, else the file) is applied, over a
    # resumed run's saved config too; with none named a fresh run takes the default preset and
    # a resumed run keeps its saved values and preset name.
    given = preset or (flags or {}).get("preset") or file_values.get("preset")
    preset = given or values.get("preset") or DEFAULT_PRESET
    if preset not in PRESETS:
        raise ConfigError(f"--preset {preset!r} must be one of {', '.join(PRESETS)}")
    if base is None or given:
        values.update(PRESETS[preset])
    values["preset"] = preset
    for source, label in ((file_values, f"--config {config_file}"), (flags or {}, "flag")):
        for k, v in source.items():
            if v is None or k == "preset":  # resolved above
                continue
            if k not in fields:
                raise ConfigError(f"{label}: unknown option {k!r}")
            values[k] = v
    if "d_steps" not in values:  # the default number of D steps depends on the loss
        values["d_steps"] = 5 if values.get("loss") in WASSERSTEIN else 1
    explicit = {k for src in (file_values, flags or {}) for k, v in src.items() if v is not None}
    if "epochs" in explicit and "max_steps" not in explicit:
        values["max_steps"] = None  # an explicit --epochs beats a preset's (or saved) --max-steps
    typed = {k: _coerce(k, v, fields[k].type) for k, v in values.items() if k in fields}
    return TrainConfig(**typed)


def train_config_from_json(d: dict[str, Any]) -> dict[str, Any]:
    """A saved config.json as merge input (unknown keys from newer versions are dropped)."""
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    return {k: v for k, v in d.items() if k in names}
