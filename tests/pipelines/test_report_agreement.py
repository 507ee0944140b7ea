"""The report with a store: reviewer agreement (overall, per guideline, person, pair), how the
snapshot resolved items, and drawings of the worst disagreements: both people's boxes and the
model's."""

from __future__ import annotations

import re
from pathlib import Path

from support import job_table, out_box

from grounding.labels import item
from grounding.store import ReviewStore, decision_record


def _rec(text, img, boxes, decision, who, pred):
    it = item(str(img), text, boxes, width=100, height=80)
    return decision_record(it, decision, reviewer=who, guideline="team@1", source="test",
                           predicted={"boxes": pred, "score": 0.5})


def test_report_shows_agreement_and_draws_the_worst_disagreement(tmp_path):
    from PIL import Image

    from grounding.draw import GOLD, OTHER, PRED
    from pipelines.report import ReportConfig, report

    img = tmp_path / "grey.png"
    Image.new("RGB", (100, 80), (128, 128, 128)).save(img)
    job_table(tmp_path / "out", [{"row_id": "a:0", "image": str(img), "text": "thing",
                                  "status": "ok", "score": 0.5,
                                  "boxes": [out_box([5, 50, 30, 75], 0.5)]}])
    pred = [[5.0, 50.0, 30.0, 75.0]]
    st = ReviewStore(str(tmp_path / "store"))
    st.append([
        # far apart: the worst disagreement
        _rec("apart", img, [[10, 10, 50, 40]], "correct", "alice", pred),
        _rec("apart", img, [[60, 5, 95, 30]], "correct", "bob", pred),
        # close: agreed, not drawn
        _rec("close", img, [[10, 10, 50, 40]], "correct", "alice", pred),
        _rec("close", img, [[11, 10, 50, 40]], "correct", "bob", pred),
    ], source="test")
    page = Path(report(ReportConfig(output=str(tmp_path / "out"), store=st.uri,
                                    out=str(tmp_path / "rep"))))
    html = page.read_text()
    assert "<h2>Reviewer agreement</h2>" in html
    assert re.search(r"<td>alice \| bob</td><td class='n'>2</td>", html)
    assert "team@1" in html and "unresolved" in html
    # one disagreement drawn: alice green, bob blue, the model red
    (src,) = re.findall(r'<img src="(thumbs/disagree-[^"]+)"', html)
    im = Image.open(page.parent / src).convert("RGB")
    scale = im.width // 100
    assert im.getpixel((30 * scale, 10 * scale)) == GOLD      # alice's box, top edge
    assert im.getpixel((80 * scale, 5 * scale)) == OTHER      # bob's box, top edge
    assert im.getpixel((15 * scale, 50 * scale)) == PRED      # the model's box, top edge
    assert "green: alice (correct)" in html and "blue: bob (correct)" in html
