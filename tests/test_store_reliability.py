"""Store crash safety, corruption detection, verify/repair, full disk, read-only and concurrent access."""

from __future__ import annotations

import errno
import json
import multiprocessing
import os
import signal
import sqlite3
import subprocess
from pathlib import Path

import pytest
import torch

from lloco_index import store as store_mod
from lloco_index.cli import main
from lloco_index.store import CompressedStore, StoreError

FP = "f" * 32
CFG = {"hidden_size": 8, "summary_tokens": 4, "store_dtype": "float16"}


def vec(i: int) -> torch.Tensor:
    """The one right tensor for chunk i, so any reader can check what it got."""
    return torch.arange(32, dtype=torch.float16).reshape(4, 8) + i


def put(store: CompressedStore, ids, doc: str = "doc") -> int:
    items = [(store.key_for(f"chunk {i}"), vec(i), f"chunk {i}", 3) for i in ids]
    return store.put_many(items, [(doc, i, k) for i, (k, *_) in zip(ids, items)])


def make_store(path: Path, batches=((0, 1, 2), (3, 4, 5))) -> CompressedStore:
    store = CompressedStore(path, fingerprint=FP, create=True, compressor_config=CFG)
    for ids in batches:
        put(store, ids)
    return store


def shard_of(store: CompressedStore, i: int) -> Path:
    (shard,) = store._db().execute("SELECT shard FROM chunks WHERE key=?", (store.key_for(f"chunk {i}"),)).fetchone()
    return store.path / "shards" / shard


def verify_cli(path: Path, *extra: str, capsys) -> tuple[int, dict]:
    rc = main(["verify", "--store", str(path), "--json", *extra])
    return rc, json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_clean_store_verifies(tmp_path, capsys):
    make_store(tmp_path / "s")
    rc, rep = verify_cli(tmp_path / "s", capsys=capsys)
    assert rc == 0 and rep["ok"] and rep["entries"] == 6 and rep["shards"] == 2
    assert rep["problems"] == [] and rep["leftovers"] == []


@pytest.mark.parametrize("proportional", [False, True])
def test_vector_count_check_follows_the_compressor(tmp_path, proportional, capsys):
    """3 vectors where a segment gives 4: a shape error, unless short chunks keep fewer (proportional_vectors),
    which ``lloco info`` then says."""
    store = CompressedStore(tmp_path / "s", fingerprint=FP, create=True,
                            compressor_config={**CFG, "segment_tokens": 32, "proportional_vectors": proportional})
    store.put_many([(store.key_for("short"), vec(0)[:3], "short", 3)], [("doc", 0, store.key_for("short"))])
    assert [p.kind for p in store.verify().problems] == ([] if proportional else ["shape"])
    assert main(["info", "--store", str(store.path)]) in (0, None)
    out = capsys.readouterr().out
    assert "vectors:          3" in out and "(segment 32 -> 4 vectors" in out
    assert ("fewer for a shorter one" in out) == proportional


def test_corrupt_tensor_is_never_served_and_repair_recompresses(tmp_path, capsys):
    store = make_store(tmp_path / "s")
    shard = shard_of(store, 4)
    data = bytearray(shard.read_bytes())
    data[-3] ^= 0xFF  # inside the tensor data of the last tensor in the file
    shard.write_bytes(bytes(data))
    fresh = CompressedStore(store.path)  # no cache
    bad = [i for i in (3, 4, 5) if _fails(fresh, i)]
    assert len(bad) == 1
    assert all(torch.equal(fresh.get_many([fresh.key_for(f"chunk {i}")])[0], vec(i)) for i in (0, 1, 2))
    rc, rep = verify_cli(store.path, capsys=capsys)
    assert rc == 1 and not rep["ok"]
    assert [p["kind"] for p in rep["problems"]] == ["checksum"]
    rc, rep = verify_cli(store.path, "--repair", capsys=capsys)
    assert rc == 0 and rep["ok"] and len(rep["dropped"]) == 1
    assert fresh.missing([fresh.key_for(f"chunk {i}") for i in range(6)]) == [fresh.key_for(f"chunk {bad[0]}")]
    assert fresh.doc_keys("doc") == [fresh.key_for(f"chunk {i}") for i in range(6) if i != bad[0]]
    assert put(fresh, [bad[0]]) == 1  # the next ingest stores it again
    assert fresh.verify().ok


def _fails(store: CompressedStore, i: int) -> bool:
    try:
        store.get_many([store.key_for(f"chunk {i}")])
        return False
    except StoreError as e:
        assert "verify" in str(e)
        return True


