"""The `facegan sample` core: `SampleConfig` -> `sample` (per-seed PNGs, grid, interpolation
strips, vector arithmetic, attribute edits; split across processes), and a conditional G with
its condition fixed.

Above `directions` (an edit reads the run's directions) and `artifacts` (where the generator
comes from); pictures are made by `images`, the latent-space maths lives in `latent`. It never
imports train/.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

SAMPLE_DEFAULT_GRID = (8, 8)
EDIT_DEFAULT_N = 8
EDIT_GRID_MAX = 16  # columns (seeds) in edits.png; every seed still gets its own strip


def seed_png_name(seed: int) -> str:
    """`seed000042.png`: the same seed always maps to the same file name."""
    return f"seed{seed:06d}.png"


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
    from facegan_dist.artifacts import load_any_generator
    from facegan_dist.errors import CheckpointError, ConfigError
    from facegan_dist.images import generate, grid_uint8, save_png, strip_uint8, to_uint8
    from facegan_dist.paths import atomic_write_text, out_dir

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
    out = out_dir(Path(cfg.out), "--out")  # every rank
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
