#!/usr/bin/env python3
"""Kill `lloco ingest` with SIGKILL at random moments, then check the store and resume.

Kills alternate between two kinds. "time": after a random delay, uniform over the fastest run seen
so far, so kills land in start-up, chunking, compression, shard writes and commits. "write": the
moment a shard write starts (a ``*.tmp`` file appears in ``shards/``), plus 0-20 ms, so kills land
inside the temp-file write, the fsync, the rename and the commit, where a crash would hurt most.
After each kill the store is opened and every entry verified (checksums, shapes, dtypes, keys,
index vs files): a store that does not open or has any problem fails the run. Every
``--kills-per-store`` kills (or when a run finishes before its kill) the store is resumed with a
plain `lloco ingest` and compared with a clean run: same keys, texts, sources, shapes and dtypes;
vectors equal (bit for bit or, when batches were composed differently after a resume, within ``--atol``).

    python scripts/fault_injection.py --kills 20              # real default model (SmolLM2-135M)
    python scripts/fault_injection.py --model DIR --kills 2   # any local model folder (tests use a tiny one)

Prints a human summary and, with ``--json``, one JSON object as the last line. Exit code 1 on failure.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

SAMPLES = Path(__file__).resolve().parent.parent / "lloco_index" / "samples"


def make_corpus(folder: Path, docs: int, sentences: int, seed: int) -> None:
    """Deterministic documents made of shuffled sample sentences (distinct texts, many chunks)."""
    pool = [s.strip() + "." for p in sorted(SAMPLES.glob("*.txt")) for s in p.read_text().split(".") if s.strip()]
    folder.mkdir(parents=True, exist_ok=True)
    for d in range(docs):
        rng = random.Random(seed * 1000 + d)
        paras = [" ".join(rng.choice(pool) for _ in range(6)) for _ in range(sentences // 6)]
        (folder / f"doc{d:02d}.txt").write_text(f"Document {d}.\n\n" + "\n\n".join(paras) + "\n")


def ingest_cmd(args, corpus: Path, store: Path) -> list[str]:
    return [sys.executable, "-m", "lloco_index.cli", "ingest", str(corpus), "--store", str(store), "--model",
            args.model, "--device", "cpu", "--batch-size", str(args.batch_size), "--json"]


def run_ingest(args, corpus: Path, store: Path, kill_after: float | None = None,
               write_jitter: float | None = None) -> tuple[bool, float]:
    """Run one ingest; SIGKILL it after ``kill_after`` s, or ``write_jitter`` s after a shard write starts.

    Returns (finished on its own, seconds)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(ingest_cmd(args, corpus, store), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    at_write = write_jitter is not None
    finished = _wait_for_write(proc, store / "shards") if at_write else _wait(proc, kill_after)
    if not finished:
        time.sleep(write_jitter or 0)
        os.killpg(proc.pid, signal.SIGKILL)
    _, err = proc.communicate()
    if finished and proc.returncode != 0:
        raise RuntimeError(f"ingest failed ({proc.returncode}): {err.decode()[-2000:]}")
    return finished, time.perf_counter() - t0


def _wait(proc: subprocess.Popen, seconds: float | None) -> bool:
    try:
        proc.wait(timeout=seconds)
        return True
    except subprocess.TimeoutExpired:
        return False


def _wait_for_write(proc: subprocess.Popen, shards: Path) -> bool:
    """Poll every ~0.5 ms until a temp shard appears (False) or the process ends (True)."""
    while proc.poll() is None:
        try:
            if any(name.endswith(".tmp") for name in os.listdir(shards)):
                return False
        except FileNotFoundError:
            pass
        time.sleep(0.0005)
    return True


def snapshot(store_dir: Path) -> dict:
    """Everything a store holds, by key: index row, vectors, plus the sources table."""
    from lloco_index.store import CompressedStore

    store = CompressedStore(store_dir)
    db = store._db()
    rows = {r[0]: r[1:] for r in db.execute("SELECT key, n_vectors, hidden, dtype, source_tokens, text FROM chunks")}
    sources = sorted(db.execute("SELECT doc, position, key FROM sources").fetchall())
    vectors = dict(zip(rows, store.get_many(list(rows)))) if rows else {}
    store.close()
    return {"rows": rows, "sources": sources, "vectors": vectors}


def compare(clean: dict, other: dict, atol: float) -> dict:
    same_rows = clean["rows"] == other["rows"]
    same_sources = clean["sources"] == other["sources"]
    identical, max_diff = 0, 0.0
    for k, v in clean["vectors"].items():
        w = other["vectors"].get(k)
        if w is None:
            max_diff = float("inf")
            continue
        diff = (v.float() - w.float()).abs().max().item()
        identical += diff == 0
        max_diff = max(max_diff, diff)
    ok = same_rows and same_sources and max_diff <= atol
    return {"ok": ok, "entries": len(other["rows"]), "same_keys_texts_shapes": same_rows,
            "same_sources": same_sources, "bit_identical": identical, "max_abs_diff": max_diff}


def check(store_dir: Path) -> dict:
    """Open + verify after a kill; a missing index means the kill came before the store was created."""
    from lloco_index.store import CompressedStore

    if not (store_dir / "index.sqlite").is_file():
        return {"opened": False, "entries": 0, "problems": [], "leftovers": []}
    store = CompressedStore(store_dir)
    report = store.verify()
    store.close()
    return {"opened": True, "entries": report.entries, "problems": [p.detail for p in report.problems],
            "leftovers": report.leftovers}


def resume_and_compare(args, corpus: Path, store: Path, clean: dict, failures: list[str]) -> dict:
    """Finish the interrupted store with a plain ingest, compare it with the clean run, then repair leftovers."""
    from lloco_index.store import CompressedStore

    run_ingest(args, corpus, store)
    result = compare(clean, snapshot(store), args.atol)
    st = CompressedStore(store)
    repaired = st.verify(repair=True)
    after = st.verify()
    st.close()
    result.update(leftovers_removed=len(repaired.removed), dropped=len(repaired.dropped),
                  final_ok=after.ok and not after.leftovers)
    result["ok"] = result["ok"] and result["final_ok"] and not repaired.dropped
    if not result["ok"]:
        failures.append(f"resume of {store.name}: {result}")
    print(f"resumed {store.name}: {result['entries']} entries, same as clean run: {result['ok']} "
          f"({result['bit_identical']} bit-identical, max |diff| {result['max_abs_diff']:.2g}), "
          f"{result['leftovers_removed']} leftover files removed")
    return result


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--kills-per-store", type=int, default=5, help="resume and compare after this many kills")
    ap.add_argument("--docs", type=int, default=6)
    ap.add_argument("--sentences", type=int, default=120, help="sentences per document")
    ap.add_argument("--batch-size", type=int, default=1, help="ingest batch size (a shard every 8 batches)")
    ap.add_argument("--atol", type=float, default=1e-2, help="max |difference| of vectors vs the clean run")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", default=None, help="default: a temporary folder, removed at the end")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args(argv)
    rng = random.Random(args.seed)
    work = Path(args.workdir or tempfile.mkdtemp(prefix="lloco-faults-"))
    corpus = work / "corpus"
    make_corpus(corpus, args.docs, args.sentences, args.seed)

    _, t_clean = run_ingest(args, corpus, work / "clean")
    clean = snapshot(work / "clean")
    print(f"clean run: {len(clean['rows'])} entries in {t_clean:.1f}s")

    kills, rounds, failures = [], [], []
    store, since_resume, fastest = work / "faulty-0", 0, t_clean
    while sum(not k["finished_first"] for k in kills) < args.kills and len(kills) < 3 * args.kills:
        i = len(kills)
        kind = "write" if i % 2 else "time"
        delay, jitter = rng.uniform(0.2, fastest), rng.uniform(0, 0.02)
        finished, seconds = run_ingest(args, corpus, store, kill_after=delay,
                                       write_jitter=jitter if kind == "write" else None)
        if finished and not since_resume:
            fastest = min(fastest, seconds)
        state = check(store)
        kills.append({"kind": kind, "at_s": round(seconds, 2), "finished_first": finished, **state})
        if state["problems"]:
            failures.append(f"kill {i}: {state['problems'][:3]}")
        print(f"run {i + 1} ({kind} kill) at {seconds:.2f}s: {'finished first; ' if finished else ''}"
              f"{state['entries']} entries, {len(state['problems'])} problems, {len(state['leftovers'])} leftovers")
        since_resume += 1
        done = sum(not k["finished_first"] for k in kills) >= args.kills or len(kills) >= 3 * args.kills
        if finished or since_resume == args.kills_per_store or done:
            rounds.append(resume_and_compare(args, corpus, store, clean, failures))
            store, since_resume = work / f"faulty-{len(rounds)}", 0

    killed = [k for k in kills if not k["finished_first"]]
    summary = {"model": args.model, "kills": len(killed), "runs": len(kills), "clean_entries": len(clean["rows"]),
               "kills_at_write": sum(k["kind"] == "write" for k in killed),
               "clean_seconds": round(t_clean, 1), "entries_checked_after_kills": sum(k["entries"] for k in kills),
               "kills_with_problems": sum(bool(k["problems"]) for k in kills),
               "kills_with_leftovers": sum(bool(k["leftovers"]) for k in kills),
               "resumed_stores": len(rounds), "rounds": rounds, "kill_log": kills, "failures": failures,
               "ok": not failures}
    print(f"{len(killed)} kills in {len(kills)} runs ({summary['kills_at_write']} as a shard write started), "
          f"{summary['entries_checked_after_kills']} entries verified after kills, "
          f"{summary['kills_with_problems']} with problems, {summary['kills_with_leftovers']} with leftover files; "
          f"{len(rounds)} stores resumed, all equal to the clean run: {all(r['ok'] for r in rounds)}")
    if args.json:
        print(json.dumps(summary))
    if not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
