"""Serve one ``LLoCO`` to many asyncio clients: a bounded queue in front of one worker thread.

The backbone runs one forward pass at a time anyway (its lock), so requests run one after another
in a single worker thread and the event loop stays free. At most ``max_pending`` requests are queued
or running; one more is refused at once with ``Overloaded``, so memory stays bounded however many
clients call. Cancelling a waiting request drops it; cancelling a running one stops generation (or
compression) at the next token (batch) and frees its KV cache.

Example::

    server = AsyncLLoCO(LLoCO.from_pretrained(store="my_store"), max_pending=32)
    ans = await server.ask("Who founded the museum?", top_k=3)
    async for delta in server.stream_ask("How many steps?"):
        print(delta, end="")
"""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import nullcontext
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Iterator, TypeVar

from .generation import cancel_scope, check_cancelled

if TYPE_CHECKING:
    from .pipeline import Answer, LLoCO

T = TypeVar("T")
_END = object()


class Overloaded(RuntimeError):
    """``max_pending`` requests are already queued or running; retry later (like HTTP 429)."""


class RequestQueue:
    """Run blocking calls one at a time in a worker thread, at most ``max_pending`` at once.

    ``lock`` (e.g. ``backbone.lock``) is held for the whole call, so direct users of the same
    model in other threads wait instead of interleaving with it.
    """

    def __init__(self, max_pending: int = 32, lock: Any = None):
        if max_pending < 1:
            raise ValueError("max_pending must be >= 1")
        self.max_pending = max_pending
        self._lock = lock if lock is not None else nullcontext()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="lloco-worker")
        self._count = 0
        self._count_lock = threading.Lock()

    @property
    def pending(self) -> int:
        """Requests queued or running now."""
        return self._count

    async def run(self, fn: Callable[..., T], *args, **kwargs) -> T:
        """``fn(*args, **kwargs)`` in the worker thread; ``Overloaded`` when the queue is full."""
        cancel = threading.Event()
        future = self._submit(self._call, cancel, fn, args, kwargs)
        try:
            return await asyncio.wrap_future(future)
        finally:
            cancel.set()  # no-op when done; otherwise stops the work at its next token
            future.cancel()

    async def stream(self, fn: Callable[..., Iterator[T]], *args, **kwargs) -> AsyncIterator[T]:
        """Items of the iterator ``fn(*args, **kwargs)`` (built and consumed in the worker) as they come."""
        loop = asyncio.get_running_loop()
        items: asyncio.Queue = asyncio.Queue()  # at most one item per generated token: bounded by max_new_tokens
        cancel = threading.Event()

        def send(item, error=None) -> None:
            try:
                loop.call_soon_threadsafe(items.put_nowait, (item, error))
            except RuntimeError:  # the event loop is gone: nobody is listening any more
                cancel.set()

        def produce() -> None:
            try:
                it = fn(*args, **kwargs)
                try:
                    for item in it:
                        if cancel.is_set():
                            break
                        send(item)
                finally:
                    getattr(it, "close", lambda: None)()  # frees the generator's KV cache now
                send(_END)
            except BaseException as e:  # noqa: BLE001 - handed to the consumer, re-raised there
                send(_END, e)

        future = self._submit(self._call, cancel, produce, (), {})
        try:
            while True:
                item, error = await items.get()
                if item is _END:
                    if error is not None:
                        raise error
                    return
                yield item
        finally:
            cancel.set()
            future.cancel()

    def close(self) -> None:
        """Drop queued requests and stop the worker once the running one ends."""
        self._executor.shutdown(wait=False, cancel_futures=True)

    def _submit(self, fn: Callable, *args) -> Future:
        with self._count_lock:
            if self._count >= self.max_pending:
                raise Overloaded(f"{self._count} requests already pending (max_pending={self.max_pending}); retry later")
            self._count += 1
        try:
            future = self._executor.submit(fn, *args)
        except BaseException:
            self._release()
            raise
        future.add_done_callback(lambda _: self._release())  # also runs when cancelled before starting
        return future

    def _release(self) -> None:
        with self._count_lock:
            self._count -= 1

    def _call(self, cancel: threading.Event, fn: Callable[..., T], args: tuple, kwargs: dict) -> T:
        with self._lock, cancel_scope(cancel):
            check_cancelled()  # cancelled while it waited for the lock
            return fn(*args, **kwargs)


class AsyncLLoCO:
    """asyncio face of one ``LLoCO`` (same arguments as its methods), through a ``RequestQueue``."""

    def __init__(self, lloco: "LLoCO", max_pending: int = 32):
        self.lloco = lloco
        self.queue = RequestQueue(max_pending, lock=lloco.backbone.lock)

    async def ask(self, question: str, **kwargs) -> "Answer":
        return await self.queue.run(self.lloco.ask, question, **kwargs)

    async def answer(self, question: str, contexts: list[str], **kwargs) -> "Answer":
        return await self.queue.run(self.lloco.answer, question, contexts, **kwargs)

    async def complete(self, prompt: str, **kwargs) -> "Answer":
        return await self.queue.run(self.lloco.complete, prompt, **kwargs)

    def stream_ask(self, question: str, **kwargs) -> AsyncIterator[str]:
        return self.queue.stream(self.lloco.stream_ask, question, **kwargs)

    def stream_complete(self, prompt: str, **kwargs) -> AsyncIterator[str]:
        return self.queue.stream(self.lloco.complete, prompt, stream=True, **kwargs)

    def close(self) -> None:
        self.queue.close()
