"""One self-contained HTML page about a labeling job's output: ``groundlabel report OUTPUT``.

What it shows:

* the job: rows, unique rows, labeled rows, rows/s (from ``_summary.json``), job id, model,
  adapter, prompt version;
* Acc@0.5, mean IoU and the parse-failure rate, when the rows carry true boxes;
* rows per status, and rows per error code with its meaning (`pipelines.schema.ERROR_CODES`) plus
  up to 20 example error rows;
* with ``--registry``: per model + adapter + prompt version of the rows, its calibration
  (`grounding.calibration`): expected calibration error of the raw and the calibrated score and
  a reliability diagram, both on the calibration's HELD-OUT reviews (never those it was fitted
  on); with ``--store`` too: the audit of auto-accepted rows per calibration (realised
  precision against the target, with an alarm when the sequential test of
  `pipelines.routing.audit` says it is below at the stated confidence);
* thumbnails of the least confident labeled rows (``unparseable`` / ``empty`` first, then the
  lowest ``score``): the model's boxes in red with their scores, the reviewed label (if given) or
  else the row's true box in green.

Layout (``OUT`` defaults to ``{output}/_report``; local paths and ``s3://`` alike)::

    OUT/report.html
    OUT/thumbs/000.png ...     # referenced by relative path

Thumbnails are drawn at a readable size and then shrunk to at most 320 px on the long side.
They are saved as PNG from a fresh RGB image: no EXIF/GPS, ICC or text chunk of a source image
reaches the report, and no source bytes are copied. The page (``templates/report.html.j2``,
rendered by jinja2 with autoescaping) uses no scripts and no external URLs; every text from the
data is HTML-escaped, once.

Run::

    groundlabel report runs/label-1            # -> runs/label-1/_report/report.html
    groundlabel report runs/label-1 --registry adapters/ --store reviewed/   # + calibration
"""

from __future__ import annotations

import functools
import io
from pathlib import Path

from pydantic import Field

from grounding.settings import BlurFaces, JobOutputURI, Settings, StoreVersion
from grounding.storage import StorageOptions, filesystem, join
from pipelines.output import JobOutput

THUMB_MAX = 320      # long side of a thumbnail, pixels
DRAW_MAX = 640       # larger images are shrunk to this before drawing, so lines stay visible
MAX_ERROR_EXAMPLES = 20
MAX_DISAGREEMENTS = 6  # the worst disagreements between reviewers drawn, with --store
LOW_STATUS = ("unparseable", "empty")
COLUMNS = ["row_id", "image", "text", "boxes", "score", "calibrated_score", "status", "error_code", "error",
           "width", "height", "gold", "model", "adapter", "family", "prompt_version", "job_id"]

class ReportConfig(Settings):
    """``groundlabel report``: one HTML page of a job output."""

    output: JobOutputURI = Field(description="Job output folder (local or s3://), or one "
                                 "Parquet file.", json_schema_extra={"positional": True})
    out: str | None = Field(None, description="Folder for report.html and thumbs/ (default: "
                            "OUTPUT/_report).")
    n: int = Field(24, ge=0, description="Number of least confident rows to draw.")
    store: str | None = Field(None, description="Reviewed-label store: draw its reviewed boxes "
                              "(green) instead of the input's true boxes.")
    version: StoreVersion = None
    registry: str | None = Field(None, description="Adapter registry: show the calibration of "
                                 "the rows' model + adapter + prompt version (ECE, reliability "
                                 "diagram on held-out reviews).")
    blur_faces: BlurFaces = False
    storage: StorageOptions = Field(default_factory=StorageOptions, description="Object storage.")


