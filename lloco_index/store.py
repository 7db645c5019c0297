"""Persistent, content-addressed cache of compressed chunks: safetensors shards + a SQLite index.

Layout of a store folder::

    index.sqlite          meta (fingerprint, compressor config, secret), chunks, sources
    shards/<id>.safetensors   one file per ``put_many`` batch, tensor names = chunk keys

A shard is written to a temp file, fsynced and renamed before the rows that point to it are
committed in one transaction, so a crash leaves at worst an unreferenced shard (removed by
``verify(repair=True)``) and never a row that points to a partial tensor. Every read checks the
tensor's sha256 against the index, so a corrupted file is reported, not served.
"""

from __future__ import annotations

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
from typing import NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file

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


def _digest(t: torch.Tensor) -> str:
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()


class CompressedStore:
    """Open (``create=False``) or create a store bound to one compressor fingerprint.

    Example::

        store = CompressedStore("my_store", fingerprint=comp.fingerprint(), create=True)
        store.put_many([(key, tensor, text, n_tokens)])
        store.get_many([key])   # [Tensor [24, 576]]
    """

    def __init__(self, path: str | Path, fingerprint: str | None = None, create: bool = False,
                 compressor_config: dict | None = None, cache_size: int = 4096):
        self.path = Path(path)
        index = self.path / "index.sqlite"
        if not index.is_file():
            if not create:
                raise StoreError(f"no store at {self.path} (run `lloco ingest ... --store {self.path}` first)")
            if fingerprint is None:
                raise ValueError("creating a store needs the compressor fingerprint")
            (self.path / "shards").mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        self._index = index
        self.read_only = index.is_file() and not os.access(self.path, os.W_OK)
        db = self._db()
        if not self.read_only:
            db.executescript(SCHEMA)  # outside a transaction: executescript commits first
            if fingerprint is not None:
                meta = {"fingerprint": fingerprint, "secret": secrets.token_hex(16),
                        "compressor_config": json.dumps(compressor_config or {}), "created": str(time.time())}
                with db as tx:  # first writer wins; later openers read what it wrote
                    tx.executemany("INSERT OR IGNORE INTO meta VALUES (?, ?)", meta.items())
        meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        if not meta:
            raise StoreError(f"{self.path}: store index is empty; was it created with a fingerprint?")
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

    def _db(self) -> sqlite3.Connection:
        """One connection per thread (sqlite3 objects must not cross threads); WAL for concurrent readers."""
        db = getattr(self._local, "db", None)
        if db is None:
            uri = f"file:{self._index}?mode=ro" if self.read_only else f"file:{self._index}"
            db = sqlite3.connect(uri, uri=True, timeout=60, isolation_level=None)
            if not self.read_only:
                db.execute("PRAGMA journal_mode=WAL")
                db.execute("PRAGMA synchronous=FULL")
            self._local.db = db
        return _Tx(db)

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
        have = set()
        db = self._db()
        for i in range(0, len(keys), 500):
            part = keys[i:i + 500]
            q = f"SELECT key FROM chunks WHERE key IN ({','.join('?' * len(part))})"
            have.update(r[0] for r in db.execute(q, part))
        return [k for k in dict.fromkeys(keys) if k not in have]

    def put_many(self, items: list[tuple[str, torch.Tensor, str, int]], sources: list[tuple[str, int, str]] = ()) -> int:
        """Store ``(key, tensor, text, source_tokens)`` items in one shard; returns how many were new.

        ``sources`` rows ``(doc, position, key)`` record where each chunk came from.
        """
        if self.read_only:
            raise StoreError(f"{self.path} is read-only; nothing was written")
        new = {k: (t, text, n) for k, t, text, n in items if k in set(self.missing([i[0] for i in items]))}
        if new:
            shard = f"{uuid.uuid4().hex}.safetensors"
            tmp = self.path / "shards" / (shard + ".tmp")
            tensors = {k: v[0].detach().cpu().contiguous() for k, v in new.items()}
            try:
                save_file(tensors, str(tmp))
                with open(tmp, "rb+") as f:
                    os.fsync(f.fileno())
                os.replace(tmp, self.path / "shards" / shard)
            except OSError as e:
                tmp.unlink(missing_ok=True)
                raise StoreError(f"could not write to {self.path}: {e.strerror}; the store is unchanged") from e
            now = time.time()
            rows = [(k, shard, t.shape[0], t.shape[1], str(t.dtype).removeprefix("torch."), _digest(t), n, text, now)
                    for k, (t, text, n) in ((k, (tensors[k], v[1], v[2])) for k, v in new.items())]
            with self._db() as db:
                db.executemany("INSERT OR IGNORE INTO chunks VALUES (?,?,?,?,?,?,?,?,?)", rows)
                db.executemany("INSERT OR REPLACE INTO sources VALUES (?,?,?)", sources)
        elif sources:
            with self._db() as db:
                db.executemany("INSERT OR REPLACE INTO sources VALUES (?,?,?)", sources)
        return len(new)

    def get_many(self, keys: list[str]) -> list[torch.Tensor]:
        """Tensors for ``keys`` in order (LRU-cached, checksum-verified); KeyError names a missing key."""
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
            for i in range(0, len(todo), 500):
                part = todo[i:i + 500]
                q = f"SELECT key, shard, sha256 FROM chunks WHERE key IN ({','.join('?' * len(part))})"
                rows.update({r[0]: r[1:] for r in db.execute(q, part)})
            for k in todo:
                if k not in rows:
                    raise KeyError(f"chunk {k} is not in store {self.path}")
            by_shard: dict[str, list[str]] = {}
            for k, (shard, _) in rows.items():
                by_shard.setdefault(shard, []).append(k)
            for shard, ks in by_shard.items():
                try:
                    with safe_open(str(self.path / "shards" / shard), "pt") as f:
                        for k in ks:
                            t = f.get_tensor(k)
                            if _digest(t) != rows[k][1]:
                                raise StoreError(f"chunk {k} in {shard} is corrupt (checksum); run `lloco verify --repair`")
                            out[k] = t
                except (OSError, KeyError, ValueError) as e:  # missing/truncated shard
                    raise StoreError(f"shard {shard} is unreadable ({e}); run `lloco verify --store {self.path} --repair`") from e
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
        for i in range(0, len(keys), 500):
            part = keys[i:i + 500]
            q = f"SELECT rowid, key, text, source_tokens, n_vectors FROM chunks WHERE key IN ({','.join('?' * len(part))})"
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
                "compressor_config": self.compressor_config}


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
        self._db.execute("ROLLBACK" if exc_type else "COMMIT")
