"""QA evaluation over the project's JSONL format (``data.QAExample``) in the lloco/full/rag/none modes."""

from __future__ import annotations

import hashlib
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterable, Literal

from ..data import QAExample
from ..generation import GenerationConfig
from ..pipeline import LLoCO
from ..prompts import question_text
from . import CHOICE_SCORING
from .contexts import Mode, Outcome, PromptBuilder, answer_batches
from .metrics import choice_correct, contains_answer, exact_match, gold_choice, token_f1
from .report import EvalRun

ChoiceScoring = Literal["generate", "likelihood"]


def evaluate_qa(lloco: LLoCO, examples: Iterable[QAExample], mode: Mode = "lloco", top_k: int | None = None,
                config: GenerationConfig | None = None, batch_size: int = 8, adapter: str | None = None,
                out: str | Path | None = None, meta: dict | None = None, show_progress_bar: bool = False,
                expand: int = 0, choice_scoring: ChoiceScoring = "generate") -> dict:
    """Answer every example in ``mode`` and score it.

    Args:
        lloco: the model under test.
        examples: QA examples (``data.read_qa``); ids must be unique.
        mode: ``lloco`` (compressed documents), ``full`` (all text, cut in the middle to fit), ``rag``
            (top-k text chunks, default 5), ``none`` (question only).
        top_k: chunks kept per example (lloco/rag); lloco without it answers from whole documents.
        config: generation settings; the default is greedy, so runs are repeatable.
        batch_size: questions generated together (latency is the batch time shared among them).
        adapter: decoder adapter name; default the LLoCO's own (``backbone.BASE`` for the plain base model).
        out: report path; items finished so far are kept beside it (``.partial.jsonl``) and a rerun resumes.
        meta: extra fields recorded in the report (e.g. the command line that made it).
        show_progress_bar: a tqdm bar over questions.
        expand: lloco mode: the K most relevant chunks go in as text (selective re-expansion).
        choice_scoring: multiple choice: ``generate`` asks for the letter of an option (the lettered options in
            the question) and reads the answer; ``likelihood`` asks the bare question and picks the option the
            decoder finds most likely as the whole answer (``Generator.score``), as lm-evaluation-harness does.

    Returns:
        The report: settings, ``metrics`` (exact_match, f1, contains, accuracy, mean_prompt_positions, ...)
        and ``predictions`` (one record per example, in input order).

    Example::

        report = evaluate_qa(lloco, read_qa("dev.jsonl"), mode="full")
        print(report["metrics"]["f1"], report["metrics"]["mean_prompt_positions"])
    """
    config = config or GenerationConfig()
    examples = list(examples)
    ids = [ex.id for ex in examples]
    if len(set(ids)) != len(ids):
        raise ValueError("example ids must be unique: " + ", ".join(sorted({i for i in ids if ids.count(i) > 1})))
    for ex in examples:
        if ex.choices:
            try:
                gold_choice(ex.choices, ex.answers)
            except ValueError as e:
                raise ValueError(f"example {ex.id!r}: {e}") from None
    if choice_scoring not in CHOICE_SCORING:
        raise ValueError(f"choice_scoring must be one of {', '.join(CHOICE_SCORING)}, got {choice_scoring!r}")
    adapter = lloco.adapter if adapter is None else adapter
    builder = PromptBuilder(lloco, mode, top_k, config.max_new_tokens, truncate=True, expand=expand)
    data_hash = hashlib.sha256("\n".join(ex.to_json() for ex in examples).encode()).hexdigest()[:16]
    settings = {"kind": "qa", "mode": mode, "top_k": builder.top_k, "expand": expand, "expand_at": lloco.expand_at,
                "model": lloco.backbone.name_or_path,
                "adapter": adapter, "compressor": lloco.compressor.fingerprint(), "generation": asdict(config),
                "choice_scoring": choice_scoring,
                "dataset_sha256": data_hash}
    run = EvalRun(settings, ids, out, f"eval {mode}", show_progress_bar)
    t0 = time.perf_counter()
    todo = run.pending(examples, lambda ex: ex.id)
    scored = choice_scoring == "likelihood"
    for pairs in answer_batches(builder, todo, lambda ex: (question_text(ex.question, None if scored else ex.choices),
                                                           ex.documents),
                                config, adapter, batch_size, lambda ex: ex.choices if scored else None):
        run.add([_record(ex, o) for ex, o in pairs])
    records = run.records()
    return run.finish({**settings, **(meta or {}), "device": str(lloco.backbone.device),
                       "dtype": str(lloco.backbone.dtype).removeprefix("torch."),
                       "elapsed_s": round(time.perf_counter() - t0, 3), "metrics": summarize(records),
                       "predictions": records})


def _record(ex: QAExample, o: Outcome) -> dict:
    p, pred = o.prompt, o.text or ""
    rec = {"id": ex.id, "question": ex.question, "answers": ex.answers, "prediction": o.text, "fits": p.fits,
           "truncated": p.truncated, "prompt_positions": p.positions,
           "context_positions": p.context_positions, "source_tokens": p.source_tokens,
           "document_tokens": p.document_tokens, "chunks": p.chunks, "finish_reason": o.finish_reason,
           "latency_s": round(o.latency_s, 4), "prepare_s": round(o.prepare_s, 4)}
    if ex.choices and o.choice_scores is not None:
        best = o.choice_scores.index(max(o.choice_scores))
        rec.update(choices=ex.choices, choice_scores=[round(x, 4) for x in o.choice_scores],
                   correct=float(best == gold_choice(ex.choices, ex.answers)))
    elif ex.choices:
        rec.update(choices=ex.choices, correct=choice_correct(pred, ex.choices, ex.answers))
    else:
        rec.update(exact_match=exact_match(pred, ex.answers), f1=token_f1(pred, ex.answers),
                   contains=contains_answer(pred, ex.answers))
    return rec


def _mean(xs: list[float]) -> float | None:
    return round(sum(xs) / len(xs), 4) if xs else None


def summarize(records: list[dict]) -> dict:
    """Aggregate per-example records; scores count a prompt that does not fit as wrong."""
    open_ = [r for r in records if "choices" not in r]
    fit = [r for r in records if r["fits"]]
    return {
        "examples": len(records), "open": len(open_), "multiple_choice": len(records) - len(open_),
        "exact_match": _mean([r["exact_match"] for r in open_]), "f1": _mean([r["f1"] for r in open_]),
        "contains": _mean([r["contains"] for r in open_]),
        "accuracy": _mean([r["correct"] for r in records if "choices" in r]),
        "mean_prompt_positions": _mean([r["prompt_positions"] for r in fit]),
        # None when resumed from records written before context_positions was recorded
        "mean_context_positions": None if any("context_positions" not in r for r in fit)
        else _mean([r["context_positions"] for r in fit]),
        "mean_source_tokens": _mean([r["source_tokens"] for r in fit]),
        "mean_document_tokens": _mean([r["document_tokens"] for r in records]),
        "truncated": sum(r["truncated"] for r in records), "does_not_fit": len(records) - len(fit),
        "mean_latency_s": _mean([r["latency_s"] for r in fit]), "mean_prepare_s": _mean([r["prepare_s"] for r in records]),
    }