def report(cfg: ReportConfig) -> str:
    """Write the report of ``cfg.output``; returns the path of report.html."""
    reviewed, audits, agreed, worst = None, None, None, None
    if cfg.store:
        from grounding import agreement
        from grounding.store import ReviewStore
        from pipelines.routing import audit

        store = ReviewStore(cfg.store, cfg.storage)
        snap = store.snapshot(cfg.version, ("accept", "correct"))
        reviewed = {r["row_id"]: r["boxes"] for r in snap.to_pylist() if r["row_id"]}
        audits = audit(store, cfg.version)
        agreed = agreement.agreement(store, cfg.version)
        worst = agreement.worst(store, cfg.version, MAX_DISAGREEMENTS)
    return write_report(cfg.output, cfg.out, cfg.storage, n_thumbs=cfg.n, reviewed=reviewed,
                        registry=cfg.registry, audits=audits, blur_faces=cfg.blur_faces,
                        agreement=agreed, disagreements=worst)


def write_report(output: str, out_dir: str | None = None, opts: StorageOptions | None = None,
                 n_thumbs: int = 24, reviewed: dict[str, list[list[float]]] | None = None,
                 registry: str | None = None, audits: list[dict] | None = None,
                 blur_faces: bool = False, agreement: dict | None = None,
                 disagreements: list[dict] | None = None) -> str:
    """Write ``report.html`` (and ``thumbs/``) for the job output ``output``; return its path.

    ``reviewed`` maps ``row_id`` -> reviewed boxes (``[x1, y1, x2, y2]`` in original pixels);
    where a row has one, it is drawn in green instead of the row's true box. ``registry``:
    where the calibrations are; ``audits``: `pipelines.routing.audit` of the store;
    ``blur_faces``: blur detected faces in the thumbnails (`grounding.faces`);
    ``agreement``: `grounding.agreement.agreement` of the store, shown as a table;
    ``disagreements``: `grounding.agreement.worst`, each drawn with the first person's boxes in
    green, the second's in blue and the model's in red.
    """
    from pipelines.summary import summarize

    opts = opts or StorageOptions()
    reviewed = reviewed or {}
    job = JobOutput(output, opts)
    if out_dir is None:  # one Parquet file: its report goes next to it
        out_dir = (output.removesuffix(".parquet") + "_report" if job.is_file()
                   else job.uri_of("_report"))
    summary = summarize(job, write=False)
    table = job.read(COLUMNS)
    info = job.job_record()                 # job id, model, prompt ...
    info["last_run"] = job.summary()        # rows/s of the last run

    fs, root = filesystem(out_dir, opts)
    thumbs_dir = f"{root.rstrip('/')}/thumbs"
    if fs.exists(thumbs_dir):  # thumbnails of an earlier report
        for p in fs.find(thumbs_dir):
            if p.endswith(".png"):
                fs.rm(p)
    fs.makedirs(thumbs_dir, exist_ok=True)

    cards = []
    for i, row in enumerate(_least_confident(table, n_thumbs)):
        green = reviewed.get(row["row_id"])
        kind = "reviewed" if green is not None else "true"
        if green is None and row.get("gold") is not None:
            green = [row["gold"]]
        try:
            png, size = _thumbnail(row, green or [], opts, blur_faces)
        except Exception as e:  # noqa: BLE001 - a report shows what it cannot draw, never dies
            cards.append(_card(row, None, None, _why(e), kind if green else None))
            continue
        name = f"{i:03d}.png"
        with fs.open(f"{thumbs_dir}/{name}", "wb") as f:
            f.write(png)
        cards.append(_card(row, f"thumbs/{name}", size, None, kind if green else None))

    pairs = []
    for i, d in enumerate(disagreements or []):
        row = {"image": d["image"], "text": d["text"], "boxes": d["predicted_boxes"] or []}
        try:
            png, size = _thumbnail(row, d["a"]["boxes"] or [], opts, blur_faces,
                                   blue=d["b"]["boxes"] or [])
        except Exception as e:  # noqa: BLE001 - a report shows what it cannot draw, never dies
            pairs.append(_pair_card(d, None, None, _why(e)))
            continue
        name = f"disagree-{i:03d}.png"
        with fs.open(f"{thumbs_dir}/{name}", "wb") as f:
            f.write(png)
        pairs.append(_pair_card(d, f"thumbs/{name}", size, None))

    calib = _calibrations(table, registry, opts) if registry else None
    html = _page(output, summary, info, _lineage(table), _error_examples(table), cards,
                 n_thumbs, calib, audits, _agreement_view(agreement), pairs)
    with fs.open(f"{root.rstrip('/')}/report.html", "w", encoding="utf-8") as f:
        f.write(html)
    return join(out_dir, "report.html")


