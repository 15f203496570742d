"""The latent space: seed -> z, truncation, interpolation, vector arithmetic, attribute edits.

Pure tensor functions (no model, no files, no ranks), shared by `facegan sample`, `facegan
directions`, `facegan evaluate` and the training loop.

Seed addressing. The latent of seed s is `torch.randn(z_dim, generator=torch.Generator()
.manual_seed(s))`, drawn on the CPU and moved afterwards: it depends on the seed alone, never on
the batch it travels in, the process that draws it or the device, so the same seed is the same
face in every command, batch size and world size.

Truncation (notes-gans-it: the fidelity/variety trade-off of sampling near the mode of N(0, I)).
Two modes, PSI = 1 meaning "off" in both:
- `shrink`: z <- psi * z, i.e. pull z towards the mean of N(0, I), which is 0 (StyleGAN's trick
  with the mean latent known exactly). PSI = 0 gives the same face for every seed.
- `resample`: the notes' rule, "repeat the draw while ||z|| > u". The threshold u is the
  PSI-quantile of ||z|| under N(0, I) (chi distribution with z_dim degrees of freedom), so PSI is
  the fraction of draws kept: 0.5 keeps the half of the draws with the smallest norm. Redraws are
  whole vectors and continue the seed's own generator, so they are deterministic per seed, and a
  seed whose first draw is accepted keeps its untruncated z. PSI must be > 0 here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
from torch import Tensor

from facegan_dist.errors import ConfigError

TRUNCATION_MODES = ("shrink", "resample")
INTERP_MODES = ("lerp", "slerp")
MAX_SEED = 2**63 - 1
MIN_RESAMPLE_PSI = 1e-3  # below this, resampling would need ~1000+ draws per seed


# ---- seeds ----


def parse_seeds(text: str, flag: str = "--seeds") -> list[int]:
    """ "0-99" or "1,5,7-9" -> [0..99] / [1, 5, 7, 8, 9] (order kept, duplicates dropped)."""
    seeds: list[int] = []
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(not p for p in parts):
        raise ConfigError(f"{flag} {text!r}: expected seeds like 0-99 or 1,5,7-9")
    for part in parts:
        m = re.fullmatch(r"(\d+)(?:\s*-\s*(\d+))?", part)
        if not m:
            raise ConfigError(f"{flag} {text!r}: {part!r} is not a seed or a range like 7-9")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) is not None else lo
        if hi < lo:
            raise ConfigError(f"{flag} {text!r}: range {part!r} runs backwards")
        if hi > MAX_SEED:
            raise ConfigError(f"{flag} {text!r}: seeds must be at most {MAX_SEED}")
        if hi - lo >= 10_000_000:
            raise ConfigError(f"{flag} {text!r}: range {part!r} is too long (10 million at most)")
        seeds.extend(range(lo, hi + 1))
    return list(dict.fromkeys(seeds))


def seed_generator(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(int(seed))


def seed_z(seeds: list[int] | range, z_dim: int) -> Tensor:
    """[len(seeds), z_dim] float32 on CPU; row i depends on seeds[i] alone."""
    if not len(seeds):
        return torch.empty(0, z_dim)
    return torch.stack([torch.randn(z_dim, generator=seed_generator(s)) for s in seeds])


def fixed_noise(n: int, z_dim: int, seed: int) -> Tensor:
    """The same [n, z_dim] noise for a given seed on every machine (drawn on CPU): training's
    fixed-noise grid, one generator for all n rows (unlike `seed_z`)."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, z_dim, generator=g)


# ---- truncation ----


