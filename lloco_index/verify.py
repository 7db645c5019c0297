"""Check a compressed store entry by entry, and repair it by dropping what is bad.

Per entry: the shard exists and parses, the tensor is in it, its sha256, shape and dtype match the
index, the shape fits the compressor config, and the key is the content address of the entry's text
under the store's fingerprint. Store-wide: SQLite's own integrity check and ``sources`` rows that
point to no entry. Leftovers of interrupted writes (orphan shards, ``*.tmp`` files) are listed
separately: they are never served, so they are not problems, and repair removes them.

Repair drops bad entries (the next ``lloco ingest`` recompresses them; nothing bad is ever served)
and removes leftovers. It holds the store's write lock while it looks for leftovers, so a file that a
live writer is about to commit is never mistaken for one.
"""

from __future__ import annotations

import sqlite3
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING

from safetensors import SafetensorError, safe_open

from .store import SHARD_SUFFIX, StoreError, _batches, _digest, _dtype_name, _marks, chunk_key

if TYPE_CHECKING:
    from .store import CompressedStore

# kinds of problems; "index" cannot be repaired here (the SQLite file itself is damaged)
ENTRY_KINDS = ("missing_shard", "unreadable_shard", "missing_tensor", "checksum", "shape", "dtype", "key_mismatch")


@dataclass
class Problem:
    kind: str  # one of ENTRY_KINDS, "dangling_source" or "index"
    detail: str
    key: str | None = None
    shard: str | None = None
    fixed: bool = False


@dataclass
class VerifyReport:
    store: str
    entries: int = 0  # entries checked
    shards: int = 0  # shard files referenced by the index
    problems: list[Problem] = field(default_factory=list)
    leftovers: list[str] = field(default_factory=list)  # orphan shards / temp files, relative to the store
    repaired: bool = False
    dropped: list[str] = field(default_factory=list)  # keys of entries repair removed
    removed: list[str] = field(default_factory=list)  # files repair removed

    @property
    def ok(self) -> bool:
        """Nothing wrong remains (every problem found was fixed, or there was none)."""
        return all(p.fixed for p in self.problems)

    def to_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def verify_store(store: "CompressedStore", repair: bool = False) -> VerifyReport:
    if repair and store.read_only:
        raise StoreError(f"{store.path} is read-only; cannot repair it (nothing was changed)")
    report = VerifyReport(str(store.path))
    db = store._db()
    check = db.execute("PRAGMA quick_check").fetchall()
    if check != [("ok",)]:
        report.problems.append(Problem("index", "SQLite integrity check failed: " + "; ".join(r[0] for r in check[:5])
                                       + " (restore the store from a backup or re-ingest into a new folder)"))
    db.execute("BEGIN")  # one read snapshot: entries committed meanwhile by other processes are not half-seen
    try:
        _check_entries(store, db, report)
        for doc, pos, key in db.execute(
                "SELECT doc, position, key FROM sources WHERE key NOT IN (SELECT key FROM chunks)"):
            report.problems.append(Problem("dangling_source", f"{doc} #{pos} points to missing entry", key=key))
    finally:
        db.execute("COMMIT")
    # writers create shard files only while holding the write lock: holding it too, every
    # unreferenced file is a true leftover, not a commit in flight
    with (nullcontext(db) if store.read_only else db) as tx:
        if repair:
            _drop_bad(tx, report)
        report.leftovers = _leftovers(store, tx)
    if repair:
        for name in report.leftovers:
            (store.path / name).unlink(missing_ok=True)
            report.removed.append(name)
        report.repaired = True
    return report


def _check_entries(store: "CompressedStore", db: sqlite3.Connection, report: VerifyReport) -> None:
    cfg = store.compressor_config
    rows = db.execute("SELECT key, shard, n_vectors, hidden, dtype, sha256, text FROM chunks ORDER BY shard, rowid")
    shard, group = None, []
    for row in rows:
        if row[1] != shard and group:
            _check_shard(store, shard, group, cfg, report)
            group = []
        shard = row[1]
        group.append(row)
    if group:
        _check_shard(store, shard, group, cfg, report)