# ---------------------------------------------------------------------------------- data


def _lineage(table) -> dict[str, list[str]]:
    """Distinct model / adapter / family / prompt version / job id values of the rows."""
    import pyarrow.compute as pc

    out = {}
    for col in ("job_id", "model", "adapter", "family", "prompt_version"):
        vals = pc.unique(table[col].drop_null()).to_pylist()
        out[col] = sorted(str(v) for v in vals)
    return out


def _calibrations(table, registry: str, opts) -> list[dict]:
    """The newest calibration of each model + adapter + prompt version among the rows, with
    its held-out quality (`grounding.calibration.Calibration.quality`)."""
    from grounding.calibration import Key
    from grounding.registry import AdapterRegistry

    reg = AdapterRegistry(registry, opts)
    combos = table.select(["model", "adapter", "prompt_version"]).group_by(
        ["model", "adapter", "prompt_version"]).aggregate([]).to_pylist()
    out = []
    for c in sorted(combos, key=lambda c: tuple(str(v) for v in c.values())):
        if not c["model"] or not c["prompt_version"]:
            continue
        key = Key(model=c["model"], adapter=c["adapter"] or None,
                  prompt_version=c["prompt_version"])
        cal = reg.calibration(key)
        out.append({"key": key.show(), "cal": cal, "quality": cal.quality() if cal else None})
    return out


def _least_confident(table, n: int) -> list[dict]:
    """Up to ``n`` labeled rows: ``unparseable``/``empty`` first, then by lowest score."""
    import pyarrow as pa
    import pyarrow.compute as pc

    if n <= 0 or table.num_rows == 0:
        return []
    labeled = table.filter(pc.is_null(table["error_code"]))
    if labeled.num_rows == 0:
        return []
    low = pc.is_in(labeled["status"], value_set=pa.array(LOW_STATUS))
    key = pa.table({
        "first": pc.if_else(pc.fill_null(low, False), 0, 1),
        "score": pc.fill_null(labeled["score"], -1.0),   # no score: least confident
        "row_id": labeled["row_id"],
    })
    order = pc.sort_indices(key, sort_keys=[("first", "ascending"), ("score", "ascending"),
                                            ("row_id", "ascending")])
    return labeled.take(order[:n]).to_pylist()


def _error_examples(table) -> list[dict]:
    """Up to `MAX_ERROR_EXAMPLES` error rows, taken in turn from every error code."""
    import pyarrow.compute as pc

    errs = table.filter(pc.is_valid(table["error_code"]))
    if errs.num_rows == 0:
        return []
    per_code = []
    for code in sorted(pc.unique(errs["error_code"]).to_pylist()):
        sub = errs.filter(pc.equal(errs["error_code"], code)).slice(0, MAX_ERROR_EXAMPLES)
        per_code.append(sub.select(["row_id", "error_code", "error"]).to_pylist())
    out: list[dict] = []
    while len(out) < MAX_ERROR_EXAMPLES and any(per_code):
        for rows in per_code:
            if rows and len(out) < MAX_ERROR_EXAMPLES:
                out.append(rows.pop(0))
    return out


# ---------------------------------------------------------------------------------- images


def _boxes(items, **kw):
    from grounding.boxes import Box

    out = []
    for b in items or []:
        try:
            if isinstance(b, dict):
                out.append(Box(x1=b["x1"], y1=b["y1"], x2=b["x2"], y2=b["y2"],
                               score=b.get("score"), label=b.get("label")))
            else:
                out.append(Box.from_list(b, **kw))
        except (ValueError, TypeError, KeyError):
            continue  # a box the drawing cannot show is left out, not fatal
    return out


