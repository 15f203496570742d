"""dist.py in one CPU process: what each helper returns on one process, and its rank logic with
the collectives simulated (fake ranks, accelerate's own split), so the order of gathered rows,
the padding that is cut, per-rank seeds and rank-0-only printing are checked without launching
processes. tests/distributed/ runs the real 2-process collectives end to end.
"""

from __future__ import annotations

import random
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from accelerate import PartialState
from torch import nn

from facegan_dist import dist
from facegan_dist.errors import ConfigError, DataError


class Rank:
    """One rank of a simulated world: what dist.py reads from an Accelerator / PartialState.
    `split_between_processes` is accelerate's own (PartialState's), not a copy of it."""

    split_between_processes = PartialState.split_between_processes

    def __init__(self, index: int, world: int) -> None:
        self.process_index, self.num_processes = index, world
        self.is_main_process = index == 0
        self.device = torch.device("cpu")
        self.waits = 0

    def wait_for_everyone(self) -> None:
        self.waits += 1

    def reduce(self, t, reduction):  # a one-process Accelerator never reaches a collective
        raise AssertionError("a collective on one process")


def ranks(world: int) -> list[Rank]:
    return [Rank(r, world) for r in range(world)]


# ---- one process: no collectives, the values themselves ----


def test_one_process_helpers_return_their_input_without_a_collective():
    one = Rank(0, 1)  # reduce() raises: any collective would fail the test
    t = torch.tensor([1.0, 2.0])
    assert dist.reduce_sum(one, t) is t and dist.reduce_min(one, t) is t
    assert dist.any_rank(one, True) is True and dist.any_rank(one, False) is False
    obj = {"a": 1}
    assert dist.broadcast_object(one, obj) is obj and dist.broadcast_object(None, obj) is obj
    rows = torch.arange(6.0).view(3, 2)
    assert torch.equal(dist.gather_rows(None, rows, 3), rows)
    assert dist.split_items(None, "abc") == ["a", "b", "c"] == dist.split_items(one, "abc")
    assert dist.world(None) == (0, 1) and dist.world(Rank(1, 3)) == (1, 3)
    assert dist.is_main(None) and dist.is_main(Rank(0, 2)) and not dist.is_main(Rank(1, 2))
    dist.barrier(None)
    dist.barrier(one)
    assert one.waits == 0


def test_barrier_waits_only_with_several_processes():
    two = Rank(1, 2)
    dist.barrier(two)
    assert two.waits == 1


# ---- splitting work and gathering rows back in order ----


@pytest.mark.parametrize("world", [1, 2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 5, 7, 12])
def test_split_items_agrees_with_chunk_sizes_and_covers_every_item_once(n, world):
    items = list(range(n))
    shares = [dist.split_items(r, items) for r in ranks(world)]
    assert [len(s) for s in shares] == dist.chunk_sizes(n, world)
    assert [x for s in shares for x in s] == items  # contiguous, in rank order
    sizes = dist.chunk_sizes(n, world)
    assert sum(sizes) == n and max(sizes) - min(sizes) <= 1 and sizes == sorted(sizes)[::-1]


def simulate_gather(monkeypatch, shares: list[torch.Tensor]) -> None:
    """accelerate's pad_across_processes (zeros up to the longest share) and gather (every
    rank's padded tensor, rank by rank) over a world whose ranks hold `shares`."""
    import accelerate.utils

    longest = max(s.shape[0] for s in shares)

    def pad(t, dim=0):
        assert dim == 0
        return torch.cat([t, torch.zeros(longest - t.shape[0], *t.shape[1:], dtype=t.dtype)])

    monkeypatch.setattr(accelerate.utils, "pad_across_processes", pad)
    monkeypatch.setattr(accelerate.utils, "gather", lambda t: torch.cat([pad(s) for s in shares]))


@pytest.mark.parametrize("n, world", [(5, 2), (7, 3), (2, 3), (8, 4), (1, 2)])
def test_gather_rows_returns_every_row_in_order_without_the_padding(monkeypatch, n, world):
    rows = torch.arange(1.0, 1 + n * 3).view(n, 3)  # no zero row: padding would show
    world_ranks = ranks(world)
    shares = [rows[dist.split_items(r, list(range(n)))] for r in world_ranks]
    simulate_gather(monkeypatch, shares)
    for r, share in zip(world_ranks, shares, strict=True):
        assert torch.equal(dist.gather_rows(r, share, n), rows), r.process_index


