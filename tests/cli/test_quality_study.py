"""scripts/quality_study.py end to end on tiny shards: the baseline's plain loop and one of our
recipes train, every saved point is scored through the metric path of `facegan evaluate`, and
the rows and the summary are written and read back."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.helpers.shards import write_tiny_shards

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_quality_study_trains_scores_and_summarises(tmp_path):
    shards = write_tiny_shards(tmp_path / "shards", n=128, size=16, per_shard=64)
    out = tmp_path / "study"
    cmd = [sys.executable, str(REPO / "scripts" / "quality_study.py"), "--data", str(shards),
           "--out", str(out), "--kimg", "0.64", "--points", "2", "--seeds", "0,1",
           "--recipes", "baseline,tutorial", "--eval-n", "64",
           "--classifier-epochs", "1"]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                          env={"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
                               "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    # 10 steps of 64 (0.64 kimg), points every 5 steps: steps 5 and 10 for 2 seeds; the
    # baseline draws in train mode, our recipe has an EMA and a raw G
    got = sorted((r["recipe"], r["seed"], r["step"], r["which"]) for r in rows)
    want = sorted([("baseline", s, st, "train-mode") for s in (0, 1) for st in (5, 10)]
                  + [("tutorial", s, st, w) for s in (0, 1) for st in (5, 10)
                     for w in ("ema", "raw")])  # fmt: skip
    assert got == want
    assert all(r["fid"] > 0 and r["n"] == 64 for r in rows)
    # the two seeds are two different trainings
    fids = {(r["recipe"], r["seed"]): r["fid"] for r in rows if r["step"] == 10}
    assert fids[("baseline", 0)] != fids[("baseline", 1)]
    summary = (out / "summary.md").read_text()
    assert "| baseline | train-mode | 2 |" in summary and "| tutorial | ema | 2 |" in summary
    assert (out / "grids" / "tutorial.png").is_file() and (out / "grids" / "baseline.png").is_file()
    # a second invocation resumes: nothing is trained or scored again
    proc2 = subprocess.run(cmd, capture_output=True, text=True, timeout=600,
                           env={"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
                                "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert proc2.returncode == 0, proc2.stderr[-3000:]
    assert len((out / "results.jsonl").read_text().splitlines()) == len(rows)
    # a call with other --recipes keeps the earlier recipes in the summary
    cmd3 = [*cmd[: cmd.index("--recipes") + 1], "tutorial", *cmd[cmd.index("--recipes") + 2 :]]
    proc3 = subprocess.run(cmd3, capture_output=True, text=True, timeout=600,
                           env={"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
                                "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert proc3.returncode == 0, proc3.stderr[-3000:]
    assert "| baseline | train-mode | 2 |" in (out / "summary.md").read_text()
    # a run folder trained with other settings than the recipe has now (a preset retuned since)
    # is refused with one line, before anything is trained, scored or overwritten
    saved = out / "runs" / "tutorial-s0" / "config.json"
    cfg = json.loads(saved.read_text())
    saved.write_text(json.dumps({**cfg, "lr_g": 1e-3}))
    n_rows = len((out / "results.jsonl").read_text().splitlines())
    proc4 = subprocess.run(cmd3, capture_output=True, text=True, timeout=600,
                           env={"WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1",
                                "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert proc4.returncode == 1
    last = proc4.stderr.strip().splitlines()[-1]
    assert "tutorial-s0 was trained with other settings" in last and "lr_g: run 0.001" in last
    assert "Traceback" not in proc4.stderr
    assert json.loads(saved.read_text())["lr_g"] == 1e-3
    assert len((out / "results.jsonl").read_text().splitlines()) == n_rows
