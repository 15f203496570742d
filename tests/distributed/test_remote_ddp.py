"""Training from shards at a URL in two CPU processes (gloo), launched as users launch it
(`accelerate launch --config_file launch/cpu-2proc.yaml facegan_dist train ...`), each rank with
one loader worker, against a real HTTP server on 127.0.0.1 (tests/helpers/http_shards.py).

- `--exact` over http:// (streamed, and through a shared --cache-dir) ends bit-identical to the
  same run from the local folder: G, D, the EMA, both Adam states and every metrics row;
- a run stopped at a checkpoint and continued with `--resume auto` over http:// ends where the
  uninterrupted run ends.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers.http_shards import FaultServer
from tests.helpers.shards import write_tiny_shards

pytestmark = [pytest.mark.distributed, pytest.mark.slow]
REPO = Path(__file__).resolve().parents[2]
STEPS = 8  # 64 images / batch 16: 2 epochs, so the second epoch's reshuffle is covered
TINY = ["--preset", "demo", "--g-width", "8", "--d-width", "8", "--batch", "16",
        "--num-workers", "1", "--log-every", "1", "--sample-every", "100000",
        "--ckpt-every", "100000", "--shuffle-buffer", "16", "--exact",
        "--wandb-mode", "disabled"]  # fmt: skip
FINAL = f"step-{STEPS:09d}"


def launch(*args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cmd = [str(Path(sys.executable).with_name("accelerate")), "launch", "--config_file",
           "launch/cpu-2proc.yaml", "--main_process_port", str(port), "facegan_dist", "train",
           *args]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_", "PET_"))}
    env.update(OMP_NUM_THREADS="1", WANDB_MODE="disabled")
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [{k: v for k, v in json.loads(x).items() if k != "images_per_s"} for x in lines]


def assert_same_run(a: Path, b: Path) -> None:
    """Same weights, EMA, optimizer states, per-rank digests and metric rows at step STEPS."""
    ca, cb = a / "checkpoints" / FINAL, b / "checkpoints" / FINAL
    sa = json.loads((ca / "trainer_state.json").read_text())
    sb = json.loads((cb / "trainer_state.json").read_text())
    assert sa["world_size"] == sb["world_size"] == 2
    assert sa["rank_param_sha256"] == sb["rank_param_sha256"]
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):  # G, D, EMA
        ta, tb = load_file(ca / name), load_file(cb / name)
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta), name
    for name in ("optimizer.bin", "optimizer_1.bin"):  # Adam of G and of D
        oa = torch.load(ca / name, weights_only=True)["state"]
        ob = torch.load(cb / name, weights_only=True)["state"]
        assert oa.keys() == ob.keys(), name
        for k in oa:
            assert all(torch.equal(oa[k][t], ob[k][t]) for t in oa[k]), (name, k)
    assert rows(a) == rows(b)
    assert [r["step"] for r in rows(a)] == list(range(1, STEPS + 1))


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("ddp16"), n=64, size=16, per_shard=16)


@pytest.fixture(scope="module")
def server(shards):
    srv = FaultServer(shards).start()
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def local_run(shards, tmp_path_factory) -> Path:
    """The reference: the same run from the local folder."""
    out = tmp_path_factory.mktemp("runs") / "local"
    launch("--data", str(shards), "--out", str(out), "--max-steps", str(STEPS), *TINY)
    return out


def test_exact_two_processes_over_http_equal_the_local_folder(server, local_run, tmp_path):
    streamed = tmp_path / "http"
    server.requests.clear()
    launch("--data", server.url, "--out", str(streamed), "--max-steps", str(STEPS), *TINY)
    assert json.loads((streamed / "config.json").read_text())["data"] == server.url
    assert "train-000000.tar" in server.requests  # it did read over HTTP
    assert_same_run(local_run, streamed)

    # through a --cache-dir that both ranks and their loader workers share: one download each
    cached, cache = tmp_path / "cached", tmp_path / "cache"
    server.requests.clear()
    launch("--data", server.url, "--cache-dir", str(cache), "--out", str(cached),
           "--max-steps", str(STEPS), *TINY)  # fmt: skip
    tars = sorted(r for r in server.requests if r.endswith(".tar"))
    assert tars == [f"train-00000{i}.tar" for i in range(4)], tars
    assert len(list(cache.glob("*-train-*.tar"))) == 4
    assert_same_run(local_run, cached)


def test_resume_over_http_equals_the_uninterrupted_run(server, local_run, tmp_path):
    out = tmp_path / "split"
    launch("--data", server.url, "--out", str(out), "--max-steps", str(STEPS // 2), *TINY)
    assert (out / "checkpoints" / f"step-{STEPS // 2:09d}").is_dir()
    # the resumed command names only the run folder, --resume and the new length: the URL
    # comes back from the checkpoint's config
    resumed = launch("--out", str(out), "--resume", "auto", "--max-steps", str(STEPS))
    assert f"steps {STEPS // 2} -> {STEPS}" in resumed.stderr, resumed.stderr[-3000:]
    assert json.loads((out / "config.json").read_text())["data"] == server.url
    assert_same_run(local_run, out)
