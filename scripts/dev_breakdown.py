"""Right answers by question type, and what the wrong door codes are, for `lloco eval qa` reports on dev sets.

The dev sets' ids end in their type (`dev-0007-code`, `...-multihop-teacher`; `lloco_index/eval/devset.py`), and each
question carries facts of its kind about other people: a wrong door code is "another person's" when it is one of
those, "garbled" when it shares 2+ digits in place with the gold code, else "other number" (or "no number").
Open questions count `contains`, multiple choice `correct`, as the reports' metrics do; `--split-choices` counts
multiple-choice questions per type (e.g. a set made with `lloco eval make-dev --multiple-choice 1.0`).

    python3 scripts/dev_breakdown.py --dev dev.jsonl dev_seed1.jsonl --run full=qa_full_base.json,qa_s1_full_base.json \\
        --run S576=qa_S576_lloco.json,qa_s1_S576_lloco.json
"""

from __future__ import annotations

import argparse
import collections
import json
import re

from lloco_index.eval.devset import SINGLE
from lloco_index.eval.report import read_report

# the dev set's door-code sentence, its person and code as patterns: every code fact in a question's documents
CODE_FACT = re.compile(re.escape(SINGLE["code"][0]).replace(re.escape("{p}"), "[^.]+?")
                       .replace(re.escape("{v}"), r"(\d+)"))


def load_predictions(path: str) -> dict[str, dict]:
    return {p["id"]: p for p in read_report(path)["predictions"]}


def code_outcome(prediction: dict, gold: str, documents: list[str]) -> str:
    if prediction["contains"]:
        return "right"
    others = set(CODE_FACT.findall(" ".join(documents))) - {gold}
    numbers = re.findall(r"\d+", prediction["prediction"])
    if any(n in others for n in numbers):
        return "another person's"
    if any(sum(a == b for a, b in zip(n, gold)) >= 2 for n in numbers):
        return "garbled"
    return "other number" if numbers else "no number"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dev", nargs="+", required=True, help="dev set JSONL files, in the order of each run's reports")
    ap.add_argument("--run", action="append", required=True, metavar="NAME=REPORT,REPORT",
                    help="a name and one report per dev set")
    ap.add_argument("--split-choices", action="store_true",
                    help="count multiple-choice questions under their own type ('code-choice'), not as one row")
    args = ap.parse_args()
    runs = {}
    for item in args.run:
        name, _, reports = item.partition("=")
        if len(reports.split(",")) != len(args.dev):
            raise SystemExit(f"--run {name}: give one report per --dev file ({len(args.dev)}), got {reports!r}")
        runs[name] = reports.split(",")
    right: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    codes: dict[str, collections.Counter] = {name: collections.Counter() for name in runs}
    for i, dev in enumerate(args.dev):
        preds = {name: load_predictions(reports[i]) for name, reports in runs.items()}
        with open(dev) as f:
            for q in map(json.loads, f):
                kind = q["id"].split("-", 2)[2]
                if q.get("choices") and not args.split_choices:
                    kind = "multiple choice"
                right[kind]["questions"] += 1
                for name, p in preds.items():
                    pred = p[q["id"]]
                    right[kind][name] += pred["correct"] if q.get("choices") else pred["contains"]
                    if kind == "code":
                        codes[name][code_outcome(pred, q["answers"][0], q["documents"])] += 1
    names = list(runs)
    print("| type | questions | " + " | ".join(names) + " |\n|---|---|" + "---|" * len(names))
    for kind, c in sorted(right.items()):
        print(f"| {kind} | {c['questions']} | " + " | ".join(str(round(c[n])) for n in names) + " |")
    total = {n: round(sum(c[n] for c in right.values())) for n in names + ["questions"]}
    print(f"| all | {total['questions']} | " + " | ".join(str(total[n]) for n in names) + " |")
    outcomes = ["right", "another person's", "garbled", "other number", "no number"]
    print("\n| door codes | " + " | ".join(outcomes) + " |\n|---|" + "---|" * len(outcomes))
    for name in names:
        print(f"| {name} | " + " | ".join(str(codes[name][o]) for o in outcomes) + " |")


if __name__ == "__main__":
    main()
