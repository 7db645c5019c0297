"""The bounded async request queue: overload, cancellation, streaming, many concurrent clients."""

from __future__ import annotations

import asyncio
import threading

import pytest

from lloco_index import generation
from lloco_index.generation import GenerationConfig
from lloco_index.serving import AsyncLLoCO, Overloaded, RequestQueue


async def test_queue_is_bounded_and_cancelled_waiters_never_run():
    queue = RequestQueue(max_pending=2)
    gate, ran = threading.Event(), []

    def job(name):
        gate.wait(10)
        ran.append(name)
        return name

    first = asyncio.create_task(queue.run(job, "first"))
    second = asyncio.create_task(queue.run(job, "second"))
    await asyncio.sleep(0.05)
    with pytest.raises(Overloaded, match="max_pending=2"):
        await queue.run(job, "third")
    second.cancel()  # still waiting behind "first": dropped without running
    with pytest.raises(asyncio.CancelledError):
        await second
    assert queue.pending == 1
    gate.set()
    assert await first == "first" and ran == ["first"] and queue.pending == 0
    queue.close()


async def test_errors_reach_the_caller_and_free_the_slot():
    queue = RequestQueue(max_pending=1)
    with pytest.raises(ZeroDivisionError):
        await queue.run(lambda: 1 / 0)
    assert queue.pending == 0 and await queue.run(lambda: 7) == 7
    queue.close()


async def test_abandoned_stream_stops_its_producer():
    queue = RequestQueue(max_pending=1)
    produced, closed = [], threading.Event()

    def numbers():
        try:
            for i in range(10_000):
                produced.append(i)
                yield i
        finally:
            closed.set()

    got = []
    async for i in queue.stream(numbers):
        got.append(i)
        if i == 2:
            break
    await asyncio.to_thread(closed.wait, 10)
    assert got == [0, 1, 2] and closed.is_set() and len(produced) < 10_000
    for _ in range(100):
        if queue.pending == 0:
            break
        await asyncio.sleep(0.01)
    assert queue.pending == 0
    queue.close()


async def test_many_clients_get_answers_or_overloaded(tiny_lloco):
    keys = tiny_lloco.compress_texts(["The museum cat is called Biscuit.", "The tower has 137 steps."])
    prompt = " ".join(tiny_lloco.store.sentinel(k) for k in keys) + " What is the cat called?"
    cfg = GenerationConfig(max_new_tokens=4)
    expected = tiny_lloco.complete(prompt, config=cfg).answer
    server = AsyncLLoCO(tiny_lloco, max_pending=4)
    peak = 0

    async def client():
        nonlocal peak
        peak = max(peak, server.queue.pending)
        try:
            return (await server.complete(prompt, config=cfg)).answer
        except Overloaded:
            return None

    results = await asyncio.gather(*(client() for _ in range(40)))
    answered = [r for r in results if r is not None]
    assert answered and len(answered) < 40 and set(answered) == {expected}
    assert peak <= 4 and server.queue.pending == 0
    streamed = "".join([d async for d in server.stream_complete(prompt, config=cfg)])
    assert streamed == "".join(tiny_lloco.complete(prompt, config=cfg, stream=True)) and streamed.strip() == expected
    server.close()


async def test_cancelling_a_running_generation_stops_it(tiny_lloco, monkeypatch):
    steps = []
    real = generation.check_cancelled

    def counting():
        steps.append(1)
        real()

    monkeypatch.setattr(generation, "check_cancelled", counting)
    monkeypatch.setattr(tiny_lloco.generator, "eos_ids", [])  # would run all 800 steps if not cancelled
    server = AsyncLLoCO(tiny_lloco, max_pending=2)
    cfg = GenerationConfig(max_new_tokens=800)
    task = asyncio.create_task(server.answer("Where?", ["The museum is on Harbor Street."], config=cfg))
    while len(steps) < 3:
        await asyncio.sleep(0.01)
    task.cancel()
    at_cancel = len(steps)
    with pytest.raises(asyncio.CancelledError):
        await task
    for _ in range(500):
        if server.queue.pending == 0:
            break
        await asyncio.sleep(0.01)
    assert server.queue.pending == 0 and len(steps) <= at_cancel + 2  # stopped at the next token, slot freed
    # the model is usable right after
    assert (await server.answer("Where?", ["Harbor Street."], config=GenerationConfig(max_new_tokens=2))).answer is not None
    server.close()