def test_truncated_missing_and_tampered_entries(tmp_path):
    store = make_store(tmp_path / "s", batches=((0, 1), (2, 3), (4, 5)))
    shard_of(store, 0).write_bytes(shard_of(store, 0).read_bytes()[:50])
    shard_of(store, 2).unlink()
    db = sqlite3.connect(store.path / "index.sqlite")
    with db:
        db.execute("UPDATE chunks SET text='forged text' WHERE key=?", (store.key_for("chunk 4"),))
        db.execute("UPDATE chunks SET dtype='float32' WHERE key=?", (store.key_for("chunk 5"),))
        db.execute("INSERT INTO sources VALUES ('ghost', 0, ?)", ("0" * 32,))
    db.close()
    report = store.verify()
    kinds = sorted(p.kind for p in report.problems)
    assert kinds == ["dangling_source", "dtype", "key_mismatch", "missing_shard", "missing_shard",
                     "unreadable_shard", "unreadable_shard"]
    with pytest.raises(StoreError, match="corrupt"):
        store.get_many([store.key_for("chunk 5")])  # dtype differs from the index: not served
    repaired = store.verify(repair=True)
    assert repaired.ok and len(repaired.dropped) == 6
    assert len(repaired.removed) == 2  # the truncated shard and the one left without entries
    after = store.verify()
    assert after.ok and after.entries == 0 and after.leftovers == [] and store.documents() == []
    assert list((store.path / "shards").iterdir()) == []


