"""`facegan evaluate` on 2 CPU processes (gloo) equals 1 process, with the real-statistics cache
cold (each rank featurises its share, torchmetrics reduces) and warm (rank 0 alone loads the
cached states: loaded on every rank they would be summed twice).

Launched as users do: `accelerate launch --config_file launch/cpu-2proc.yaml facegan_dist ...`
from the repo root (STACK-NOTES section 1: `--cpu --num_processes 2` starts one process).
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tests.helpers.shards import write_tiny_shards
from tests.integration.test_sample_eval import tiny_run

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
N = 31  # odd: the ranks get 16 and 15 seeds (and real images)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch2(*args) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", "launch/cpu-2proc.yaml",
           "--num_processes", "2", "--main_process_port", str(free_port()),
           "facegan_dist", *map(str, args)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read_states(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def test_two_processes_equal_one_with_the_cache_cold_and_warm(tmp_path):
    from facegan_dist.metrics import EvaluateConfig, evaluate

    shards = write_tiny_shards(tmp_path / "shards", n=64, size=16, per_shard=32)
    names = json.loads((shards / "manifest.json").read_text())["attribute_names"]
    run = tiny_run(tmp_path / "run", names)
    cache = shards / "stats" / f"attributes-train-{N}.safetensors"
    one = evaluate(
        EvaluateConfig(
            source=run, data=shards, n=N, kid_subsets=4, batch=8, out=tmp_path / "1.json"
        )
    )  # trains + caches the classifier, and caches the real statistics of 1 process
    one_states = read_states(cache)
    assert int(one_states["real_features_num_samples"]) == N

    def two(tag: str) -> tuple[dict, str]:
        proc = launch2("evaluate", run, "--data", shards, "--n", N, "--kid-subsets", 4,
                       "--batch", 8, "--out", tmp_path / f"{tag}.json")  # fmt: skip
        return json.loads((tmp_path / f"{tag}.json").read_text()), proc.stderr

    def assert_same(res: dict) -> None:
        assert res["world_size"] == 2 and one["world_size"] == 1
        assert res["n_real"] == one["n_real"] == N
        assert res["fid"] == pytest.approx(one["fid"], rel=1e-5)
        assert res["kid"] == pytest.approx(one["kid"], rel=1e-4)
        assert res["kid_std"] == pytest.approx(one["kid_std"], rel=1e-3, abs=1e-6)

    # cold: each rank featurises its share of the real images; rank 0 writes the reduced states
    cache.unlink()
    cold, err = two("cold")
    assert "computing real attributes statistics" in err
    assert_same(cold)
    states = read_states(cache)
    assert int(states["real_features_num_samples"]) == N  # counted once, not per rank
    for name, t in one_states.items():  # KID's features come back in image order
        torch.testing.assert_close(states[name], t, rtol=1e-5, atol=1e-6, msg=name)

    # warm: the cache is read by rank 0 only and not rewritten
    stamp = cache.stat().st_mtime_ns
    warm, err = two("warm")
    assert "computing real" not in err
    assert_same(warm)
    assert cache.stat().st_mtime_ns == stamp
    shutil.rmtree(shards / "stats")
