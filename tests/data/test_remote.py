"""Shards over URLs (data/remote.py): a real HTTP server on 127.0.0.1 (tests/helpers/http_shards.py)
serving tiny 16 px shard folders. Over http:// and pipe: the reader yields exactly what it yields
from the local folder; faults are retried, then one line naming the shard URL and the cause."""

from __future__ import annotations

import itertools
import json
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from facegan_dist.cli import app
from facegan_dist.data.remote import Remote
from facegan_dist.data.stream import Manifest, ManifestError, ShardStream, make_loader
from facegan_dist.errors import DataError
from tests.helpers.http_shards import FaultServer, refused_url
from tests.helpers.shards import write_tiny_shards

SHARD = "train-000001.tar"
FAST = dict(backoff_s=0.01)  # retries without the real backoff


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> Path:
    return write_tiny_shards(tmp_path_factory.mktemp("remote16"), n=48, size=16, per_shard=16)


@pytest.fixture
def server(shards):
    srv = FaultServer(shards).start()
    yield srv
    srv.stop()


def batches(src, n: int, **kw) -> list[tuple[torch.Tensor, torch.Tensor]]:
    stream = ShardStream(src, batch_per_device=4, seed=3, shuffle_buffer=8, **kw)
    return list(itertools.islice(iter(stream), n))


def assert_same(a, b) -> None:
    assert len(a) == len(b)
    for (ia, aa), (ib, ab) in zip(a, b, strict=True):
        assert torch.equal(ia, ib) and torch.equal(aa, ab)


@pytest.mark.parametrize(
    "kw",
    [
        {},
        {"num_workers": 2},
        {"rank": 1, "world_size": 2, "num_workers": 2},
        {"num_workers": 2, "start_batch": 5},
    ],  # fmt: skip
    ids=["main", "2-workers", "rank1-of-2", "resume-mid-epoch"],
)
def test_http_stream_equals_local(shards, server, kw):
    # 30 batches of 4 from 48 samples: more than two epochs, so epoch reshuffles are covered
    assert_same(batches(server.url, 30, **kw), batches(shards, 30, **kw))


def test_pipe_cat_equals_local(shards):
    assert_same(batches(f"pipe:cat {shards}/{{name}}", 14), batches(shards, 14))


def test_manifest_fetched_first_and_unsafe_names_refused(tmp_path, shards):
    bad = tmp_path / "bad"
    shutil.copytree(shards, bad)
    m = json.loads((bad / "manifest.json").read_text())
    m["splits"]["train"]["shards"][0]["name"] = "../../etc/passwd"
    (bad / "manifest.json").write_text(json.dumps(m))
    srv = FaultServer(bad).start()
    try:
        with pytest.raises(ManifestError, match="outside its folder"):
            Manifest.read(srv.url)
        assert srv.requests == ["manifest.json"]  # nothing else was asked for
    finally:
        srv.stop()


def test_manifest_sha256_is_one_fetch_of_the_bytes_it_hashes(shards, server):
    """The key of the URL cache's derived folder is the hash of the manifest bytes that were
    validated, fetched once (not validated from one download and hashed from another)."""
    import hashlib

    from facegan_dist.data.readback import manifest_sha256

    server.requests.clear()
    got = manifest_sha256(Remote(server.url))
    assert server.requests == ["manifest.json"]
    assert got == hashlib.sha256((shards / "manifest.json").read_bytes()).hexdigest()
    assert manifest_sha256(shards) == got  # the local folder's key is the same


def test_cut_transfers_are_retried_and_resume_in_place(shards, server):
    server.faults, server.fault_times = {SHARD: "cut"}, {SHARD: 2}
    assert_same(batches(Remote(server.url, **FAST), 24), batches(shards, 24))
    assert server.requests.count(SHARD) >= 3  # two cut attempts, then a whole one


