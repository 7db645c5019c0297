"""Accuracy vs compression ratio, from the runs of scripts/device/ratio_curve.sh.

    python3 scripts/plot_ratio_curve.py RUN_DIR... --out docs/accuracy_vs_compression.png

Each RUN_DIR is an unpacked ``curve_<N>.tgz`` (``qa_lloco.json`` + ``ckpt/training_state.json``). Writes the
PNG and, beside it, a JSON with the plotted numbers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# (label, where, key): dev-set metrics from the eval report, held-out synthetic ones from training's final eval
SERIES = [("dev set: answer contained (all-vector)", "qa", "contains"),
          ("dev set: multiple-choice accuracy", "qa", "accuracy"),
          ("held-out synthetic QA, 8 chunks: answer-token accuracy", "train", "qa8_acc"),
          ("held-out autoencoding: token accuracy", "train", "ae1_acc")]


def load(run: Path) -> dict:
    qa = json.loads((run / "qa_lloco.json").read_text())
    state = json.loads((run / "ckpt" / "training_state.json").read_text())
    cfg = state["train_config"]
    return {"run": run.name, "ratio": cfg["segment_tokens"] / cfg["summary_tokens"],
            "summary_tokens": cfg["summary_tokens"], "minutes": state["eval"][-1]["minutes"], "steps": state["step"],
            "qa": qa["metrics"], "train": state["eval"][-1]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--out", type=Path, default=Path("docs/accuracy_vs_compression.png"))
    args = ap.parse_args()
    points = sorted((load(r) for r in args.runs), key=lambda p: p["ratio"])
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, where, key in SERIES:
        ax.plot([p["ratio"] for p in points], [100 * p[where][key] for p in points], marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks([p["ratio"] for p in points], [f"{p['ratio']:.0f}x" for p in points])
    ax.set_xlabel("compression ratio (512-token segments)")
    ax.set_ylabel("%")
    ax.set_ylim(0, 100)
    ax.set_title(f"SmolLM2-135M compressor, {points[0]['minutes']:.0f} H100-minutes per ratio")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(args.out, dpi=120)
    args.out.with_suffix(".json").write_text(json.dumps(points, indent=2))
    print(f"{args.out} and {args.out.with_suffix('.json')}")


if __name__ == "__main__":
    main()
