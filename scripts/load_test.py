#!/usr/bin/env python3
"""Load and stress runs for docs/reliability.md (in-process or local subprocesses only, bounded in time).

    python scripts/load_test.py store --writers 4 --readers 3     # concurrent `lloco ingest` + readers on one store
    python scripts/load_test.py async --clients 64 --seconds 120  # many asyncio clients on one model (AsyncLLoCO)
    python scripts/load_test.py huge --tokens 5000000             # read + chunk a multi-million-token file
    python scripts/load_test.py huge --tokens 1000000 --ingest --model DIR

Each prints a human summary and, with ``--json``, one JSON object as the last line; exit code 1 on failure.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from fault_injection import SAMPLES, make_corpus, snapshot  # noqa: E402


def rss_mb() -> float:
    """Current resident memory (Linux /proc; falls back to the peak elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize() / 2**20
    except OSError:
        return peak_mb()


def peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- several writers and readers on one store -------------------------------------------------
def run_store(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="lloco-load-"))
    corpus = work / "corpus"
    make_corpus(corpus, args.docs, args.sentences, args.seed)
    docs = sorted(corpus.glob("*.txt"))
    store = work / "shared"

    def ingest(paths, target):
        return subprocess.Popen([sys.executable, "-m", "lloco_index.cli", "ingest", *map(str, paths), "--store",
                                 str(target), "--model", args.model, "--device", "cpu", "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    t0 = time.perf_counter()
    # each writer takes 3 neighbouring documents, so every document is ingested by 3 writers at once
    writers = [ingest([docs[(w + i) % len(docs)] for i in range(3)], store) for w in range(args.writers)]
    readers = [subprocess.Popen([sys.executable, __file__, "_reader", str(store)], stdout=subprocess.PIPE)
               for _ in range(args.readers)]
    codes = [w.wait() for w in writers]
    Path(str(store) + ".stop").touch()
    reads = [json.loads(r.communicate()[0].decode().strip().splitlines()[-1]) for r in readers]
    seconds = time.perf_counter() - t0
    covered = sorted({docs[(w + i) % len(docs)] for w in range(args.writers) for i in range(3)})
    ingest(covered, work / "reference").wait()
    from lloco_index.store import CompressedStore

    shared, ref = snapshot(store), snapshot(work / "reference")
    report = CompressedStore(store).verify()
    result = {"writers": args.writers, "readers": args.readers, "model": args.model, "seconds": round(seconds, 1),
              "writer_exit_codes": codes, "reads": sum(r["reads"] for r in reads),
              "tensors_read": sum(r["tensors"] for r in reads), "read_errors": sum(r["errors"] for r in reads),
              "entries": report.entries, "reference_entries": len(ref["rows"]),
              "same_keys_texts_sources": shared["rows"] == ref["rows"] and shared["sources"] == ref["sources"],
              "problems": len(report.problems), "leftovers": len(report.leftovers)}
    result["ok"] = (codes == [0] * len(codes) and result["read_errors"] == 0 and result["same_keys_texts_sources"]
                    and report.ok and not report.leftovers)
    print(f"{args.writers} concurrent ingests + {args.readers} readers on one store in {seconds:.0f}s: "
          f"{result['entries']} entries (reference {result['reference_entries']}), same keys/texts/sources: "
          f"{result['same_keys_texts_sources']}; {result['reads']} reads ({result['tensors_read']} tensors) with "
          f"{result['read_errors']} errors; verify: {len(report.problems)} problems, {len(report.leftovers)} leftovers")
    return result


def reader(store: str) -> None:
    """Child: read random committed entries (checksum-verified by get_many) until told to stop."""
    from lloco_index.store import CompressedStore, StoreError

    stop, st = Path(store + ".stop"), None
    reads = tensors = errors = 0
    rng = random.Random()
    while not stop.exists():
        try:
            st = st or CompressedStore(store)
        except StoreError:  # not created yet
            time.sleep(0.05)
            continue
        try:
            chunks = st.chunks()
            pick = rng.sample(chunks, min(16, len(chunks)))
            st._cache.clear()  # read from disk every time, not from the LRU cache
            tensors += len(st.get_many([c.key for c in pick]))
            reads += 1
        except Exception as e:  # noqa: BLE001 - counted and reported: any failure is a finding
            errors += 1
            print(f"reader error: {e}", file=sys.stderr)
        time.sleep(0.01)
    print(json.dumps({"reads": reads, "tensors": tensors, "errors": errors}))


# -- many asyncio clients on one model ----------------------------------------------------------
async def run_async(args) -> dict:
    from lloco_index.cli import DEMO_QUESTIONS
    from lloco_index.generation import GenerationConfig
    from lloco_index.pipeline import LLoCO
    from lloco_index.serving import AsyncLLoCO, Overloaded

    lloco = LLoCO.from_pretrained(args.model, store=tempfile.mkdtemp(prefix="lloco-async-"), device="cpu")
    lloco.ingest([SAMPLES])
    server = AsyncLLoCO(lloco, max_pending=args.max_pending)
    cfg = GenerationConfig(max_new_tokens=args.max_new_tokens)
    stats = {"completed": 0, "streamed": 0, "overloaded": 0, "cancelled": 0, "errors": 0}
    latencies, rss, peak_pending = [], [rss_mb()], 0
    deadline = time.monotonic() + args.seconds

    async def client(i: int) -> None:
        nonlocal peak_pending
        rng = random.Random(i)
        while time.monotonic() < deadline:
            q = rng.choice(DEMO_QUESTIONS)[0]
            kind = rng.random()
            t0 = time.perf_counter()
            try:
                if kind < 0.15:  # a client that reads two deltas and hangs up
                    stream = server.stream_ask(q, top_k=3, config=cfg)
                    deltas = 0
                    async for _ in stream:
                        deltas += 1
                        if deltas == 2:
                            break
                    await stream.aclose()
                    stats["streamed"] += 1
                elif kind < 0.25:  # a client with a short timeout: cancelled while queued or running
                    await asyncio.wait_for(server.ask(q, top_k=3, config=cfg), timeout=rng.uniform(0.01, 1.0))
                    stats["completed"] += 1
                else:
                    await server.ask(q, top_k=3, config=cfg)
                    stats["completed"] += 1
                    latencies.append(time.perf_counter() - t0)
            except Overloaded:
                stats["overloaded"] += 1
                await asyncio.sleep(rng.uniform(0.05, 0.3))
            except asyncio.TimeoutError:
                stats["cancelled"] += 1
            except Exception as e:  # noqa: BLE001 - counted and reported
                stats["errors"] += 1
                print(f"client error: {type(e).__name__}: {e}", file=sys.stderr)
            peak_pending = max(peak_pending, server.queue.pending)

    async def sample() -> None:
        while time.monotonic() < deadline + 60:
            rss.append(rss_mb())
            await asyncio.sleep(0.5)

    sampler = asyncio.create_task(sample())
    t0 = time.perf_counter()
    await asyncio.gather(*(client(i) for i in range(args.clients)))
    for _ in range(600):  # the worker finishes what it is running
        if server.queue.pending == 0:
            break
        await asyncio.sleep(0.1)
    seconds = time.perf_counter() - t0
    sampler.cancel()
    server.close()
    latencies.sort()
    pct = (lambda p: round(latencies[min(len(latencies) - 1, int(p * len(latencies)))], 2)) if latencies else (
        lambda p: None)
    result = {"clients": args.clients, "seconds": round(seconds, 1), "max_pending": args.max_pending,
              "model": args.model, **stats, "latency_p50_s": pct(0.5), "latency_p95_s": pct(0.95),
              "peak_pending": peak_pending, "pending_at_end": server.queue.pending,
              "rss_mb_start": round(rss[0]), "rss_mb_peak": round(max(rss)), "rss_mb_end": round(rss[-1])}
    result["ok"] = stats["errors"] == 0 and result["pending_at_end"] == 0 and peak_pending <= args.max_pending
    print(f"{args.clients} clients for {seconds:.0f}s (max_pending {args.max_pending}): {stats['completed']} answered "
          f"(p50 {result['latency_p50_s']}s, p95 {result['latency_p95_s']}s), {stats['streamed']} streams hung up, "
          f"{stats['cancelled']} cancelled by timeout, {stats['overloaded']} refused as overloaded, "
          f"{stats['errors']} errors; RSS {result['rss_mb_start']} -> peak {result['rss_mb_peak']} -> "
          f"{result['rss_mb_end']} MB; pending at end {result['pending_at_end']}")
    return result


# -- one huge document --------------------------------------------------------------------------
def run_huge(args) -> dict:
    from transformers import AutoTokenizer

    from lloco_index.chunking import chunk_text, read_text_file
    from lloco_index.models import resolve_model_path

    work = Path(tempfile.mkdtemp(prefix="lloco-huge-"))
    tok = AutoTokenizer.from_pretrained(resolve_model_path(args.model))
    pool = [s.strip() + "." for p in sorted(SAMPLES.glob("*.txt")) for s in p.read_text().split(".") if s.strip()]
    rng = random.Random(args.seed)
    per_sentence = len(tok(" ".join(pool), add_special_tokens=False)["input_ids"]) / len(pool)
    sep = " " if args.one_line else "\n"
    doc = work / "huge.txt"
    with open(doc, "w") as f:
        for i in range(int(args.tokens / per_sentence)):
            f.write(f"{rng.choice(pool)} ({i}){sep if i % 6 == 5 else ' '}")
    base = peak_mb()
    t0 = time.perf_counter()
    text = read_text_file(doc)
    n_tokens = len(tok(text[:1_000_000], add_special_tokens=False)["input_ids"]) * len(text) / min(len(text), 1_000_000)
    result = {"model": args.model, "bytes": doc.stat().st_size, "tokens_approx": int(n_tokens),
              "one_line": args.one_line}
    if args.ingest:
        from lloco_index.pipeline import LLoCO

        lloco = LLoCO.from_pretrained(args.model, store=work / "store", device="cpu")
        report = lloco.ingest([doc], batch_size=args.batch_size)
        verify = lloco.store.verify()
        result.update(chunks=report.chunks, new_entries=report.new_chunks, verify_ok=verify.ok,
                      ok=verify.ok and report.new_chunks > 0)
    else:
        chunks = chunk_text(text, tok, args.segment_tokens)
        result.update(chunks=len(chunks), max_chunk_tokens=max(c.n_tokens for c in chunks),
                      ok="".join(c.text for c in chunks) == text and max(c.n_tokens for c in chunks) <= args.segment_tokens)
    result.update(seconds=round(time.perf_counter() - t0, 1), peak_rss_mb=round(peak_mb()),
                  peak_rss_before_mb=round(base))
    print(f"{'ingested' if args.ingest else 'read + chunked'} {result['bytes'] / 1e6:.0f} MB "
          f"(~{result['tokens_approx'] / 1e6:.1f}M tokens{', one line' if args.one_line else ''}) into "
          f"{result['chunks']} chunks in {result['seconds']}s; peak RSS {result['peak_rss_mb']} MB "
          f"({result['peak_rss_before_mb']} MB before); ok: {result['ok']}")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("store")
    p.add_argument("--writers", type=int, default=4)
    p.add_argument("--readers", type=int, default=3)
    p.add_argument("--docs", type=int, default=6)
    p.add_argument("--sentences", type=int, default=60)
    p = sub.add_parser("async")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--seconds", type=float, default=120)
    p.add_argument("--max-pending", type=int, default=16)
    p.add_argument("--max-new-tokens", type=int, default=16)
    p = sub.add_parser("huge")
    p.add_argument("--tokens", type=int, default=5_000_000)
    p.add_argument("--segment-tokens", type=int, default=512)
    p.add_argument("--one-line", action="store_true", help="no newlines at all: one extremely long line")
    p.add_argument("--ingest", action="store_true", help="full `LLoCO.ingest` (compress + store), not just chunking")
    p.add_argument("--batch-size", type=int, default=16)
    for p in sub.choices.values():
        p.add_argument("--model", default="smollm2-135m")
        p.add_argument("--seed", type=int, default=0)
        p.add_argument("--json", action="store_true")
    r = sub.add_parser("_reader")
    r.add_argument("store")
    args = ap.parse_args(argv)
    if args.cmd == "_reader":
        reader(args.store)
        return 0
    result = {"store": run_store, "huge": run_huge}.get(args.cmd, lambda a: asyncio.run(run_async(a)))(args)
    if args.json:
        print(json.dumps(result))
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
