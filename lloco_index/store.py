"""Persistent, content-addressed cache of compressed chunks: safetensors shards + a SQLite index.

Layout of a store folder::

    index.sqlite          meta (fingerprint, compressor config, secret), chunks, sources
    shards/<id>.safetensors   one file per ``put_many`` batch, tensor names = chunk keys

Writers take SQLite's write lock (``BEGIN IMMEDIATE``) first, then re-check which keys are still
missing, write the shard to a temp file, fsync it, rename it, fsync the folder and only then commit
the rows that point to it. So concurrent writers never store a key twice, a crash leaves at worst an
unreferenced shard or a ``*.tmp`` file (reported and removed by ``verify(repair=True)``), and no row
ever points to a partial tensor. Every read checks the tensor's sha256, shape and dtype against the
index, so a corrupted file is reported, not served. Readers see committed entries only (WAL snapshots).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import os
import re
import secrets
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Callable, NamedTuple, TypeVar
from urllib.parse import quote

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

if TYPE_CHECKING:
    from .verify import VerifyReport

T = TypeVar("T")

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS chunks (
    key TEXT PRIMARY KEY, shard TEXT NOT NULL, n_vectors INTEGER NOT NULL, hidden INTEGER NOT NULL,
    dtype TEXT NOT NULL, sha256 TEXT NOT NULL, source_tokens INTEGER NOT NULL, text TEXT NOT NULL,
    created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS sources (
    doc TEXT NOT NULL, position INTEGER NOT NULL, key TEXT NOT NULL, PRIMARY KEY (doc, position));
"""
SENTINEL = re.compile(r"<lloco:([0-9a-f]{32}):([0-9a-f]{16})>")
_SENTINEL_PREFIX = "<lloco:"
_DEFANGED_PREFIX = "<lloco\u2060:"  # WORD JOINER: looks the same, can never parse as a sentinel
SHARD_SUFFIX = ".safetensors"


class StoreError(RuntimeError):
    """A store problem the user must act on (missing, made by another compressor, corrupt)."""


class KeyRef(NamedTuple):
    """A verified reference to stored vectors inside a prompt."""

    key: str


@dataclass(frozen=True)
class StoredChunk:
    key: str
    text: str
    source_tokens: int
    n_vectors: int


def chunk_key(fingerprint: str, text: str) -> str:
    """Content address: same text + same compressor -> same key, in any store."""
    return hashlib.sha256(f"{fingerprint}\0{text}".encode("utf-8", "surrogatepass")).hexdigest()[:32]


def escape_sentinels(text: str) -> str:
    """Make every sentinel-looking string in untrusted text (documents, questions) inert.

    Call it on any text you did not produce before putting it in a prompt for ``LLoCO.complete``:
    a document that quotes a real sentinel then stays text and cannot load another chunk's vectors.
    """
    return text.replace(_SENTINEL_PREFIX, _DEFANGED_PREFIX)


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _fsync_dir(path: Path) -> None:
    """Make a rename in ``path`` durable (a power cut could otherwise lose the new name)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_durably(path: Path, data: bytes) -> None:
    """temp file + fsync + rename + fsync(folder): ``path`` holds all of ``data`` or does not exist."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _when_unlocked(op: Callable[[], T], seconds: float) -> T:
    """``op()``, retried while SQLite says "database is locked", for up to ``seconds``.

    Why: switching a new index to WAL needs an exclusive lock, and SQLite fails that at once, without its busy
    timeout, while another process opens the same new index (8 processes creating one store at the same moment
    failed in 3 of 30 trials)."""
    deadline, pause = time.monotonic() + seconds, 0.005
    while True:
        try:
            return op()
        except sqlite3.OperationalError as e:
            if "locked" not in str(e) or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(2 * pause, 0.25)


