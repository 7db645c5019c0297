"""The ``lloco`` command line. Command names and flags are a contract; torch is imported lazily."""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import sys
from pathlib import Path

from .presets import PRESETS

SAMPLES = Path(__file__).parent / "samples"
DEMO_QUESTIONS = [
    ("Who founded the Harbor Street Lighthouse Museum?", "Miriam Okafor"),
    ("What is the name of the museum's cat?", "Biscuit"),
    ("How many steps does the lighthouse tower have?", "137"),
]


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="smollm2-135m", help="embedded name, local folder or hub id")
    p.add_argument("--adapter", default=None, help="decoder LoRA folder or hub id, or 'base' for none (default: bundled)")
    p.add_argument("--compressor", default=None,
                   help="compressor folder (default: --model's own if it is an AutoCompressor, else bundled)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS),
                   help="LLoCO prompt format of the matching xiuyul/Lloco-7b-* adapter (default: chat layout)")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="model dtype (default: bfloat16 on GPU, float32 on CPU; bfloat16 on a CPU with native bf16 "
                        "compressed 1.5x faster, docs/benchmarks.md)")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")


def _gen(p: argparse.ArgumentParser) -> None:
    p.add_argument("--expand", type=int, default=0,
                   help="give the K chunks most relevant to the question as text instead of vectors")
    p.add_argument("--expand-at", default="end", choices=["end", "in-place"],
                   help="where --expand's text chunks go: after all vector chunks (default) or in document order")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")


def _answering(p: argparse.ArgumentParser) -> None:
    """Options of the commands that answer one question (``ask``, ``answer``)."""
    _common(p)
    _gen(p)
    p.add_argument("--choices", nargs="+", default=None, metavar="OPTION",
                   help="multiple choice: print the option the decoder finds most likely as the answer (LLoCO.choose)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lloco", description="LLoCO: answer over compressed long contexts.")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("ingest", help="chunk + compress text files/folders into a store")
    p.add_argument("paths", nargs="+", help="files/folders; with --ray also Parquet/JSONL tables and fsspec URLs")
    p.add_argument("--store", required=True, help="store folder; with --ray also an fsspec URL (s3://...)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ray", action="store_true", help="distribute over a Ray cluster (RAY_ADDRESS, else local)")
    p.add_argument("--num-gpus", type=int, default=0, help="--ray: compressor actors with one GPU each")
    p.add_argument("--num-workers", type=int, default=1, help="--ray without GPUs: CPU compressor actors")
    p.add_argument("--ray-address", default=None, help="--ray: cluster address (default: RAY_ADDRESS or local)")
    p.add_argument("--text-column", default="text", help="--ray: Parquet/JSONL column with the text")
    p.add_argument("--id-column", default="id", help="--ray: Parquet/JSONL column naming the document")
    _common(p)

    p = sub.add_parser("ask", help="answer from the top-k retrieved compressed chunks")
    p.add_argument("question")
    p.add_argument("--store", required=True)
    p.add_argument("--top-k", type=int, default=5,
                   help="chunks retrieved (BM25, default 5); fewer, even 1, suit one-fact questions, more suit "
                        "questions that chain facts (docs/quality.md)")
    p.add_argument("--stream", action="store_true")
    _answering(p)

    p = sub.add_parser("answer", help="whole-document mode: compress all given files and answer")
    p.add_argument("question")
    p.add_argument("--context", nargs="+", required=True, metavar="FILE")
    p.add_argument("--store", default=None, help="optional store to cache the compressed chunks")
    p.add_argument("--accumulate", action="store_true",
                   help="compress each file whole in AutoCompressor's recurrent mode, as LLoCO did (not cached)")
    p.add_argument("--top-k", type=int, default=None,
                   help="keep only the K chunks most relevant to the question (BM25); recommended for long inputs "
                        "and one-fact questions (docs/quality.md)")
    _answering(p)

    p = sub.add_parser("info", help="describe a store")
    p.add_argument("--store", required=True)
    _common(p)

    p = sub.add_parser("train", help="offline learning: build a corpus, pretrain the compressor, finetune a decoder, "
                                     "average runs")
    p.add_argument("what", choices=["corpus", "compressor", "finetune", "average"])
    p.add_argument("options", nargs=argparse.REMAINDER,
                   help="corpus: --out FILE.npz --max_tokens N --model M SOURCE...; compressor/finetune: "
                        "--KEY VALUE for any TrainConfig field (e.g. --out_dir runs/x --max_minutes 8); "
                        "average: --out DIR [--weights 3,1,1] RUN RUN...")
    p.set_defaults(json=False)

    p = sub.add_parser("convert-checkpoint", help="rewrite a model/adapter folder's pickled *.bin weights as safetensors")
    p.add_argument("src", help="folder with pytorch_model*.bin or adapter_model.bin")
    p.add_argument("dst", help="new folder to write")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")

    p = sub.add_parser("bench", help="speed benchmark on one device: full vs compressed context (timing only)")
    p.add_argument("--model-shape", default="7b",
                   help="comma list: 7b (LLaMA-2-7B shape, random weights), default (smollm2-135m), tiny (random)")
    p.add_argument("--sections", default="latency,compress,serve,finetune")
    p.add_argument("--lengths", default="", help="source tokens, comma list (default: per shape)")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--serve-questions", type=int, default=32)
    p.add_argument("--serve-source", type=int, default=32768, help="source tokens behind each served context")
    p.add_argument("--finetune-source", type=int, default=32768)
    p.add_argument("--compress-batches", default="", help="segments per encoder forward (default: per shape)")
    p.add_argument("--budget-s", type=float, default=450.0, help="start no new measurement after this many seconds")
    p.add_argument("--compile", action="store_true",
                   help="latency: also time both full and LLoCO on the fast engine with a torch.compile'd step")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="bench.json")
    p.add_argument("--render", default=None, metavar="JSON", help="only print the tables of an earlier run's JSON")
    p.set_defaults(json=False)

    p = sub.add_parser("verify", help="check every entry of a store; exit code 1 if something is wrong")
    p.add_argument("--store", required=True)
    p.add_argument("--repair", action="store_true",
                   help="drop bad entries (the next ingest recompresses them) and remove leftover files")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")

    p = sub.add_parser("demo", help="ingest the bundled sample and answer a few questions")
    p.add_argument("--store", default=None, help="default: a fresh temporary folder")
    _common(p)
    _eval_parsers(sub.add_parser("eval", help="evaluate: QA in four modes, needle in a haystack, tables, dev set"))
    return parser