def norm_quantile(psi: float, z_dim: int) -> float:
    """u such that P(||z|| <= u) = psi for z ~ N(0, I_z_dim): inverts the chi-square CDF
    (regularised lower incomplete gamma) by bisection in float64."""
    if psi >= 1.0:
        return math.inf
    k = torch.tensor(z_dim / 2.0, dtype=torch.float64)
    lo, hi = 0.0, float(z_dim + 20.0 * math.sqrt(2.0 * z_dim) + 50.0)  # bounds on ||z||^2
    for _ in range(200):
        mid = 0.5 * (lo + hi)
        cdf = float(torch.special.gammainc(k, torch.tensor(mid / 2.0, dtype=torch.float64)))
        lo, hi = (mid, hi) if cdf < psi else (lo, mid)
    return math.sqrt(0.5 * (lo + hi))


def check_truncation(psi: float, mode: str) -> None:
    if mode not in TRUNCATION_MODES:
        modes = ", ".join(TRUNCATION_MODES)
        raise ConfigError(f"--truncation-mode {mode!r} must be one of {modes}")
    if not 0.0 <= psi <= 1.0 or math.isnan(psi):
        raise ConfigError(f"--truncation {psi} must be in [0, 1] (1 = off)")
    if mode == "resample" and psi < MIN_RESAMPLE_PSI:
        raise ConfigError(
            f"--truncation {psi} with --truncation-mode resample keeps a fraction psi of the "
            f"draws: use at least {MIN_RESAMPLE_PSI} (or --truncation-mode shrink)"
        )


def truncated_z(seeds: list[int] | range, z_dim: int, psi: float = 1.0, mode: str = "shrink"):
    """The latents of `seeds` with truncation applied ([N, z_dim] float32, CPU)."""
    check_truncation(psi, mode)
    if psi >= 1.0:
        return seed_z(seeds, z_dim)
    if mode == "shrink":
        return psi * seed_z(seeds, z_dim)  # the mean of N(0, I) is 0
    u = norm_quantile(psi, z_dim)
    rows = []
    for s in seeds:
        g = seed_generator(s)
        z = torch.randn(z_dim, generator=g)
        while float(z.norm()) > u:  # expected 1/psi draws
            z = torch.randn(z_dim, generator=g)
        rows.append(z)
    return torch.stack(rows) if rows else torch.empty(0, z_dim)


# ---- interpolation ----


def lerp(a: Tensor, b: Tensor, steps: int) -> Tensor:
    """[steps, z_dim]: a, ..., b on the straight line (the endpoints are exactly a and b)."""
    t = torch.linspace(0, 1, steps, dtype=a.dtype)[:, None]
    out = (1 - t) * a[None] + t * b[None]
    out[0], out[-1] = a, b
    return out


def slerp(a: Tensor, b: Tensor, steps: int) -> Tensor:
    """[steps, z_dim]: spherical interpolation (White 2016). A straight line between two
    Gaussian latents passes near the origin, where N(0, I) puts almost no mass in high
    dimension; the great circle keeps the norm typical. Falls back to lerp for (anti)parallel
    vectors."""
    a64, b64 = a.double(), b.double()
    cos = torch.dot(a64, b64) / (a64.norm() * b64.norm()).clamp_min(1e-12)
    omega = torch.arccos(cos.clamp(-1.0, 1.0))
    if float(torch.sin(omega).abs()) < 1e-6:
        return lerp(a, b, steps)
    t = torch.linspace(0, 1, steps, dtype=torch.float64)[:, None]
    s = torch.sin(omega)
    out = (torch.sin((1 - t) * omega) / s) * a64[None] + (torch.sin(t * omega) / s) * b64[None]
    out = out.to(a.dtype)
    out[0], out[-1] = a, b
    return out


def interpolate(a: Tensor, b: Tensor, steps: int, mode: str = "slerp") -> Tensor:
    if steps < 2:
        raise ConfigError(f"--steps {steps} must be at least 2 (the two endpoints)")
    if mode == "lerp":
        return lerp(a, b, steps)
    if mode == "slerp":
        return slerp(a, b, steps)
    raise ConfigError(f"--interp {mode!r} must be one of {', '.join(INTERP_MODES)}")