def test_gather_rows_refuses_a_share_of_the_wrong_size(monkeypatch):
    simulate_gather(monkeypatch, [torch.ones(2, 1), torch.ones(2, 1)])
    with pytest.raises(ValueError, match=r"^rank 1: 2 rows, expected its share"):
        dist.gather_rows(Rank(1, 2), torch.ones(2, 1), 3)  # 3 rows: rank 1's share is 1


# ---- reductions ----


class Reducing(Rank):
    """A rank whose acc.reduce(sum) adds the other ranks' tensors (`others`)."""

    def __init__(self, index: int, world: int, others: list[torch.Tensor]) -> None:
        super().__init__(index, world)
        self.others = others

    def reduce(self, t, reduction):
        assert reduction == "sum"
        return t + sum(self.others)


def test_reduce_sum_any_rank_and_reduce_min_over_ranks(monkeypatch):
    mine, other = torch.tensor([1.0, 5.0]), torch.tensor([3.0, 2.0])
    acc = Reducing(0, 2, [other])
    assert torch.equal(dist.reduce_sum(acc, mine), torch.tensor([4.0, 7.0]))
    acc.others = [torch.tensor([1.0])]  # the other rank's flag is set
    assert dist.any_rank(acc, False) is True
    acc.others = [torch.tensor([0.0])]
    assert dist.any_rank(acc, False) is False and dist.any_rank(acc, True) is True

    import torch.distributed as tdist

    def all_reduce(t, op):  # in place, as torch's; the other rank holds `other`
        assert op == tdist.ReduceOp.MIN
        t.copy_(torch.minimum(t, other))

    monkeypatch.setattr(tdist, "all_reduce", all_reduce)
    assert torch.equal(dist.reduce_min(acc, mine), torch.tensor([1.0, 2.0]))
    assert torch.equal(mine, torch.tensor([1.0, 5.0]))  # the caller's tensor is untouched


def test_logged_stats_are_means_over_the_interval_and_the_ranks():
    """GANStep.take_stats divides dist.reduce_sum's totals by steps x ranks (train/loop.py logs
    these): rank 0 summed losses of 2 D and 2 G steps, rank 1 its own; no penalty -> no key."""
    from facegan_dist.train.steps import STAT_KEYS, GANStep

    mine = torch.tensor([2.0, 1.0, 0.4, 6.0, 0.8, 0.0])  # per STAT_KEYS
    other = torch.tensor([4.0, 1.4, 0.0, 2.0, 0.4, 0.0])
    acc = Reducing(0, 2, [other])
    step = SimpleNamespace(acc=acc, stats_sum=mine.clone(), n_d=2, n_g=2, n_pen=0)
    stats = GANStep.take_stats(step, lambda t: dist.reduce_sum(acc, t))
    want = (mine + other)[:5] / 4  # 2 steps x 2 ranks
    assert list(stats) == list(STAT_KEYS[:5])
    assert stats == pytest.approx(dict(zip(STAT_KEYS, want.tolist(), strict=False)))
    assert step.stats_sum.abs().sum() == 0 and step.n_d == step.n_g == 0  # reset


def test_broadcast_object_returns_rank_0s_object(monkeypatch):
    import accelerate.utils

    def broadcast_object_list(box, from_process):
        assert from_process == 0
        box[0] = "rank 0's"

    monkeypatch.setattr(accelerate.utils, "broadcast_object_list", broadcast_object_list)
    assert dist.broadcast_object(Rank(1, 2), "rank 1's") == "rank 0's"


# ---- seeds ----


def draws() -> tuple[float, float, float]:
    return random.random(), float(np.random.rand()), float(torch.rand(()))


def seeded(monkeypatch, seed: int, rank: int) -> tuple[float, float, float]:
    import accelerate.utils.random

    monkeypatch.setattr(
        accelerate.utils.random, "AcceleratorState", lambda: SimpleNamespace(process_index=rank)
    )
    dist.seed_rank(None, seed)
    return draws()


def test_per_rank_seeds_are_deterministic_and_differ_across_ranks(monkeypatch):
    """seed + rank seeds python, numpy and torch: the same (seed, rank) draws the same noise,
    each rank its own."""
    a, b = seeded(monkeypatch, 5, 0), seeded(monkeypatch, 5, 0)
    assert a == b
    per_rank = [seeded(monkeypatch, 5, r) for r in range(4)]
    for i in range(3):  # python, numpy, torch: four different streams each
        assert len({d[i] for d in per_rank}) == 4, i
    assert seeded(monkeypatch, 5, 1) == seeded(monkeypatch, 6, 0)  # the derivation: seed + rank
    assert seeded(monkeypatch, 7, 0) != a