def _eval_parsers(parser: argparse.ArgumentParser) -> None:
    from dataclasses import fields

    from .eval import CHOICE_SCORING, MODES
    from .eval.devset import DevSetConfig

    sub = parser.add_subparsers(dest="eval_command", required=True)
    p = sub.add_parser("qa", help="answer and score a QA JSONL file in one mode")
    p.add_argument("file", metavar="FILE.jsonl")
    p.add_argument("--mode", choices=MODES, default="lloco",
                   help="lloco: compressed documents; full: all text (cut in the middle to fit); "
                        "rag: top-k text chunks; none: question only")
    p.add_argument("--limit", type=int, default=None, help="only the first N examples")
    p.add_argument("--choice-scoring", choices=CHOICE_SCORING, default="generate",
                   help="multiple choice: generate (ask for the option's letter) or likelihood (the option the "
                        "decoder finds most likely as the whole answer to the bare question)")
    _eval_run(p, batch_size=8)
    p = sub.add_parser("niah", help="needle in a haystack: length x depth grid, JSON + heatmap PNG")
    p.add_argument("--haystack", nargs="+", required=True, metavar="DIR", help="folder(s) of .txt/.md haystack text")
    p.add_argument("--lengths", type=int, nargs="+", default=None, help="tokens, needle included "
                   "(default 1000 2000 4000 8000 16000)")
    p.add_argument("--depths", type=float, nargs="+", default=None, help="percent (default 0 25 50 75 100)")
    p.add_argument("--modes", nargs="+", choices=MODES, default=["lloco", "full"])
    p.add_argument("--needle", default=None, help="default: the San Francisco sandwich needle")
    p.add_argument("--question", default=None)
    p.add_argument("--expect", nargs="+", default=None, metavar="WORDS", help="phrases a right answer contains")
    p.add_argument("--seed", type=int, default=0, help="shuffles the haystack files")
    p.add_argument("--plot", default=None, help="heatmap PNG (default: next to --out)")
    _eval_run(p, batch_size=4, out="niah.json")
    p = sub.add_parser("table", help="reports side by side as a markdown table")
    p.add_argument("reports", nargs="+", metavar="REPORT.json")
    p.add_argument("--out", default=None, help="also write the table to this file")
    p = sub.add_parser("compare", help="two QA reports on the same questions, paired: who got which right, sign test")
    p.add_argument("a", metavar="A.json", help="a report, or several joined by commas (one per dev set), pooled")
    p.add_argument("b", metavar="B.json", help="the other side's reports, in the same order")
    p.add_argument("--metric", choices=("exact_match", "contains"), default="exact_match",
                   help="what makes an open answer right (multiple choice: the option)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p = sub.add_parser("make-dev", help="write a seeded synthetic multi-document QA dev set")
    p.add_argument("--source", nargs="+", default=None, metavar="DIR",
                   help="held-out text (default: the Node.js API docs, /usr/share/doc/nodejs/api)")
    p.add_argument("--out", required=True, metavar="FILE.jsonl")
    for f in fields(DevSetConfig):
        p.add_argument("--" + f.name.replace("_", "-"), type=type(f.default), default=f.default,
                       help=f.metadata["help"] + f" (default {f.default})")
    p.add_argument("--json", action="store_true", help="print one JSON object as the last line of stdout")


def _eval_run(p: argparse.ArgumentParser, batch_size: int, out: str | None = None) -> None:
    p.add_argument("--top-k", type=int, default=None, help="lloco/rag: chunks kept per question (BM25)")
    p.add_argument("--batch-size", type=int, default=batch_size, help="questions generated together")
    p.add_argument("--out", default=out, metavar="REPORT.json", help="report; rerun the same command to resume")
    p.add_argument("--store", default=None, help="optional store caching compressed chunks across runs")
    _common(p)
    _gen(p)


def _load(args, store: str | None):
    from .pipeline import LLoCO

    lloco = LLoCO.from_pretrained(args.model, compressor=args.compressor, adapter=args.adapter,
                                  store=store, device=args.device, prompt_preset=args.preset, dtype=args.dtype)
    lloco.expand_at = getattr(args, "expand_at", "end").replace("-", "_")
    return lloco


def _config(args):
    from .generation import GenerationConfig

    return GenerationConfig(max_new_tokens=args.max_new_tokens, temperature=args.temperature)


def _emit(args, obj: dict, human: str) -> None:
    print(json.dumps(obj) if args.json else human)


def cmd_ingest(args) -> None:
    if args.ray:
        from .distributed import RayIngestConfig, ingest

        config = RayIngestConfig(num_gpus=args.num_gpus, num_workers=args.num_workers, batch_size=args.batch_size,
                                 address=args.ray_address, text_column=args.text_column, id_column=args.id_column)
        report = ingest(args.paths, args.store, model=args.model, compressor=args.compressor, config=config,
                        show_progress_bar=not args.json)
    elif "://" in args.store:
        raise ValueError(f"--store {args.store}: a store URL needs --ray (a plain ingest writes a local folder)")
    else:
        report = _load(args, args.store).ingest(args.paths, batch_size=args.batch_size, show_progress_bar=not args.json)
    _emit(args, {**vars(report), "store": args.store},
          f"ingested {report.documents} documents: {report.chunks} chunks ({report.new_chunks} new), "
          f"{report.source_tokens} source tokens -> store {args.store}")


def _answer_out(args, ans) -> None:
    saved = ans.source_tokens / max(ans.context_vectors, 1)
    scores = "".join(f"\n  {s:9.3f}  {c}" for c, s in zip(args.choices, ans.choice_scores)) if args.choices else ""
    _emit(args, ans.to_dict(), f"{ans.answer}{scores}\n[{ans.prompt_tokens} prompt positions; context of "
          f"{ans.source_tokens} tokens sent as {ans.context_vectors} vectors ({saved:.1f}x fewer)]")


def cmd_ask(args) -> None:
    from .store import StoreError

    if not (Path(args.store) / "index.sqlite").is_file():
        raise StoreError(f"no store at {args.store} (run `lloco ingest ... --store {args.store}` first)")
    lloco = _load(args, args.store)
    if args.choices:
        if args.stream:
            raise ValueError("--choices scores the options; it does not stream")
        _answer_out(args, lloco.choose(args.question, args.choices, top_k=args.top_k, expand=args.expand))
        return
    if args.stream and not args.json:
        for delta in lloco.stream_ask(args.question, args.top_k, _config(args), expand=args.expand):
            print(delta, end="", flush=True)
        print()
        return
    _answer_out(args, lloco.ask(args.question, top_k=args.top_k, config=_config(args), expand=args.expand))


def cmd_answer(args) -> None:
    from .chunking import read_text_file

    if args.choices and args.accumulate:
        raise ValueError("--choices works on chunks; it does not take --accumulate")
    texts = [read_text_file(f) for f in args.context]
    lloco = _load(args, args.store)
    if args.choices:
        _answer_out(args, lloco.choose(args.question, args.choices, texts, expand=args.expand, top_k=args.top_k))
        return
    _answer_out(args, lloco.answer(args.question, texts, config=_config(args), expand=args.expand,
                                   accumulate=args.accumulate, top_k=args.top_k))


def cmd_convert_checkpoint(args) -> None:
    from .checkpoints import convert_checkpoint

    files = convert_checkpoint(args.src, args.dst)
    _emit(args, {"src": args.src, "dst": args.dst, "files": files},
          f"wrote {', '.join(files)} to {args.dst}")


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
        f"(segment {cfg.get('segment_tokens')} -> {cfg.get('summary_tokens')} vectors"
        f"{', fewer for a shorter one' if cfg.get('proportional_vectors') else ''})",
        f"bytes on disk:    {stats['bytes_on_disk']}",
        f"fingerprint:      {stats['fingerprint']}"]))