def parse_pairs(text: str, flag: str = "--interpolate") -> list[tuple[int, int]]:
    """ "3-17" or "3-17,4-9" or "3 17" -> [(3, 17), (4, 9)]."""
    pairs = []
    chunks = [c.strip() for c in str(text).split(",")]
    if len(chunks) == 1 and re.fullmatch(r"\d+\s+\d+", chunks[0]):
        chunks = ["-".join(chunks[0].split())]
    for chunk in chunks:
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)", chunk)
        if not m:
            raise ConfigError(f"{flag} {text!r}: expected seed pairs like 3-17 or 3-17,4-9")
        a, b = int(m.group(1)), int(m.group(2))
        if max(a, b) > MAX_SEED:
            raise ConfigError(f"{flag} {text!r}: seeds must be at most {MAX_SEED}")
        pairs.append((a, b))
    return pairs


# ---- vector arithmetic ----


@dataclass(frozen=True)
class ArithTerm:
    sign: int  # +1 or -1
    seeds: tuple[int, ...]  # the group; its latent is the mean of the seeds' latents


def parse_arith(text: str, flag: str = "--arith") -> list[ArithTerm]:
    """ "1,2,3 - 4,5,6 + 7,8,9" -> three terms (+, -, +). Operators need spaces around them, so a
    group may still hold ranges ("0-3 - 8 + 9" = mean(0..3) - 8 + 9)."""
    tokens = re.split(r"\s+([+-])\s+", str(text).strip())
    if not tokens or not tokens[0].strip():
        raise ConfigError(f"{flag} {text!r}: expected seed groups like '1,2,3 - 4,5,6 + 7,8,9'")
    terms = [ArithTerm(+1, tuple(parse_seeds(tokens[0], flag=flag)))]
    for op, group in zip(tokens[1::2], tokens[2::2], strict=True):
        terms.append(ArithTerm(+1 if op == "+" else -1, tuple(parse_seeds(group, flag=flag))))
    return terms


def arith_z(terms: list[ArithTerm], latents: dict[int, Tensor]) -> tuple[Tensor, Tensor]:
    """(group means [T, z_dim], result [z_dim]) with result = sum_i sign_i * mean_i."""
    means = torch.stack([torch.stack([latents[s] for s in t.seeds]).mean(0) for t in terms])
    result = means[0] * terms[0].sign
    for t, m in zip(terms[1:], means[1:], strict=True):
        result = result + m if t.sign > 0 else result - m
    return means, result


# ---- attribute edits ----


def parse_edit(text: str, attribute_names: list[str], flag: str = "--edit") -> dict[str, float]:
    """ "Smiling=2" or "Smiling=2,Eyeglasses=1.5" -> {name: amount} (names checked)."""
    out: dict[str, float] = {}
    lower = {n.lower(): n for n in attribute_names}
    for part in str(text).split(","):
        name, sep, amount = part.strip().partition("=")
        name = name.strip()
        if not sep or not name:
            raise ConfigError(f"{flag} {text!r}: expected ATTR=AMOUNT, e.g. Smiling=2")
        real = lower.get(name.lower())
        if real is None:
            raise ConfigError(
                f"{flag} {text!r}: unknown attribute {name!r} "
                f"(known: {', '.join(attribute_names) or 'none'})"
            )
        try:
            value = float(amount)
        except ValueError:
            bad = amount.strip()
            raise ConfigError(f"{flag} {text!r}: amount {bad!r} is not a number") from None
        if not math.isfinite(value):
            raise ConfigError(f"{flag} {text!r}: amount must be finite")
        out[real] = out.get(real, 0.0) + value
    return out


def apply_edit(
    z: Tensor, edit: dict[str, float], directions: Tensor, attribute_names: list[str]
) -> Tensor:
    """z + sum_k amount_k * d_k for unit directions d_k ([A, z_dim]). As N(0, I) has unit
    variance along every unit vector, an amount is a number of standard deviations."""
    out = z.clone()
    for name, amount in edit.items():
        out = out + amount * directions[attribute_names.index(name)].to(z)
    return out