# ---- rank-0 printing and error lines ----


def test_print0_prints_once_over_the_ranks_to_stderr(capsys):
    for r in ranks(3):
        dist.print0(r, "resolved config", 3)
    out = capsys.readouterr()
    assert out.err == "resolved config 3\n" and out.out == ""
    dist.print0(None, "before the Accelerator")  # no Accelerator yet: print
    import sys

    dist.print0(Rank(0, 2), "table", file=sys.stdout)
    dist.print0(Rank(1, 2), "table", file=sys.stdout)
    out = capsys.readouterr()
    assert out.err == "before the Accelerator\n" and out.out == "table\n"


def test_error_line_is_one_line_on_rank_0_and_config_errors_only_there(monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    assert dist.error_line(ConfigError("--batch 30\n  must be divisible")) == (
        "error: --batch 30 must be divisible"
    )
    assert dist.error_line(DataError("")) == "error: DataError"
    monkeypatch.setenv("RANK", "1")
    assert dist.error_line(ConfigError("--batch 30 must be divisible")) is None
    assert dist.error_line(DataError("shard-3.tar: bad")) == "error: [rank 1] shard-3.tar: bad"
    monkeypatch.setenv("RANK", "0")
    assert dist.error_line(DataError("x")) == "error: x"


# ---- batch, CPUs, the Accelerator ----


def test_batch_per_device_divides_or_names_the_flag():
    assert dist.batch_per_device(128, 1) == 128 and dist.batch_per_device(128, 4) == 32
    with pytest.raises(ConfigError) as exc:
        dist.batch_per_device(30, 4)
    assert str(exc.value) == "--batch 30 must be divisible by the 4 processes (e.g. --batch 28)"
    with pytest.raises(ConfigError, match=r"^--batch 3 must be divisible .*--batch 4\)"):
        dist.batch_per_device(3, 4)


def test_cpus_per_process_shares_the_affinity_among_local_processes(monkeypatch):
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(6)), raising=False)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert dist.cpus_per_process() == 6
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert dist.cpus_per_process() == 1  # 6 // 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert dist.cpus_per_process() == 1  # never 0
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "")
    assert dist.cpus_per_process() == 6


def test_build_accelerator_has_our_ddp_and_process_group_settings():
    acc = dist.build_accelerator("no", autocast_cache=False)
    assert acc.num_processes == 1 and acc.mixed_precision == "no"
    assert acc.ddp_handler.broadcast_buffers is False  # D runs twice per step (BatchNorm)
    assert acc.init_handler.timeout == dist.PROCESS_GROUP_TIMEOUT
    assert acc.autocast_handler.cache_enabled is False
    info = dist.runtime_info(acc, 64)
    assert (info["world_size"], info["batch"], info["batch_per_device"]) == (1, 64, 64)
    assert info["device"] == str(acc.device) and info["versions"]["torch"] == torch.__version__


@pytest.mark.skipif(torch.cuda.is_available() or torch.backends.mps.is_available(), reason="GPU")
def test_fp16_on_cpu_is_refused_naming_the_flag():
    with pytest.raises(ConfigError, match=r"^--precision fp16 needs a CUDA or MPS device"):
        dist.build_accelerator("fp16")


def test_a_world_that_accelerate_does_not_see_is_refused(monkeypatch):
    """e.g. `accelerate launch --cpu --num_processes 2` starts one process that says 2."""
    monkeypatch.setattr(dist, "_torchrun_world_size", lambda: 2)
    with pytest.raises(ConfigError, match=r"^launched 2 processes but Accelerate sees 1"):
        dist.build_accelerator("no")
    from tests.conftest import reset_accelerate

    reset_accelerate()
    with pytest.raises(ConfigError, match=r"^launched 2 processes but Accelerate sees 1"):
        dist.process_state()


def test_param_digests_see_parameters_but_not_batchnorm_statistics():
    acc = dist.build_accelerator("no")

    def model(seed: int) -> nn.Module:
        torch.manual_seed(seed)
        return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4))

    a, b = model(0), model(0)
    [digest] = dist.param_digests(acc, a)
    assert len(digest) == 64 and dist.param_digests(acc, b) == [digest]
    b[1].running_mean.add_(1.0)  # per rank under broadcast_buffers=False: left out
    assert dist.param_digests(acc, b) == [digest]
    with torch.no_grad():
        b[0].weight[0, 0] += 1e-3
    assert dist.param_digests(acc, b) != [digest]
    assert dist.param_digests(acc, a, model(1)) != [digest]  # every model counts
