"""The ``lloco`` command line. Command names and flags are a contract; torch is imported lazily."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path

SAMPLES = Path(__file__).parent / "samples"
DEMO_QUESTIONS = [
    ("Who founded the Harbor Street Lighthouse Museum?", "Miriam Okafor"),
    ("What is the name of the museum's cat?", "Biscuit"),
    ("How many steps does the lighthouse tower have?", "137"),
]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="embedded name, local folder or hub id")
    p.add_argument("--adapter", default=None, help="decoder LoRA folder, or 'base' for none (default: bundled)")
    p.add_argument("--compressor", default=None, help="compressor folder (default: bundled for --model)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")


def _gen(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lloco", description="LLoCO: answer over compressed long contexts.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="chunk + compress text files/folders into a store")
    p.add_argument("paths", nargs="+")
    p.add_argument("--store", required=True)
    p.add_argument("--batch-size", type=int, default=16)
    _common(p)

    p = sub.add_parser("ask", help="answer from the top-k retrieved compressed chunks")
    p.add_argument("question")
    p.add_argument("--store", required=True)
    p.add_argument("--top-k", type=int, default=5)
    p.add_argument("--stream", action="store_true")
    _common(p)
    _gen(p)

    p = sub.add_parser("answer", help="whole-document mode: compress all given files and answer")
    p.add_argument("question")
    p.add_argument("--context", nargs="+", required=True, metavar="FILE")
    p.add_argument("--store", default=None, help="optional store to cache the compressed chunks")
    _common(p)
    _gen(p)

    p = sub.add_parser("info", help="describe a store")
    p.add_argument("--store", required=True)
    _common(p)

    p = sub.add_parser("verify", help="check every entry of a store; exit code 1 if something is wrong")
    p.add_argument("--store", required=True)
    p.add_argument("--repair", action="store_true",
                   help="drop bad entries (the next ingest recompresses them) and remove leftover files")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")

    p = sub.add_parser("demo", help="ingest the bundled sample and answer a few questions")
    p.add_argument("--store", default=None, help="default: a fresh temporary folder")
    _common(p)
    return parser


def _load(args, store: str | None):
    from .pipeline import LLoCO

    return LLoCO.from_pretrained(args.model, compressor=args.compressor, adapter=args.adapter,
                                 store=store, device=args.device)


def _config(args):
    from .generation import GenerationConfig

    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature)


def _emit(args, obj: dict, human: str) -> None:
    print(json.dumps(obj) if args.json else human)


def cmd_ingest(args) -> None:
    lloco = _load(args, args.store)
    report = lloco.ingest(args.paths, batch_size=args.batch_size, show_progress_bar=not args.json)
    _emit(args, {**vars(report), "store": args.store},
          f"ingested {report.documents} documents: {report.chunks} chunks ({report.new_chunks} new), "
          f"{report.source_tokens} source tokens -> store {args.store}")


def _answer_out(args, ans) -> None:
    saved = ans.source_tokens / max(ans.context_vectors, 1)
    _emit(args, ans.to_dict(), f"{ans.answer}\n[{ans.prompt_tokens} prompt positions; context of "
          f"{ans.source_tokens} tokens sent as {ans.context_vectors} vectors ({saved:.1f}x fewer)]")


def cmd_ask(args) -> None:
    from .store import StoreError

    if not (Path(args.store) / "index.sqlite").is_file():
        raise StoreError(f"no store at {args.store} (run `lloco ingest ... --store {args.store}` first)")
    lloco = _load(args, args.store)
    if args.stream and not args.json:
        for delta in lloco.stream_ask(args.question, args.top_k, _config(args)):
            print(delta, end="", flush=True)
        print()
        return
    _answer_out(args, lloco.ask(args.question, top_k=args.top_k, config=_config(args)))


def cmd_answer(args) -> None:
    from .chunking import read_text_file

    texts = [read_text_file(f) for f in args.context]
    lloco = _load(args, args.store)
    _answer_out(args, lloco.answer(args.question, texts, config=_config(args)))


def cmd_info(args) -> None:
    from .store import CompressedStore

    stats = CompressedStore(args.store).stats()
    cfg = stats["compressor_config"]
    _emit(args, stats, "\n".join([
        f"store:            {stats['store']}",
        f"documents:        {stats['documents']}",
        f"chunks:           {stats['chunks']}",
        f"vectors:          {stats['vectors']}",
        f"source tokens:    {stats['source_tokens']}",
        f"compression:      {stats['compression_ratio']} text tokens per vector "
        f"(segment {cfg.get('segment_tokens')} -> {cfg.get('summary_tokens')} vectors)",
        f"bytes on disk:    {stats['bytes_on_disk']}",
        f"fingerprint:      {stats['fingerprint']}"]))


def cmd_verify(args) -> int:
    from .store import CompressedStore

    report = CompressedStore(args.store).verify(repair=args.repair)
    n = len(report.problems)
    lines = [f"store {report.store}: {report.entries} entries in {report.shards} shards checked, "
             f"{n} problem{'' if n == 1 else 's'}"]
    lines += [f"  {p.kind}: {p.detail}" + (f" (chunk {p.key})" if p.key else "") + (" [fixed]" if p.fixed else "")
              for p in report.problems]
    if report.repaired:
        lines.append(f"repaired: dropped {len(report.dropped)} entries (re-run `lloco ingest` to recompress them), "
                     f"removed {len(report.removed)} leftover files")
    elif report.leftovers:
        lines.append(f"{len(report.leftovers)} leftover files of interrupted writes (never served; --repair removes them)")
    lines.append("OK" if report.ok else "PROBLEMS FOUND" + ("" if report.repaired else "; run with --repair"))
    _emit(args, report.to_dict(), "\n".join(lines))
    return 0 if report.ok else 1


def cmd_demo(args) -> None:
    import tempfile
    import time

    store = args.store or tempfile.mkdtemp(prefix="lloco-demo-")
    t0 = time.perf_counter()
    lloco = _load(args, store)
    report = lloco.ingest([SAMPLES], show_progress_bar=False)
    print(f"ingested {report.chunks} chunks ({report.source_tokens} tokens) into {store} "
          f"in {time.perf_counter() - t0:.1f}s; adapter: {lloco.adapter or 'none (base model)'}")
    results = []
    for q, expect in DEMO_QUESTIONS:
        a = lloco.ask(q, top_k=3)
        ok = expect.lower() in a.answer.lower()
        results.append({"question": q, "expected": expect, "correct": ok, **a.to_dict()})
        print(f"Q: {q}\nA: {a.answer}\n   expected {expect!r}: {'yes' if ok else 'no'}; "
              f"{a.source_tokens} context tokens sent as {a.context_vectors} vectors "
              f"({a.source_tokens / max(a.context_vectors, 1):.1f}x fewer), {a.latency_s:.2f}s")
    src = sum(r["source_tokens"] for r in results)
    vec = sum(r["context_vectors"] for r in results)
    summary = {"correct": sum(r["correct"] for r in results), "questions": len(results),
               "context_tokens": src, "context_vectors": vec, "tokens_saved": src - vec, "results": results}
    print(f"{summary['correct']}/{len(results)} correct; context tokens {src} -> {vec} vectors "
          f"({src - vec} decoder positions saved)")
    if args.json:
        print(json.dumps(summary))


COMMANDS = {"ingest": cmd_ingest, "ask": cmd_ask, "answer": cmd_answer, "info": cmd_info, "verify": cmd_verify,
            "demo": cmd_demo}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("LLOCO_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args) or 0
    except KeyboardInterrupt:
        print("interrupted; the store keeps every chunk written so far", file=sys.stderr)
        return 130
    except Exception as e:  # one clear line, no traceback, for expected user errors
        from .errors import USER_ERRORS

        if not isinstance(e, USER_ERRORS) or os.environ.get("LLOCO_DEBUG"):
            raise
        print(f"lloco {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
