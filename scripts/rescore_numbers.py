"""Would the stored text fix the numbers LLoCO writes? Rescore each answer's number among the documents' numbers.

    python3 scripts/rescore_numbers.py --dev dev.jsonl --report qa_lloco.json [--adapter DIR --compressor DIR]
        [--device cpu] [--out rescored.json]

Compression often garbles digits (a door code comes out as "37933" for "2919"). For every open answer of a
`lloco eval qa` report that holds a number of 3+ digits, this rewrites the answer with each 3+-digit number of the
example's documents in its place, scores every rewrite as the complete answer (``Generator.score``, on the prompt the
report's mode builds) and prints how many answers are right as generated, when a number found in no document is
replaced by the likeliest document number ("absent"), and when every number is ("always"). A diagnostic, not a
product feature: the rewrites let the stored text shape the answer, so they would be reported beside plain generation.
"""

from __future__ import annotations

import argparse
import json
import re

from lloco_index import LLoCO
from lloco_index.data import QAExample, read_qa
from lloco_index.eval.contexts import PromptBuilder
from lloco_index.eval.metrics import contains_answer
from lloco_index.eval.report import read_report

NUMBER = re.compile(r"\d{3,}")


def rescore(lloco: LLoCO, examples: list[QAExample], report: dict, batch_size: int = 16) -> list[dict]:
    """One row per open answer of ``report`` with a 3+-digit number: as generated, "absent" and "always"."""
    predictions = {p["id"]: p["prediction"] for p in report["predictions"]}
    todo = [ex for ex in examples if not ex.choices and predictions.get(ex.id) and NUMBER.search(predictions[ex.id])]
    builder = PromptBuilder(lloco, report["mode"], report["top_k"], expand=report["expand"])
    rows = []
    for start in range(0, len(todo), batch_size):
        part = todo[start:start + batch_size]
        prompts = builder.build([(ex.question, ex.documents) for ex in part])
        rewrites = []
        for ex in part:
            pred = predictions[ex.id]
            m = NUMBER.search(pred)
            numbers = sorted(set(NUMBER.findall("\n".join(ex.documents))))
            rewrites.append([pred[:m.start()] + n + pred[m.end():] for n in numbers])
        asked = [(p.pieces, opts) for p, opts in zip(prompts, rewrites) if opts]
        scores = iter(lloco.generator.score([p for p, _ in asked], [o for _, o in asked], lloco.adapter)
                      if asked else [])
        for ex, opts in zip(part, rewrites):
            pred = best = predictions[ex.id]
            if opts:  # documents without a 3+-digit number leave the answer as it is
                s = next(scores)
                best = opts[s.index(max(s))]
            rows.append({"id": ex.id, "answers": ex.answers, "generated": pred,
                         "absent": pred if pred in opts else best, "always": best, "candidates": len(opts)})
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dev", required=True)
    ap.add_argument("--report", required=True, help="a `lloco eval qa` report on --dev")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--adapter", default=None, help="decoder adapter folder (default: the bundled one)")
    ap.add_argument("--compressor", default=None, help="compressor folder (default: the bundled one)")
    ap.add_argument("--device", default=None)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--out", default=None, help="write each rescored answer here (JSON)")
    args = ap.parse_args()
    report = read_report(args.report)
    lloco = LLoCO.from_pretrained(args.model, adapter=args.adapter, compressor=args.compressor, device=args.device)
    rows = rescore(lloco, read_qa(args.dev), report, args.batch_size)
    print(f"{len(rows)} open answers with a 3+-digit number ({report['mode']}, {args.report})")
    for key in ("generated", "absent", "always"):
        right = [r for r in rows if contains_answer(r[key], r["answers"])]
        print(f"{key:9s} right {len(right):3d}  door codes {sum('code' in r['id'] for r in right)}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