def _check_shard(store: "CompressedStore", shard: str, rows: list[tuple], cfg: dict, report: VerifyReport) -> None:
    report.shards += 1
    report.entries += len(rows)
    path = store.path / "shards" / shard
    if not path.is_file():
        report.problems += [Problem("missing_shard", f"shard file {shard} is missing", key=r[0], shard=shard)
                            for r in rows]
        return
    try:
        with safe_open(str(path), "pt") as f:
            names = set(f.keys())
            for key, _, n, hidden, dtype, sha, text in rows:
                problem = _entry_problem(f, names, key, n, hidden, dtype, sha)
                if problem is None:
                    problem = _meta_problem(store.fingerprint, key, n, hidden, dtype, text, cfg)
                if problem:
                    report.problems.append(Problem(problem[0], problem[1], key=key, shard=shard))
    except (OSError, SafetensorError) as e:
        report.problems += [Problem("unreadable_shard", f"shard {shard} is unreadable: {e}", key=r[0], shard=shard)
                            for r in rows]


def _entry_problem(f, names: set, key: str, n: int, hidden: int, dtype: str, sha: str) -> tuple[str, str] | None:
    """The stored tensor against its index row."""
    if key not in names:
        return "missing_tensor", "tensor not in its shard"
    t = f.get_tensor(key)
    if tuple(t.shape) != (n, hidden):
        return "shape", f"tensor is {tuple(t.shape)}, index says {(n, hidden)}"
    if _dtype_name(t) != dtype:
        return "dtype", f"tensor is {_dtype_name(t)}, index says {dtype}"
    if _digest(t) != sha:
        return "checksum", "sha256 of the tensor does not match the index"
    return None


def _meta_problem(fingerprint: str, key: str, n: int, hidden: int, dtype: str, text: str,
                  cfg: dict) -> tuple[str, str] | None:
    """The index row against the store's fingerprint and compressor config."""
    if chunk_key(fingerprint, text) != key:
        return "key_mismatch", "key is not the content address of the stored text under this store's fingerprint"
    per_segment = None if cfg.get("proportional_vectors") else cfg.get("summary_tokens")  # else any count fits
    if cfg.get("hidden_size") not in (None, hidden) or (per_segment and n % per_segment):
        return "shape", (f"[{n}, {hidden}] does not fit the compressor (hidden {cfg.get('hidden_size')}, "
                         f"{cfg.get('summary_tokens')} vectors per segment)")
    if cfg.get("store_dtype") not in (None, dtype):
        return "dtype", f"{dtype}, the compressor stores {cfg['store_dtype']}"
    return None


def _drop_bad(db: sqlite3.Connection, report: VerifyReport) -> None:
    """Delete exactly the bad rows seen (matched by key and shard: a key re-stored meanwhile by another
    process in a new shard is kept) and the sources rows that point nowhere."""
    for p in report.problems:
        if p.kind in ENTRY_KINDS:
            if db.execute("DELETE FROM chunks WHERE key=? AND shard=?", (p.key, p.shard)).rowcount:
                report.dropped.append(p.key)
            p.fixed = True
    dropped = list(dict.fromkeys(report.dropped))
    for part in _batches(dropped):
        db.execute(f"DELETE FROM sources WHERE key IN ({_marks(part)})", part)
    db.execute("DELETE FROM sources WHERE key NOT IN (SELECT key FROM chunks)")
    for p in report.problems:
        p.fixed = p.fixed or p.kind == "dangling_source"


def _leftovers(store: "CompressedStore", db: sqlite3.Connection) -> list[str]:
    used = {r[0] for r in db.execute("SELECT DISTINCT shard FROM chunks")}
    shards = store.path / "shards"
    files = sorted(shards.iterdir()) if shards.is_dir() else []
    return [f"shards/{f.name}" for f in files
            if f.is_file() and (f.name.endswith(".tmp") or (f.name.endswith(SHARD_SUFFIX) and f.name not in used))]
