"""Label Studio: tasks with predictions out, annotation exports back in.

Out (``write`` / `to_tasks`): one task per item, least-confident first, in Label Studio's task
import JSON::

    {"data": {"image": URL, "text": EXPR, "item_id": ..., "predicted_boxes": [[x1,y1,x2,y2]],
              "score": raw, "calibrated_score": p, "route": "review" | "audit", ...},
     "predictions": [{"model_version": ..., "score": s, "result": [
        {"id": ..., "from_name": "label", "to_name": "image", "type": "rectanglelabels",
         "original_width": W, "original_height": H, "image_rotation": 0, "score": s_k,
         "value": {"x": %, "y": %, "width": %, "height": %, "rotation": 0,
                   "rectanglelabels": ["target"]}}]}]}

The prediction's ``score`` (the one Label Studio sorts tasks by) is the calibrated P(right)
when there is one (`pipelines.routing`), else the raw answer score; each region carries its
box's raw score. ``route: audit`` marks an auto-accepted row sent to people as a check.
``x, y, width, height`` are percent of the original image (top-left corner and size), which
is Label Studio's convention; our boxes are xyxy pixels of the same image: ``x = x1 / W * 100``,
``y = y1 / H * 100``, ``width = (x2 - x1) / W * 100``, ``height = (y2 - y1) / H * 100``.

Edges, as the shipped guideline states them (grounding/guidelines/default.md): pixels are
continuous, ``x2``/``y2`` are the far edges (one past the last pixel inside), so a box touching
the right border has ``x + width = 100``. Read back, ``x2 = (x + width) * W / 100``, rounded
to a millionth of a pixel (`grounding.labels.snap`): a box dragged to the border is exactly at
``W``, and our boxes round-trip exactly.
`LABEL_CONFIG` is the project's labeling config: the box tool, the expression as a header, and
a ``decision`` choice to reject an unusable item.

In (``read``): Label Studio's JSON export (a list of tasks with ``annotations``). Per task the
newest non-cancelled annotation is the review decision; with ``every_annotation`` (what
``review pull`` and ``import --from labelstudio`` use) each person's newest one is, one item
per person, oldest first (several people may label one task: overlap). A decision is

* a ``reject`` choice -> ``reject``;
* boxes equal to the predicted boxes (within 0.5 px) -> ``accept``;
* otherwise -> ``correct``, with the annotation's boxes (none = "no such object").

Who decided is the annotation's ``completed_by`` (Label Studio's export gives the user id;
``reviewers`` maps ids to e-mail addresses, which ``review pull`` reads from ``/api/users``).
The guideline a task was pushed with is in its data (``guideline``, ``NAME@VERSION``,
`grounding.guideline`) and comes back as ``_guideline``.

Tasks of the adjudication queue (`adjudication_tasks`, ``data.role: adjudication``) come
back with ``_role`` ``adjudication``: their decision settles the item in the store.

Tasks without annotations come back as their predictions, with no decision. Unknown labels,
boxes more than 0.5 px outside the image, tasks without an image or image size are problems
(reported together; nothing is imported unless invalid tasks are skipped on purpose).
"""

from __future__ import annotations

import json
import uuid

from grounding.convert import ReadResult
from grounding.labels import LINEAGE, check_box, clamp, item, outside, snap

LABEL = "target"
FROM_NAME, TO_NAME, CHOICE_NAME = "label", "image", "decision"

LABEL_CONFIG = f"""<View>
  <Header value="$text"/>
  <Image name="{TO_NAME}" value="$image" zoom="true"/>
  <RectangleLabels name="{FROM_NAME}" toName="{TO_NAME}">
    <Label value="{LABEL}" background="red"/>
  </RectangleLabels>
  <Choices name="{CHOICE_NAME}" toName="{TO_NAME}" required="false">
    <Choice value="reject" hint="the expression or image is unusable"/>
  </Choices>
</View>
"""

ACCEPT_TOL = 0.5  # pixels: an annotation this close to the prediction is an acceptance


def to_percent(b: list[float], w: int, h: int) -> dict:
    """Label Studio's ``value`` of an xyxy pixel box on a ``w`` x ``h`` image (percent)."""
    return {"x": b[0] / w * 100, "y": b[1] / h * 100, "width": (b[2] - b[0]) / w * 100,
            "height": (b[3] - b[1]) / h * 100, "rotation": 0}


def from_percent(v: dict, w: int, h: int) -> list[float]:
    """The xyxy pixel box of Label Studio's ``value`` (percent of a ``w`` x ``h`` image): the
    far edges from ``x + width`` and ``y + height``, to a millionth of a pixel."""
    x, y = float(v["x"]), float(v["y"])
    return [snap(x * w / 100), snap(y * h / 100), snap((x + float(v["width"])) * w / 100),
            snap((y + float(v["height"])) * h / 100)]