def _thumbnail(row: dict, green: list, opts: StorageOptions,
               blur_faces: bool = False, blue: list | None = None) -> tuple[bytes, tuple[int, int]]:
    """PNG bytes (no metadata) of the row's image with its boxes drawn (the row's in red,
    ``green`` and ``blue`` boxes in those colours), and the PNG's size; faces are blurred (on
    the original pixels, before any resize) with ``blur_faces``."""
    from PIL import Image

    from grounding.draw import draw_boxes
    from grounding.images import ImageError, load_image

    ref = row.get("image")
    if not ref:
        raise ImageError("inline", "the image was inline in the input; the output keeps no "
                                   "image bytes")
    img = load_image(ref, opts)
    if blur_faces:
        from grounding.faces import blur_faces as blur

        img, _ = blur(img)
    pred, gold, other = _boxes(row.get("boxes")), _boxes(green), _boxes(blue)
    long_side = max(img.size)
    if long_side > DRAW_MAX:  # draw on a smaller copy: 2-3 px lines must survive the shrink
        f = DRAW_MAX / long_side
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))),
                         Image.LANCZOS)
        pred = [b.scale(f, f) for b in pred]
        gold = [b.scale(f, f) for b in gold]
        other = [b.scale(f, f) for b in other]
    # small images are upscaled (nearest) towards the thumbnail size, so lines and the score
    # labels are drawn large enough; anything larger than the thumbnail is shrunk after
    scale = max(1, min(8, round(THUMB_MAX / max(img.size))))
    drawn = draw_boxes(img, pred, gold, text=row.get("text"), scale=scale,
                       score=row.get("score"), other=other)
    drawn.thumbnail((THUMB_MAX, THUMB_MAX), Image.LANCZOS)
    clean = Image.new("RGB", drawn.size, (255, 255, 255))  # nothing but pixels
    clean.paste(drawn, (0, 0))
    buf = io.BytesIO()
    clean.save(buf, format="PNG", optimize=True)
    return buf.getvalue(), clean.size


def _why(e: Exception) -> str:
    code = getattr(e, "code", None) or type(e).__name__
    return f"image not shown ({code}): {str(e)[:200]}"


# ---------------------------------------------------------------------------------- HTML
# The page is ``templates/report.html.j2``: the functions below only build its view data (plain
# strings and numbers, never markup); the template lays them out and escapes every one of them.

TEMPLATE = "report.html.j2"


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _card(row: dict, src: str | None, size, why: str | None, green: str | None) -> dict:
    """One thumbnail card: the image (``src``, ``size``) or why it is not shown, and caption."""
    w, h = size if src else (None, None)
    return {"text": row.get("text") or "", "score": _fmt(row.get("score")),
            "calibrated": (None if row.get("calibrated_score") is None
                           else _fmt(row["calibrated_score"])),
            "status": row.get("status") or "-", "row_id": row["row_id"], "green": green,
            "src": src, "width": w, "height": h, "why": why or "image not shown"}


def _pair_card(d: dict, src: str | None, size, why: str | None) -> dict:
    """One drawn disagreement: both people (who, what they decided) and the distance."""
    w, h = size if src else (None, None)
    return {"text": d["text"] or "", "item_id": d["item_id"], "src": src, "width": w,
            "height": h, "why": why or "image not shown", "distance": _fmt(d["distance"], 2),
            "a": f"{d['a']['reviewer']} ({d['a']['decision']})",
            "b": f"{d['b']['reviewer']} ({d['b']['decision']})"}


def _agreement_view(a: dict | None) -> dict | None:
    """The agreement table: one row per scope (all, guideline, person, pair)."""
    if a is None:
        return None

    def row(kind: str, name: str, s: dict) -> dict:
        d, b = s["decisions"], s["boxes"]
        return {"kind": kind, "name": name, "pairs": s["pairs"], "items": s["items"],
                "same": _fmt(d["agreement"]), "kappa": _fmt(d["kappa"]),
                "matched": _fmt(b["matched_share"]), "iou": _fmt(b["mean_iou"])}

    rows = [row("all", "all reviewers", a["overall"])]
    rows += [row("guideline", g, s) for g, s in a["by_guideline"].items()]
    rows += [row("person", p, s) for p, s in a["by_person"].items()]
    rows += [row("pair", p, s) for p, s in a["by_pair"].items()]
    return {"rows": rows, "overlapped": a["overlapped_items"], "iou": a["iou"],
            "resolution": [(k, v) for k, v in a["resolution"].items() if k != "version"]}