def split_options(options: list[str]) -> tuple[dict[str, str], list[str]]:
    """``--name value`` pairs (dashes in names become underscores) and the remaining positional arguments."""
    pairs, rest, it = {}, [], iter(options)
    for tok in it:
        if tok.startswith("--"):
            pairs[tok[2:].replace("-", "_")] = next(it, "")
        else:
            rest.append(tok)
    return pairs, rest


def _train_help(what: str) -> str:
    from dataclasses import fields

    from .train import TrainConfig

    if what == "corpus":
        return ("usage: lloco train corpus [--out corpus.npz] [--max_tokens 5000000] [--model smollm2-135m] "
                "SOURCE...\n  SOURCE: .txt/.rst/.md/.gz files or folders of them")
    if what == "average":
        return ("usage: lloco train average --out DIR [--weights W1,W2,...] RUN RUN...\n  RUN: a training run's "
                "out_dir (compressor/, decoder/); runs must have continued one checkpoint with one configuration")
    return "\n".join([f"usage: lloco train {what} --KEY VALUE ...  (TrainConfig; recipes in docs/training.md)",
                      *(f"  --{f.name} {f.default!r}" for f in fields(TrainConfig))])


def cmd_train(args) -> None:
    from .train import TrainConfig, train_compressor, train_finetune

    if {"-h", "--help"} & set(args.options):
        print(_train_help(args.what))
        return
    logging.getLogger("lloco_index").setLevel(logging.INFO)
    pairs, rest = split_options(args.options)
    if args.what == "corpus":
        from .corpus import build_corpus
        from .models import load_base_model

        files = [f for p in rest for f in (sorted(Path(p).rglob("*")) if Path(p).is_dir() else [Path(p)])
                 if f.is_file() and f.suffix in (".txt", ".rst", ".md", ".gz")] if rest else []
        if not files:
            raise ValueError("train corpus needs SOURCE files or folders (.txt/.rst/.md/.gz)")
        _, tok = load_base_model(pairs.get("model", "smollm2-135m"), device="cpu")
        info = build_corpus(files, tok, Path(pairs.get("out", "corpus.npz")), int(pairs.get("max_tokens", 5_000_000)))
        _emit(args, info, f"corpus: {info['tokens']} tokens from {info['documents']} documents -> {info['file']}")
        return
    if args.what == "average":
        from .average import average_runs

        if unknown := set(pairs) - {"out", "weights"}:
            raise ValueError(f"train average takes --out and --weights, not --{', --'.join(sorted(unknown))}")
        if "out" not in pairs:
            raise ValueError("train average needs --out DIR (a new folder)")
        try:
            weights = [float(w) for w in pairs["weights"].split(",")] if "weights" in pairs else None
        except ValueError:
            raise ValueError(f"--weights takes numbers like 3,1,1, got {pairs['weights']!r}") from None
        errors = average_runs(rest, pairs["out"], weights)
        _emit(args, {"out_dir": pairs["out"], "truncation_error": errors},
              f"averaged {len(rest)} runs -> {pairs['out']} (largest rank-truncation error {errors})")
        return
    cfg = TrainConfig.from_args(pairs)
    out = (train_compressor if args.what == "compressor" else train_finetune)(cfg)
    if os.environ.get("RANK", "0") == "0":  # under a multi-process launch only process 0 saved
        _emit(args, {"out_dir": str(out)}, f"saved to {out} (compressor/, decoder/, training_state.json)")


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
        print(f"Q: {q}   (expected: {expect})")
        for expand, label in ((0, "LLoCO, all chunks as vectors"), (1, "LLoCO + best chunk as text (--expand 1)")):
            a = lloco.ask(q, top_k=3, expand=expand)
            ok = expect.lower() in a.answer.lower()
            results.append({"question": q, "expected": expect, "expand": expand, "correct": ok, **a.to_dict()})
            print(f"  {label}: {a.answer!r} [{'right' if ok else 'wrong'}; {a.prompt_tokens} decoder positions, "
                  f"{a.context_vectors} of them vectors; {a.latency_s:.2f}s]")
    for expand in (0, 1):
        rs = [r for r in results if r["expand"] == expand]
        pos = sum(r["prompt_tokens"] for r in rs)
        print(f"expand={expand}: {sum(r['correct'] for r in rs)}/{len(rs)} right; {pos} decoder positions in all")
    full = sum(r["source_tokens"] for r in results if r["expand"] == 0)
    vec = sum(r["context_vectors"] for r in results if r["expand"] == 0)
    print(f"all-vector mode: {full} context tokens sent as {vec} vectors ({full - vec} decoder positions saved, "
          f"{full / max(vec, 1):.1f}x fewer)")
    if args.json:
        print(json.dumps({"results": results, "context_tokens": full, "context_vectors": vec}))


