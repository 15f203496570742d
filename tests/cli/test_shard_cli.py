"""`facegan shard` / `facegan verify` end to end: summaries, exit codes, one-line errors."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from facegan_dist.cli import app

REPO = Path(__file__).resolve().parents[2]
runner = CliRunner()


def run(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def shard(src: Path, out: Path, *extra: str):
    return run("shard", src, "--out", out, "--size", "16", "--shard-size", "7", "--workers", "2",
               "--no-progress", *extra)  # fmt: skip


def assert_one_line_error(result, *needles: str) -> None:
    assert result.exit_code == 1, result.output
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    assert "Traceback" not in result.output
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_shard_summary_then_resume(synth_kaggle_zip, tmp_path):
    out = tmp_path / "out"
    r = shard(synth_kaggle_zip, out)
    assert r.exit_code == 0, r.output
    text = r.stdout
    assert "kept 0, wrote 9 shard(s)" in text
    assert "train       48 images     7 shards" in text
    assert "val          6 images     1 shard" in text
    assert "skipped 0 images" in text
    assert "images/s" in text
    assert f"output: {out}" in text
    assert (out / "manifest.json").is_file()

    r = shard(synth_kaggle_zip, out)
    assert r.exit_code == 0, r.output
    assert "kept 9, wrote 0 shard(s)" in r.stdout

    r = run("verify", out)
    assert r.exit_code == 0 and r.stdout.startswith("OK: 9 shards, 60 samples")


def test_verify_names_bad_shards(synth_kaggle_zip, tmp_path):
    out = tmp_path / "out"
    assert shard(synth_kaggle_zip, out).exit_code == 0
    data = bytearray((out / "train-000001.tar").read_bytes())
    data[1234] ^= 0x10
    (out / "train-000001.tar").write_bytes(bytes(data))
    (out / "val-000000.tar").unlink()
    r = run("verify", out)
    assert r.exit_code == 1
    assert "BAD train-000001.tar: sha256" in r.stdout
    assert "BAD val-000000.tar: missing" in r.stdout
    assert "error: 2 problem(s)" in r.stderr


def test_verify_not_a_shard_folder(tmp_path):
    assert_one_line_error(run("verify", tmp_path), "no manifest.json", str(tmp_path))


def test_plain_folder_png(plain_image_folder, tmp_path):
    r = run("shard", plain_image_folder, "--out", tmp_path / "o", "--size", "32", "--format", "png",
            "--workers", "1", "--limit", "5", "--seed", "3")  # fmt: skip
    assert r.exit_code == 0, r.output
    m = json.loads((tmp_path / "o" / "manifest.json").read_text())
    assert m["splits"]["train"]["count"] == 5
    assert m["settings"] == {"size": 32, "crop": "center", "format": "png", "quality": 95,
                             "limit": 5, "split": "all", "shard_size": 5000, "seed": 3}  # fmt: skip


def test_missing_source(tmp_path):
    assert_one_line_error(
        shard(tmp_path / "nowhere", tmp_path / "out"), "nowhere", "does not exist"
    )


def test_empty_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(shard(tmp_path / "empty", tmp_path / "out"), "no images", "empty")


def test_mismatched_attribute_ids(synth_kaggle_dir, tmp_path):
    src = shutil.copytree(synth_kaggle_dir, tmp_path / "k")
    for n in (4, 8, 15):
        (src / "img_align_celeba" / "img_align_celeba" / f"{n:06d}.jpg").unlink()
    r = shard(src, tmp_path / "out")
    assert_one_line_error(r, "list_attr_celeba.csv", "3 image(s)", "000004.jpg")
    assert not (tmp_path / "out").exists()


def test_bad_images_skipped_or_strict(synth_kaggle_zip, synth_kaggle_dir, tmp_path):
    src = shutil.copytree(synth_kaggle_dir, tmp_path / "k")
    img = src / "img_align_celeba" / "img_align_celeba" / "000009.jpg"
    img.write_bytes(img.read_bytes()[:900])
    r = shard(src, tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert "skipped 1 of 60 images, unreadable (all listed in manifest.json)" in r.stdout
    assert "img_align_celeba/img_align_celeba/000009.jpg: truncated" in r.stdout
    r = shard(src, tmp_path / "strict", "--strict")
    assert_one_line_error(r, "000009.jpg", "truncated", "--strict")
    assert not (tmp_path / "strict" / "manifest.json").exists()


def test_different_settings_refused(synth_kaggle_zip, tmp_path):
    out = tmp_path / "out"
    assert shard(synth_kaggle_zip, out).exit_code == 0
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    r = run("shard", synth_kaggle_zip, "--out", out, "--size", "32", "--shard-size", "7",
            "--no-progress")  # fmt: skip
    assert_one_line_error(r, str(out), "--size 16", "--size 32", "use a new --out")
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before


def test_bad_flag_values(synth_kaggle_zip, tmp_path):
    assert_one_line_error(shard(synth_kaggle_zip, tmp_path / "o", "--format", "gif"), "--format")
    assert_one_line_error(shard(synth_kaggle_zip, tmp_path / "o", "--quality", "0"), "--quality")
    assert_one_line_error(shard(synth_kaggle_zip, tmp_path / "o", "--split", "dev"), "--split")
    r = run("shard", synth_kaggle_zip, "--out", tmp_path / "o", "--size", "48")
    assert_one_line_error(r, "--size 48")


def test_unwritable_output(synth_kaggle_zip, tmp_path):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        if not os.access(locked, os.W_OK):
            r = shard(synth_kaggle_zip, locked / "out")
            assert_one_line_error(r, f"--out {locked / 'out'}: cannot create the folder")
            return
        # Root ignores permission bits: run the real CLI as root *without* the capabilities that
        # override them (uid 0 still owns and can read everything it made).
        if os.geteuid() != 0 or shutil.which("setpriv") is None:
            pytest.skip("chmod has no effect here and setpriv is unavailable")
        caps = "-dac_override,-dac_read_search"
        args = ["setpriv", "--bounding-set", caps, "--inh-caps", caps,
                sys.executable, "-m", "facegan_dist", "shard", str(synth_kaggle_zip),
                "--out", str(locked / "out"), "--size", "16", "--no-progress"]  # fmt: skip
        p = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120)
        if "setpriv:" in p.stderr:
            pytest.skip(f"setpriv cannot drop capabilities here: {p.stderr.strip()}")
        assert p.returncode == 1, p.stderr
        lines = p.stderr.strip().splitlines()
        assert len(lines) == 1, p.stderr
        assert lines[0].startswith(f"error: --out {locked / 'out'}: cannot create the folder")
        assert not (locked / "out").exists()
    finally:
        locked.chmod(0o700)


def test_out_is_a_file_or_under_one_or_unwritable(synth_kaggle_zip, tmp_path):
    (tmp_path / "file").write_text("x")
    assert_one_line_error(shard(synth_kaggle_zip, tmp_path / "file"), "--out", "is a file")
    r = shard(synth_kaggle_zip, tmp_path / "file" / "out")
    assert_one_line_error(r, f"--out {tmp_path / 'file' / 'out'}: {tmp_path / 'file'} is a file")
    assert_one_line_error(shard(synth_kaggle_zip, "/proc/facegan-x"), "--out /proc/facegan-x")
    assert (tmp_path / "file").read_text() == "x" and sorted(os.listdir(tmp_path)) == ["file"]


def _cli(*args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "facegan_dist", *map(str, args)], cwd=REPO,
                          capture_output=True, text=True, timeout=120, **kw)  # fmt: skip


def _file_size_limit(max_bytes: int):
    """preexec_fn: files this process writes stop at `max_bytes` (a full disk, as `ulimit -f`)."""

    def limit() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # so the write fails with EFBIG instead
        resource.setrlimit(resource.RLIMIT_FSIZE, (max_bytes, max_bytes))

    return limit


@pytest.mark.parametrize("workers", ["1", "2"])
def test_disk_full_is_one_line_and_the_folder_resumes(synth_kaggle_zip, tmp_path, workers):
    """A write that fails (here: a 2 KiB file size limit, as `ulimit -f`; shards are 30 KiB, the
    .state records 0.3 KiB) is one line naming the file, with 1 or 2 workers; finished shards
    stay as they were, no temp file is left, no manifest, and the same command then resumes.
    (A failing manifest write: tests/data/test_shards.py.)"""
    out = tmp_path / "out"
    assert shard(synth_kaggle_zip, out).exit_code == 0
    reference = (out / "manifest.json").read_bytes()
    (out / "manifest.json").unlink()  # an interrupted run: no manifest...
    redo = ["train-000003.tar", "val-000000.tar"]
    for name in redo:  # ... and two shards to write (two chunks: two workers really run)
        (out / name).unlink()
    kept = {p.name: p.read_bytes() for p in out.glob("*.tar")}

    p = _cli("shard", synth_kaggle_zip, "--out", out, "--size", "16", "--shard-size", "7",
             "--workers", workers, "--no-progress", preexec_fn=_file_size_limit(2048))  # fmt: skip
    assert p.returncode == 1, p.stderr
    assert "Traceback" not in p.stderr, p.stderr
    [line] = p.stderr.strip().splitlines()
    what = line.split(": ")[1]  # error: cannot write PATH: reason; advice
    assert what.startswith(f"cannot write {out}/") and what.endswith(".tar.tmp"), line
    assert "File too large" in line and "re-run the same command to resume" in line, line
    assert not (out / "manifest.json").exists()
    assert [q.name for q in out.rglob("*") if ".tmp" in q.name] == []
    assert {q.name: q.read_bytes() for q in out.glob("*.tar")} == kept

    r = shard(synth_kaggle_zip, out)
    assert r.exit_code == 0, r.output
    assert f"kept {9 - len(redo)}, wrote {len(redo)} shard(s)" in r.stdout
    assert (out / "manifest.json").read_bytes() == reference


@pytest.mark.slow
@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_is_one_line_and_the_folder_resumes(synth_kaggle_zip, tmp_path, workers):
    """SIGINT to the whole process group (what Ctrl-C does, workers included) while shards are
    being written: one line, exit 130, no partial shard, no manifest; the re-run resumes."""
    out = tmp_path / "out"
    args = [sys.executable, "-m", "facegan_dist", "shard", str(synth_kaggle_zip), "--out", str(out),
            "--size", "256", "--crop", "none", "--format", "png", "--shard-size", "2",
            "--workers", workers, "--no-progress"]  # fmt: skip
    # each finished shard pauses 0.2 s, so the signal cannot arrive after the last one (60
    # images shard in well under a second on an idle machine)
    env = {**os.environ, "FACEGAN_TEST_SHARD_DELAY_S": "0.2"}
    proc = subprocess.Popen(args, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True, start_new_session=True, env=env,
                            # a test run started in the background inherits SIGINT ignored, and
                            # Python then never raises KeyboardInterrupt: restore the default
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            )  # fmt: skip
    try:
        deadline = time.monotonic() + 60
        while not list((out / ".state").glob("*.tar.json")) and time.monotonic() < deadline:
            assert proc.poll() is None, proc.stderr.read()
            time.sleep(0.005)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert proc.returncode == 130, err
    assert err.strip().splitlines() == [
        f"error: interrupted; finished shards are kept in {out}: re-run the same command to resume"
    ], err
    assert not (out / "manifest.json").exists()
    assert [q.name for q in out.rglob("*") if ".tmp" in q.name] == []
    # finished = recorded (a tar renamed just before the signal, without its record, is redone)
    finished = len(list((out / ".state").glob("*.tar.json")))
    assert 1 <= finished < 30  # 24 train + 3 val + 3 test shards

    r = run("shard", synth_kaggle_zip, "--out", out, "--size", "256", "--crop", "none",
            "--format", "png", "--shard-size", "2", "--workers", "2", "--no-progress")  # fmt: skip
    assert r.exit_code == 0, r.output
    assert f"kept {finished}, wrote {30 - finished} shard(s)" in r.stdout
    assert run("verify", out).exit_code == 0


def test_folder_of_unreadable_images_is_an_error(plain_image_folder, tmp_path):
    """Files named .jpg that are not images: no 0-image manifest, one line naming the folder and
    the count; a partly unreadable folder is sharded and says how many of how many it skipped."""
    junk = tmp_path / "junk"
    junk.mkdir()
    for i in range(3):
        (junk / f"x{i}.jpg").write_text(f"not an image {i}\n")
    out = tmp_path / "out"
    r = shard(junk, out)
    assert_one_line_error(r, f"no readable image in {junk}", "all 3 image file(s) are unreadable",
                          "x0.jpg: not an image")  # fmt: skip
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar"))

    mixed = shutil.copytree(plain_image_folder, tmp_path / "mixed")
    shutil.copy(junk / "x0.jpg", mixed / "x0.jpg")
    r = shard(mixed, tmp_path / "mixed-out")
    assert r.exit_code == 0, r.output
    assert "skipped 1 of 21 images, unreadable (all listed in manifest.json):" in r.stdout
    assert "x0.jpg: not an image" in r.stdout


def _drop_first_count(text: str) -> str:
    m = json.loads(text)
    del m["splits"]["train"]["shards"][0]["count"]
    return json.dumps(m)


@pytest.mark.parametrize(
    "damage,problem",
    [
        (lambda t: t[: len(t) // 2], " is not valid JSON"),
        (lambda t: "[1, 2, 3]", ": not a JSON object (it holds a list [1, 2, 3])"),
        (_drop_first_count, ": splits.train.shards[0] has no 'count'"),
    ],
    ids=["truncated", "list", "no-count"],
)
def test_damaged_manifest_is_repaired_by_the_shard_command(synth_kaggle_zip, tmp_path, damage,
                                                           problem):  # fmt: skip
    """What verify (and every reader) tells the user to do about a damaged manifest works:
    re-running the shard command rebuilds it from .state, byte for byte, touching no shard."""
    out = tmp_path / "out"
    assert shard(synth_kaggle_zip, out).exit_code == 0
    path = out / "manifest.json"
    reference = path.read_bytes()
    path.write_text(damage(path.read_text()))
    shards = {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")}

    advice = "re-run the `facegan shard` command that wrote it"
    assert_one_line_error(run("verify", out), f"{path}{problem}", advice)
    r = shard(synth_kaggle_zip, out)
    assert r.exit_code == 0, r.output
    assert "kept 9, wrote 0 shard(s)" in r.stdout
    assert path.read_bytes() == reference
    assert {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in out.glob("*.tar")} == shards
    assert run("verify", out).exit_code == 0


def test_damaged_manifest_without_state_is_refused_untouched(synth_kaggle_zip, tmp_path):
    """No .state/run.json (e.g. a copied folder): the settings are unknown, so the shard command
    refuses, and verify says the same thing (a new folder), not "run shard again"."""
    out = tmp_path / "out"
    assert shard(synth_kaggle_zip, out).exit_code == 0
    shutil.rmtree(out / ".state")
    (out / "manifest.json").write_text("[1, 2, 3]")
    before = {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}
    assert_one_line_error(run("verify", out), "not a JSON object", "into a new folder")
    r = shard(synth_kaggle_zip, out)
    assert_one_line_error(r, "not a JSON object", "run.json is missing", "use a new --out")
    assert {p: p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()} == before