def test_cut_in_a_later_epoch_is_retried_in_place(shards, server):
    """Epoch 0 parses the shards with tarfile; later epochs cut samples out of the stream by the
    offsets found then (stream._StreamIndex). A cut there is retried like any other."""
    stream = iter(ShardStream(Remote(server.url, **FAST), batch_per_device=4, seed=3,
                              shuffle_buffer=8))  # fmt: skip
    got = [next(stream) for _ in range(12)]  # one epoch: 48 samples / 4
    server.requests.clear()
    server.faults, server.fault_times = {SHARD: "cut"}, {SHARD: 2}
    got += [next(stream) for _ in range(18)]
    assert_same(got, batches(shards, 30))
    assert server.requests.count(SHARD) >= 3


def test_a_shard_replaced_at_its_url_is_read_again(tmp_path, shards):
    """The offsets a process remembers are checked against each sample's tar header: after the
    file changes at its URL, the stream yields what a fresh reader of the new file yields."""
    folder = tmp_path / "moving"
    shutil.copytree(shards, folder)
    srv = FaultServer(folder).start()
    try:
        kw = dict(batch_per_device=4, seed=3, shuffle_buffer=8, return_keys=True)
        stream = iter(ShardStream(Remote(srv.url, **FAST), **kw))
        head = [next(stream) for _ in range(12)]  # epoch 0: the offsets are learnt
        (folder / SHARD).write_bytes((shards / "train-000002.tar").read_bytes())
        tail = [next(stream) for _ in range(18)]
        want = list(itertools.islice(iter(ShardStream(folder, start_batch=12, **kw)), 18))
        assert [b[2] for b in tail] == [b[2] for b in want]
        assert all(torch.equal(a[0], b[0]) for a, b in zip(tail, want, strict=True))
        assert len(head) == 12
    finally:
        srv.stop()


def test_a_shard_replaced_at_its_url_is_read_again_past_its_known_part(tmp_path, shards):
    """A read that starts after the samples this process knows of begins at the remembered
    offset of the next one: in a replaced file that is no header, and the retry must read the
    new file from its start (not fail every attempt at the same stale offset)."""
    folder = tmp_path / "moving"
    shutil.copytree(shards, folder)
    other = write_tiny_shards(tmp_path / "other", n=48, size=24, per_shard=16)  # other offsets
    srv = FaultServer(folder).start()
    try:
        kw = dict(batch_per_device=4, shuffle_buffer=1, return_keys=True, decode=False)
        first = ShardStream(Remote(srv.url, **FAST), **kw)
        name = first.epoch_shards(0)[0].name
        next(iter(first))  # this process now knows the first samples of `name`
        (folder / name).write_bytes((other / name).read_bytes())
        # rank 1 of 4 starts at sample 12 of `name` (3 batches of 4 per rank and epoch)
        part = dict(kw, rank=1, world_size=4)
        got = next(iter(ShardStream(Remote(srv.url, **FAST), **part)))
        want = next(iter(ShardStream(folder, **part)))
        assert got[2] == want[2] and got[0] == want[0]
    finally:
        srv.stop()