def cmd_eval(args) -> None:
    {"qa": _eval_qa, "niah": _eval_niah, "table": _eval_table, "compare": _eval_compare,
     "make-dev": _make_dev}[args.eval_command](args)


def _eval_qa(args) -> None:
    from .data import read_qa
    from .eval import evaluate_qa
    from .eval.report import pct

    examples = read_qa(args.file)[:args.limit]
    lloco = _load(args, args.store)
    report = evaluate_qa(lloco, examples, mode=args.mode, top_k=args.top_k, config=_config(args), expand=args.expand,
                         batch_size=args.batch_size, out=args.out, meta={"command": args.command_line},
                         show_progress_bar=not args.json, choice_scoring=args.choice_scoring)
    m = report["metrics"]
    _emit(args, {k: v for k, v in report.items() if k != "predictions"} | {"out": args.out}, "\n".join([
        f"{args.mode}: {m['examples']} examples ({m['open']} open, {m['multiple_choice']} multiple choice)",
        f"EM {pct(m['exact_match'])}  F1 {pct(m['f1'])}  contains {pct(m['contains'])}  "
        f"MC accuracy {pct(m['accuracy'])} ({args.choice_scoring})",
        f"mean prompt positions {m['mean_prompt_positions']} (context {m['mean_context_positions']}), "
        f"source tokens {m['mean_source_tokens']}; "
        f"truncated {m['truncated']}, does not fit {m['does_not_fit']}; {m['mean_latency_s']} s/question",
        f"report: {args.out}" if args.out else "(no --out: per-example predictions not saved)"]))