def task_score(it: dict) -> float | None:
    """The one score Label Studio sorts and filters a task by: the calibrated P(right) when the
    item has one, else the raw answer score."""
    return it["calibrated"] if it.get("calibrated") is not None else it.get("score")


def _order(it: dict) -> tuple:
    # Least confident first; no score at all (unparseable / empty answers) before any score.
    s = task_score(it)
    return (s is not None, s or 0.0, it["item_id"])


def _same_ref(ref: str) -> str:
    return ref


def to_tasks(items: list[dict], model_version: str | None = None, label: str = LABEL,
             image_url=None, guideline: str | None = None) -> list[dict]:
    """Label Studio tasks with predictions, least-confident first (items need width/height).

    ``image_url(ref)`` maps our image reference to a URL Label Studio can load (default: as is).
    ``guideline``: ``NAME@VERSION`` of the labeling guideline the tasks are labeled under
    (`grounding.guideline`), kept in each task's data.
    """
    tasks = []
    for it in sorted(items, key=_order):
        w, h = it["width"], it["height"]
        result = []
        for k, b in enumerate(it["boxes"]):
            r = {"id": uuid.uuid4().hex[:10], "from_name": FROM_NAME, "to_name": TO_NAME,
                 "type": "rectanglelabels", "original_width": w, "original_height": h,
                 "image_rotation": 0, "value": dict(to_percent(b, w, h), rectanglelabels=[label])}
            if it.get("scores") and it["scores"][k] is not None:
                r["score"] = it["scores"][k]
            result.append(r)
        # ``image`` is what Label Studio loads (maybe a rewritten URL); ``image_ref`` is ours.
        data = {"image": (image_url or _same_ref)(it["image"]), "image_ref": it["image"],
                "text": it["text"], "item_id": it["item_id"], "width": w, "height": h,
                "predicted_boxes": it["boxes"]}
        data.update({k: it[k] for k in LINEAGE if it.get(k) is not None})
        # Data columns too: Label Studio's data manager sorts and filters by any of them.
        data.update({"score": it.get("score"), "calibrated_score": it.get("calibrated"),
                     "route": it.get("route", "review")})
        if guideline:
            data["guideline"] = guideline
        pred = {"model_version": model_version or _version(it), "result": result}
        if task_score(it) is not None:
            pred["score"] = task_score(it)
        tasks.append({"data": data, "predictions": [pred]})
    return tasks


def _regions(boxes: list, w: int, h: int, label: str = LABEL) -> list[dict]:
    return [{"id": uuid.uuid4().hex[:10], "from_name": FROM_NAME, "to_name": TO_NAME,
             "type": "rectanglelabels", "original_width": w, "original_height": h,
             "image_rotation": 0, "value": dict(to_percent(b, w, h), rectanglelabels=[label])}
            for b in boxes]


def adjudication_tasks(records: list[dict], image_url=None, guideline: str | None = None
                       ) -> list[dict]:
    """Label Studio tasks for the adjudication queue (`grounding.store.ReviewStore.unresolved`
    records: every disagreeing person's current decision per item), one task per item.

    Each person's decision is a prediction named ``"<reviewer>: <decision>"`` (their boxes, or
    the ``reject`` choice), the model's boxes one named ``model``; the adjudicator starts from
    any of them. ``data.role`` is ``adjudication``: the decision pulled back settles the item
    (store role ``adjudication``); ``data.predicted_boxes`` stay the model's, which accept /
    correct are read against."""
    per_item: dict[str, list[dict]] = {}
    for r in records:
        per_item.setdefault(r["item_id"], []).append(r)
    tasks = []
    for item_id, recs in per_item.items():
        first = recs[0]
        w, h = first["width"], first["height"]
        if not (w and h):
            raise ValueError(f"item {item_id}: no image size in the store; Label Studio boxes "
                             "need it")
        preds = []
        for r in sorted(recs, key=lambda r: str(r["reviewer"])):
            result = _regions(r["boxes"] or [], w, h)
            if r["decision"] == "reject":
                result = [{"id": uuid.uuid4().hex[:10], "from_name": CHOICE_NAME,
                           "to_name": TO_NAME, "type": "choices",
                           "value": {"choices": ["reject"]}}]
            preds.append({"model_version": f"{r['reviewer']}: {r['decision']}",
                          "result": result})
        predicted = next((r["predicted_boxes"] for r in recs
                          if r.get("predicted_boxes") is not None), None)
        if predicted is not None:
            preds.append({"model_version": "model", "result": _regions(predicted, w, h)})
        data = {"image": (image_url or _same_ref)(first["image"]), "image_ref": first["image"],
                "text": first["text"], "item_id": item_id, "width": w, "height": h,
                "predicted_boxes": predicted, "score": first.get("predicted_score"),
                "role": "adjudication",
                "reviewers": sorted(str(r["reviewer"]) for r in recs)}
        data.update({k: first[k] for k in LINEAGE if first.get(k) is not None})
        if guideline:
            data["guideline"] = guideline
        tasks.append({"data": data, "predictions": preds})
    return tasks


