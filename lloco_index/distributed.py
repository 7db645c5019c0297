"""Distributed ingest on Ray Data: read -> chunk -> compress (one stateful actor per GPU or CPU worker) -> store.

Inputs are text files and folders (``.txt``/``.md``/``.rst``) or Parquet/JSONL tables with an id and
a text column, as local paths or fsspec URLs (``s3://...``). Only the driver writes the store, always
through ``CompressedStore.put_many``. Keys are content addresses and rows go in with
``INSERT OR IGNORE``, so a rerun of a job that died skips every chunk already stored and can never
write a duplicate. Chunks the store already has are dropped before compression, which is what makes
a resumed job cheap.

The store is a local folder on the driver, or an fsspec URL. For a URL the driver writes into a
local staging folder, uploads each shard as soon as it is written, and uploads the index after its
shards, every ``sync_every_s`` seconds and at the end. See docs/distributed-ingest.md.
"""

from __future__ import annotations

import importlib.util
import logging
import shutil
import sqlite3
import tempfile
import time
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Sequence

import numpy as np

from .chunking import TEXT_SUFFIXES, chunk_text, decode_text, iter_text_files
from .models import DEFAULT_MODEL
from .pipeline import IngestReport
from .store import CompressedStore, StoreError, chunk_key

logger = logging.getLogger(__name__)
TABLE_SUFFIXES = frozenset({".parquet", ".jsonl"})


@dataclass
class RayIngestConfig:
    """How the job is spread out. Runtime settings only: nothing here changes the vectors."""

    num_gpus: int = field(default=0, metadata={"help": "compressor actors with one GPU each (0: CPU actors)"})
    num_workers: int = field(default=1, metadata={"help": "CPU compressor actors when num_gpus is 0"})
    cpus_per_worker: int = field(default=1, metadata={"help": "CPUs (torch threads) per CPU compressor actor"})
    chunk_workers: int = field(default=1, metadata={"help": "tokenizer actors that read and chunk documents"})
    batch_size: int = field(default=16, metadata={"help": "segments per compressor forward pass"})
    write_batch: int = field(default=256, metadata={"help": "chunks per store shard (one put_many)"})
    text_column: str = field(default="text", metadata={"help": "Parquet/JSONL column holding the text"})
    id_column: str = field(default="id", metadata={"help": "Parquet/JSONL column naming the document"})
    address: str | None = field(default=None, metadata={"help": "Ray cluster address (default: RAY_ADDRESS or local)"})
    sync_every_s: float = field(default=300.0, metadata={"help": "remote stores: upload the index this often"})

    def __post_init__(self) -> None:
        if min(self.num_gpus, self.cpus_per_worker - 1, self.num_workers - 1, self.chunk_workers - 1) < 0:
            raise ValueError("need num_gpus >= 0 and num_workers, cpus_per_worker, chunk_workers >= 1")
        if self.batch_size < 1 or self.write_batch < 1:
            raise ValueError("batch_size and write_batch must be >= 1")