def _eval_niah(args) -> None:
    from .eval import load_haystack, plot_niah, run_niah
    from .eval.report import pct

    corpus = load_haystack(args.haystack, seed=args.seed)
    lloco = _load(args, args.store)
    opts = {k: v for k, v in [("lengths", args.lengths), ("depths", args.depths), ("needle", args.needle),
                              ("question", args.question), ("expect", args.expect)] if v is not None}
    report = run_niah(lloco, corpus, modes=args.modes, top_k=args.top_k, config=_config(args), expand=args.expand,
                      batch_size=args.batch_size, out=args.out, show_progress_bar=not args.json,
                      meta={"command": args.command_line, "haystack": args.haystack, "seed": args.seed}, **opts)
    plot = args.plot or str(Path(args.out).with_suffix(".png"))
    plot_niah(report, plot)
    lines = [f"{mode}: accuracy {pct(s['accuracy'])}% over {s['fit']} of {s['cells']} cells that fit the "
             f"{report['window']}-position window; mean score {s['mean_score']}" for mode, s in report["summary"].items()]
    _emit(args, {k: v for k, v in report.items() if k != "cells"} | {"out": args.out, "plot": plot},
          "\n".join(lines + [f"report: {args.out}  heatmap: {plot}"]))


def _eval_table(args) -> None:
    from .eval.report import markdown_table, read_report

    table = markdown_table([read_report(r) for r in args.reports], [Path(r).stem for r in args.reports])
    if args.out:
        Path(args.out).write_text(table, encoding="utf-8")
    print(table, end="")