def _version(it: dict) -> str:
    parts = [p for p in (it.get("model"), it.get("adapter"), it.get("prompt_version")) if p]
    return "/".join(p.rstrip("/").rsplit("/", 1)[-1] for p in parts) or "groundlabel"


def write(items: list[dict], fs, path: str, model_version: str | None = None,
          image_url=None, guideline: str | None = None) -> None:
    from grounding.convert import fill_sizes
    from grounding.labels import LabelFormatError

    problems = fill_sizes(items)
    if problems:
        raise LabelFormatError(path, ["Label Studio needs image sizes: " + p for p in problems])
    with fs.open(path, "wt", encoding="utf-8") as f:
        json.dump(to_tasks(items, model_version, image_url=image_url, guideline=guideline), f,
                  indent=1)


def _when(a: dict) -> tuple:
    return str(a.get("updated_at") or a.get("created_at") or ""), a.get("id") or 0


def _live(annotations: list) -> list[dict]:
    """The task's annotations that are decisions (not cancelled = skipped), oldest first."""
    live = [a for a in annotations or [] if isinstance(a, dict) and not a.get("was_cancelled")]
    return sorted(live, key=_when)


def _newest(annotations: list) -> dict | None:
    live = _live(annotations)
    return live[-1] if live else None


def _who(a: dict):
    who = a.get("completed_by")
    return who.get("id", who.get("email")) if isinstance(who, dict) else who


def _reviewer(a: dict, reviewers: dict | None = None) -> str | None:
    """Who made annotation ``a``: an e-mail address where known, else Label Studio's user id."""
    who = a.get("completed_by")
    if isinstance(who, dict):
        return who.get("email") or (None if who.get("id") is None else str(who.get("id")))
    if who is None:
        return None
    return (reviewers or {}).get(who) or (reviewers or {}).get(str(who)) or str(who)


_NEWEST = object()


def parse_task(task, labels: set[str], annotation=_NEWEST,
               reviewers: dict | None = None) -> tuple[dict | None, list[str]]:
    """One exported task -> a labeled item with ``_decision`` (or problems), from its newest
    live annotation (or from ``annotation``; None: from its prediction)."""
    if not isinstance(task, dict) or not isinstance(task.get("data"), dict):
        return None, ["not a Label Studio task (no 'data')"]
    data = task["data"]
    problems = []
    image = data.get("image_ref") or data.get("image")
    if not image:
        problems.append("task has no image")
    if not isinstance(data.get("text"), str) or not data["text"].strip():
        problems.append("task has no text")
    ann = _newest(task.get("annotations")) if annotation is _NEWEST else annotation
    if ann is not None:
        source, results = "annotation", ann.get("result") or []
    else:
        preds = [p for p in task.get("predictions") or [] if isinstance(p, dict)]
        source, results = "prediction", (preds[-1].get("result") or []) if preds else []
    w, h = data.get("width"), data.get("height")
    boxes, reject = [], False
    for r in results:
        if not isinstance(r, dict):
            problems.append(f"result is not an object: {r!r}")
            continue
        if r.get("type") == "choices":
            reject = reject or "reject" in (r.get("value") or {}).get("choices", [])
            continue
        if r.get("type") not in ("rectanglelabels", "rectangle"):
            continue  # other controls (text areas, ratings ...) carry no boxes
        # "rectangle": a box drawn with a plain <Rectangle> tool, without a label
        v = r.get("value") or {}
        unknown = sorted(set(v.get("rectanglelabels") or []) - labels)
        if unknown:
            problems.append(f"unknown label(s) {unknown}; this project knows {sorted(labels)}")
            continue
        if v.get("rotation"):
            problems.append(f"rotated box ({v['rotation']} degrees) cannot be an xyxy box")
            continue
        rw, rh = r.get("original_width") or w, r.get("original_height") or h
        if not (rw and rh):
            problems.append("box without original_width/original_height")
            continue
        w, h = rw, rh
        try:
            b = from_percent(v, rw, rh)
        except (KeyError, TypeError):
            problems.append(f"box value needs x, y, width, height: {v!r}")
            continue
        if outside(b, rw, rh):
            problems.append(f"box {[round(c, 1) for c in b]} reaches outside the {rw}x{rh} image")
            continue
        boxes.append(clamp(b, rw, rh))
    if problems:
        return None, problems
    try:
        it = item(image, data["text"], boxes, width=w, height=h,
                  item_id=data.get("item_id"), **{k: data.get(k) for k in LINEAGE})
    except ValueError as e:
        return None, [str(e)]
    predicted = data.get("predicted_boxes")
    if predicted is not None:
        try:
            predicted = [check_box(b) for b in predicted]
        except (TypeError, ValueError) as e:
            return None, [f"predicted_boxes is malformed ({e}); it is what the decision (accept "
                          "or correct) is read against, so the task cannot be imported"]
    it["_predicted"] = {"boxes": predicted, "score": _pred_score(task)}
    guideline = data.get("guideline")
    it["_guideline"] = guideline if isinstance(guideline, str) and guideline else None
    it["_role"] = "adjudication" if data.get("role") == "adjudication" else None
    if source == "prediction":
        it["_decision"] = None
        it["score"] = _pred_score(task)
    else:
        it["_reviewer"] = _reviewer(ann, reviewers)
        it["_reviewed_at"] = ann.get("updated_at") or ann.get("created_at")
        it["_annotation"] = {k: ann.get(k) for k in ("id", "updated_at", "created_at")}
        it["_decision"] = "reject" if reject else (
            "accept" if predicted is not None and _same(boxes, predicted) else "correct")
    return it, []


