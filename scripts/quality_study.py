"""The quality study: which training recipe draws the best images at a fixed budget of images seen.

    python scripts/quality_study.py --data TRAIN_SHARDS --real HELDOUT_SHARDS --out DIR \
        [--kimg 160] [--seeds 0,1] [--recipes baseline,tutorial,...] [--quick]

For every recipe and seed it trains from scratch on TRAIN_SHARDS for `--kimg` thousand images seen
(checkpoints at `--points` evenly spaced budgets), then scores the checkpoints with FID and KID
against the held-out real images of HELDOUT_SHARDS (`--real-split`), through the same metric path
as `facegan evaluate` (torchmetrics). Output in DIR:
- results.jsonl  one row per (recipe, seed, kimg, generator): fid, kid, kid_std;
- summary.md     mean and spread over seeds at each budget, and the ratio to the baseline;
- grids/         seeds 0-63 of each recipe's final generator (seed 0 run).
A second call resumes: only missing runs and scores are done. A run folder whose config.json
differs from its recipe as it is now (a preset retuned since) is refused, never reused.

The baseline is the recipe of the PyTorch DCGAN example (pytorch/examples dcgan/main.py): ngf =
ndf = 32 here, Adam(2e-4, betas (0.5, 0.999)), BCE, batch 64, D called separately on the real and
the fake batch, images drawn with G in TRAIN mode (BatchNorm batch statistics over batches of
64), as the example draws its grids. It is trained here as a plain eager loop on the same shards
and the same models (`facegan_dist.models`, the example's architecture), not through our trainer.

Features: no pretrained network can be downloaded offline, so by default the features are the
penultimate layer of a small classifier trained on the TRAIN shards' own labels (the CelebA
attributes of the synthetic faces, the emoji categories of `scripts/emoji_dataset.py` sharded
with `--labels subfolders`): `facegan_dist.classifier`, here with `--classifier-epochs`. With
`--features inception` (and the weights file) the standard TF-FID Inception is used instead.
Each recipe is a set of `facegan train` flags on top of a preset; `--list` prints them.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# Flags shared by every recipe: the example's budget and widths (ngf = ndf = 32, batch 64).
COMMON = dict(g_width=32, d_width=32, batch=64, num_workers=1, wandb_mode="disabled",
              log_every=100, sample_every=10**9, n_samples=16)  # fmt: skip

# The sngan-hinge preset before the seventh session added the default's switches to it; the
# sngan-* retuning recipes below were measured on top of it.
_SNGAN_PLAIN = dict(upsample="convtranspose", mbstd=False, hflip=False, ema_kimg=10.0)

# name -> (preset, flags). "baseline" is the plain loop of the PyTorch example (see above).
RECIPES: dict[str, tuple[str, dict]] = {
    "baseline": ("tutorial", {}),
    "quality": ("quality", {}),
    "tutorial": ("tutorial", {}),
    "diffaug": ("tutorial", dict(augment="color,translation,cutout")),
    "ttur": ("tutorial", dict(lr_g=1e-4, lr_d=4e-4)),
    "betas0": ("tutorial", dict(betas_g=(0.0, 0.99), betas_d=(0.0, 0.99))),
    "r1": ("tutorial", dict(r1=1.0)),
    "mbstd": ("tutorial", dict(mbstd=True)),
    "d-wide": ("tutorial", dict(d_width=64)),
    "resize-conv": ("tutorial", dict(upsample="nearest")),
    "resize-conv-last": ("tutorial", dict(upsample="nearest-last")),
    "quality-last": ("quality", dict(upsample="nearest-last")),
    "quality-ct": ("quality", dict(upsample="convtranspose")),
    "quality-tr": ("quality", dict(augment="translation")),
    # second-round candidates on top of the winner: a longer EMA (ramped), mirrored real images,
    # D's minibatch standard deviation
    "q-ema10": ("quality", dict(ema_kimg=10.0)),
    # shorter EMA half-lives, for small data where G still improves fast late in the budget
    "q-ema1": ("quality", dict(ema_kimg=1.0)),
    "q-ema05": ("quality", dict(ema_kimg=0.5)),
    # learning rates falling linearly to 0 over the last half / all of the run
    "q-lrd05": ("quality", dict(lr_decay=0.5)),
    "q-lrd1": ("quality", dict(lr_decay=1.0)),
    # small-data candidates against D overfitting late in the budget (seventh session): the
    # tutorial's Adam betas, a slower D, R1 on the reals, a longer EMA
    "q-b05": ("quality", dict(betas_g=(0.5, 0.999), betas_d=(0.5, 0.999))),
    "q-slowd": ("quality", dict(lr_d=1e-4)),
    "q-r1": ("quality", dict(r1=0.1)),
    "q-ema5": ("quality", dict(ema_kimg=5.0)),
    "q-r1e5": ("quality", dict(r1=0.1, ema_kimg=5.0)),  # the two ties above, together
    # DiffAugment (Zhao et al. 2020), the small-data remedy, on top of the default
    "q-diffaug": ("quality", dict(augment="color,translation,cutout")),
    "q-hflip": ("quality", dict(hflip=True)),
    "q-mbstd": ("quality", dict(mbstd=True)),
    "q-mh": ("quality", dict(mbstd=True, hflip=True)),
    "ema-2": ("tutorial", dict(ema_kimg=2.0)),
    "sngan-hinge": ("sngan-hinge", {}),
    # sngan-hinge before the seventh session (betas 0, 0.9, none of the default's switches): the
    # study's sngan-hinge runs from before then are this recipe
    "sngan-plain": ("sngan-hinge", _SNGAN_PLAIN),
    # retuning candidates for sngan-hinge (its D, spectrally normalised and 32 wide, is weak):
    # TTUR as in SAGAN/BigGAN, and beta1 = 0 alone
    "sngan-ttur": (
        "sngan-hinge",
        dict(_SNGAN_PLAIN, lr_g=1e-4, lr_d=4e-4, betas_g=(0.0, 0.9), betas_d=(0.0, 0.9)),
    ),
    "sngan-b0": ("sngan-hinge", dict(_SNGAN_PLAIN, betas_g=(0.0, 0.9), betas_d=(0.0, 0.9))),
    "sngan-dw": ("sngan-hinge", dict(_SNGAN_PLAIN, d_width=64)),  # SNGAN's own D is far wider
    # the default's switches on the SNGAN objective (seventh session; = sngan-hinge since then)
    "sngan-q": ("sngan-hinge", dict(upsample="nearest-last", mbstd=True, hflip=True, ema_kimg=2.0)),
    "wgan-gp": ("wgan-gp", {}),
    "cgan": ("cgan", {}),
    # cgan as first shipped (the tutorial optimiser), and the retuned preset spelt from quality
    "cgan-tutorial": ("tutorial", dict(condition="all")),
    "cgan-q": ("quality", dict(condition="all")),
    "paper-dcgan": ("paper-dcgan", {}),
    "paper-mlp-relu": ("paper-mlp-relu", {}),
    "paper-mlp-leaky": ("paper-mlp-leaky", {}),
}
QUICK = ["baseline", "tutorial", "quality"]  # with --kimg 96 unless given: < 30 min on 2 cores


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", flush=True)


def reset_accelerate() -> None:
    """Accelerate's state is a process-wide singleton; each run here builds its own."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(True)
    GradientState._reset_state()


