"""`facegan sample` and `facegan evaluate` on 2 CPU processes (gloo) equal 1 process.

Launched as users do: `accelerate launch --config_file launch/cpu-2proc.yaml facegan_dist ...`
from the repo root. `accelerate launch --cpu --num_processes 2` would start ONE process
(STACK-NOTES), so the tests check that both ranks really ran (one stderr line per rank, and the
world size recorded in the outputs).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.helpers.shards import write_tiny_shards
from tests.integration.test_sample_eval import tiny_run, write_random_directions

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch2(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).with_name("accelerate")
    cmd = [str(accelerate), "launch", "--config_file", "launch/cpu-2proc.yaml",
           "--num_processes", "2", "--main_process_port", str(free_port()),
           "facegan_dist", *map(str, args)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_MODE": "disabled"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def pngs(folder: Path) -> dict[str, np.ndarray]:
    return {p.name: np.asarray(Image.open(p)).astype(int) for p in sorted(folder.glob("*.png"))}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    shards = write_tiny_shards(root / "shards", n=64, size=16, per_shard=32)
    names = json.loads((shards / "manifest.json").read_text())["attribute_names"]
    run = tiny_run(root / "run", names)
    write_random_directions(run, names)
    return run, shards


def test_two_process_sample_equals_one_process(setup, tmp_path):
    from facegan_dist.sampling import SampleConfig, sample

    run, _ = setup
    flags = dict(seeds="0-6", grid="2x3", interpolate=("1-2,3-4",), steps=4,
                 arith=("1,2 - 3 + 4",), edit=("attr_0=2",))  # fmt: skip
    proc = launch2(
        "sample", run, "--out", tmp_path / "two", "--seeds", "0-6", "--grid", "2x3",
        "--interpolate", "1-2,3-4", "--steps", 4, "--arith", "1,2 - 3 + 4",
        "--edit", "attr_0=2", "--batch", 3,
    )  # fmt: skip
    ranks = sorted(re.findall(r"\[rank (\d)/(\d)\] wrote (\d+) file", proc.stderr))
    assert [(r, w) for r, w, _ in ranks] == [("0", "2"), ("1", "2")], proc.stderr[-2000:]
    assert all(int(k) > 0 for _, _, k in ranks)  # both ranks wrote their share
    assert json.loads((tmp_path / "two" / "sample.json").read_text())["world_size"] == 2
    sample(SampleConfig(source=run, out=tmp_path / "one", batch=5, **flags))
    one, two = pngs(tmp_path / "one"), pngs(tmp_path / "two")
    assert set(one) == set(two) and len(one) == 7 + 1 + 2 + 1 + 7 + 1
    for name in one:  # float tolerance across processes: at most 1 grey level
        assert np.abs(one[name] - two[name]).max() <= 1, name


def test_two_process_evaluate_equals_one_process(setup, tmp_path):
    from facegan_dist.metrics import EvaluateConfig, evaluate

    run, shards = setup
    cfg = EvaluateConfig(
        source=run, data=shards, n=30, features="attributes", kid_subsets=5, batch=8,
        out=tmp_path / "one.json",
    )  # fmt: skip
    one = evaluate(cfg)  # trains + caches the classifier and the real statistics
    shutil.rmtree(shards / "stats")  # so the 2-process run recomputes them, sharded
    launch2(
        "evaluate", run, "--data", shards, "--features", "attributes", "--n", 30,
        "--kid-subsets", 5, "--batch", 8, "--out", tmp_path / "two.json",
    )  # fmt: skip
    two = json.loads((tmp_path / "two.json").read_text())
    assert two["world_size"] == 2 and one["world_size"] == 1
    assert two["fid"] == pytest.approx(one["fid"], rel=1e-4, abs=1e-6)
    assert two["kid"] == pytest.approx(one["kid"], rel=1e-3, abs=1e-7)
    assert (shards / "stats" / "attributes-train-30.safetensors").is_file()