def _pred_score(task: dict) -> float | None:
    """The prediction's RAW score: our tasks keep it in ``data.score`` (the prediction's own
    score may be the calibrated one, which must never be calibrated again); tasks from
    elsewhere have only the prediction's score."""
    data = task.get("data") or {}
    if isinstance(data.get("score"), int | float) and not isinstance(data["score"], bool):
        return float(data["score"])
    preds = [p for p in task.get("predictions") or [] if isinstance(p, dict)]
    return preds[-1].get("score") if preds else None


def _same(a: list, b: list) -> bool:
    if len(a) != len(b):
        return False
    key = sorted
    return all(max(abs(x - y) for x, y in zip(p, q, strict=True)) <= ACCEPT_TOL
               for p, q in zip(key(a), key(b), strict=True))


def parse_annotations(task, labels: set[str], reviewers: dict | None = None
                      ) -> tuple[list[dict], list[str]]:
    """One exported task -> one labeled item per person who annotated it (their newest live
    annotation; people oldest first), or the task's prediction when nobody did; or problems
    (all of the task's, the task then refused whole)."""
    if not isinstance(task, dict):
        return [], ["not a Label Studio task (no 'data')"]
    per_person: dict = {}
    for a in _live(task.get("annotations")):
        per_person.pop(_who(a), None)  # re-inserted: people ordered by their newest annotation
        per_person[_who(a)] = a
    out, problems = [], []
    for ann in per_person.values() or [None]:
        it, probs = parse_task(task, labels, ann, reviewers)
        if probs:
            several = len(per_person) > 1  # then say whose annotation it is
            who = f"annotation {ann.get('id')} by {_reviewer(ann, reviewers)}: " if several else ""
            problems.extend(who + p for p in probs)
        else:
            out.append(it)
    return ([], problems) if problems else (out, [])


def read(fs, path: str, labels: set[str] | None = None, every_annotation: bool = False,
         reviewers: dict | None = None) -> ReadResult:
    """Items of a Label Studio JSON export: one per task (its newest annotation), or with
    ``every_annotation`` one per person who annotated it. ``reviewers``: ``{user id: e-mail}``."""
    labels = labels or {LABEL}
    with fs.open(path, "rt", encoding="utf-8") as f:
        try:
            doc = json.load(f)
        except json.JSONDecodeError as e:
            return ReadResult([], [{"where": path, "problems": [f"not JSON: {e.msg}"], "row": None}])
    if isinstance(doc, dict):
        doc = [doc]
    if not isinstance(doc, list):
        return ReadResult([], [{"where": path, "problems": ["expected a list of tasks"],
                                "row": None}])
    items, rejects = [], []
    for i, task in enumerate(doc):
        if every_annotation:
            found, problems = parse_annotations(task, labels, reviewers)
        else:
            it, problems = parse_task(task, labels, reviewers=reviewers)
            found = [it]
        where = f"task {task.get('id', i) if isinstance(task, dict) else i}"
        if problems:
            rejects.append({"where": where, "problems": problems, "row": task})
        else:
            items.extend(found)
    return ReadResult(items, rejects)