def _job_rows(output: str, s: dict, info: dict, lin: dict) -> list[tuple[str, str]]:
    """The job table: counts from the summary, rows/s of the last run, lineage of the rows
    (else of ``_job.json``)."""
    last = info.get("last_run") or {}

    def one(col: str, fallback=None, none: str = "-") -> str:
        vals = lin.get(col) or ([str(fallback)] if fallback else [])
        return ", ".join(vals) if vals else none

    job = [
        ("output", output),
        ("rows", _fmt(s["rows"])),
        ("unique rows", _fmt(s["unique_rows"])),
        ("labeled", _fmt(s["labeled"])),
        ("errors", _fmt(s["rows"] - s["labeled"])),
        ("rows/s (last run)", _fmt(last.get("rows_per_s"), 2)),
        ("job id", one("job_id", info.get("job_id"))),
        ("model", one("model", info.get("model"))),
        ("adapter", one("adapter", info.get("default_adapter"), "none (base model)")),
        ("family", one("family", info.get("family"))),
        ("prompt version", one("prompt_version", info.get("prompt_version"))),
    ]
    if last.get("seconds") is not None:
        job.insert(6, ("seconds (last run)", _fmt(last.get("seconds"), 1)))
    return job


def _metric_rows(m: dict | None) -> list[tuple[str, str]]:
    """The metrics table; empty when no row carries a true box."""
    if not m:
        return []
    return [("rows with a true box", _fmt(m["n"])),
            ("Acc@0.5", _fmt(m.get("acc@0.5"))),
            ("mean IoU", _fmt(m.get("mean_iou"))),
            ("parse-failure rate", _fmt(m.get("parse_fail_rate")))]


def _status_rows(status: dict) -> list[tuple[str, int]]:
    """(status, rows), most rows first."""
    return [(str(k), v) for k, v in sorted(status.items(), key=lambda kv: (-kv[1], str(kv[0])))]


def _error_rows(errors: dict) -> list[dict]:
    """(code, rows, meaning) of every error code, most rows first."""
    from pipelines.schema import ERROR_CODES

    return [{"code": k, "rows": v, "meaning": ERROR_CODES.get(k, "unknown code")}
            for k, v in sorted(errors.items(), key=lambda kv: (-kv[1], kv[0]))]


def _example_rows(examples: list[dict]) -> list[dict]:
    """The example error rows, messages cut to 300 characters."""
    return [{"row_id": r["row_id"], "code": r["error_code"], "message": (r["error"] or "")[:300]}
            for r in examples]


PLOT = 240          # side of the reliability diagram's plotting square, CSS pixels
PAD = 36            # room for the axes' labels