def test_two_reads_of_a_url_shard_in_one_process_yield_its_samples_in_order(shards, server):
    """Reader x starts in the part of a shard that reader y has already learnt (_StreamIndex)
    and is suspended there while y learns more: x's tarfile part must still start right after
    the samples x knew of, not after those learnt since (which it would number wrongly)."""
    kw = dict(batch_per_device=4, shuffle_buffer=1, return_keys=True)
    y = iter(ShardStream(server.url, **kw))
    next(y)  # y learnt the first samples of the epoch's first shard, and is still reading it
    x = iter(ShardStream(server.url, **kw))
    got = [next(x)]  # from the known part
    for _ in range(2):
        next(y)  # y learns more of the shard while x is suspended
    got += [next(x) for _ in range(5)]
    want = list(itertools.islice(iter(ShardStream(shards, **kw)), 6))
    assert [b[2] for b in got] == [b[2] for b in want]
    assert all(torch.equal(a[0], b[0]) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize(
    "fault, cause",
    [
        ("404", "HTTP error status >= 400 (e.g. 404 Not Found) (curl exit 22)"),
        ("cut", "cut mid-file (partial transfer) (curl exit 18)"),
        ("stall", "stalled: no data for 0.5 s (read timeout)"),
    ],  # fmt: skip
)
def test_faults_are_retried_then_one_line(server, fault, cause):
    server.faults, server.stall_s = {SHARD: fault}, 3
    t0 = time.perf_counter()
    with pytest.raises(DataError) as err:
        batches(Remote(server.url, retries=2, timeout_s=0.5, **FAST), 24)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{server.url}{SHARD}: "), msg
    assert msg.endswith(f"{cause}, 3 attempts"), msg
    assert server.requests.count(SHARD) == 3  # the first attempt and 2 retries
    assert time.perf_counter() - t0 < 10


def test_connection_refused_names_the_manifest_url():
    url = refused_url()
    with pytest.raises(DataError) as err:
        Manifest.read(Remote(url, retries=1, **FAST))
    assert str(err.value) == (
        f"{url}manifest.json: connection refused (the server is down or refuses connections) "
        "(curl exit 7), 2 attempts"
    )


def test_a_stalled_s3_transfer_leaves_no_process(tmp_path, monkeypatch):
    """s3:// runs `aws s3 cp URL -` through webdataset's `pipe:` (a shell): the reader's kill on
    a stall must reach the aws process itself, not only the shell that started it."""
    import os
    import sys

    pid_file = tmp_path / "aws.pid"
    fake = tmp_path / "bin" / "aws"  # a stand-in aws CLI: one process that never answers
    fake.parent.mkdir()
    body = f"import os, time\nopen({str(pid_file)!r}, 'w').write(str(os.getpid()))\n"
    fake.write_text(f"#!{sys.executable}\n{body}time.sleep(60)\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake.parent}{os.pathsep}{os.environ['PATH']}")
    remote = Remote("s3://bucket/shards/", retries=0, timeout_s=0.5)
    with pytest.raises(DataError, match=r"^s3://bucket/shards/manifest.json: stalled"):
        Manifest.read(remote)
    pid = int(pid_file.read_text())
    status = Path(f"/proc/{pid}/status")
    assert not status.exists() or "State:\tZ" in status.read_text(), "aws still runs"


def test_train_exact_over_http_is_bit_identical_to_local(shards, server, tmp_path):
    """`facegan train --data URL --exact` (the CLI, so the URL survives the option parsing)
    against the same run from the folder: identical weights and metric rows."""
    common = ["--preset", "demo", "--g-width", "8", "--d-width", "8", "--batch", "8",
              "--num-workers", "0", "--log-every", "3", "--sample-every", "6", "--ckpt-every", "6",
              "--n-samples", "4", "--wandb-mode", "disabled", "--max-steps", "6", "--exact",
              "--shuffle-buffer", "8"]  # fmt: skip
    from tests.conftest import reset_accelerate

    for data, out in ((server.url, "http"), (str(shards), "local")):
        reset_accelerate()
        res = CliRunner().invoke(app, ["train", "--data", data, "--out", str(tmp_path / out),
                                       *common])  # fmt: skip
        assert res.exit_code == 0, res.output
    saved = json.loads((tmp_path / "http" / "config.json").read_text())
    assert saved["data"] == server.url  # kept as given, "//" and all
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):
        a = load_file(tmp_path / "http" / "checkpoints" / "step-000000006" / name)
        b = load_file(tmp_path / "local" / "checkpoints" / "step-000000006" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name
    assert "train-000000.tar" in server.requests


def test_train_fault_is_one_line_exit_1(tmp_path):
    url = refused_url()
    res = CliRunner().invoke(app, ["train", "--data", url, "--out", str(tmp_path / "r"),
                                   "--data-retries", "0", "--wandb-mode", "disabled"])  # fmt: skip
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and f"{url}manifest.json: connection refused" in lines[0], lines


def test_verify_over_http_catches_a_flipped_byte(tmp_path, shards):
    folder = tmp_path / "flip"
    shutil.copytree(shards, folder)
    srv = FaultServer(folder).start()
    try:
        ok = CliRunner().invoke(app, ["verify", srv.url])
        assert ok.exit_code == 0 and f"OK: 3 shards, 48 samples in {srv.url}" in ok.stdout
        data = bytearray((folder / SHARD).read_bytes())
        data[2000] ^= 0xFF
        (folder / SHARD).write_bytes(bytes(data))
        bad = CliRunner().invoke(app, ["verify", srv.url])
        assert bad.exit_code == 1
        assert f"BAD {SHARD}: sha256 does not match the manifest (corrupted)" in bad.stdout
        srv.faults = {"train-000002.tar": "404"}
        gone = CliRunner().invoke(app, ["verify", srv.url])
        assert gone.exit_code == 1 and "BAD train-000002.tar: cannot be fetched: " in gone.stdout
    finally:
        srv.stop()


# ---- the shard cache (--cache-dir): once per machine, checked against the manifest's sha256


def cache_files(cache: Path) -> list[str]:
    """What a --cache-dir holds besides its lock files (.locks/)."""
    return sorted(str(p.relative_to(cache)) for p in cache.rglob("*")
                  if p.is_file() and p.parent.name != ".locks")  # fmt: skip


def cached(url: str, cache: Path, **kw) -> Remote:
    from facegan_dist.data import remote

    remote._hashed.clear()  # as a new process: every cached file is hashed before its first use
    return Remote(url, cache_dir=cache, **FAST, **kw)


def test_cache_downloads_each_shard_once_then_no_requests(shards, server, tmp_path):
    cache = tmp_path / "cache"
    local = batches(shards, 30, num_workers=2)
    # real loader workers (2 processes) race for the same shards: each is downloaded once
    stream = ShardStream(cached(server.url, cache), batch_per_device=4, seed=3, shuffle_buffer=8,
                         num_workers=2)  # fmt: skip
    assert_same(list(itertools.islice(iter(make_loader(stream)), 30)), local)
    tars = [r for r in server.requests if r.endswith(".tar")]
    assert sorted(tars) == ["train-000000.tar", "train-000001.tar", "train-000002.tar"], tars
    m = json.loads((shards / "manifest.json").read_text())["splits"]["train"]["shards"]
    assert cache_files(cache) == sorted(f"{s['sha256'][:16]}-{s['name']}" for s in m)
    server.requests.clear()
    assert_same(batches(cached(server.url, cache), 30, num_workers=2), local)
    assert server.requests == ["manifest.json"]  # the second run asks for no shard


def test_cache_retries_a_corrupted_download(shards, server, tmp_path):
    server.faults, server.fault_times = {SHARD: "corrupt"}, {SHARD: 1}
    assert_same(batches(cached(server.url, tmp_path / "c"), 24), batches(shards, 24))
    assert server.requests.count(SHARD) == 2  # the corrupted download, then a good one


def test_cache_refuses_a_shard_corrupted_every_time(server, tmp_path):
    server.faults = {SHARD: "corrupt"}
    cache = tmp_path / "c"
    with pytest.raises(DataError) as err:
        batches(cached(server.url, cache, retries=2), 24)
    msg = str(err.value)
    assert "\n" not in msg and msg.startswith(f"{server.url}{SHARD}: sha256 mismatch"), msg
    assert msg.endswith(", 3 attempts"), msg
    assert server.requests.count(SHARD) == 3
    assert not any(SHARD in f for f in cache_files(cache)), cache_files(cache)  # nothing kept


def test_cache_replaces_a_damaged_cached_file(shards, server, tmp_path):
    cache = tmp_path / "c"
    batches(cached(server.url, cache), 24)
    (bad,) = [p for p in cache.iterdir() if p.name.endswith(SHARD)]
    data = bytearray(bad.read_bytes())
    data[3000] ^= 0xFF
    bad.write_bytes(bytes(data))
    server.requests.clear()
    assert_same(batches(cached(server.url, cache), 24), batches(shards, 24))
    assert server.requests == ["manifest.json", SHARD]  # only the damaged one again


@pytest.mark.parametrize("kind", ["pipe", "file"])
def test_cache_with_pipe_and_file_urls(shards, tmp_path, kind):
    url = f"pipe:cat {shards}/{{name}}" if kind == "pipe" else f"file://{shards}/"
    cache = tmp_path / "c"
    assert_same(batches(cached(url, cache), 14), batches(shards, 14))
    assert len([f for f in cache_files(cache) if f.endswith(".tar")]) == 3


def test_cache_open_failures_leak_no_file_descriptor(tmp_path):
    """A transfer that cannot even start (file: of a missing file) is retried, then one line;
    the temporary file's descriptor of each attempt is closed and the file deleted."""
    import os

    remote = Remote(f"file://{tmp_path}/gone/", retries=2, cache_dir=tmp_path / "c", **FAST)
    before = len(os.listdir("/proc/self/fd"))
    with pytest.raises(DataError, match="cannot open .*, 3 attempts"):
        remote.cached(SHARD, "0" * 64)
    assert len(os.listdir("/proc/self/fd")) == before
    assert cache_files(tmp_path / "c") == []


def test_train_cache_corrupted_is_one_line_exit_1(server, tmp_path):
    server.faults = {SHARD: "corrupt"}
    cache = tmp_path / "c"
    res = CliRunner().invoke(app, ["train", "--data", server.url, "--cache-dir", str(cache),
                                   "--out", str(tmp_path / "r"), "--data-retries", "1",
                                   "--wandb-mode", "disabled", "--num-workers", "0",
                                   "--batch", "8", "--max-steps", "40", "--preset", "demo",
                                   "--g-width", "8", "--d-width", "8"])  # fmt: skip
    assert res.exit_code == 1, res.output
    errors = [x for x in res.stderr.splitlines() if "error" in x.lower() or "Traceback" in x]
    assert errors == [res.stderr.strip().splitlines()[-1]], res.stderr  # one line, the last
    assert errors[0].startswith(f"error: {server.url}{SHARD}: sha256 mismatch"), errors
    assert errors[0].endswith(", 2 attempts"), errors
    assert not any(SHARD in f for f in cache_files(cache)), cache_files(cache)


def test_cache_dir_with_a_local_folder_is_refused(shards, tmp_path):
    res = CliRunner().invoke(app, ["train", "--data", str(shards), "--cache-dir",
                                   str(tmp_path / "c"), "--dry-run"])  # fmt: skip
    assert res.exit_code == 1
    assert res.stderr.strip() == (
        f"error: --cache-dir caches the shards of a URL --data; --data {shards} is a local "
        "folder (read in place): drop --cache-dir"
    )


def test_bench_data_over_a_url_beside_local_and_warm_cache(shards, server, tmp_path):
    cache = tmp_path / "c"
    res = CliRunner().invoke(app, ["bench", "data", "--data", server.url, "--local", str(shards),
                                   "--cache-dir", str(cache), "--read-seconds", "0.2",
                                   "--rounds", "1"])  # fmt: skip
    assert res.exit_code == 0, res.output
    r = json.loads(res.stdout.strip().splitlines()[-1])
    assert r["bench"] == "data-url" and r["num_samples"] == 48 and r["image_size"] == 16
    for name in ("streamed", "local", "cache"):
        assert r[name]["images_per_s"] > 0 and r[name]["first_pass_images_per_s"] > 0, name
    assert r["streamed_over_local"] > 0 and r["cache_over_local"] > 0
    assert f"streamed   {server.url}: first pass " in res.stdout
    assert len([f for f in cache_files(cache) if f.endswith(".tar")]) == 3
    assert r["cache"]["fill_s"] >= 0 and r["local"]["path"] == str(shards)
    bad = CliRunner().invoke(app, ["bench", "data", "--local", str(shards)])
    assert bad.exit_code == 1 and bad.stderr.strip() == "error: --local goes with --data URL"


# ---- the other commands over a URL: verify, preview, evaluate, directions, train --eval-every


def invoke(*args) -> object:
    from tests.conftest import reset_accelerate

    reset_accelerate()
    return CliRunner().invoke(app, [str(a) for a in args])


def one_line_error(res, needle: str) -> None:
    lines = [x for x in res.stderr.splitlines() if x.strip()]
    assert res.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: "), res.output
    assert needle in lines[0], lines[0]


NO_CACHE = "is a URL: give --cache-dir DIR, where the attribute classifier and FID's real"


@pytest.fixture(scope="module")
def generator(tmp_path_factory, shards) -> Path:
    """A tiny exported 16 px G (tests/integration/test_sample_eval.py)."""
    from tests.integration.test_sample_eval import tiny_run

    names = json.loads((shards / "manifest.json").read_text())["attribute_names"]
    return tiny_run(tmp_path_factory.mktemp("gen"), names)


def test_verify_with_a_cache_keeps_the_checked_shards(server, tmp_path):
    cache = tmp_path / "c"
    res = invoke("verify", server.url, "--cache-dir", cache)
    assert res.exit_code == 0 and "OK: 3 shards, 48 samples" in res.stdout, res.output
    assert len([f for f in cache_files(cache) if f.endswith(".tar")]) == 3
    server.requests.clear()
    assert invoke("verify", server.url, "--cache-dir", cache).exit_code == 0
    assert not [r for r in server.requests if r.endswith(".tar")]  # checked in the cache


def test_preview_over_http_equals_the_local_one(shards, server, tmp_path):
    a, b = tmp_path / "http.png", tmp_path / "local.png"
    res = invoke("preview", server.url, "--out", a, "--n", 16, "--cache-dir", tmp_path / "c")
    assert res.exit_code == 0 and f"16 images from {server.url}" in res.stdout, res.output
    assert invoke("preview", shards, "--out", b, "--n", 16).exit_code == 0
    assert a.read_bytes() == b.read_bytes()


def test_evaluate_over_http_keeps_classifier_and_stats_in_the_cache(
    shards, server, generator, tmp_path
):
    local = tmp_path / "local"
    shutil.copytree(shards, local)
    args = ["--features", "attributes", "--n", 24, "--kid-subsets", 2, "--batch", 8]
    one_line_error(invoke("evaluate", generator, "--data", server.url, *args), NO_CACHE)
    cache = tmp_path / "c"
    res = invoke("evaluate", generator, "--data", server.url, "--cache-dir", cache,
                 "--out", tmp_path / "http.json", *args)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert invoke("evaluate", generator, "--data", local, "--out", tmp_path / "local.json",
                  *args).exit_code == 0  # fmt: skip
    got = json.loads((tmp_path / "http.json").read_text())
    want = json.loads((tmp_path / "local.json").read_text())
    assert got["data"] == server.url and got["n_real"] == 24
    assert got["fid"] == pytest.approx(want["fid"], rel=1e-6)
    assert got["kid"] == pytest.approx(want["kid"], rel=1e-6, abs=1e-9)
    (derived,) = cache.glob("manifest-*")
    assert (derived / "classifier" / "attributes.safetensors").is_file()
    stats = derived / "stats" / "attributes-train-24.safetensors"
    stamp = stats.stat().st_mtime_ns
    assert not (shards / "classifier").exists() and not (shards / "stats").exists()
    server.requests.clear()  # again: classifier and statistics come from the cache
    assert invoke("evaluate", generator, "--data", server.url, "--cache-dir", cache,
                  "--out", tmp_path / "again.json", *args).exit_code == 0  # fmt: skip
    assert set(server.requests) == {"manifest.json"} and stats.stat().st_mtime_ns == stamp


def test_directions_over_http_equal_the_local_ones(shards, server, generator, tmp_path):
    from facegan_dist.directions import load_directions

    local = tmp_path / "local"
    shutil.copytree(shards, local)
    args = ["--n", 40, "--check-seeds", 0, "--classifier-epochs", 1, "--classifier-width", 8]
    http, here = tmp_path / "http.safetensors", tmp_path / "local.safetensors"
    one_line_error(invoke("directions", generator, "--data", server.url, "--out", http, *args),
                   NO_CACHE)  # fmt: skip
    cache = tmp_path / "c"
    res = invoke("directions", generator, "--data", server.url, "--cache-dir", cache,
                 "--out", http, *args)  # fmt: skip
    assert res.exit_code == 0, res.output
    assert invoke("directions", generator, "--data", local, "--out", here, *args).exit_code == 0
    (derived,) = cache.glob("manifest-*")
    report = json.loads(http.with_suffix(".json").read_text())
    assert report["classifier"]["path"] == str(derived / "classifier")
    assert torch.equal(load_directions(http)[0], load_directions(here)[0])
    assert not (shards / "classifier").exists()


def test_train_eval_every_over_http_needs_and_uses_a_cache(server, tmp_path):
    common = ["train", "--data", server.url, "--preset", "demo", "--g-width", "8",
              "--d-width", "8", "--batch", "8", "--num-workers", "0", "--max-steps", "2",
              "--eval-every", "2", "--eval-n", "16", "--wandb-mode", "disabled",
              "--sample-every", "100", "--n-samples", "4"]  # fmt: skip
    one_line_error(
        invoke(*common, "--out", tmp_path / "r0"),
        "--eval-every needs a local --data folder, or --cache-dir DIR with a URL",
    )
    cache = tmp_path / "c"
    res = invoke(*common, "--out", tmp_path / "r", "--cache-dir", cache)
    assert res.exit_code == 0, res.output
    rows = [json.loads(x) for x in (tmp_path / "r" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "fid" in r]
    assert [r["step"] for r in evals] == [2] and evals[0]["fid"] > 0
    (derived,) = cache.glob("manifest-*")
    assert (derived / "classifier" / "attributes.safetensors").is_file()
    assert (tmp_path / "r" / "best" / "best.json").is_file()


@pytest.mark.parametrize("command", ["verify", "preview", "evaluate", "directions"])
def test_other_commands_take_the_retry_policy(server, generator, tmp_path, command):
    """--data-retries and --data-timeout reach the transfers of every command that reads shards
    (train's own are covered above): a stalled manifest is given up after 0.5 s, twice."""
    args = {
        "verify": [server.url],
        "preview": [server.url, "--out", tmp_path / "p.png"],
        "evaluate": [generator, "--data", server.url, "--out", tmp_path / "e.json"],
        "directions": [generator, "--data", server.url, "--out", tmp_path / "d.safetensors"],
    }[command]
    server.faults, server.stall_s = {"manifest.json": "stall"}, 3
    res = invoke(command, *args, "--cache-dir", tmp_path / "c", "--data-retries", 1,
                 "--data-timeout", 0.5)  # fmt: skip
    one_line_error(res, "manifest.json: stalled: no data for 0.5 s (read timeout), 2 attempts")
    assert server.requests.count("manifest.json") == 2
    assert not list(tmp_path.glob("[ped].*"))  # no output file
    bad = invoke(command, *args, "--data-retries", -1)
    one_line_error(bad, "--data-retries -1 must be at least 0")