class CompressedStore:
    """Open (``create=False``) or create a store bound to one compressor fingerprint.

    ``read_only`` defaults to "the folder or index is not writable"; a read-only store serves reads
    and refuses writes with a ``StoreError`` (nothing is changed). Example::

        store = CompressedStore("my_store", fingerprint=comp.fingerprint(), create=True)
        store.put_many([(key, tensor, text, n_tokens)])
        store.get_many([key])   # [Tensor [24, 576]]
    """

    def __init__(self, path: str | Path, fingerprint: str | None = None, create: bool = False,
                 compressor_config: dict | None = None, cache_size: int = 4096, read_only: bool | None = None):
        self.path = Path(path)
        index = self.path / "index.sqlite"
        if not index.is_file():
            if not create or read_only:
                raise StoreError(f"no store at {self.path} (run `lloco ingest ... --store {self.path}` first)")
            if fingerprint is None:
                raise ValueError("creating a store needs the compressor fingerprint")
            try:
                (self.path / "shards").mkdir(parents=True, exist_ok=True)
            except OSError as e:
                raise StoreError(f"cannot create a store at {self.path}: {e.strerror or e}") from e
        self._local = threading.local()
        self._index = index
        self.read_only = _not_writable(self.path) if read_only is None else read_only
        if self.read_only and not index.is_file():
            raise StoreError(f"cannot create a store at {self.path}: the folder is read-only")
        try:
            meta = self._init_meta(fingerprint, compressor_config)
        except sqlite3.Error as e:
            raise StoreError(f"{self.path}: cannot open the store index ({e})") from e
        if fingerprint is not None and meta["fingerprint"] != fingerprint:
            raise StoreError(
                f"{self.path} was made by another compressor (fingerprint {meta['fingerprint']}, this one is "
                f"{fingerprint}); use a new --store folder or the compressor/adapter it was made with")
        self.fingerprint: str = meta["fingerprint"]
        self.compressor_config: dict = json.loads(meta["compressor_config"])
        self._secret = bytes.fromhex(meta["secret"])
        self._cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._cache_size = cache_size
        self._cache_lock = threading.Lock()

    def _init_meta(self, fingerprint: str | None, compressor_config: dict | None) -> dict:
        db = self._db()
        if not self.read_only:
            db.executescript(SCHEMA)  # outside a transaction: executescript commits first
            if fingerprint is not None:
                meta = {"fingerprint": fingerprint, "secret": secrets.token_hex(16),
                        "compressor_config": json.dumps(compressor_config or {}), "created": str(time.time())}
                with db as tx:  # first writer wins; later openers read what it wrote
                    tx.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", meta.items())
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if not {"fingerprint", "secret", "compressor_config"} <= meta.keys():
            raise StoreError(f"{self.path}: store index has no metadata; was it created with a fingerprint?")
        return meta

    def _db(self) -> "_Tx":
        """One connection per thread and process (sqlite3 objects must not cross either); WAL for concurrent readers."""
        db = getattr(self._local, "db", None)
        if db is None or self._local.pid != os.getpid():
            db = self._connect()
            self._local.db, self._local.pid = db, os.getpid()
        return _Tx(db)

    def _connect(self) -> sqlite3.Connection:
        if self.read_only:
            # A clean WAL store has no -wal/-shm files and a read-only folder cannot create them, so
            # plain mode=ro fails; immutable=1 reads the main file alone, which then holds everything.
            wal = self._index.with_name(self._index.name + "-wal")
            mode = "mode=ro" if wal.is_file() and wal.stat().st_size else "immutable=1"
            return sqlite3.connect(f"file:{quote(str(self._index.absolute()))}?{mode}", uri=True,
                                   timeout=60, isolation_level=None)
        db = sqlite3.connect(self._index, timeout=60, isolation_level=None)
        _when_unlocked(lambda: db.execute("PRAGMA journal_mode=WAL"), seconds=60)
        db.execute("PRAGMA synchronous=FULL")
        return db

    def close(self) -> None:
        """Close this thread's connection (a later call reopens it)."""
        db = getattr(self._local, "db", None)
        if db is not None:
            db.close()
            self._local.db = None

    # -- keys and sentinels -------------------------------------------------------------------
    def key_for(self, text: str) -> str:
        return chunk_key(self.fingerprint, text)

    def sentinel(self, key: str) -> str:
        """``<lloco:KEY:TAG>``: TAG is an HMAC with this store's secret, so text that merely
        contains a sentinel-looking string cannot make the LLM load vectors it was not given."""
        tag = hmac.new(self._secret, key.encode(), hashlib.sha256).hexdigest()[:16]
        return f"<lloco:{key}:{tag}>"

    def split_sentinels(self, prompt: str) -> list[str | KeyRef]:
        """Split a prompt into text pieces and verified ``KeyRef``s, in order.

        Forged or unknown sentinels stay plain text.
        """
        pieces: list[str | KeyRef] = []
        last = 0
        for m in SENTINEL.finditer(prompt):
            key = m.group(1)
            if not hmac.compare_digest(self.sentinel(key), m.group(0)) or not self.contains(key):
                continue
            pieces.append(prompt[last:m.start()])
            pieces.append(KeyRef(key))
            last = m.end()
        pieces.append(prompt[last:])
        return [p for p in pieces if p != ""]

    # -- reads and writes ---------------------------------------------------------------------
    def contains(self, key: str) -> bool:
        return self._db().execute("SELECT 1 FROM chunks WHERE key=?", (key,)).fetchone() is not None

    def missing(self, keys: list[str]) -> list[str]:
        """``keys`` not stored yet, deduplicated, in order."""
        return _missing(self._db(), keys)

    def put_many(self, items: list[tuple[str, torch.Tensor, str, int]], sources: list[tuple[str, int, str]] = ()) -> int:
        """Store ``(key, tensor [n, hidden], text, source_tokens)`` items in one shard; returns how many were new.

        ``sources`` rows ``(doc, position, key)`` record where each chunk came from. Safe to call from
        several processes at once: each key is stored once. On any failure (full disk, read-only
        store) a ``StoreError`` says so and the store is exactly as before the call.
        """
        if self.read_only:
            raise StoreError(f"{self.path} is read-only; nothing was written")
        tensors: dict[str, torch.Tensor] = {}
        info: dict[str, tuple[str, int]] = {}
        for key, t, text, n in items:
            if not isinstance(t, torch.Tensor) or t.ndim != 2 or not t.is_floating_point():
                raise ValueError(f"chunk {key}: vectors must be a float tensor [n, hidden], got {getattr(t, 'shape', t)!r}")
            tensors[key] = t.detach().cpu().contiguous()
            info[key] = (text, int(n))
        sources = list(sources)
        shard: str | None = None
        new: list[str] = []
        try:
            with self._db() as db:  # write lock first, so the missing-check and the insert agree
                new = _missing(db, list(tensors))
                if new:
                    shard = uuid.uuid4().hex + SHARD_SUFFIX
                    _write_durably(self.path / "shards" / shard, save({k: tensors[k] for k in new}))
                    now = time.time()
                    db.executemany("INSERT INTO chunks VALUES (?,?,?,?,?,?,?,?,?)", [
                        (k, shard, *tensors[k].shape, _dtype_name(tensors[k]), _digest(tensors[k]), info[k][1],
                         info[k][0], now) for k in new])
                if sources:
                    db.executemany("INSERT OR REPLACE INTO sources VALUES (?,?,?)", sources)
        except BaseException as e:
            if shard is not None and not self._referenced(shard):
                (self.path / "shards" / shard).unlink(missing_ok=True)
            if isinstance(e, (OSError, sqlite3.Error)):
                reason = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
                raise StoreError(f"could not write to store {self.path} ({reason}); this batch was not stored, "
                                 "everything stored before is intact") from e
            raise
        return len(new)

    def _referenced(self, shard: str) -> bool:
        try:
            return self._db().execute("SELECT 1 FROM chunks WHERE shard=? LIMIT 1", (shard,)).fetchone() is not None
        except sqlite3.Error:
            return True  # cannot tell: keep the file (verify --repair removes it if it is an orphan)

    def get_many(self, keys: list[str]) -> list[torch.Tensor]:
        """Tensors for ``keys`` in order (LRU-cached; checksum, shape and dtype verified); KeyError names a missing key."""
        out: dict[str, torch.Tensor] = {}
        with self._cache_lock:
            for k in keys:
                if k in self._cache:
                    self._cache.move_to_end(k)
                    out[k] = self._cache[k]
        todo = [k for k in dict.fromkeys(keys) if k not in out]
        if todo:
            rows = {}
            db = self._db()
            for part in _batches(todo):
                q = f"SELECT key, shard, sha256, n_vectors, hidden, dtype FROM chunks WHERE key IN ({_marks(part)})"
                rows.update({r[0]: r[1:] for r in db.execute(q, part)})
            for k in todo:
                if k not in rows:
                    raise KeyError(f"chunk {k} is not in store {self.path}")
            by_shard: dict[str, list[str]] = {}
            for k, row in rows.items():
                by_shard.setdefault(row[0], []).append(k)
            repair = f"run `lloco verify --store {self.path} --repair`"
            for shard, ks in by_shard.items():
                try:
                    with safe_open(str(self.path / "shards" / shard), "pt") as f:
                        for k in ks:
                            t = f.get_tensor(k)
                            _, sha, n, hidden, dtype = rows[k]
                            if tuple(t.shape) != (n, hidden) or _dtype_name(t) != dtype or _digest(t) != sha:
                                raise StoreError(f"chunk {k} in shard {shard} is corrupt; {repair}")
                            out[k] = t
                except (OSError, SafetensorError) as e:  # missing, truncated or overwritten shard
                    raise StoreError(f"shard {shard} is unreadable ({e}); {repair}") from e
            with self._cache_lock:
                for k in todo:
                    self._cache[k] = out[k]
                while len(self._cache) > self._cache_size:
                    self._cache.popitem(last=False)
        return [out[k] for k in keys]

    def keys(self) -> list[str]:
        """Every stored chunk key, in insertion order (cheap: no text, no tensors)."""
        return [r[0] for r in self._db().execute("SELECT key FROM chunks ORDER BY rowid")]

    def chunks(self, keys: list[str] | None = None) -> list[StoredChunk]:
        """Stored chunk metadata and text in insertion order (document order); all when ``keys`` is None."""
        db = self._db()
        if keys is None:
            rows = db.execute("SELECT key, text, source_tokens, n_vectors FROM chunks ORDER BY rowid").fetchall()
            return [StoredChunk(*r) for r in rows]
        found = []
        for part in _batches(keys):
            q = f"SELECT rowid, key, text, source_tokens, n_vectors FROM chunks WHERE key IN ({_marks(part)})"
            found += db.execute(q, part).fetchall()
        return [StoredChunk(*r[1:]) for r in sorted(set(found))]

    def documents(self) -> list[str]:
        return [r[0] for r in self._db().execute("SELECT DISTINCT doc FROM sources ORDER BY doc")]

    def doc_keys(self, doc: str) -> list[str]:
        return [r[0] for r in self._db().execute("SELECT key FROM sources WHERE doc=? ORDER BY position", (doc,))]

    def stats(self) -> dict:
        db = self._db()
        n, vecs, src = db.execute("SELECT COUNT(*), COALESCE(SUM(n_vectors),0), COALESCE(SUM(source_tokens),0) FROM chunks").fetchone()
        size = sum(f.stat().st_size for f in self.path.rglob("*") if f.is_file())
        return {"store": str(self.path), "chunks": n, "documents": len(self.documents()), "vectors": vecs,
                "source_tokens": src, "bytes_on_disk": size, "fingerprint": self.fingerprint,
                "compression_ratio": round(src / vecs, 2) if vecs else None,
                "compressor_config": self.compressor_config, "read_only": self.read_only}

    def verify(self, repair: bool = False) -> "VerifyReport":
        """Check every entry against its shard and the index; ``repair`` drops bad entries (so the next
        ingest recompresses them) and removes orphan shards and ``*.tmp`` leftovers. See ``verify.py``."""
        from .verify import verify_store

        return verify_store(self, repair)


