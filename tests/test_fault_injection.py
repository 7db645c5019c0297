"""A short run of scripts/fault_injection.py (SIGKILL during ingest, verify, resume, compare) on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_killed_ingest_verifies_and_resumes_to_the_clean_result(tiny_model_dir, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, str(ROOT / "scripts" / "fault_injection.py"), "--model", str(tiny_model_dir),
           "--kills", "2", "--kills-per-store", "2", "--docs", "2", "--sentences", "60", "--seed", "1",
           "--workdir", str(tmp_path), "--json"]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["ok"] and summary["kills"] == 2 and summary["kills_with_problems"] == 0
    assert summary["resumed_stores"] >= 1 and all(r["ok"] and r["entries"] == summary["clean_entries"]
                                                  for r in summary["rounds"])