def ingest(paths: Sequence[str | Path], store: str | Path, model: str = DEFAULT_MODEL,
           compressor: str | Path | None = None, config: RayIngestConfig | None = None,
           show_progress_bar: bool = True) -> IngestReport:
    """Chunk and compress ``paths`` on a Ray cluster into ``store``; what is stored already is skipped.

    Gives the same keys, vectors (within float tolerance) and document order as
    ``LLoCO.from_pretrained(model, compressor=compressor, store=store).ingest(paths)``.

    Example::

        report = ingest(["corpus/"], "my_store", config=RayIngestConfig(num_gpus=8))
        print(report.new_chunks)
    """
    if importlib.util.find_spec("ray") is None:
        raise ModuleNotFoundError("distributed ingest needs Ray: pip install 'lloco-index[ray]'")
    import ray
    from ray.data import ActorPoolStrategy

    config = config or RayIngestConfig()
    texts, tables = _expand(paths)
    if not ray.is_initialized():
        ray.init(address=config.address, logging_level=logging.WARNING)
    gpu = config.num_gpus > 0
    spec = {"model": model, "compressor": None if compressor is None else str(compressor),
            "device": "cuda" if gpu else "cpu"}
    resources = {"num_gpus": 1} if gpu else {"num_cpus": config.cpus_per_worker}
    # the fingerprint is computed where the actors run: it depends on the device's dtype
    fingerprint, comp_config = ray.get(ray.remote(_describe).options(**resources).remote(spec))
    with _open_store(store, fingerprint, comp_config, config.sync_every_s) as st:
        stored = ray.put(np.array(sorted(st.keys()), dtype="S32"))
        ds = _documents(texts, tables, config)
        ds.context.execution_options.preserve_order = True  # document order, as a single-process ingest
        ds.context.enable_progress_bars = show_progress_bar
        ds = ds.map_batches(_Chunker, batch_size=8, num_cpus=1, compute=ActorPoolStrategy(size=config.chunk_workers),
                            fn_constructor_kwargs={"model": model, "fingerprint": fingerprint,
                                                   "segment_tokens": comp_config["segment_tokens"], "stored": stored})
        ds = ds.map_batches(_Compressor, batch_size=config.batch_size * 4, **resources,
                            compute=ActorPoolStrategy(size=config.num_gpus if gpu else config.num_workers),
                            fn_constructor_kwargs={**spec, "fingerprint": fingerprint, "batch_size": config.batch_size,
                                                   "threads": config.cpus_per_worker})
        return _write(ds, st, comp_config, config.write_batch, show_progress_bar)


def _expand(paths: Sequence[str | Path]) -> tuple[list[str], list[str]]:
    """Input paths/URLs -> (text files, table files), each sorted within its folder."""
    files: list[str] = []
    for p in map(str, paths):
        files += _remote_files(p) if "://" in p else [str(f) for f in iter_text_files([p], TEXT_SUFFIXES | TABLE_SUFFIXES)]
    if not files:
        raise ValueError(f"no text (.txt/.md/.rst) or table (.parquet/.jsonl) files found in {', '.join(map(str, paths))}")
    is_table = [Path(f).suffix.lower() in TABLE_SUFFIXES for f in files]
    return [f for f, t in zip(files, is_table) if not t], [f for f, t in zip(files, is_table) if t]


