"""Turn generator outputs into pictures: seed -> z, image grids as uint8, PNG files, and the
`facegan sample` core (find and load a run's generator, per-seed PNGs, grid, interpolation strips,
vector arithmetic, attribute edits; split across processes).

Shared by training (fixed-noise grids), `facegan sample`, `facegan directions` and evaluation. It
never imports train/ (train imports it). The latent-space maths lives in `latent.py`.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor


def fixed_noise(n: int, z_dim: int, seed: int) -> Tensor:
    """The same [n, z_dim] noise for a given seed on every machine (drawn on CPU)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, z_dim, generator=g)


def to_uint8(images: Tensor) -> Tensor:
    """[-1, 1] float images -> uint8 [0, 255] (W&B 0.31 no longer rescales floats)."""
    return ((images.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)


def grid_uint8(images: Tensor, nrow: int | None = None, padding: int = 2) -> Tensor:
    """A [3, H, W] uint8 grid from [B, 3, S, S] images (uint8, or floats in [-1, 1])."""
    from torchvision.utils import make_grid

    if images.dtype != torch.uint8:
        images = to_uint8(images)
    nrow = nrow or max(1, int(math.ceil(math.sqrt(images.shape[0]))))
    return make_grid(images.cpu(), nrow=nrow, padding=padding, pad_value=0)


def save_png(image_chw_uint8: Tensor, path: Path) -> Path:
    """Write a [3, H, W] uint8 tensor as PNG (atomically: temp name + rename; a failed write
    leaves no temp file)."""
    from PIL import Image

    from facegan_dist.export import atomic_path

    path.parent.mkdir(parents=True, exist_ok=True)
    arr = image_chw_uint8.permute(1, 2, 0).contiguous().numpy()
    with atomic_path(path) as tmp:
        Image.fromarray(arr).save(tmp, format="PNG")
    return path


@torch.no_grad()
def generate(G: torch.nn.Module, z: Tensor, batch: int = 256) -> Tensor:
    """G(z) in eval mode, in chunks, returned on CPU as float in [-1, 1]."""
    was_training = G.training
    G.eval()
    device = next(G.parameters()).device
    try:
        out = [G(z[i : i + batch].to(device)).float().cpu() for i in range(0, z.shape[0], batch)]
    finally:
        G.train(was_training)
    return torch.cat(out)


# ---------------------------------------------------------------------------------------------
# Using a trained generator: where it comes from, seed-addressed images, strips and grids, and
# the `facegan sample` core (`SampleConfig` -> `sample`).
# ---------------------------------------------------------------------------------------------

# The checkpoint layout of train/checkpoint.py, restated here because sampling never imports
# train/ (train imports sampling; tests/unit/test_sampling.py checks the two agree).
CHECKPOINTS_DIR = "checkpoints"
CKPT_STATE_NAME = "trainer_state.json"
CKPT_G_NAME = "model.safetensors"  # accelerate's save_state: the first prepared model is G
CKPT_EMA_NAME = "ema.safetensors"
_CKPT_RE = re.compile(r"^step-(\d{9})$")
EXPORT_DIR = "export"
SAMPLE_DEFAULT_GRID = (8, 8)
EDIT_DEFAULT_N = 8
EDIT_GRID_MAX = 16  # columns (seeds) in edits.png; every seed still gets its own strip


def seed_png_name(seed: int) -> str:
    """`seed000042.png`: the same seed always maps to the same file name."""
    return f"seed{seed:06d}.png"


def newest_checkpoint(run_dir: Path) -> Path | None:
    """The newest complete checkpoint folder in run_dir/checkpoints (None if there is none)."""
    root = Path(run_dir) / CHECKPOINTS_DIR
    if not root.is_dir():
        return None
    found = [
        p
        for p in root.iterdir()
        if p.is_dir() and _CKPT_RE.match(p.name) and (p / CKPT_STATE_NAME).is_file()
    ]
    return max(found, key=lambda p: int(_CKPT_RE.match(p.name).group(1))) if found else None


def find_generator(path: Path) -> tuple[str, Path, Path | None]:
    """RUN_DIR | RUN_DIR/export | a checkpoint folder -> (kind, folder, run_dir).

    kind is "export" or "checkpoint". A run folder uses its export when there is one (the
    final G), else its newest complete checkpoint. run_dir is where `directions.safetensors`
    lives (None for a folder outside a run)."""
    from facegan_dist.errors import CheckpointError
    from facegan_dist.export import META_NAME, WEIGHTS_NAME

    path = Path(path)
    if path.is_file() and path.suffix == ".safetensors":
        path = path.parent
    if not path.exists():
        raise CheckpointError(f"{path}: no such run folder or checkpoint")
    if not path.is_dir():
        raise CheckpointError(f"{path}: not a run folder, export folder or checkpoint folder")
    if (path / META_NAME).is_file():
        return "export", path, path.parent if path.name == EXPORT_DIR else path
    if (path / CKPT_STATE_NAME).is_file():
        run_dir = path.parent.parent if path.parent.name == CHECKPOINTS_DIR else path
        return "checkpoint", path, run_dir
    if (path / EXPORT_DIR / META_NAME).is_file():
        return "export", path / EXPORT_DIR, path
    ckpt = newest_checkpoint(path)
    if ckpt is not None:
        return "checkpoint", ckpt, path
    for folder in (path, path / EXPORT_DIR):  # weights without their config: name the config
        if (folder / WEIGHTS_NAME).is_file():
            raise CheckpointError(f"{folder / META_NAME}: missing (it describes {WEIGHTS_NAME})")
    raise CheckpointError(
        f"{path}: no {EXPORT_DIR}/{META_NAME} and no complete checkpoint in "
        f"{CHECKPOINTS_DIR}/ (train first, or pass a checkpoint folder)"
    )


def _load_checkpoint_generator(ckpt: Path, device, ema: bool):
    import json

    from facegan_dist.errors import CheckpointError
    from facegan_dist.export import build_checked, check_meta, load_weights

    state_path = ckpt / CKPT_STATE_NAME
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{state_path}: unreadable ({exc})") from None
    meta = state.get("generator") if isinstance(state, dict) else None
    if not isinstance(meta, dict):
        raise CheckpointError(
            f"{state_path}: no 'generator' entry (a checkpoint from an older "
            "version); sample its run's export/ instead"
        )
    check_meta(meta, state_path)
    use_ema = ema and (ckpt / CKPT_EMA_NAME).is_file()
    weights = ckpt / (CKPT_EMA_NAME if use_ema else CKPT_G_NAME)
    if not weights.is_file():
        raise CheckpointError(f"{ckpt}: no {CKPT_G_NAME} (incomplete checkpoint)")
    G, _ = build_checked(meta, state_path)
    load_weights(G, weights, prefixes=("module.", "_orig_mod."))  # DDP / torch.compile wrappers
    return G.to(device).eval(), {**meta, "ema": use_ema}


def load_any_generator(path: Path, device="cpu", ema: bool = True):
    """(G in eval mode, meta, info) from a run folder, an export folder or a checkpoint folder.

    `ema=True` takes the EMA of G when the run kept one (the export's `generator.safetensors`,
    a checkpoint's `ema.safetensors`), else G; `ema=False` always takes the raw G. `meta["ema"]`
    says which one was loaded; info = {"kind", "path", "run_dir"}."""
    from facegan_dist.export import load_generator

    kind, folder, run_dir = find_generator(path)
    if kind == "export":
        G, meta = load_generator(folder, device, ema=ema)
        meta = {**meta, "ema": bool(ema and meta.get("ema", False))}
    else:
        G, meta = _load_checkpoint_generator(folder, device, ema)
    info = {"kind": kind, "path": folder, "run_dir": run_dir, "bn_recalibrated": False}
    if meta["ema"] and "ema_bn_calibration" not in meta and not meta.get("condition"):
        # Written before the EMA had BatchNorm statistics of its own (they were copied from
        # the raw G): re-estimate them now, as training does today (models/bn.py).
        from facegan_dist.models.bn import recalibrate_bn

        info["bn_recalibrated"] = recalibrate_bn(G)
    return G, meta, info


class ConditionedG(torch.nn.Module):
    """A conditional G with its condition fixed: G'(z) = G(z, c) for every z (so seeds, grids,
    interpolation and arithmetic work unchanged on conditional models)."""

    def __init__(self, G: torch.nn.Module, c: Tensor) -> None:
        super().__init__()
        self.G = G
        self.register_buffer("c", c.reshape(1, -1).float())

    def forward(self, z: Tensor) -> Tensor:
        return self.G(z, self.c.expand(z.shape[0], -1))


def parse_attrs(text: str | None, condition: list[str], flag: str = "--attrs") -> Tensor:
    """ "Smiling=1,Eyeglasses=0" -> a {0,1} vector over the model's condition attributes; the
    attributes not named are 0 (absent)."""
    from facegan_dist.errors import ConfigError

    c = torch.zeros(len(condition))
    for part in (text or "").split(","):
        if not part.strip():
            continue
        name, _, value = part.partition("=")
        name = name.strip()
        if name not in condition:
            raise ConfigError(f"{flag}: {name!r} is not an attribute the model is conditioned on")
        if value.strip() not in ("0", "1"):
            raise ConfigError(f"{flag}: {part.strip()!r} must be ATTR=0 or ATTR=1")
        c[condition.index(name)] = float(value.strip())
    return c


def condition_generator(G: torch.nn.Module, meta: dict, attrs: str | None):
    """G itself for an unconditional model; a ConditionedG for a conditional one."""
    from facegan_dist.errors import ConfigError

    condition = list(meta.get("condition") or [])
    if not condition:
        if attrs:
            raise ConfigError("--attrs needs a conditional model (trained with --condition)")
        return G
    return ConditionedG(G, parse_attrs(attrs, condition)).to(next(G.parameters()).device).eval()


def load_unconditional_generator(path: Path, device="cpu", ema: bool = True):
    """load_any_generator for the commands that draw G(z) without a condition (`directions`: on
    a conditional model the condition itself is the attribute control): a conditional generator
    is refused with one line."""
    from facegan_dist.errors import ConfigError

    G, meta, info = load_any_generator(path, device, ema=ema)
    if meta.get("condition"):
        raise ConfigError(
            f"{path}: a conditional generator; this command supports unconditional models only "
            "(use `facegan sample --attrs` to draw from it)"
        )
    return G, meta, info


# ---- seed-addressed images ----


def seed_images(
    G: torch.nn.Module,
    seeds: list[int] | range,
    *,
    psi: float = 1.0,
    mode: str = "shrink",
    batch: int = 64,
) -> Tensor:
    """[len(seeds), 3, S, S] float in [-1, 1] on CPU; image i depends on seeds[i] only (G in
    eval mode: BatchNorm uses its running statistics, dropout is off)."""
    from facegan_dist.latent import truncated_z

    return generate(G, truncated_z(seeds, G.z_dim, psi, mode), batch=batch)


def strip_uint8(images: Tensor, padding: int = 2) -> Tensor:
    """One row of images -> [3, H, W] uint8."""
    return grid_uint8(images, nrow=images.shape[0], padding=padding)


def parse_grid(text: str, flag: str = "--grid") -> tuple[int, int]:
    """ "8x8" -> (rows, cols), both >= 1."""
    from facegan_dist.errors import ConfigError

    m = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not m:
        raise ConfigError(f"{flag} {text!r}: expected ROWSxCOLS, e.g. 8x8")
    rows, cols = int(m.group(1)), int(m.group(2))
    if rows < 1 or cols < 1:
        raise ConfigError(f"{flag} {text}: rows and columns must be at least 1")
    if rows * cols > 10_000:
        raise ConfigError(f"{flag} {text}: at most 10,000 images in one grid")
    return rows, cols


# ---- `facegan sample` ----


@dataclass(frozen=True)
class SampleConfig:
    """Everything `facegan sample` does; see docs/SAMPLING.md for each field's flag."""

    source: Path  # run folder, export folder or checkpoint folder
    out: Path
    n: int | None = None  # --n: per-seed PNGs for seeds seed..seed+n-1
    seed: int = 0  # --seed: first seed (with --n, --grid, --edit)
    seeds: str | None = None  # --seeds "0-99" / "1,5,7-9": per-seed PNGs for these seeds
    grid: str | None = None  # --grid RxC
    batch: int = 64  # images per G forward (per process)
    ema: bool = True
    truncation: float = 1.0
    truncation_mode: str = "shrink"
    interpolate: tuple[str, ...] = ()  # "A-B" / "A-B,C-D" per entry
    steps: int = 8
    interp: str = "slerp"
    arith: tuple[str, ...] = ()
    edit: tuple[str, ...] = ()  # "ATTR=AMOUNT" / "A=1,B=-2" per entry: one "after" each
    directions: Path | None = None  # default: <run dir>/directions.safetensors
    attrs: str | None = None  # conditional models: "Smiling=1,Eyeglasses=0" (others 0)

    def plan(self) -> dict:
        """Validate and resolve the seeds/pairs/expressions (no file is read)."""
        from facegan_dist import latent
        from facegan_dist.errors import ConfigError

        if self.n is not None and self.n < 1:
            raise ConfigError(f"--n {self.n} must be at least 1")
        if self.n is not None and self.seeds is not None:
            raise ConfigError("give either --seeds or --seed/--n, not both")
        if not 0 <= self.seed <= latent.MAX_SEED:
            raise ConfigError(f"--seed {self.seed} must be in [0, {latent.MAX_SEED}]")
        if self.batch < 1:
            raise ConfigError(f"--batch {self.batch} must be at least 1")
        latent.check_truncation(self.truncation, self.truncation_mode)
        if self.interp not in latent.INTERP_MODES:
            raise ConfigError(f"--interp {self.interp!r} must be one of lerp, slerp")
        if self.steps < 2:
            raise ConfigError(f"--steps {self.steps} must be at least 2 (the two endpoints)")
        if self.seeds is not None:
            seeds = latent.parse_seeds(self.seeds)
        elif self.n is not None:
            seeds = list(range(self.seed, self.seed + self.n))
        else:
            seeds = None
        grid = parse_grid(self.grid) if self.grid is not None else None
        pairs = [p for text in self.interpolate for p in latent.parse_pairs(text)]
        ariths = [latent.parse_arith(text) for text in self.arith]
        nothing = seeds is None and grid is None and not pairs and not ariths and not self.edit
        if nothing:
            grid = SAMPLE_DEFAULT_GRID
        grid_seeds = None
        if grid is not None:
            k = grid[0] * grid[1]
            if seeds is None:
                grid_seeds = list(range(self.seed, self.seed + k))
            elif len(seeds) < k:
                raise ConfigError(f"--grid {grid[0]}x{grid[1]} needs {k} seeds, got {len(seeds)}")
            else:
                grid_seeds = seeds[:k]
        edit_seeds = None
        if self.edit:
            edit_seeds = seeds or list(range(self.seed, self.seed + EDIT_DEFAULT_N))
        return {
            "seeds": seeds,  # per-seed PNGs (None: none)
            "grid": grid,
            "grid_seeds": grid_seeds,
            "pairs": pairs,
            "ariths": ariths,
            "edit_seeds": edit_seeds,
        }


def load_directions_for(cfg_directions: Path | None, run_dir: Path | None):
    """(directions [A, z_dim], attribute names, meta) for --edit."""
    from facegan_dist.directions import DIRECTIONS_NAME, load_directions
    from facegan_dist.errors import CheckpointError

    path = cfg_directions or (run_dir / DIRECTIONS_NAME if run_dir is not None else None)
    if path is None or not Path(path).is_file():
        where = path if path is not None else f"<run>/{DIRECTIONS_NAME}"
        raise CheckpointError(
            f"--edit needs attribute directions: {where} not found "
            "(run `facegan directions RUN_DIR --data SHARD_DIR` first, or pass --directions)"
        )
    return load_directions(Path(path))


def sample(cfg: SampleConfig, state=None) -> dict:
    """Run `facegan sample`; every rank calls it. Returns what this rank wrote.

    Work split: the per-seed images, interpolation pairs, arithmetic expressions and edit seeds
    are each split across ranks (`dist.split_items`), and every rank writes its own PNGs: a file
    depends on its seed(s) alone, so no rank waits for another. The grid and edits.png need
    images from every rank: those are gathered (uint8) and written by rank 0."""
    import json

    from facegan_dist import dist, latent
    from facegan_dist.errors import CheckpointError, ConfigError
    from facegan_dist.export import atomic_write_text, writable_dir

    plan = cfg.plan()
    rank, world = dist.world(state)
    device = state.device if state is not None else "cpu"
    G, meta, info = load_any_generator(cfg.source, device, ema=cfg.ema)
    G = condition_generator(G, meta, cfg.attrs)
    z_dim, psi, mode, bs = meta["z_dim"], cfg.truncation, cfg.truncation_mode, cfg.batch
    edits: list[dict[str, float]] = []
    if plan["edit_seeds"] is not None:
        directions, names, dmeta = load_directions_for(cfg.directions, info["run_dir"])
        if directions.shape[1] != z_dim:
            raise CheckpointError(
                f"{cfg.directions or info['run_dir']}: directions have z_dim "
                f"{directions.shape[1]}, the generator has {z_dim}"
            )
        usable = dmeta.get("usable", {})
        for text in cfg.edit:
            edit = latent.parse_edit(text, names)
            for name in edit:
                if usable.get(name) is False or float(directions[names.index(name)].norm()) == 0:
                    raise ConfigError(
                        f"--edit {name}: no direction was found for it (too few generated "
                        "faces of one class when `facegan directions` ran)"
                    )
            edits.append(edit)
    # inputs first (nothing is created for a bad source), then the output, then the work
    out = writable_dir(Path(cfg.out), "--out")  # every rank
    written: list[Path] = []

    def z_of(seeds: list[int]) -> Tensor:
        return latent.truncated_z(seeds, z_dim, psi, mode)

    # 1. one PNG per seed (each rank its own share)
    if plan["seeds"] is not None:
        mine = dist.split_items(state, plan["seeds"])
        for i in range(0, len(mine), 1024):  # bounded memory for --n 100000
            chunk = mine[i : i + 1024]
            for s, img in zip(chunk, to_uint8(generate(G, z_of(chunk), bs)), strict=True):
                written.append(save_png(img, out / seed_png_name(s)))
    # 2. the grid (gathered to rank 0)
    if plan["grid"] is not None:
        gs = plan["grid_seeds"]
        mine = dist.split_items(state, gs)
        S = meta["resolution"]
        imgs = torch.empty(0, 3, S, S, dtype=torch.uint8)  # a rank may get no grid seed
        if mine:
            imgs = to_uint8(generate(G, z_of(mine), bs))
        every = dist.gather_rows(state, imgs, len(gs))
        if dist.is_main(state):
            written.append(save_png(grid_uint8(every, nrow=plan["grid"][1]), out / "grid.png"))
    # 3. interpolation strips, one per pair
    for a, b in dist.split_items(state, plan["pairs"]):
        za, zb = z_of([a, b])
        path = out / f"interp-{a:06d}-{b:06d}.png"
        strip = to_uint8(generate(G, latent.interpolate(za, zb, cfg.steps, cfg.interp), bs))
        written.append(save_png(strip_uint8(strip), path))
    # 4. vector arithmetic: [mean of group 1, ..., mean of group T, result]
    for idx, terms in dist.split_items(state, list(enumerate(plan["ariths"]))):
        seeds = sorted({s for t in terms for s in t.seeds})
        lat = dict(zip(seeds, z_of(seeds), strict=True))
        means, result = latent.arith_z(terms, lat)
        strip = to_uint8(generate(G, torch.cat([means, result[None]]), bs))
        written.append(save_png(strip_uint8(strip), out / f"arith-{idx:02d}.png"))
    # 5. attribute edits: per seed [before, after edit 1, ...]; edits.png = rows of those
    if plan["edit_seeds"] is not None:
        es = plan["edit_seeds"]
        mine = dist.split_items(state, es)
        k = 1 + len(edits)
        S = meta["resolution"]
        rows = torch.empty(len(mine), k, 3, S, S, dtype=torch.uint8)
        if mine:
            z0 = z_of(mine)
            variants = [z0] + [latent.apply_edit(z0, e, directions, names) for e in edits]
            imgs = to_uint8(generate(G, torch.cat(variants), bs)).view(k, len(mine), 3, S, S)
            rows = imgs.transpose(0, 1).contiguous()
            for s, row in zip(mine, rows, strict=True):
                written.append(save_png(strip_uint8(row), out / f"edit-{seed_png_name(s)}"))
        shown = min(len(es), EDIT_GRID_MAX)
        every = dist.gather_rows(state, rows, len(es))[:shown]
        if dist.is_main(state):
            grid = every.transpose(0, 1).reshape(k * shown, 3, S, S)
            written.append(save_png(grid_uint8(grid, nrow=shown), out / "edits.png"))
    summary = {
        "source": str(info["path"]),
        "kind": info["kind"],
        "ema": meta["ema"],
        "truncation": psi,
        "truncation_mode": mode,
        "world_size": world,
        "edits": edits,
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in cfg.__dict__.items()},
    }
    if dist.is_main(state):
        atomic_write_text(out / "sample.json", json.dumps(summary, indent=2, default=str))
    dist.barrier(state)
    return {**summary, "rank": rank, "written": written}