def _crash_in_write(path: str, when: str) -> None:
    """Child process: SIGKILL itself at ``when`` inside put_many (after the shard rename, or mid temp file)."""
    store = CompressedStore(path)
    real = store_mod._write_durably

    def dying(target: Path, data: bytes) -> None:
        if when == "mid_tmp":
            with open(target.with_name(target.name + ".tmp"), "wb") as f:
                f.write(data[: len(data) // 2])
        else:
            real(target, data)
        os.kill(os.getpid(), signal.SIGKILL)

    store_mod._write_durably = dying
    put(store, [10, 11])


@pytest.mark.parametrize("when", ["after_rename", "mid_tmp"])
def test_kill_inside_a_write_leaves_only_harmless_leftovers(tmp_path, when):
    store = make_store(tmp_path / "s")
    store.close()
    proc = multiprocessing.get_context("fork").Process(target=_crash_in_write, args=(str(store.path), when))
    proc.start()
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL
    again = CompressedStore(store.path)
    report = again.verify()
    assert report.ok and report.entries == 6 and len(report.leftovers) == 1
    assert report.leftovers[0].endswith(".tmp" if when == "mid_tmp" else ".safetensors")
    assert again.missing([again.key_for("chunk 10")]) == [again.key_for("chunk 10")]
    assert again.verify(repair=True).removed == report.leftovers
    assert put(again, [10, 11]) == 2 and again.verify().leftovers == []


def test_full_disk_during_shard_write_changes_nothing(tmp_path, monkeypatch):
    store = make_store(tmp_path / "s")
    files = sorted((store.path / "shards").iterdir())

    def no_space(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", no_space)
    with pytest.raises(StoreError, match="No space left on device.*everything stored before is intact"):
        put(store, [20, 21])
    monkeypatch.undo()
    assert sorted((store.path / "shards").iterdir()) == files  # no temp file, no shard
    assert store.verify().ok and store.stats()["chunks"] == 6


def test_full_disk_in_sqlite_removes_the_new_shard(tmp_path, monkeypatch):
    store = make_store(tmp_path / "s")
    files = sorted((store.path / "shards").iterdir())
    real = store_mod._write_durably

    def then_fill(target: Path, data: bytes) -> None:
        real(target, data)
        store._db().execute("PRAGMA max_page_count=1")  # the next insert fails like SQLITE_FULL

    monkeypatch.setattr(store_mod, "_write_durably", then_fill)
    with pytest.raises(StoreError, match="full"):
        put(store, list(range(20, 60)))
    assert sorted((store.path / "shards").iterdir()) == files
    store._db().execute(f"PRAGMA max_page_count={2 ** 30}")
    assert store.verify().ok and store.stats()["chunks"] == 6


@pytest.fixture()
def mounted(tmp_path):
    """Mount helper for real full-disk / read-only checks; skipped where mounting is not allowed."""
    done = []

    def mount(*args: str) -> None:
        r = subprocess.run(["mount", *args], capture_output=True)
        if r.returncode:
            pytest.skip(f"cannot mount here: {r.stderr.decode().strip()}")
        done.append(args[-1])

    yield mount
    for target in reversed(done):
        subprocess.run(["umount", "--lazy", target], check=False)  # lazy: open files must not keep it mounted


def test_real_full_disk(tmp_path, mounted):
    disk = tmp_path / "disk"
    disk.mkdir()
    mounted("-t", "tmpfs", "-o", "size=192k", "tmpfs", str(disk))
    store = CompressedStore(disk / "s", fingerprint=FP, create=True, compressor_config=CFG)
    stored, i = 0, 0
    with pytest.raises(StoreError, match="No space left|full"):
        while i < 10_000:
            put(store, range(i, i + 8))
            stored, i = stored + 8, i + 8
    assert not list((store.path / "shards").glob("*.tmp"))
    report = store.verify()
    assert report.ok and report.entries == stored > 0 and report.leftovers == []
    keys = [store.key_for(f"chunk {j}") for j in range(stored)]
    assert all(torch.equal(t, vec(j)) for j, t in enumerate(CompressedStore(store.path).get_many(keys)))


def test_read_only_store(tmp_path, mounted, capsys):
    store = make_store(tmp_path / "s")
    store.close()
    ro = CompressedStore(store.path, read_only=True)
    assert torch.equal(ro.get_many([ro.key_for("chunk 1")])[0], vec(1))
    with pytest.raises(StoreError, match="read-only; nothing was written"):
        put(ro, [30])
    with pytest.raises(StoreError, match="read-only; cannot repair"):
        ro.verify(repair=True)
    assert ro.verify().ok and CompressedStore(store.path).stats()["chunks"] == 6
    # a real read-only mount: detected by itself, readable, verifiable; writes refused in one line
    view = tmp_path / "ro"
    view.mkdir()
    mounted("--bind", str(store.path), str(view))
    mounted("-o", "remount,ro,bind", str(view))
    auto = CompressedStore(view)
    assert auto.read_only and auto.get_many([auto.key_for("chunk 5")])[0].equal(vec(5))
    assert main(["verify", "--store", str(view)]) == 0
    assert main(["verify", "--store", str(view), "--repair"]) == 2
    assert "read-only" in capsys.readouterr().err


def _writer(path: str, start: int, rounds: int) -> None:
    store = CompressedStore(path, fingerprint=FP, create=True, compressor_config=CFG)  # all create at once
    for r in range(rounds):
        put(store, [(start + r * 3 + j) % 40 for j in range(6)], doc=f"w{start}")


def _reader(path: str, seconds: float, out) -> None:
    import time

    while not (Path(path) / "index.sqlite").is_file():
        time.sleep(0.01)
    store, seen, end = None, 0, time.time() + seconds
    while time.time() < end:
        try:
            store = store or CompressedStore(path)
        except StoreError:  # index file created but metadata not committed yet
            continue
        chunks = store.chunks()
        for c, t in zip(chunks, store.get_many([c.key for c in chunks])):
            assert torch.equal(t, vec(int(c.text.split()[1]))), c.text
        seen = max(seen, len(chunks))
    out.put(seen)


def _open_at_once(path: str, barrier, out) -> None:
    barrier.wait()
    try:
        CompressedStore(path, fingerprint=FP, create=True, compressor_config=CFG)
        out.put("")
    except StoreError as e:
        out.put(str(e))


def test_many_processes_create_one_store_at_the_same_moment(tmp_path):
    """Switching a new index to WAL fails at once (no busy timeout) while another process opens it; the store
    retries. Before, 8 processes opening one new store together failed in 3 of 30 trials."""
    ctx = multiprocessing.get_context("fork")
    for trial in range(30):
        path, barrier, out = str(tmp_path / f"s{trial}"), ctx.Barrier(8), ctx.Queue()
        procs = [ctx.Process(target=_open_at_once, args=(path, barrier, out)) for _ in range(8)]
        for p in procs:
            p.start()
        for p in procs:
            p.join(120)
        assert [out.get(timeout=5) for _ in procs] == [""] * 8
        assert CompressedStore(path).fingerprint == FP


def test_concurrent_writers_and_readers(tmp_path):
    ctx = multiprocessing.get_context("fork")
    path = str(tmp_path / "s")
    results = ctx.Queue()
    readers = [ctx.Process(target=_reader, args=(path, 4.0, results)) for _ in range(2)]
    writers = [ctx.Process(target=_writer, args=(path, s, 12)) for s in (0, 7, 13, 21)]
    for p in readers + writers:
        p.start()
    for p in writers + readers:
        p.join(120)
        assert p.exitcode == 0
    assert all(results.get(timeout=5) > 0 for _ in readers)
    store = CompressedStore(path)
    report = store.verify()
    assert report.ok and report.leftovers == [] and report.entries == 40  # every key once, no orphan shard
    n_shards = len(list((store.path / "shards").iterdir()))
    assert n_shards == report.shards
