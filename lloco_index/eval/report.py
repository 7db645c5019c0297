"""Eval reports: atomic JSON files, resumable partial results, markdown tables and needle heatmaps."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Sequence


def write_json(path: str | Path, obj: dict) -> None:
    """Write ``obj`` atomically (temp file + rename), so an interrupted run never leaves half a report."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    tmp.replace(path)


def read_report(path: str | Path) -> dict:
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not a JSON eval report ({e})") from None
    if not isinstance(report, dict) or report.get("kind") not in ("qa", "niah"):
        raise ValueError(f"{path}: not an eval report (no \"kind\": \"qa\" or \"niah\")")
    return report


class EvalRun:
    """Bookkeeping of one eval run: a record per item, a progress bar, and the report written to ``out``.

    With ``out``, records are appended to ``<out>.partial.jsonl`` as they finish (first line: the run's
    settings), so an interrupted run resumes where it stopped; other settings are refused, never mixed.
    """

    def __init__(self, settings: dict, ids: Sequence[str], out: str | Path | None, desc: str,
                 show_progress_bar: bool = False):
        from tqdm.auto import tqdm

        self.out, self.ids = out, list(ids)
        settings = json.loads(json.dumps(settings))  # compare as stored (tuples become lists)
        self.done: dict[str, dict] = {}
        self.partial = Path(str(out) + ".partial.jsonl") if out else None
        if self.partial and self.partial.is_file():
            lines = self.partial.read_text(encoding="utf-8").splitlines()
            if not lines or not lines[0].startswith('{"settings": ') or json.loads(lines[0])["settings"] != settings:
                raise ValueError(f"{self.partial} holds partial results of a run with other settings; "
                                 f"rerun with the same settings to resume, or delete it to start over")
            for line in lines[1:]:
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError:  # the last line of an interrupted write
                    break
                self.done[rec["id"]] = rec
        elif self.partial:
            self.partial.parent.mkdir(parents=True, exist_ok=True)
            self.partial.write_text(json.dumps({"settings": settings}) + "\n", encoding="utf-8")
        self.bar = tqdm(total=len(self.ids), initial=sum(i in self.done for i in self.ids),
                        disable=not show_progress_bar, desc=desc, unit="item")

    def pending(self, items: Sequence, key: Callable) -> list:
        """The items whose record is not done yet."""
        return [x for x in items if key(x) not in self.done]

    def add(self, records: list[dict]) -> None:
        if self.partial:
            with open(self.partial, "a", encoding="utf-8") as f:
                f.writelines(json.dumps(r, ensure_ascii=False) + "\n" for r in records)
                f.flush()
                os.fsync(f.fileno())
        self.done.update((r["id"], r) for r in records)
        self.bar.update(len(records))

    def records(self) -> list[dict]:
        return [self.done[i] for i in self.ids]

    def finish(self, report: dict) -> dict:
        """Write the report (if ``out``) and drop the partial file it supersedes."""
        self.bar.close()
        if self.out:
            write_json(self.out, report)
            self.partial.unlink(missing_ok=True)
        return report


def pct(x: float | None) -> str:
    """A share as a percentage with one decimal; "-" when there is nothing to score."""
    return "-" if x is None else f"{100 * x:.1f}"


def _num(x: float | None, fmt: str = ".0f") -> str:
    return "-" if x is None else format(x, fmt)