# ---- training ----


def train_recipe(name: str, data: Path, out: Path, seed: int, steps: int, every: int) -> Path:
    """Our trainer on one recipe; checkpoints every `every` steps, all kept."""
    from facegan_dist.train.loop import resolve_config, steps_for_epochs, train

    preset, flags = RECIPES[name]
    run_dir = out / "runs" / f"{name}-s{seed}"
    reset_accelerate()
    base = {**COMMON, **flags, "data": data, "out": run_dir, "seed": seed, "keep": 10**6}
    # Equal REAL images seen: `steps` real batches. With d_steps K (wgan-gp: 5) a G step draws
    # K batches, with d_every K one batch every K steps (train.loop.steps_for_epochs).
    probe, _ = resolve_config(preset, None, {**base, "max_steps": 1})
    g_steps = steps_for_epochs(1.0, steps, probe.d_every, probe.d_steps)
    g_every = max(1, round(every * g_steps / steps))
    cfg, ckpt = resolve_config(preset, None, {**base, "max_steps": g_steps, "ckpt_every": g_every,
                                              "resume": "auto"})  # fmt: skip
    check_run_matches(name, run_dir, cfg)
    if train(cfg, resume_from=ckpt).preempted:  # SIGTERM/SIGINT: the trainer saved and stopped
        log(f"{name} seed {seed} stopped by a signal; run the same command again to continue")
        raise SystemExit(130)
    return run_dir