def _eval_compare(args) -> None:
    from .eval.report import compare_reports, read_report

    res = compare_reports([read_report(f) for f in args.a.split(",")], [read_report(f) for f in args.b.split(",")],
                          args.metric)
    lines = [f"| questions ({args.metric} for open ones) | right in {args.a} | right in {args.b} | only A | only B "
             "| sign test p |",
             "|---|---|---|---|---|---|"]
    lines += [f"| {k.replace('_', ' ')} ({v['questions']}) | {v['right_a']} | {v['right_b']} | {v['only_a']} "
              f"| {v['only_b']} | {v['p']:.3f} |" for k, v in res.items() if v["questions"]]
    _emit(args, res, "\n".join(lines))


def _make_dev(args) -> None:
    from dataclasses import fields

    from .data import write_qa
    from .eval.devset import DEFAULT_SOURCE, DevSetConfig, make_dev_set

    config = DevSetConfig(**{f.name: getattr(args, f.name) for f in fields(DevSetConfig)})
    source = args.source or [str(DEFAULT_SOURCE)]
    examples = make_dev_set(source, config)
    write_qa(args.out, examples)
    multi = sum("multihop" in ex.id for ex in examples)
    choice = sum(ex.choices is not None for ex in examples)
    _emit(args, {"out": args.out, "examples": len(examples), "multi_hop": multi, "multiple_choice": choice,
                 "source": source}, f"wrote {len(examples)} questions ({multi} multi-hop, {choice} multiple choice) "
          f"over {config.documents} documents each, filler from {', '.join(source)} -> {args.out}")


def cmd_bench(args) -> None:
    from .bench import BenchConfig, run_bench
    from .bench_utils import summary_tables

    if args.render:
        print(summary_tables(json.loads(Path(args.render).read_text())))
        return

    def ints(text: str) -> tuple[int, ...]:
        return tuple(int(v) for v in text.split(",") if v.strip())

    run_bench(BenchConfig(
        shapes=tuple(args.model_shape.split(",")), sections=tuple(args.sections.split(",")), lengths=ints(args.lengths),
        new_tokens=args.new_tokens, reps=args.reps, serve_questions=args.serve_questions,
        serve_source=args.serve_source, finetune_source=args.finetune_source,
        compress_batches=ints(args.compress_batches), budget_s=args.budget_s, compile=args.compile, device=args.device,
        out=args.out))


COMMANDS = {"ingest": cmd_ingest, "ask": cmd_ask, "answer": cmd_answer, "info": cmd_info, "train": cmd_train,
            "eval": cmd_eval, "demo": cmd_demo, "convert-checkpoint": cmd_convert_checkpoint, "verify": cmd_verify,
            "bench": cmd_bench}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["lloco", *(sys.argv[1:] if argv is None else argv)])
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
