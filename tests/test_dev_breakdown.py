"""scripts/dev_breakdown.py counts right answers per dev question type and sorts the wrong door codes."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["Intro. The door code of Ailsa Greaves's workshop is 1234. More text.",
        "The door code of Marek Okonjo's workshop is 5678. Ailsa Greaves learned to sail in 1901."]
QUESTIONS = [("dev-0000-code", "1234", None), ("dev-0001-code", "1234", None), ("dev-0002-code", "1234", None),
             ("dev-0003-code", "1234", None), ("dev-0004-year", "1901", None), ("dev-0005-year-choice", "1901",
                                                                               ["1901", "1902", "1903", "1904"])]


def _write(tmp_path: Path, predictions: dict[str, tuple[str, float]]) -> tuple[Path, Path]:
    dev = tmp_path / "dev.jsonl"
    dev.write_text("".join(json.dumps({"id": i, "documents": DOCS, "question": "?", "answers": [a],
                                       **({"choices": c} if c else {})}) + "\n" for i, a, c in QUESTIONS))
    report = tmp_path / "report.json"
    preds = [{"id": i, "prediction": p, **({"correct": s} if i.endswith("choice") else {"contains": s})}
             for i, (p, s) in predictions.items()]
    report.write_text(json.dumps({"kind": "qa", "metrics": {}, "predictions": preds}))
    return dev, report


def test_dev_breakdown_sorts_wrong_codes(tmp_path):
    dev, report = _write(tmp_path, {"dev-0000-code": ("1234", 1.0), "dev-0001-code": ("5678", 0.0),
                                    "dev-0002-code": ("12349", 0.0), "dev-0003-code": ("none", 0.0),
                                    "dev-0004-year": ("in 1901", 1.0), "dev-0005-year-choice": ("A", 1.0)})
    out = subprocess.run([sys.executable, str(ROOT / "scripts" / "dev_breakdown.py"), "--dev", str(dev),
                          "--run", f"R={report}"], check=True, capture_output=True, text=True).stdout
    assert "| code | 4 | 1 |" in out and "| year | 1 | 1 |" in out and "| multiple choice | 1 | 1 |" in out
    assert "| all | 6 | 3 |" in out
    assert "| R | 1 | 1 | 1 | 0 | 1 |" in out  # right, another person's (5678), garbled (12349), -, no number
    split = subprocess.run([sys.executable, str(ROOT / "scripts" / "dev_breakdown.py"), "--dev", str(dev),
                            "--run", f"R={report}", "--split-choices"], check=True, capture_output=True, text=True).stdout
    assert "| year-choice | 1 | 1 |" in split and "multiple choice" not in split


def test_dev_breakdown_wants_one_report_per_dev_set(tmp_path):
    dev, report = _write(tmp_path, {})
    with pytest.raises(subprocess.CalledProcessError) as err:
        subprocess.run([sys.executable, str(ROOT / "scripts" / "dev_breakdown.py"), "--dev", str(dev), str(dev),
                        "--run", f"R={report}"], check=True, capture_output=True, text=True)
    assert "one report per --dev file" in err.value.stderr
