"""The README's demo, end to end through vLLM, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def test_demo_labels_scores_and_draws(tmp_path):
    out = tmp_path / "demo"
    res = subprocess.run([sys.executable, "-m", "groundlabel", "demo", "--n", "4", "--out",
                          str(out)], capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert "Acc@0.5 =" in res.stdout
    m = json.loads((out / "metrics.json").read_text())
    assert m["n"] == 4
    rows = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(rows) == 4
    from PIL import Image

    for r in rows:
        img = Image.open(r["png"])
        assert img.size[0] >= 256  # upscaled with boxes drawn