def markdown_table(reports: Sequence[dict], names: Sequence[str]) -> str:
    """Reports side by side: one table for QA reports, one for needle reports, then the commands behind them."""
    qa = [(n, r) for n, r in zip(names, reports) if r["kind"] == "qa"]
    niah = [(n, r) for n, r in zip(names, reports) if r["kind"] == "niah"]
    out: list[str] = []
    if qa:
        out += ["| report | mode | top-k | adapter | examples | EM | F1 | contains | MC acc | prompt positions "
                "| context positions | source tokens | truncated | does not fit | latency s |",
                "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in qa:
            m = r["metrics"]
            out.append(f"| {name} | {r['mode']} | {r['top_k'] or '-'} | {r['adapter'] or 'base'} | {m['examples']} "
                       f"| {pct(m['exact_match'])} | {pct(m['f1'])} | {pct(m['contains'])} "
                       f"| {_mc(r)} | {_num(m['mean_prompt_positions'])} | {_num(m.get('mean_context_positions'))} "
                       f"| {_num(m['mean_source_tokens'])} | {m['truncated']} | {m['does_not_fit']} "
                       f"| {_num(m['mean_latency_s'], '.2f')} |")
    if niah:
        out += ["", ""] if out else []
        out += ["| report | mode | top-k | adapter | lengths | depths | cells | fit | accuracy | mean score |",
                "|---|---|---|---|---|---|---|---|---|---|"]
        for name, r in niah:
            for mode, m in r["summary"].items():
                out.append(f"| {name} | {mode} | {r['top_k'] or '-'} | {r['adapter'] or 'base'} "
                           f"| {min(r['lengths'])}-{max(r['lengths'])} | {len(r['depths'])} | {m['cells']} "
                           f"| {m['fit']} | {pct(m['accuracy'])} | {_num(m['mean_score'], '.2f')} |")
    commands = [(n, r["command"]) for n, r in zip(names, reports) if r.get("command")]
    if commands:
        out += ["", "Commands:", ""] + [f"- {n}: `{c}`" for n, c in commands]
    return "\n".join(out) + "\n"


def _mc(report: dict) -> str:
    """Multiple-choice accuracy, marked when the options were ranked by likelihood instead of generated."""
    acc = pct(report["metrics"]["accuracy"])
    return f"{acc} (likelihood)" if report.get("choice_scoring") == "likelihood" and acc != "-" else acc


def _sign_test_p(a: int, b: int) -> float:
    """Two-sided exact sign test: how likely a split at least this uneven is if both sides were equally good."""
    from math import comb

    n = a + b
    return 1.0 if n == 0 else min(1.0, 2 * sum(comb(n, i) for i in range(min(a, b) + 1)) / 2 ** n)


def compare_reports(a: dict | list[dict], b: dict | list[dict], metric: str = "exact_match") -> dict[str, dict]:
    """Two QA reports on the same questions, paired: per kind (open questions by ``metric``, "exact_match" or
    "contains"; multiple choice by accuracy), how many only ``a`` got right, only ``b``, and the sign test's p.
    Why paired: two versions differ on a few questions each way, and a 2-point EM gap on 157 questions can be noise
    or not. Lists of reports (one per dev set, in the same order on both sides) are pooled into one test."""
    if metric not in ("exact_match", "contains"):
        raise ValueError(f"compare scores open questions by exact_match or contains, not {metric!r}")
    a, b = ([a] if isinstance(a, dict) else a), ([b] if isinstance(b, dict) else b)
    if len(a) != len(b) or not a:
        raise ValueError(f"compare pairs report i of A with report i of B: got {len(a)} and {len(b)}")
    pa: dict[tuple[int, str], dict] = {}
    pb: dict[tuple[int, str], dict] = {}
    for n, (ra, rb) in enumerate(zip(a, b)):
        if ra.get("kind") != "qa" or rb.get("kind") != "qa":
            raise ValueError("compare needs QA reports (lloco eval qa)")
        qa, qb = ({p["id"]: p for p in r["predictions"]} for r in (ra, rb))
        if qa.keys() != qb.keys() or ra.get("dataset_sha256") != rb.get("dataset_sha256"):
            raise ValueError(f"reports {n + 1} of A and B answer different questions (other dataset or --limit): "
                             "nothing to pair")
        pa.update({(n, i): p for i, p in qa.items()})
        pb.update({(n, i): p for i, p in qb.items()})
    out = {}
    for kind, key in (("open", metric), ("multiple_choice", "correct")):
        ids = [i for i in pa if ("choices" in pa[i]) == (kind == "multiple_choice")]
        only_a = sum(pa[i][key] > 0 and not pb[i][key] > 0 for i in ids)
        only_b = sum(pb[i][key] > 0 and not pa[i][key] > 0 for i in ids)
        out[kind] = {"questions": len(ids), "right_a": sum(pa[i][key] > 0 for i in ids),
                     "right_b": sum(pb[i][key] > 0 for i in ids), "only_a": only_a, "only_b": only_b,
                     "p": round(_sign_test_p(only_a, only_b), 4)}
    return out


def plot_niah(report: dict, path: str | Path) -> None:
    """Length x depth heatmap per mode, coloured like the published needle plots; "n/f" = does not fit."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.colors import LinearSegmentedColormap
    except ImportError:
        raise ImportError("the needle heatmap needs matplotlib: pip install 'lloco-index[eval]'") from None
    import numpy as np

    lengths, depths, modes = report["lengths"], report["depths"], list(report["summary"])
    cmap = LinearSegmentedColormap.from_list("needle", ["#F0496E", "#EBB839", "#0CD79F"]).with_extremes(bad="#d0d0d0")
    fig, axes = plt.subplots(1, len(modes), figsize=(1.1 + 0.55 * len(lengths) * len(modes) + 1.5 * len(modes),
                                                     1.5 + 0.4 * len(depths)), squeeze=False)
    cells = {(c["mode"], c["length"], c["depth"]): c for c in report["cells"]}
    for ax, mode in zip(axes[0], modes):
        grid = np.full((len(depths), len(lengths)), np.nan)
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                c = cells.get((mode, n, d))
                if c is not None and c["fits"]:
                    grid[i, j] = c["score"]
                elif c is not None:
                    ax.text(j, i, "n/f", ha="center", va="center", fontsize=7, color="#555555")
        im = ax.imshow(np.ma.masked_invalid(grid), cmap=cmap, vmin=1, vmax=10, aspect="auto")
        ax.set_xticks(range(len(lengths)), [str(n) for n in lengths], rotation=45, fontsize=8)
        ax.set_yticks(range(len(depths)), [f"{d:g}" for d in depths], fontsize=8)
        ax.set_xlabel("context length (tokens)")
        ax.set_ylabel("needle depth (%)")
        acc = report["summary"][mode]["accuracy"]
        ax.set_title(f"{mode}: accuracy {pct(acc)}%" + (f" (top-{report['top_k']})" if report["top_k"] and
                                                          mode == "lloco" else ""), fontsize=10)
        fig.colorbar(im, ax=ax, label="score")
    fig.suptitle(f"Needle in a haystack: {report['model']} (adapter {report['adapter'] or 'base'}); "
                 f"n/f = does not fit the {report['window']}-position window", fontsize=10)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