# The settings that decide a run's training; a finished run is reused only if they match.
RECIPE_KEYS = ("arch", "act", "dropout", "z_dim", "g_width", "d_width", "upsample",
               "d_norm", "mbstd", "spectral_norm", "condition", "loss", "gp_lambda", "clip", "r1",
               "augment", "d_every", "d_steps", "lr_g", "lr_d", "betas_g", "betas_d", "lr_decay",
               "batch", "ema_kimg", "ema_rampup", "hflip", "seed")  # fmt: skip


def check_run_matches(name: str, run_dir: Path, cfg) -> None:
    """A run folder left by an earlier call must have been trained with this recipe as it is
    now: a preset retuned since then would otherwise resume (or reuse) the old run under the
    new name. One line naming the folder and the settings that differ."""
    from facegan_dist.config import dumps

    saved_path = run_dir / "config.json"
    if not saved_path.is_file():
        return
    saved, now = json.loads(saved_path.read_text()), json.loads(dumps(cfg))
    diffs = [f"{k}: run {saved[k]!r}, recipe {now[k]!r}" for k in RECIPE_KEYS
             if k in saved and k in now and saved[k] != now[k]]  # fmt: skip
    if diffs:
        raise SystemExit(
            f"quality_study: {run_dir} was trained with other settings than recipe {name} has "
            f"now ({'; '.join(diffs)}); move the folder aside or use another --out"
        )


def train_baseline(data: Path, out: Path, seed: int, steps: int, every: int) -> Path:
    """The PyTorch DCGAN example's loop on our shards; G's weights saved every `every` steps."""
    from safetensors.torch import save_file

    from facegan_dist.data.stream import ShardStream, make_loader, read_manifest
    from facegan_dist.models import build_models

    run_dir = out / "runs" / f"baseline-s{seed}"
    (run_dir / "points").mkdir(parents=True, exist_ok=True)
    if (run_dir / "points" / f"step-{steps:09d}.safetensors").is_file():
        return run_dir
    torch.manual_seed(seed)
    resolution = int(read_manifest(data)["settings"]["size"])
    G, D = build_models("dcgan", resolution=resolution, z_dim=100, g_width=32, d_width=32)
    opt_g = torch.optim.Adam(G.parameters(), lr=2e-4, betas=(0.5, 0.999))
    opt_d = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    stream = ShardStream(data, split="train", batch_per_device=64, num_workers=1, seed=seed)
    B = 64
    ones, zeros = torch.ones(B), torch.zeros(B)

    def reals():
        while True:
            for images, _ in make_loader(stream):
                yield images.float().div_(127.5).sub_(1.0)

    it = reals()
    for step in range(1, steps + 1):
        real = next(it)
        # D: maximise log D(x) + log(1 - D(G(z))), two separate batches as the example does
        D.zero_grad()
        F.binary_cross_entropy_with_logits(D(real), ones).backward()
        fake = G(torch.randn(B, 100))
        F.binary_cross_entropy_with_logits(D(fake.detach()), zeros).backward()
        opt_d.step()
        # G: maximise log D(G(z)) (the non-saturating loss)
        G.zero_grad()
        F.binary_cross_entropy_with_logits(D(fake), ones).backward()
        opt_g.step()
        if step % every == 0 or step == steps:
            path = run_dir / "points" / f"step-{step:09d}.safetensors"
            save_file({k: v.contiguous() for k, v in G.state_dict().items()}, str(path))
    return run_dir


class TrainModeG(torch.nn.Module):
    """The example's way of drawing: G in train mode, BatchNorm on each batch's statistics
    (evaluate_generator sets eval mode on this wrapper; the inner G stays in train mode)."""

    def __init__(self, G: torch.nn.Module) -> None:
        super().__init__()
        self.G, self.z_dim = G, G.z_dim

    def forward(self, z, c=None):
        return self.G.train()(z)


# ---- evaluation ----


def generators(name: str, run_dir: Path):
    """(step, kimg, which, G) for every saved point of a run: the EMA and the raw G of our trainer,
    the train-mode G of the baseline."""
    from safetensors.torch import load_file

    from facegan_dist.artifacts import CKPT_STATE_NAME, load_any_generator
    from facegan_dist.models import build_models

    if name == "baseline":
        meta = json.loads((run_dir.parent.parent / "baseline-meta.json").read_text())
        for path in sorted((run_dir / "points").glob("step-*.safetensors")):
            step = int(path.stem.split("-")[1])
            G, _ = build_models("dcgan", resolution=meta["resolution"], g_width=32, d_width=32)
            G.load_state_dict(load_file(str(path)))
            yield step, step * COMMON["batch"] / 1000, "train-mode", TrainModeG(G)
        return
    for ckpt in sorted((run_dir / "checkpoints").glob("step-*")):
        step = int(ckpt.name.split("-")[1])
        kimg = json.loads((ckpt / CKPT_STATE_NAME).read_text())["images_seen"] / 1000
        for ema in (True, False):
            G, meta, _ = load_any_generator(ckpt, "cpu", ema=ema)
            if ema and not meta["ema"]:
                continue
            yield step, kimg, "ema" if ema else "raw", G