def _diagram(q: dict) -> dict:
    """Reliability diagram view data: bars of the calibrated score's bins (hit rate per bin of
    calibrated P), points of the raw score's bins, and the diagonal; SVG user units, y down."""
    def xy(p: float, r: float) -> tuple[float, float]:
        return round(PAD + p * PLOT, 1), round(PAD / 2 + (1 - r) * PLOT, 1)

    bars = []
    for b in q["reliability_calibrated"]:
        x0, y0 = xy(b["lo"], b["hit_rate"])
        x1, _ = xy(b["hi"], 0)
        bars.append({"x": x0 + 1, "y": y0, "w": round(x1 - x0 - 2, 1),
                     "h": round(PAD / 2 + PLOT - y0, 1), "n": b["n"],
                     "title": f"calibrated {b['lo']:.1f}-{b['hi']:.1f}: {b['n']} rows, "
                              f"mean P {b['mean_p']:.3f}, right {b['hit_rate']:.3f}"})
    pts = [dict(zip(("x", "y"), xy(b["mean_p"], b["hit_rate"]), strict=True),
                title=f"raw {b['lo']:.1f}-{b['hi']:.1f}: {b['n']} rows, mean score "
                      f"{b['mean_p']:.3f}, right {b['hit_rate']:.3f}")
           for b in q["reliability_raw"]]
    x0, y0 = xy(0, 0)
    x1, y1 = xy(1, 1)
    ticks = [{"v": f"{t:.1f}", "x": xy(t, 0)[0], "y": xy(0, t)[1]} for t in (0, 0.5, 1.0)]
    return {"size": PLOT + PAD * 2, "bars": bars, "points": pts, "line": " ".join(
        f"{p['x']},{p['y']}" for p in pts), "diag": (x0, y0, x1, y1), "ticks": ticks,
        "axis_y": y0, "axis_x": x0}


def _calibration_view(calib: list[dict] | None) -> list[dict] | None:
    if calib is None:
        return None
    out = []
    for c in calib:
        cal, q = c["cal"], c["quality"]
        if cal is None:
            out.append({"key": c["key"], "id": None})
            continue
        out.append({"key": c["key"], "id": cal.id, "rows": [
            ("calibration", cal.id), ("method", cal.method),
            ("fitted on", f"{cal.n_fit} reviews (store {cal.store or '-'} version "
                          f"{cal.store_version or '-'})"),
            ("held out", f"{q['n_holdout']} reviews, {_fmt(q['hit_rate'])} right"),
            ("ECE, raw score (held out)", _fmt(q["ece_raw"])),
            ("ECE, calibrated (held out)", _fmt(q["ece_calibrated"]))],
            "ece_raw": _fmt(q["ece_raw"]), "ece_calibrated": _fmt(q["ece_calibrated"]),
            "diagram": _diagram(q)})
    return out


def _audit_view(audits: list[dict] | None) -> list[dict] | None:
    if audits is None:
        return None
    return [{"target": _fmt(a["target"], 2), "audited": a["audited"], "right": a["right"],
             "precision": _fmt(a["precision"]),
             "interval": "-" if a["lower"] is None else f"{a['lower']:.3f}-{a['upper']:.3f}",
             "calibration": a.get("calibration") or "-",
             "evidence": _fmt(a.get("evidence"), 1),
             "confidence": f"{a.get('confidence', 0.95):.0%}",
             "alarm": a["alarm"]} for a in audits]


def _page(output: str, s: dict, info: dict, lin: dict, examples: list[dict],
          cards: list[dict], n_thumbs: int, calib: list[dict] | None = None,
          audits: list[dict] | None = None, agreement: dict | None = None,
          disagreements: list[dict] | None = None) -> str:
    return _render(TEMPLATE, output=output, job=_job_rows(output, s, info, lin),
                   metrics=_metric_rows(s.get("metrics")), statuses=_status_rows(s["status"]),
                   errors=_error_rows(s["errors"]), examples=_example_rows(examples),
                   max_examples=MAX_ERROR_EXAMPLES, cards=cards, n_thumbs=n_thumbs,
                   calibrations=_calibration_view(calib), audits=_audit_view(audits),
                   agreement=agreement, disagreements=disagreements or [])


def _render(name: str, **view) -> str:
    return _environment().get_template(name).render(**view)


@functools.cache
def _environment():
    """The jinja2 environment of the ``templates`` folder next to this module (autoescaped; an
    undefined name fails). A folder, not `PackageLoader`: under pytest ``pipelines`` can be a
    namespace package whose path is ``tests/pipelines``."""
    from jinja2 import Environment, FileSystemLoader, StrictUndefined

    return Environment(loader=FileSystemLoader(Path(__file__).with_name("templates")),
                       autoescape=True, undefined=StrictUndefined, trim_blocks=True,
                       lstrip_blocks=True, keep_trailing_newline=True)
