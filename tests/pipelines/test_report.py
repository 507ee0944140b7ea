"""``groundlabel report``: the HTML page of a job output, its thumbnails, and a real browser on it.

The job output is built by hand (a table committed through the job's own path, synthetic images on
disk), so these tests need no Ray and no engine.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
from contextlib import contextmanager
from functools import partial
from pathlib import Path

import pytest
from support import SECRET, fake_calibration, fake_job, job_table, out_box

from pipelines import schema

CHROMIUM = Path("/usr/bin/chromium")
CHROMEDRIVER = Path("/usr/bin/chromedriver")
def _imgs(html: str) -> list[str]:
    return re.findall(r'<img src="([^"]+)"', html)


def test_report_summary_errors_thumbnails_and_no_source_metadata(tmp_path):
    from PIL import Image

    from pipelines.output import JobOutput
    from pipelines.report import write_report
    from pipelines.summary import summarize

    job = fake_job(tmp_path)
    out = job["out"]
    path = write_report(str(out), n_thumbs=5)
    assert path == f"{out}/_report/report.html"
    html = Path(path).read_text()
    report = out / "_report"

    # summary and lineage
    for s in ("<th>rows</th><td>12</td>", "<th>unique rows</th><td>12</td>",
              "<th>labeled</th><td>9</td>", "<th>rows/s (last run)</th><td>3.21</td>",
              "job-abc123", "/models/tiny-qwen3-vl", "qwen3_vl:1a2b3c4d", "none (base model)"):
        assert s in html, s
    m = summarize(JobOutput(str(out)), write=False)["metrics"]
    assert m["n"] == 7  # rows with a true box: the 6 ok synthetic ones and the unparseable one
    assert f"<th>Acc@0.5</th><td>{m['acc@0.5']:.3f}</td>" in html
    assert f"<th>parse-failure rate</th><td>{m['parse_fail_rate']:.3f}</td>" in html
    assert "<td>unparseable</td><td class='n'>1</td>" in html
    # error table: counts with meanings, examples escaped
    for code in ("missing", "bad_json", "corrupt"):
        assert f"<td><code>{code}</code></td><td class='n'>1</td>" in html
        assert schema.ERROR_CODES[code] in html
    for rid in ("data.jsonl:9", "data.jsonl:10", "data.jsonl:11"):
        assert f"<td><code>{rid}</code></td>" in html
    assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "<script" not in html
    assert "&lt;b&gt;bold&lt;/b&gt; &amp; &#34;quoted&#34;" in html  # jinja2's autoescape
    assert "http://" not in html and "https://" not in html and "data:" not in html

    # 5 least confident labeled rows: unparseable first, then by score; one image is gone
    order = re.findall(r"<figcaption>.*?<code>(data\.jsonl:\d+)</code>", html)
    assert order == ["data.jsonl:6", "data.jsonl:7", "data.jsonl:8", "data.jsonl:4",
                     "data.jsonl:3"]
    assert html.count("<figure>") == 5
    assert "image not shown (missing)" in html
    srcs = _imgs(html)
    assert len(srcs) == 4 and all(re.fullmatch(r"thumbs/\d{3}\.png", s) for s in srcs)
    for s in srcs:
        with Image.open(report / s) as im:
            assert im.format == "PNG" and max(im.size) <= 320
    assert sorted(p.name for p in (report / "thumbs").iterdir()) == sorted(
        Path(s).name for s in srcs)

    # the GPS JPEG's thumbnail (3rd card, 2nd image) keeps no metadata at all
    gps_png = report / srcs[1]
    with Image.open(gps_png) as im:
        assert im.info == {} and len(im.getexif()) == 0
    raw = gps_png.read_bytes()
    for chunk in (b"eXIf", b"tEXt", b"iTXt", b"zTXt", b"iCCP", b"Exif"):
        assert chunk not in raw
    files = [p for p in report.rglob("*") if p.is_file()]
    sources = [p.read_bytes() for p in job["sources"]]
    for p in files:
        data = p.read_bytes()
        assert SECRET.encode() not in data and job["exif"] not in data, p
        assert not any(src in data for src in sources), p

    # a second report with fewer thumbnails leaves no stale files behind
    write_report(str(out), n_thumbs=2)
    srcs = _imgs((report / "report.html").read_text())
    assert srcs == ["thumbs/000.png"]  # card 1 is the missing image
    assert [p.name for p in (report / "thumbs").iterdir()] == ["000.png"]


def test_reviewed_box_replaces_the_true_box_in_green(tmp_path):
    from PIL import Image

    from grounding.draw import GOLD, PRED
    from pipelines.report import write_report

    img = tmp_path / "grey.png"
    Image.new("RGB", (100, 80), (128, 128, 128)).save(img)
    row = {"row_id": "a:0", "image": str(img), "text": "thing", "status": "ok", "score": 0.5,
           "boxes": [out_box([5, 50, 30, 75], 0.5)], "gold": [60, 40, 90, 70]}
    job_table(tmp_path / "out", [row])

    def thumb(reviewed):
        d = tmp_path / f"rep-{bool(reviewed)}"
        html = Path(write_report(str(tmp_path / "out"), str(d), reviewed=reviewed)).read_text()
        return html, Image.open(d / _imgs(html)[0]).convert("RGB")

    # 100 px wide: drawn at 3x (300 px), not shrunk afterwards
    html, im = thumb({"a:0": [[10, 10, 50, 40]]})
    assert im.size == (300, 240 + 28)
    assert im.getpixel((90, 30)) == GOLD            # reviewed box, top edge
    assert im.getpixel((225, 120)) == (128, 128, 128)  # the true box is not drawn
    assert im.getpixel((52, 150)) == PRED          # prediction, top edge
    assert "green: reviewed box" in html
    html, im = thumb(None)
    assert im.getpixel((225, 120)) == GOLD and im.getpixel((90, 30)) == (128, 128, 128)
    assert "green: true box" in html


def test_data_texts_are_escaped_exactly_once(tmp_path):
    import pyarrow.parquet as pq
    from PIL import Image

    from pipelines.report import write_report

    img = tmp_path / "grey.png"
    Image.new("RGB", (40, 30), (128, 128, 128)).save(img)
    rows = [{"row_id": "a<0>", "image": str(img), "text": "<script>alert(1)</script>",
             "status": "ok", "score": 0.5, "boxes": [out_box([5, 5, 20, 20], 0.5)]},
            {"row_id": "a:1", "image": str(tmp_path / "gone.png"), "text": "x",
             "status": "error", "error_code": "missing", "error": "not found: R&D <1>.png"}]
    # one Parquet file is an output too (row ids of any shape)
    pq.write_table(schema.table(rows, schema.OUTPUT), tmp_path / "out.parquet")
    html = Path(write_report(str(tmp_path / "out.parquet"), str(tmp_path / "rep"))).read_text()

    # the expression: once in the caption, once in the image's alt text
    assert html.count("&lt;script&gt;alert(1)&lt;/script&gt;") == 2
    assert "<script" not in html and "alert(1)</script>" not in html
    assert "<td>not found: R&amp;D &lt;1&gt;.png</td>" in html
    assert "<code>a&lt;0&gt;</code>" in html
    assert "&amp;lt;" not in html and "&amp;amp;" not in html and "&amp;#" not in html


def test_cli_report_prints_the_path(tmp_path):
    job = fake_job(tmp_path)
    res = subprocess.run([sys.executable, "-m", "groundlabel", "report", str(job["out"]),
                          "--out", str(tmp_path / "r"), "--n", "3"],
                         capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == f"{tmp_path / 'r'}/report.html"
    assert len(_imgs((tmp_path / "r" / "report.html").read_text())) == 2  # 3 cards, 1 missing


def test_report_of_an_s3_output_is_written_next_to_it(tmp_path, s3_endpoint):
    import s3fs

    from grounding.storage import StorageOptions
    from pipelines.report import write_report

    job = fake_job(tmp_path)
    fs = s3fs.S3FileSystem(client_kwargs={"endpoint_url": s3_endpoint})
    fs.mkdir("gl-report")
    fs.put(str(job["out"]) + "/", "gl-report/out/", recursive=True)
    path = write_report("s3://gl-report/out", opts=StorageOptions(s3_endpoint_url=s3_endpoint),
                        n_thumbs=3)
    assert path == "s3://gl-report/out/_report/report.html"
    html = fs.cat("gl-report/out/_report/report.html").decode()
    assert "<th>labeled</th><td>9</td>" in html and "job-abc123" in html
    srcs = _imgs(html)
    assert len(srcs) == 2
    assert sorted(fs.ls("gl-report/out/_report/thumbs")) == sorted(
        f"gl-report/out/_report/{s}" for s in srcs)


def _need_browser() -> None:
    if CHROMIUM.exists():
        return
    msg = f"{CHROMIUM} not installed (apt-get install chromium chromium-driver)"
    if os.environ.get("GROUNDLABEL_REQUIRE_BROWSER"):
        pytest.fail(msg + " and GROUNDLABEL_REQUIRE_BROWSER is set")
    pytest.skip(msg)


@contextmanager
def _chromium(tmp_path, folder: Path, monkeypatch):
    """A headless Chromium (Selenium) and a loopback server of ``folder``: yields
    ``(driver, base_url)``."""
    _need_browser()
    from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer

    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    monkeypatch.setenv("SE_OFFLINE", "true")  # Selenium Manager must never download anything

    class Quiet(SimpleHTTPRequestHandler):
        def log_message(self, *a):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), partial(Quiet, directory=str(folder)))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    base = f"http://127.0.0.1:{server.server_address[1]}/"
    opts = webdriver.ChromeOptions()
    opts.binary_location = str(CHROMIUM)
    for flag in ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
                 "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage",
                 f"--user-data-dir={tmp_path / 'chromium-profile'}", "--window-size=1280,900"):
        opts.add_argument(flag)
    driver = webdriver.Chrome(service=Service(executable_path=str(CHROMEDRIVER)), options=opts)
    try:
        driver.set_page_load_timeout(60)
        yield driver, base
    finally:
        driver.quit()
        server.shutdown()
        server.server_close()


def _load(driver, url: str) -> None:
    from selenium.webdriver.support.ui import WebDriverWait

    driver.get(url)
    WebDriverWait(driver, 30).until(lambda d: d.execute_script(
        "return document.readyState === 'complete' && "
        "Array.from(document.images).every(i => i.complete)"))


def test_report_renders_in_headless_chromium(tmp_path, monkeypatch):
    """Serve the report on loopback and check, in a real browser, that every image rendered."""
    from pipelines.report import write_report

    _need_browser()
    job = fake_job(tmp_path)
    report = Path(write_report(str(job["out"])))
    expected = _imgs(report.read_text())
    assert len(expected) == 8  # 9 labeled rows, one image gone

    with _chromium(tmp_path, report.parent, monkeypatch) as (driver, base):
        _load(driver, base + "report.html")
        imgs = driver.execute_script(
            "return Array.from(document.images).map(i => "
            "[i.getAttribute('src'), i.complete, i.naturalWidth, i.naturalHeight]);")
        assert [i[0] for i in imgs] == expected
        for src, complete, w, h in imgs:
            assert complete and w > 0 and h > 0, src
        assert driver.find_element("tag name", "h1").text == "groundlabel report"
        # everything the page loaded came from the report folder
        loaded = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name);")
        assert loaded and all(u.startswith(base) for u in loaded), loaded
        height = driver.execute_script("return document.documentElement.scrollHeight;")
        driver.set_window_size(1280, min(int(height) + 140, 6000))
        shot = tmp_path / "report-screenshot.png"
        assert driver.save_screenshot(str(shot)) and shot.stat().st_size > 10_000


def _calibrated_world(tmp_path):
    """A registry holding a calibration of the fake job's model + prompt (fitted on reviews
    whose raw scores are overconfident: P(right) = score**3), and a store in which people
    audited three auto-accepted rows and found two wrong."""
    from grounding.labels import item
    from grounding.store import ReviewStore, decision_record

    reg = tmp_path / "reg"
    cal = fake_calibration(reg)
    key = cal.key
    st = ReviewStore(str(tmp_path / "store"))
    preds = [item(f"/i/{i}.png", "the red square", [[0, 0, 10, 10]], width=40, height=40,
                  score=0.99, model=key.model, prompt_version=key.prompt_version)
             for i in range(3)]
    st.append([decision_record(p, "auto", predicted=p, calibrated_score=0.97,
                               auto_precision=0.95, calibration=cal.id) for p in preds],
              source="auto")
    st.append([decision_record(preds[0], "accept", predicted=preds[0])]
              + [decision_record(dict(p, boxes=[[20, 20, 40, 40]]), "correct", predicted=p)
                 for p in preds[1:]], source="people")
    return cal, str(reg), str(tmp_path / "store")


def test_report_shows_the_reliability_diagram_and_the_audit_alarm_in_chromium(
        tmp_path, monkeypatch):
    """ECE before/after and the reliability diagram of the held-out reviews, and the alarm of
    an audit below target, as a person sees them in a real browser."""
    from pipelines.report import ReportConfig, report

    _need_browser()
    job = fake_job(tmp_path)
    cal, reg, store = _calibrated_world(tmp_path)
    q = cal.quality()
    assert q["ece_calibrated"] < q["ece_raw"]
    page = Path(report(ReportConfig(output=str(job["out"]), registry=reg, store=store)))
    with _chromium(tmp_path, page.parent, monkeypatch) as (driver, base):
        _load(driver, base + "report.html")
        svg = driver.find_element("css selector", "svg.rel")
        assert svg.is_displayed() and svg.size["width"] > 200 and svg.size["height"] > 200
        bars = driver.find_elements("css selector", "svg.rel rect.bar")
        raw = driver.find_elements("css selector", "svg.rel circle.raw")
        assert len(bars) == len(q["reliability_calibrated"]) >= 3
        assert len(raw) == len(q["reliability_raw"]) >= 3
        # each bar is as tall as its bin's share of right answers (y grows downwards)
        heights = [float(b.get_attribute("height")) for b in bars]
        want = [b["hit_rate"] * 240 for b in q["reliability_calibrated"]]
        assert heights == pytest.approx(want, abs=0.2)
        text = driver.find_element("tag name", "body").text
        assert f"ECE, raw score (held out) {q['ece_raw']:.3f}" in text
        assert f"{q['ece_calibrated']:.3f}" in text and cal.id in text
        alarm = driver.find_element("css selector", "p.alarm")
        assert alarm.is_displayed() and "below the target 0.95" in alarm.text
        assert "1 of 3" in alarm.text
        height = driver.execute_script("return document.documentElement.scrollHeight;")
        driver.set_window_size(1280, min(int(height) + 140, 6000))
        shot = tmp_path / "calibration-screenshot.png"
        assert driver.save_screenshot(str(shot))
        if os.environ.get("GROUNDLABEL_KEEP_SCREENSHOT"):
            import shutil

            shutil.copy(shot, os.environ["GROUNDLABEL_KEEP_SCREENSHOT"])