def make_features(args, device):
    from facegan_dist import metrics

    if args.features == "inception":
        return metrics.make_extractor("inception", args.real, device,
                                      inception_weights=args.inception_weights)  # fmt: skip
    from facegan_dist.classifier import ClassifierSettings, get_classifier

    src = args.classifier_data or args.data
    get_classifier(src, device, settings=ClassifierSettings(epochs=args.classifier_epochs),
                   log=log)  # fmt: skip
    return metrics.make_extractor("attributes", src, device, log=log)


def score(args, G, extractor, batch: int) -> dict:
    from facegan_dist.metrics import evaluate_generator

    cond_idx = None
    if getattr(G, "n_cond", 0):  # cGAN: fake image i gets the labels of real image i
        from facegan_dist.data.stream import read_manifest

        cond_idx = list(range(len(read_manifest(args.real)["attribute_names"])))
    return evaluate_generator(G, args.real, n=args.eval_n, split=args.real_split, batch=batch,
                              device="cpu", seed=10**6, extractor=extractor,
                              condition_idx=cond_idx)  # fmt: skip


# ---- summary ----


def summarise(rows: list[dict], recipes: list[str], out: Path) -> str:
    """Markdown: per recipe, the best generator kind, FID/KID mean +- half-range over seeds at
    each budget, and the FID ratio to the baseline at the same budget."""
    by: dict[tuple, list[dict]] = {}
    for r in rows:
        by.setdefault((r["recipe"], r["which"], r["kimg"]), []).append(r)
    kimgs = sorted({r["kimg"] for r in rows})
    final = kimgs[-1]

    def mean_spread(vals):
        return statistics.mean(vals), (max(vals) - min(vals)) / 2

    base = {k: statistics.mean(x["fid"] for x in by.get(("baseline", "train-mode", k), []))
            for k in kimgs if by.get(("baseline", "train-mode", k))}  # fmt: skip
    lines = [f"FID / KID x1000 at each recipe's largest budget scored (at most {final:g} kimg; "
             "mean +- half-range over seeds); ratio = FID / baseline FID at the same budget", "",
             "| recipe | G | seeds | kimg | FID | KID x1000 | ratio | FID curve (kimg: FID) |",
             "|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name in recipes:
        mine = {k for (n, _, k) in by if n == name}
        if not mine:
            continue
        # the recipe's largest budget the baseline was scored at too (a run stopped by a signal
        # leaves an off-grid checkpoint), else its largest
        last = max(mine & set(base)) if mine & set(base) else max(mine)
        for which in ("train-mode", "ema", "raw"):
            cell = by.get((name, which, last))
            if not cell:
                continue
            f, fs = mean_spread([x["fid"] for x in cell])
            k, ks = mean_spread([1000 * x["kid"] for x in cell])
            ratio = f"{f / base[last]:.2f}" if last in base else "-"
            curve = ", ".join(
                f"{kk:g}: {statistics.mean(x['fid'] for x in by[(name, which, kk)]):.1f}"
                for kk in kimgs if (name, which, kk) in by
            )  # fmt: skip
            lines.append(f"| {name} | {which} | {len(cell)} | {last:g} | {f:.1f} +- {fs:.1f} | "
                         f"{k:.1f} +- {ks:.1f} | {ratio} | {curve} |")  # fmt: skip
    text = "\n".join(lines) + "\n"
    (out / "summary.md").write_text(text)
    return text


def final_grid(name: str, run_dir: Path, out: Path) -> None:
    from facegan_dist.images import grid_uint8, save_png, seed_images

    last = list(generators(name, run_dir))
    if not last:
        return
    step = max(s for s, _, _, _ in last)
    G = next(g for s, _, w, g in last if s == step and w in ("ema", "train-mode"))
    G.eval()
    if getattr(G, "n_cond", 0):
        return  # a conditional G needs conditions: its grid is in its run folder
    with torch.no_grad():
        images = seed_images(G, range(64))
    save_png(grid_uint8(images), out / "grids" / f"{name}.png")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--data", type=Path, help="training shards (facegan shard)")
    p.add_argument("--real", type=Path, help="held-out real shards (default: --data)")
    p.add_argument("--real-split", default="train", help="split of --real scored against")
    p.add_argument("--out", type=Path, default=Path("quality-study"))
    p.add_argument(
        "--kimg",
        type=float,
        default=None,
        help="budget: thousands of images seen (160; 96 with --quick)",
    )
    p.add_argument("--points", type=int, default=4, help="evaluated budgets (evenly spaced)")
    p.add_argument("--seeds", default="0,1")
    p.add_argument("--recipes", default=",".join(RECIPES))
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"recipes {','.join(QUICK)} only, 96 kimg unless --kimg",
    )
    p.add_argument("--eval-n", type=int, default=2000, help="generated images per score")
    p.add_argument("--features", default="attributes", choices=["attributes", "inception"])
    p.add_argument("--inception-weights", type=Path, default=None)
    p.add_argument(
        "--classifier-data",
        type=Path,
        default=None,
        help="shards the feature classifier is trained on (default: --data)",
    )
    p.add_argument("--classifier-epochs", type=int, default=10)
    p.add_argument("--list", action="store_true", help="print the recipes and exit")
    args = p.parse_args(argv)
    if args.list:
        for name, (preset, flags) in RECIPES.items():
            print(f"{name:16s} --preset {preset} {json.dumps(flags)}")
        return 0
    if args.data is None:
        p.error("--data is required")
    args.real = args.real or args.data
    if args.kimg is None:
        args.kimg = 96.0 if args.quick else 160.0
    from facegan_dist.data.stream import read_manifest

    recipes = QUICK if args.quick else [r.strip() for r in args.recipes.split(",") if r.strip()]
    unknown = [r for r in recipes if r not in RECIPES]
    if unknown:
        p.error(f"--recipes: unknown {', '.join(unknown)} (see --list)")
    seeds = [int(s) for s in args.seeds.split(",")]
    steps = max(1, round(args.kimg * 1000 / COMMON["batch"]))
    every = max(1, steps // args.points)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "grids").mkdir(exist_ok=True)
    resolution = int(read_manifest(args.data)["settings"]["size"])
    (args.out / "runs").mkdir(exist_ok=True)
    (args.out / "baseline-meta.json").write_text(json.dumps({"resolution": resolution}))
    log(f"{len(recipes)} recipes x {len(seeds)} seeds, {steps} steps of 64 ({args.kimg:g} kimg), "
        f"points every {every} steps, {args.eval_n} generated images per score")  # fmt: skip
    extractor = make_features(args, "cpu")
    results = args.out / "results.jsonl"
    done = set()
    rows: list[dict] = []
    if results.is_file():
        rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()]
        done = {(r["recipe"], r["seed"], r["step"], r["which"]) for r in rows}
    for name in recipes:
        for seed in seeds:
            t0 = time.perf_counter()
            if name == "baseline":
                run_dir = train_baseline(args.data, args.out, seed, steps, every)
            else:
                run_dir = train_recipe(name, args.data, args.out, seed, steps, every)
            t_train = time.perf_counter() - t0
            for step, kimg, which, G in generators(name, run_dir):
                if (name, seed, step, which) in done:
                    continue
                res = score(args, G, extractor, 64 if which == "train-mode" else 200)
                row = {"recipe": name, "seed": seed, "step": step, "which": which,
                       "kimg": round(kimg, 3), "fid": res["fid"],
                       "kid": res["kid"], "kid_std": res["kid_std"], "n": res["n"],
                       "n_real": res["n_real"], "train_s": round(t_train, 1)}  # fmt: skip
                rows.append(row)
                with open(results, "a") as f:
                    f.write(json.dumps(row) + "\n")
                log(f"{name} seed {seed} {row['kimg']:g} kimg {which}: FID {res['fid']:.2f} "
                    f"KID x1000 {1000 * res['kid']:.1f}")  # fmt: skip
            if seed == seeds[0]:
                final_grid(name, run_dir, args.out)
        # every recipe of the folder: the ones asked for first, then any from earlier calls
        shown = recipes + [r for r in dict.fromkeys(x["recipe"] for x in rows) if r not in recipes]
        print(summarise(rows, shown, args.out), flush=True)
    return 0 if all(math.isfinite(r["fid"]) for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
