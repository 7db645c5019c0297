"""scripts/plot_ratio_curve.py turns ratio-curve runs into a PNG and a JSON of the plotted numbers."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(folder: Path, summary: int, contains: float) -> Path:
    (folder / "ckpt").mkdir(parents=True)
    (folder / "qa_lloco.json").write_text(json.dumps({"metrics": {"contains": contains, "accuracy": 0.25}}))
    state = {"train_config": {"segment_tokens": 512, "summary_tokens": summary}, "step": 10,
             "eval": [{"minutes": 4.0, "qa8_acc": 0.4, "ae1_acc": 0.5}]}
    (folder / "ckpt" / "training_state.json").write_text(json.dumps(state))
    return folder


def test_plot_ratio_curve(tmp_path):
    runs = [_run(tmp_path / "s16", 16, 0.0), _run(tmp_path / "s64", 64, 0.1)]
    out = tmp_path / "curve.png"
    subprocess.run([sys.executable, str(ROOT / "scripts" / "plot_ratio_curve.py"), *map(str, runs), "--out", str(out)],
                   check=True, capture_output=True)
    assert out.stat().st_size > 1000
    points = json.loads(out.with_suffix(".json").read_text())
    assert [p["ratio"] for p in points] == [8.0, 32.0]  # sorted by ratio, 512 / summary tokens
    assert points[0]["qa"]["contains"] == 0.1
