"""One self-contained HTML page about a labeling job's output: ``groundlabel report OUTPUT``.

What it shows:

* the job: rows, unique rows, labeled rows, rows/s (from ``_summary.json``), job id, model,
  adapter, prompt version;
* Acc@0.5, mean IoU and the parse-failure rate, when the rows carry true boxes;
* rows per status, and rows per error code with its meaning (`pipelines.schema.ERROR_CODES`) plus
  up to 20 example error rows;
* thumbnails of the least confident labeled rows (``unparseable`` / ``empty`` first, then the
  lowest ``score``): the model's boxes in red with their scores, the reviewed label (if given) or
  else the row's true box in green.

Layout (``OUT`` defaults to ``{output}/_report``; local paths and ``s3://`` alike)::

    OUT/report.html
    OUT/thumbs/000.png ...     # referenced by relative path

Thumbnails are drawn at a readable size and then shrunk to at most 320 px on the long side.
They are saved as PNG from a fresh RGB image: no EXIF/GPS, ICC or text chunk of a source image
reaches the report, and no source bytes are copied. The page uses no scripts and no external
URLs; every text from the data is HTML-escaped.

Run::

    groundlabel report runs/label-1            # -> runs/label-1/_report/report.html
"""

from __future__ import annotations

import io
import json
from html import escape

from grounding.storage import StorageOptions, filesystem, join

THUMB_MAX = 320      # long side of a thumbnail, pixels
DRAW_MAX = 640       # larger images are shrunk to this before drawing, so lines stay visible
MAX_ERROR_EXAMPLES = 20
LOW_STATUS = ("unparseable", "empty")
COLUMNS = ["row_id", "image", "text", "boxes", "score", "status", "error_code", "error",
           "width", "height", "gold", "model", "adapter", "family", "prompt_version", "job_id"]

CSS = """
body{font:14px/1.4 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px;color:#222}
h1{font-size:22px;margin:0 0 4px} h2{font-size:17px;margin:28px 0 8px}
table{border-collapse:collapse;margin:4px 0}
td,th{border:1px solid #ddd;padding:3px 8px;text-align:left;vertical-align:top}
th{background:#f4f4f4} td.n{text-align:right;font-variant-numeric:tabular-nums}
code{font-size:12px;background:#f6f6f6;padding:0 3px}
.muted{color:#777} .legend span{display:inline-block;margin-right:18px}
.sw{display:inline-block;width:14px;height:10px;border:3px solid;vertical-align:middle;
margin-right:4px}
.grid{display:flex;flex-wrap:wrap;gap:14px}
figure{margin:0;width:320px;border:1px solid #ddd;padding:6px;background:#fafafa}
figure img{display:block;max-width:320px;height:auto}
figcaption{font-size:12px;margin-top:4px;word-wrap:break-word}
.ph{width:300px;height:120px;display:flex;align-items:center;justify-content:center;
text-align:center;background:#eee;color:#666;font-size:12px;padding:10px;box-sizing:border-box}
"""


def write_report(output: str, out_dir: str | None = None, opts: StorageOptions | None = None,
                 n_thumbs: int = 24, reviewed: dict[str, list[list[float]]] | None = None) -> str:
    """Write ``report.html`` (and ``thumbs/``) for the job output ``output``; return its path.

    ``reviewed`` maps ``row_id`` -> reviewed boxes (``[x1, y1, x2, y2]`` in original pixels);
    where a row has one, it is drawn in green instead of the row's true box.
    """
    from pipelines.summary import summarize

    opts = opts or StorageOptions()
    reviewed = reviewed or {}
    if out_dir is None:
        fs, path = filesystem(output, opts)
        if fs.isfile(path):  # one Parquet file: its report goes next to it
            out_dir = output.removesuffix(".parquet") + "_report"
        else:
            out_dir = join(output, "_report")
    summary = summarize(output, opts, write=False)
    table = _read(output, opts)
    info = _read_json(join(output, "_job.json"), opts)            # job id, model, prompt ...
    info["last_run"] = _read_json(join(output, "_summary.json"), opts)  # rows/s of the last run

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
            png, size = _thumbnail(row, green or [], opts)
        except Exception as e:  # noqa: BLE001 - a report shows what it cannot draw, never dies
            cards.append(_card(row, None, None, _why(e), kind if green else None))
            continue
        name = f"{i:03d}.png"
        with fs.open(f"{thumbs_dir}/{name}", "wb") as f:
            f.write(png)
        cards.append(_card(row, f"thumbs/{name}", size, None, kind if green else None))

    html = _page(output, summary, info, _lineage(table), _error_examples(table), cards,
                 n_thumbs)
    with fs.open(f"{root.rstrip('/')}/report.html", "w", encoding="utf-8") as f:
        f.write(html)
    return join(out_dir, "report.html")


# ---------------------------------------------------------------------------------- data


def _read(output: str, opts: StorageOptions):
    from pipelines.summary import read_output

    return read_output(output, opts, COLUMNS)


def _read_json(uri: str, opts: StorageOptions) -> dict:
    fs, path = filesystem(uri, opts)
    try:
        with fs.open(path, "r") as f:
            d = json.load(f)
    except (FileNotFoundError, ValueError):
        return {}
    return d if isinstance(d, dict) else {}


def _lineage(table) -> dict[str, list[str]]:
    """Distinct model / adapter / family / prompt version / job id values of the rows."""
    import pyarrow.compute as pc

    out = {}
    for col in ("job_id", "model", "adapter", "family", "prompt_version"):
        vals = pc.unique(table[col].drop_null()).to_pylist()
        out[col] = sorted(str(v) for v in vals)
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


