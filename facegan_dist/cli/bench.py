"""`facegan bench data|train`: throughput numbers to quote (docs/PERFORMANCE.md)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from facegan_dist.cli.app import app, errors_to_exit, one_of
from facegan_dist.config import DATA_CACHES, PRECISIONS, PRESETS, SHARD_FORMATS, SHARD_SIZES

# bench.bench_presets(), restated without importing torch (tests/cli/test_help.py: they agree)
BENCH_PRESETS = tuple(name for name, p in PRESETS.items() if not p.get("condition"))

bench_app = typer.Typer(
    help="Benchmarks: sharding/reading throughput and training images/s. Print a JSON line.",
    no_args_is_help=True,
)
app.add_typer(bench_app, name="bench")


@bench_app.command("data")
def bench_data_cmd(
    count: Annotated[int, typer.Option(help="Synthetic 178x218 JPEGs to shard.")] = 2000,
    size: Annotated[int, typer.Option(help=f"Output size in px: {one_of(SHARD_SIZES)}.")] = 64,
    workers: Annotated[
        int | None, typer.Option(help="Shard workers. \\[default: all cores]")
    ] = None,
    read_seconds: Annotated[float, typer.Option(help="Seconds of reading to time.")] = 5.0,
    fmt: Annotated[str, typer.Option("--format", help=f"{one_of(SHARD_FORMATS)}.")] = "jpg",
    work_dir: Annotated[
        Path | None,
        typer.Option(
            help="Folder for the temp files (removed afterwards). \\[default: the system's "
            "temp folder]",
            show_default=False,
        ),
    ] = None,
    data: Annotated[
        str | None,
        typer.Option(
            help="A URL shard folder (https://, s3://, gs://, hf://, file://, pipe:CMD with "
            "{name}): time reading it instead of sharding synthetic images.",
            show_default=False,
        ),
    ] = None,
    local: Annotated[
        Path | None,
        typer.Option(
            help="With --data: the same shards on disk, read beside it.", show_default=False
        ),
    ] = None,
    cache_dir: Annotated[
        Path | None,
        typer.Option(
            help="With --data: fill this shard cache (train's --cache-dir), then time reading "
            "it warm.",
            show_default=False,
        ),
    ] = None,
    rounds: Annotated[
        int, typer.Option(help="With --data: rounds in which the sources take turns (medians).")
    ] = 3,
) -> None:
    """Sharding images/s (decode+crop+resize+encode, whole pipeline) and reading images/s.

    With --data URL: the training reader's images/s over the URL (streamed), beside --local
    (the same shards on disk) and/or the warm --cache-dir; each read as a new loader process
    would, first pass (tar headers parsed, cache files hashed) and later passes apart."""
    from facegan_dist.bench import bench_data, bench_data_url, to_json_line
    from facegan_dist.errors import ConfigError

    if data is not None:
        with errors_to_exit():
            r = bench_data_url(data, local, cache_dir, read_seconds, rounds)
        _print_url_bench(r)
        typer.echo(to_json_line(r))
        return
    with errors_to_exit():
        if local is not None or cache_dir is not None:
            flag = "--local" if local is not None else "--cache-dir"
            raise ConfigError(f"{flag} goes with --data URL")
        if count < 10:
            raise ConfigError(f"--count {count} must be at least 10")
        r = bench_data(count, size, workers, read_seconds, fmt, work_dir)
    typer.echo(
        f"shard: {r['shard_images_per_s_per_core']:,.0f} images/s per core (one process), "
        f"{r['shard_images_per_s']:,.0f} images/s with {r['workers']} workers "
        f"-> all of CelebA in {r['celeba_shard_minutes_projected']:.1f} min"
    )
    typer.echo(
        f"read:  {r['read_images_per_s_per_process']:,.0f} images/s per loader process "
        f"({r['read_images_per_cpu_s']:,.0f} per CPU-second), {size}px {fmt}"
    )
    typer.echo(to_json_line(r))


def _print_url_bench(r: dict) -> None:
    def line(label: str, where: str, m: dict) -> str:
        return (
            f"{label:<11}{where}: first pass {m['first_pass_images_per_s']:,.0f} images/s "
            f"({m['first_pass_images_per_cpu_s']:,.0f} per CPU-second), later passes "
            f"{m['images_per_s']:,.0f} images/s ({m['images_per_cpu_s']:,.0f} per CPU-second)"
        )

    typer.echo(
        f"{r['num_samples']:,} images of {r['image_size']} px ('{r['split']}'), batches of 256, "
        f"one loader process; load average {r['load_average']:.1f} on {r['cpu_count']} CPUs"
    )
    typer.echo(line("streamed", r["data"], r["streamed"]))
    if "cache" in r:
        c = r["cache"]
        typer.echo(line("warm cache", c["path"], c) + f"; filled in {c['fill_s']:.1f} s")
    if "local" in r:
        typer.echo(line("local", r["local"]["path"], r["local"]))
        for name in ("streamed", "cache"):
            if f"{name}_over_local" in r:
                typer.echo(
                    f"{name} / local, later passes: {r[f'{name}_over_local']:.2f} "
                    f"({r[f'{name}_over_local_cpu']:.2f} per CPU-second)"
                )


@bench_app.command("train")
def bench_train_cmd(
    preset: Annotated[
        str,
        typer.Option(
            help=f"Model/loss/optimizer preset (train's; conditional ones excluded): "
            f"{one_of(BENCH_PRESETS)}."
        ),
    ] = "tutorial",
    batch: Annotated[
        int, typer.Option(help="Batch per process (under accelerate launch: per device).")
    ] = 64,
    resolution: Annotated[int, typer.Option(help="Image size in px.")] = 64,
    precision: Annotated[str, typer.Option(help=f"{one_of(PRECISIONS)}.")] = "no",
    steps: Annotated[int, typer.Option(help="Timed steps per round.")] = 20,
    warmup: Annotated[int, typer.Option(help="Untimed warm-up steps.")] = 3,
    rounds: Annotated[int, typer.Option(help="Alternating rounds (median reported).")] = 3,
    epochs: Annotated[int, typer.Option(help="Projection: epochs.")] = 400,
    dataset_images: Annotated[int, typer.Option(help="Projection: dataset size.")] = 202_599,
    g_width: Annotated[int | None, typer.Option(help="Override the preset's G width.")] = None,
    d_width: Annotated[int | None, typer.Option(help="Override the preset's D width.")] = None,
    data: Annotated[
        Path | None, typer.Option(help="Shard folder: also time the real data pipeline.")
    ] = None,
    data_cache: Annotated[
        str, typer.Option(help=f"With --data: {one_of(DATA_CACHES)} (none streams the shards).")
    ] = "none",
    num_workers: Annotated[
        int | None,
        typer.Option(help="With --data: loader workers. \\[default: 2; CUDA: up to 8]"),
    ] = None,
    compile: Annotated[bool, typer.Option("--compile/--no-compile", help="torch.compile.")] = False,
    cuda_graphs: Annotated[
        bool, typer.Option("--cuda-graphs/--no-cuda-graphs", help="The step as a CUDA graph.")
    ] = False,
    channels_last: Annotated[
        bool | None,
        typer.Option("--channels-last/--no-channels-last", help="\\[default: CUDA and CPU]"),
    ] = None,
    tf32: Annotated[bool | None, typer.Option("--tf32/--no-tf32", help="\\[default: CUDA]")] = None,
    fused_adam: Annotated[
        bool | None, typer.Option("--fused-adam/--no-fused-adam", help="\\[default: CUDA]")
    ] = None,
    check_steps: Annotated[
        int,
        typer.Option(help="Steps of the agreement check against the eager fp32 step (0 = skip)."),
    ] = 2,
) -> None:
    """Our training step vs a plain eager PyTorch loop (same models), synthetic batches.

    Under `accelerate launch --num_processes N facegan_dist bench train ...` it times the DDP
    step with --batch per process and sums images/s over the processes: compare with a
    one-process run for the scaling efficiency."""
    from facegan_dist.bench import bench_train, to_json_line
    from facegan_dist.errors import ConfigError

    with errors_to_exit():
        for flag, v in (("--steps", steps), ("--rounds", rounds), ("--batch", batch)):
            if v < 1:
                raise ConfigError(f"{flag} {v} must be at least 1")
        if check_steps < 0:
            raise ConfigError(f"--check-steps {check_steps} must be 0 or more")
        overrides = {k: v for k, v in (("g_width", g_width), ("d_width", d_width)) if v}
        overrides.update(
            compile=compile, cuda_graphs=cuda_graphs, channels_last=channels_last, tf32=tf32,
            fused_adam=fused_adam, data_cache=data_cache, num_workers=num_workers,
        )  # fmt: skip
        r = bench_train(preset, batch, resolution, precision, steps, warmup, rounds, epochs,
                        dataset_images, overrides, data, check_steps)  # fmt: skip
    if r is None:  # not the main process of a multi-process launch
        return
    procs = f" x {r['world_size']} processes (DDP)" if r["world_size"] > 1 else ""
    typer.echo(
        f"{r['arch']} {r['resolution']}px batch {batch}{procs} {precision} on {r['device']} "
        f"({r['threads']} threads): ours {r['ours_images_per_s']:,.0f} images/s "
        f"({r['ours_step_ms']:.1f} ms/step), plain eager loop {r['plain_images_per_s']:,.0f} "
        f"images/s -> ratio {r['ratio_ours_over_plain']:.2f}"
    )
    if r["device"].startswith("cpu"):
        typer.echo(
            f"CPU time per step: ours {r['ours_cpu_ms_per_step']:.0f} ms, plain "
            f"{r['plain_cpu_ms_per_step']:.0f} ms -> ratio "
            f"{r['ratio_cpu_time_plain_over_ours']:.2f} (less sensitive to other load)"
        )
    if r.get("check_skipped"):
        typer.echo(f"agreement check skipped: {r['check_skipped']}")
    if r["check_ok"] is not None:
        verdict = "ok" if r["check_ok"] else "OUTSIDE TOLERANCE"
        typer.echo(
            f"{'' if r['check_ok'] else 'warning: '}agreement with the eager fp32 step over "
            f"{r['check_steps']} steps: max |loss diff| {r['check_max_loss_diff']:.2e} "
            f"(tolerance {r['check_tolerance']:.0e}, {verdict}), G weights differ by "
            f"{r['check_weight_rel_diff']:.2e} of how far they moved"
        )
    if r["ours_end_to_end_images_per_s"]:
        typer.echo(
            f"end to end with {r['data']} ({r['data_cache']}): "
            f"{r['ours_end_to_end_images_per_s']:,.0f} images/s"
        )
    typer.echo(
        f"projected: {epochs} epochs x {dataset_images:,} images = "
        f"{r['projected_hours']:.1f} h at this rate; peak memory {r['peak_memory_mb']:,.0f} MB"
    )
    typer.echo(to_json_line(r))