def _remote_files(url: str) -> list[str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    if not fs.exists(root):
        raise FileNotFoundError(f"no such file or folder: {url}")
    if not fs.isdir(root):
        return [url]
    found = sorted(f for f in fs.find(root) if Path(f).suffix.lower() in TEXT_SUFFIXES | TABLE_SUFFIXES)
    return [fs.unstrip_protocol(f) for f in found]


def _documents(texts: list[str], tables: list[str], config: RayIngestConfig):
    """One dataset of ``{doc, path, text, error}`` rows: files are read by the chunkers, tables by Ray Data."""
    import ray.data

    parts = [ray.data.from_items([{"doc": f, "path": f, "text": "", "error": ""} for f in texts])] if texts else []
    parquet = [f for f in tables if f.lower().endswith(".parquet")]
    jsonl = [f for f in tables if f.lower().endswith(".jsonl")]
    kwargs = {"batch_format": "pyarrow", "fn_kwargs": {"id_col": config.id_column, "text_col": config.text_column}}
    if parquet:
        parts.append(ray.data.read_parquet(parquet).map_batches(_table_rows, **kwargs))
    if jsonl:
        parts.append(ray.data.read_json(jsonl, lines=True).map_batches(_table_rows, **kwargs))
    return parts[0].union(*parts[1:]) if len(parts) > 1 else parts[0]


def _table_rows(batch, id_col: str, text_col: str) -> dict[str, np.ndarray]:
    """Table rows -> ``{doc, path, text, error}``; a missing column becomes an error row for the driver."""
    missing = [c for c in (id_col, text_col) if c not in batch.column_names]
    if missing:
        error = (f"table has no column {missing[0]!r} (columns: {', '.join(batch.column_names)}); "
                 f"set --id-column/--text-column")
        return {k: np.array([error if k == "error" else ""], dtype=object) for k in ("doc", "path", "text", "error")}
    docs = [str(v) for v in batch.column(id_col).to_pylist()]
    texts = [t or "" for t in batch.column(text_col).to_pylist()]
    return {"doc": np.array(docs, dtype=object), "path": np.array([""] * len(docs), dtype=object),
            "text": np.array(texts, dtype=object), "error": np.array([""] * len(docs), dtype=object)}


def _describe(spec: dict) -> tuple[str, dict]:
    """(fingerprint, compressor config) of the compressor every actor will load."""
    from .pipeline import LLoCO

    comp = LLoCO.from_pretrained(spec["model"], compressor=spec["compressor"], adapter="base",
                                 device=spec["device"]).compressor
    return comp.fingerprint(), asdict(comp.config)


class _Chunker:
    """Ray Data UDF: documents -> chunks with content keys, marking those the store already has."""

    def __init__(self, model: str, fingerprint: str, segment_tokens: int, stored):
        import ray
        from transformers import AutoTokenizer

        from .models import resolve_model_path

        self.tokenizer = AutoTokenizer.from_pretrained(resolve_model_path(model))
        self.fingerprint, self.segment_tokens = fingerprint, segment_tokens
        self.stored = ray.get(stored) if isinstance(stored, ray.ObjectRef) else stored

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Bad input is not raised here (Ray would bury it in a traceback) but sent to the driver."""
        out: dict[str, list] = {"doc": [], "position": [], "key": [], "text": [], "n_tokens": [], "error": []}
        for doc, path, text, error in zip(batch["doc"], batch["path"], batch["text"], batch["error"]):
            try:
                text = _read(path) if path and not error else str(text)
            except (OSError, ValueError) as e:
                error = str(e)
            if error:
                rows = [("", 0, "", 0, error)]
            else:
                rows = [(c.text, i, chunk_key(self.fingerprint, c.text),
                         len(self.tokenizer(c.text, add_special_tokens=False)["input_ids"]), "")
                        for i, c in enumerate(chunk_text(text, self.tokenizer, self.segment_tokens))]
            for chunk, i, key, n, err in rows:
                for col, v in zip(("doc", "text", "position", "key", "n_tokens", "error"), (doc, chunk, i, key, n, err)):
                    out[col].append(v)
        keys = np.array(out["key"], dtype="S32")
        stored = np.isin(keys, self.stored) if len(self.stored) else np.zeros(len(keys), dtype=bool)
        stored |= np.array([bool(e) for e in out["error"]], dtype=bool)  # nothing to compress in an error row
        return {**{k: np.array(v, dtype=object) for k, v in out.items() if k not in ("position", "n_tokens")},
                "position": np.array(out["position"], dtype=np.int64),
                "n_tokens": np.array(out["n_tokens"], dtype=np.int64), "stored": stored}


def _read(path: str) -> str:
    if "://" not in path:
        return decode_text(Path(path).read_bytes(), path)
    import fsspec

    with fsspec.open(path, "rb") as f:
        return decode_text(f.read(), path)


class _Compressor:
    """Ray Data UDF: one loaded compressor per actor; vectors travel as raw bytes (bf16-safe)."""

    def __init__(self, model: str, compressor: str | None, device: str, fingerprint: str, batch_size: int,
                 threads: int):
        import torch

        from .pipeline import LLoCO

        if device == "cpu":
            torch.set_num_threads(threads)
        self.comp = LLoCO.from_pretrained(model, compressor=compressor, adapter="base", device=device).compressor
        if self.comp.fingerprint() != fingerprint:
            raise StoreError(f"this worker's compressor has fingerprint {self.comp.fingerprint()}, the job's is "
                             f"{fingerprint}: every node needs the same model files and device type")
        self.batch_size = batch_size

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        import torch

        todo = {k: t for k, t, s in zip(batch["key"], batch["text"], batch["stored"]) if not s}
        vecs = dict(zip(todo, self.comp.compress(list(todo.values()), batch_size=self.batch_size))) if todo else {}
        blobs = [vecs[k].contiguous().view(torch.uint8).numpy().tobytes() if k in vecs else b"" for k in batch["key"]]
        return {**batch, "vectors": np.array(blobs, dtype=object)}


def _write(ds, st, comp_config: dict, write_batch: int, show_progress_bar: bool) -> IngestReport:
    """Driver side: every ``write_batch`` chunks become one ``put_many`` (one shard + one transaction)."""
    import torch
    from tqdm.auto import tqdm

    dtype, hidden = getattr(torch, comp_config["store_dtype"]), comp_config["hidden_size"]
    docs: set[str] = set()
    tokens: dict[str, int] = {}
    n_chunks = new = 0
    bar = tqdm(disable=not show_progress_bar, desc="store", unit="chunk")
    for b in ds.iter_batches(batch_size=write_batch, batch_format="numpy"):
        ok = [i for i, e in enumerate(b["error"]) if not e]
        items = [(b["key"][i], torch.frombuffer(bytearray(b["vectors"][i]), dtype=dtype).reshape(-1, hidden),
                  b["text"][i], int(b["n_tokens"][i])) for i in ok if len(b["vectors"][i])]
        new += st.put_many(items, [(b["doc"][i], int(b["position"][i]), b["key"][i]) for i in ok])
        bar.update(len(ok))
        bar.set_postfix(new=new)
        errors = [e for e in b["error"] if e]
        if errors:  # everything before it is stored (document order): a rerun resumes from here
            bar.close()
            raise ValueError(f"{errors[0]}; the chunks before it are stored: fix it and rerun to resume")
        docs.update(b["doc"][i] for i in ok)
        tokens.update((b["key"][i], int(b["n_tokens"][i])) for i in ok)
        n_chunks += len(ok)
    bar.close()
    return IngestReport(len(docs), n_chunks, new, sum(tokens.values()))


@contextmanager
def _open_store(store: str | Path, fingerprint: str, comp_config: dict, sync_every_s: float):
    """A local ``CompressedStore``, or a staged one mirrored to an fsspec URL."""
    if "://" not in str(store):
        yield CompressedStore(store, fingerprint=fingerprint, create=True, compressor_config=comp_config)
        return
    remote = _RemoteStore(str(store), fingerprint, comp_config, sync_every_s)
    try:
        yield remote
    finally:
        remote.close()  # also after a failure: upload the index of what was written


class _RemoteStore:
    """``put_many`` into a local staging store; shards are uploaded at once, the index after them."""

    def __init__(self, url: str, fingerprint: str, comp_config: dict, sync_every_s: float):
        import fsspec

        self.fs, self.root = fsspec.core.url_to_fs(url)
        self.staging = Path(tempfile.mkdtemp(prefix="lloco-staging-"))
        index = f"{self.root}/index.sqlite"
        if self.fs.exists(index):  # resume: the remote index says what is stored already
            self.fs.get_file(index, str(self.staging / "index.sqlite"))
        self.store = CompressedStore(self.staging, fingerprint=fingerprint, create=True, compressor_config=comp_config)
        self.sync_every_s, self.last_sync = sync_every_s, time.monotonic()
        self.fs.makedirs(f"{self.root}/shards", exist_ok=True)

    def keys(self) -> list[str]:
        return self.store.keys()

    def put_many(self, items, sources) -> int:
        new = self.store.put_many(items, sources)
        for shard in sorted((self.staging / "shards").glob("*.safetensors")):
            self.fs.put_file(str(shard), f"{self.root}/shards/{shard.name}")
            shard.unlink()  # the staging store is never read, only its index
        if time.monotonic() - self.last_sync > self.sync_every_s:
            self.sync()
        return new

    def sync(self) -> None:
        """Upload a consistent snapshot of the index (its shards are already up)."""
        snapshot = self.staging / "index.snapshot"
        with closing(sqlite3.connect(self.staging / "index.sqlite")) as src, closing(sqlite3.connect(snapshot)) as dst:
            src.backup(dst)
        self.fs.put_file(str(snapshot), f"{self.root}/index.sqlite.part")
        self.fs.mv(f"{self.root}/index.sqlite.part", f"{self.root}/index.sqlite")
        snapshot.unlink()
        self.last_sync = time.monotonic()

    def close(self) -> None:
        try:
            self.sync()
        finally:
            shutil.rmtree(self.staging, ignore_errors=True)