def _thumbnail(row: dict, green: list, opts: StorageOptions) -> tuple[bytes, tuple[int, int]]:
    """PNG bytes (no metadata) of the row's image with its boxes drawn, and the PNG's size."""
    from PIL import Image

    from grounding.draw import draw_boxes
    from grounding.images import ImageError, load_image

    ref = row.get("image")
    if not ref:
        raise ImageError("inline", "the image was inline in the input; the output keeps no "
                                   "image bytes")
    storage = opts.fsspec_kwargs(ref)
    img = load_image(ref, storage)
    pred, gold = _boxes(row.get("boxes")), _boxes(green)
    long_side = max(img.size)
    if long_side > DRAW_MAX:  # draw on a smaller copy: 2-3 px lines must survive the shrink
        f = DRAW_MAX / long_side
        img = img.resize((max(1, round(img.width * f)), max(1, round(img.height * f))),
                         Image.LANCZOS)
        pred = [b.scale(f, f) for b in pred]
        gold = [b.scale(f, f) for b in gold]
    # small images are upscaled (nearest) towards the thumbnail size, so lines and the score
    # labels are drawn large enough; anything larger than the thumbnail is shrunk after
    scale = max(1, min(8, round(THUMB_MAX / max(img.size))))
    drawn = draw_boxes(img, pred, gold, text=row.get("text"), scale=scale,
                       score=row.get("score"))
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


def _fmt(v, digits: int = 3) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.{digits}f}"
    return str(v)


def _card(row: dict, src: str | None, size, why: str | None, green: str | None) -> str:
    cap = (f"<b>{escape(row.get('text') or '')}</b><br>"
           f"score {escape(_fmt(row.get('score')))} &middot; {escape(row.get('status') or '-')}"
           f" &middot; <code>{escape(row['row_id'])}</code>")
    if green:
        cap += f"<br><span class='muted'>green: {escape(green)} box</span>"
    if src:
        w, h = size
        body = (f'<img src="{escape(src)}" width="{w}" height="{h}" '
                f'alt="{escape(row.get("text") or "")}">')
    else:
        body = f'<div class="ph">{escape(why or "image not shown")}</div>'
    return f"<figure>{body}<figcaption>{cap}</figcaption></figure>"


def _kv(rows: list[tuple[str, str]]) -> str:
    return "<table>" + "".join(f"<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>"
                               for k, v in rows) + "</table>"


def _page(output: str, s: dict, info: dict, lin: dict, examples: list[dict],
          cards: list[str], n_thumbs: int) -> str:
    from pipelines.schema import ERROR_CODES

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

    m = s.get("metrics")
    if m:
        metrics = _kv([("rows with a true box", _fmt(m["n"])),
                       ("Acc@0.5", _fmt(m.get("acc@0.5"))),
                       ("mean IoU", _fmt(m.get("mean_iou"))),
                       ("parse-failure rate", _fmt(m.get("parse_fail_rate")))])
    else:
        metrics = "<p class='muted'>No row carries a true box: no accuracy to show.</p>"

    status = "<table><tr><th>status</th><th>rows</th></tr>" + "".join(
        f"<tr><td>{escape(str(k))}</td><td class='n'>{v}</td></tr>"
        for k, v in sorted(s["status"].items(), key=lambda kv: (-kv[1], str(kv[0])))) + "</table>"

    if s["errors"]:
        errors = ("<table><tr><th>error_code</th><th>rows</th><th>meaning</th></tr>" + "".join(
            f"<tr><td><code>{escape(k)}</code></td><td class='n'>{v}</td>"
            f"<td>{escape(ERROR_CODES.get(k, 'unknown code'))}</td></tr>"
            for k, v in sorted(s["errors"].items(), key=lambda kv: (-kv[1], kv[0])))
            + "</table>")
        errors += (f"<h3>Examples (up to {MAX_ERROR_EXAMPLES})</h3>"
                   "<table class='examples'><tr><th>row_id</th><th>code</th><th>message</th></tr>"
                   + "".join(f"<tr><td><code>{escape(r['row_id'])}</code></td>"
                             f"<td><code>{escape(r['error_code'])}</code></td>"
                             f"<td>{escape((r['error'] or '')[:300])}</td></tr>"
                             for r in examples) + "</table>")
    else:
        errors = "<p class='muted'>No error rows.</p>"

    legend = ("<p class='legend'><span><i class='sw' style='border-color:rgb(230,30,30)'></i>"
              "red: the model's predicted box, with its score</span>"
              "<span><i class='sw' style='border-color:rgb(20,170,60)'></i>green: the reviewed "
              "label where one was given, else the row's true box from the input</span></p>")
    thumbs = (f"<p class='muted'>The {len(cards)} least confident labeled rows (of at most "
              f"{n_thumbs}): <code>unparseable</code> and <code>empty</code> first, then "
              "lowest score.</p>" + legend + "<div class='grid'>" + "".join(cards) + "</div>"
              if cards else "<p class='muted'>No labeled rows.</p>")

    return (
        "<!DOCTYPE html>\n<html lang='en'><head><meta charset='utf-8'>"
        "<meta name='viewport' content='width=device-width, initial-scale=1'>"
        f"<title>groundlabel report: {escape(output)}</title><style>{CSS}</style></head><body>"
        f"<h1>groundlabel report</h1><p class='muted'>{escape(output)}</p>"
        f"<h2>Job</h2>{_kv(job)}"
        f"<h2>Metrics</h2>{metrics}"
        f"<h2>Status</h2>{status}"
        f"<h2>Errors</h2>{errors}"
        f"<h2>Least confident rows</h2>{thumbs}"
        "</body></html>\n")