def _not_writable(path: Path) -> bool:
    return not all(os.access(p, os.W_OK) for p in (path, path / "shards", path / "index.sqlite") if p.exists())


def _batches(keys: list[str], size: int = 500) -> list[list[str]]:
    """SQLite limits bound parameters per statement; query long key lists in parts."""
    return [keys[i:i + size] for i in range(0, len(keys), size)]


def _marks(part: list) -> str:
    return ",".join("?" * len(part))


def _missing(db, keys: list[str]) -> list[str]:
    have = set()
    for part in _batches(keys):
        have.update(r[0] for r in db.execute(f"SELECT key FROM chunks WHERE key IN ({_marks(part)})", part))
    return [k for k in dict.fromkeys(keys) if k not in have]


class _Tx:
    """``with store._db() as db``: one IMMEDIATE transaction (write lock taken up front, so
    concurrent writers queue instead of failing); plain attribute access passes through."""

    def __init__(self, db: sqlite3.Connection):
        self._db = db

    def __getattr__(self, name):
        return getattr(self._db, name)

    def __enter__(self) -> sqlite3.Connection:
        self._db.execute("BEGIN IMMEDIATE")
        return self._db

    def __exit__(self, exc_type, *_) -> None:
        if exc_type is None:
            try:
                self._db.execute("COMMIT")
                return
            except BaseException:
                self._rollback()
                raise
        self._rollback()

    def _rollback(self) -> None:
        # SQLite may already have rolled back (e.g. SQLITE_FULL); a second ROLLBACK would mask the real error
        if self._db.in_transaction:
            with contextlib.suppress(sqlite3.Error):
                self._db.execute("ROLLBACK")
