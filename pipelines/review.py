"""Review: a job's predictions out to people (Label Studio, or any label format), their
decisions back into the reviewed-label store (`grounding.store`).

    groundlabel review export out/job1 --tasks review/tasks.json     # Label Studio tasks
    # ... import tasks.json + review/label_config.xml into Label Studio, review, export JSON ...
    groundlabel review import review/export.json --store s3://bucket/reviewed
    groundlabel export s3://bucket/reviewed --to coco --out labels.json --version 3
    groundlabel import labels.json --from coco --store s3://bucket/reviewed

Sources of labels (``groundlabel export SOURCE``): a reviewed-label store (a snapshot of its
accepted and corrected items, by version), a job output (its predictions), or a label file in
any format. Image bytes never leave unless ``embed_images`` is asked for.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from typing import Literal

from pydantic import BaseModel, Field, model_validator

from grounding.settings import (
    BlurFaces,
    EmbedImages,
    JobOutputURI,
    Settings,
    StoreURI,
    StoreVersion,
)
from grounding.storage import StorageOptions, filesystem, join
from pipelines.output import JobOutput
from pipelines.routing import Routing

FORMATS = "seed, swift, coco, parquet, labelstudio"
LabelFormat = Literal["seed", "swift", "coco", "parquet", "labelstudio"]


def _blur_needs_embed(cfg, what: str):
    """``--blur-faces`` is refused without ``--embed-images``: there would be nothing to blur."""
    if cfg.blur_faces and not cfg.embed_images:
        raise ValueError(f"--blur-faces needs --embed-images: without it {what} holds image "
                         "references, no image bytes")
    return cfg


class TaskImages(BaseModel):
    """Task images: how Label Studio reaches each image."""

    image_root: str | None = Field(None, description="Image path prefix to rewrite for Label "
                                   "Studio ...")
    image_url_prefix: str | None = Field(None, description="... into this URL prefix (e.g. "
                                         "/data/local-files/?d=).")
    embed_images: EmbedImages = False
    blur_faces: BlurFaces = False

    _blur = model_validator(mode="after")(lambda self: _blur_needs_embed(self, "the tasks"))


class ExportConfig(Settings):
    """``groundlabel export``: labels from a store, a job or a file, in another format."""

    source: str = Field(description="Reviewed-label store, job output folder, or label file.",
                        json_schema_extra={"positional": True})
    to: LabelFormat = Field(description="Output format.", json_schema_extra={"metavar": "FORMAT"})
    out: str = Field(description="Output file (local or s3://).")
    from_fmt: LabelFormat | None = Field(None, description="Format of a label-file SOURCE.",
                                         json_schema_extra={"flag": "--from",
                                                            "metavar": "FORMAT"})
    version: StoreVersion = None
    embed_images: EmbedImages = False
    blur_faces: BlurFaces = False
    storage: StorageOptions = Field(default_factory=StorageOptions, description="Object storage.")

    _blur = model_validator(mode="after")(lambda self: _blur_needs_embed(self, "the file"))


class ImportConfig(Settings):
    """``groundlabel import``: people's boxes from a label file into the store, one version."""

    input: str = Field(description="Label file (local or s3://).",
                       json_schema_extra={"positional": True})
    from_fmt: LabelFormat = Field(description="Its format. Label Studio exports carry their own "
                                  "decisions.", json_schema_extra={"flag": "--from",
                                                                   "metavar": "FORMAT"})
    store: StoreURI
    decision: Literal["accept", "correct", "reject"] = Field(
        "correct", description="Decision recorded for formats without one.")
    reviewer: str | None = Field(None, description="Who reviewed them (recorded with each "
                                 "decision).")
    labels: str | None = Field(None, description="Comma-separated labels the Label Studio "
                               "project knows (default: target).")
    skip_invalid: bool = Field(False, description="Import the valid rows and write the invalid "
                               "ones, with their problems, to --rejects (default: refuse the "
                               "whole file).")
    rejects: str | None = Field(None, description="Where invalid rows go (default: "
                                "INPUT.rejects.jsonl).")
    storage: StorageOptions = Field(default_factory=StorageOptions, description="Object storage.")

    def label_set(self) -> set[str] | None:
        return {x.strip() for x in self.labels.split(",") if x.strip()} if self.labels else None


GUIDELINE_HELP = ("Labeling guideline: a Markdown file whose front matter gives its name and "
                  "version (default: the guideline groundlabel ships, "
                  "grounding/guidelines/default.md). Shown to reviewers as the project's "
                  "instructions; every task and decision records its NAME@VERSION.")


class GoldTasks(BaseModel):
    """Gold items among the tasks: items with known boxes that score each reviewer."""

    gold: str | None = Field(None, description="Gold file: items with known boxes "
                             "(`grounding.gold`). The job's items that are in it are gold; "
                             "nothing in a task says so.")
    gold_format: LabelFormat = Field("seed", description="Format of --gold.",
                                     json_schema_extra={"metavar": "FORMAT"})
    gold_share: float | None = Field(None, ge=0.0, le=1.0, description="Share of the tasks "
                                     "that are gold: that many of the job's gold items (a "
                                     "seeded choice) go to people whatever routing says "
                                     "(default: every gold item of the job, routed like the "
                                     "rest).")

    @model_validator(mode="after")
    def _needs_gold(self) -> GoldTasks:
        if self.gold_share is not None and not self.gold:
            raise ValueError("--gold-share needs --gold (the items with known boxes)")
        return self


class ReviewExportConfig(Settings):
    """``groundlabel review export``: a job's predictions as Label Studio tasks."""

    output: JobOutputURI = Field(json_schema_extra={"positional": True})
    tasks: str = Field(description="Tasks JSON file to write.")
    guideline: str | None = Field(None, description=GUIDELINE_HELP)
    model_version: str | None = Field(None, description="model_version of the predictions "
                                      "(default: model/adapter/prompt version of each row).")
    images: TaskImages = Field(default_factory=TaskImages, description="Task images.")
    routing: Routing = Field(default_factory=Routing, description="Auto-accept routing.")
    gold_tasks: GoldTasks = Field(default_factory=GoldTasks,
                                  description="Gold items among the tasks.")
    storage: StorageOptions = Field(default_factory=StorageOptions, description="Object storage.")


class LabelStudio(BaseModel):
    """Label Studio: where it is; the token comes from the environment, never a flag."""

    url: str = Field(description="Label Studio address, e.g. http://ls:8080.")
    token_env: str = Field("LABEL_STUDIO_API_KEY", description="Environment variable holding "
                           "the Label Studio API token (kept out of flags and shell history).")

    def token(self) -> str:
        token = os.environ.get(self.token_env)
        if not token:
            raise FileNotFoundError(f"set {self.token_env} to a Label Studio API token "
                                    "(Account & Settings; kept out of flags and shell history)")
        return token


class ReviewPushConfig(Settings):
    """``groundlabel review push``: a Label Studio project from a job's predictions, or from a
    store's adjudication queue."""

    output: str | None = Field(None, description="Job output folder (local or s3://), as "
                               "written by `groundlabel label` (leave out with --adjudicate).",
                               json_schema_extra={"positional": True})
    adjudicate: str | None = Field(None, description="A reviewed-label store: push its "
                                   "adjudication queue (items whose reviewers disagree, not yet "
                                   "adjudicated) instead of a job's predictions; each person's "
                                   "decision is shown as a prediction named after them.")
    label_studio: LabelStudio
    title: str | None = Field(None, description="Project title (default: groundlabel JOB_ID).")
    project: int | None = Field(None, description="Add the tasks to this existing project "
                                "instead (its instructions must be the same guideline, or "
                                "empty).")
    guideline: str | None = Field(None, description=GUIDELINE_HELP)
    overlap: float = Field(0.0, ge=0.0, le=1.0, description="Share of the tasks that "
                           "--annotators people label independently (a seeded choice of items; "
                           "Label Studio's own per-task overlap). 0: one person per task.")
    annotators: int = Field(2, ge=2, le=20, description="How many people label each overlapped "
                            "task.")
    seed: int = Field(0, description="Seed of the overlap choice: the same items are chosen for "
                      "the same seed, whatever their order.")
    images: TaskImages = Field(default_factory=TaskImages, description="Task images.")
    routing: Routing = Field(default_factory=Routing, description="Auto-accept routing.")
    gold_tasks: GoldTasks = Field(default_factory=GoldTasks,
                                  description="Gold items among the tasks.")
    storage: StorageOptions = Field(default_factory=StorageOptions, description="Object storage.")

    _source = model_validator(mode="after")(lambda self: _one_source(self))


def _one_source(cfg: ReviewPushConfig) -> ReviewPushConfig:
    if (cfg.output is None) == (cfg.adjudicate is None):
        raise ValueError("give either OUTPUT (a job's predictions) or --adjudicate STORE")
    if cfg.adjudicate is not None and cfg.overlap:
        raise ValueError("--overlap is for reviews: an adjudication task is decided by one "
                         "person")
    return cfg


def overlap_items(item_ids: list[str], share: float, seed: int = 0) -> set[str]:
    """The items ``share`` of ``item_ids`` (rounded) that several people label: those with the
    smallest ``sha256(seed:item_id)``. Seeded, independent of the order, and nested (an item
    chosen at a smaller share is chosen at a larger one)."""
    import hashlib

    if not 0.0 <= share <= 1.0:
        raise ValueError(f"the overlap share must be in [0, 1], got {share}")
    ids = sorted(set(item_ids), key=lambda i: hashlib.sha256(f"{seed}:{i}".encode()).hexdigest())
    return set(ids[:round(share * len(ids))])


class ReviewPullConfig(Settings):
    """``groundlabel review pull``: a Label Studio project's reviews into the store."""

    label_studio: LabelStudio
    project: int = Field(description="Project id.")
    store: StoreURI
    export: str | None = Field(None, description="Where to keep the raw export (default: "
                               "STORE/exports/).")
    labels: str | None = Field(None, description="Comma-separated labels the project knows "
                               "(default: target).")
    skip_invalid: bool = Field(False, description="Import valid tasks; write invalid ones next "
                               "to the export.")
    storage: StorageOptions = Field(default_factory=StorageOptions, description="Object storage.")


class ReviewLogConfig(Settings):
    """``groundlabel review log``: the store's versions."""

    store: StoreURI = Field(json_schema_extra={"positional": True})
    storage: StorageOptions = Field(default_factory=StorageOptions, description="Object storage.")


class ReviewAgreementConfig(Settings):
    """``groundlabel review agreement``: how well the store's reviewers agree."""

    store: StoreURI = Field(json_schema_extra={"positional": True})
    version: StoreVersion = None
    iou: float = Field(0.5, gt=0.0, le=1.0, description="Two people's boxes match when their "
                       "IoU is at least this.")
    gold: str | None = Field(None, description="Gold file (items with known boxes) to score "
                             "each reviewer on: Acc@0.5 and decision accuracy.")
    gold_format: LabelFormat = Field("seed", description="Format of --gold.",
                                     json_schema_extra={"metavar": "FORMAT"})
    storage: StorageOptions = Field(default_factory=StorageOptions, description="Object storage.")


def review_agreement(cfg: ReviewAgreementConfig) -> dict:
    """Agreement between the people who reviewed the store's items (`grounding.agreement`):
    box agreement and decision agreement (Cohen's kappa), overall, per guideline version, per
    person and per pair."""
    from grounding.agreement import agreement
    from grounding.store import ReviewStore, is_store

    if not is_store(cfg.store, cfg.storage):
        raise FileNotFoundError(f"{cfg.store}: no reviewed-label store there")
    store = ReviewStore(cfg.store, cfg.storage)
    out = agreement(store, cfg.version, cfg.iou)
    if cfg.gold:
        from grounding.gold import load_gold, score

        out["gold"] = score(store, load_gold(cfg.gold, cfg.gold_format, cfg.storage),
                            cfg.version, cfg.iou)
    return out


def review_log(cfg: ReviewLogConfig) -> list[dict]:
    """What each commit of the store added, oldest first."""
    from grounding.store import ReviewStore

    return ReviewStore(cfg.store, cfg.storage).versions()


def source_kind(uri: str, opts: StorageOptions | None = None) -> str:
    """``store``, ``job`` or ``file``."""
    from grounding.store import is_store

    fs, path = filesystem(uri, opts)
    if fs.isdir(path):
        if is_store(uri, opts):
            return "store"
        if JobOutput(uri, opts).exists():
            return "job"
        raise FileNotFoundError(f"{uri} is a folder but neither a reviewed-label store nor a "
                                "label job's output (both are Delta tables)")
    if not fs.exists(path):
        raise FileNotFoundError(f"{uri}: no such file or folder")
    return "file"


def guess_format(uri: str) -> str:
    if uri.endswith(".parquet"):
        return "parquet"
    raise ValueError(f"cannot tell the format of {uri} from its name: pass --from "
                     f"(seed, swift, coco, parquet, labelstudio)")


def job_items(output: str, opts: StorageOptions | None = None) -> list[dict]:
    """Predictions of a job output as labeled items (error rows are left out)."""
    from grounding.labels import from_job_rows

    return from_job_rows(JobOutput(output, opts).read().to_pylist())


def load_items(source: str, fmt: str | None = None, opts: StorageOptions | None = None,
               version: int | None = None, skip_invalid: bool = False):
    """Labeled items of any source; returns ``(items, rejects, what)``."""
    from grounding.convert import read_labels
    from grounding.store import ReviewStore

    kind = source_kind(source, opts)
    if kind == "store":
        st = ReviewStore(source, opts)
        v = version or st.latest()
        return st.labels(v), [], f"store {source} version {v}"
    if kind == "job":
        return job_items(source, opts), [], f"predictions of job {source}"
    fmt = fmt or guess_format(source)
    res = read_labels(source, fmt, opts, skip_invalid=skip_invalid)
    items = [it for it in res.items if it.get("_decision") != "reject"]
    return items, res.rejects, f"{fmt} file {source}"


def export_labels(cfg: ExportConfig) -> dict:
    """Convert labels from any source to ``cfg.to`` format at ``cfg.out``."""
    from grounding.convert import write_labels

    items, rejects, what = load_items(cfg.source, cfg.from_fmt, cfg.storage, cfg.version)
    write_labels(items, cfg.out, cfg.to, cfg.storage, embed_images=cfg.embed_images,
                 blur_faces=cfg.blur_faces)
    return {"from": what, "to": cfg.to, "out": cfg.out, "items": len(items),
            "boxes": sum(len(it["boxes"]) for it in items)}


def _save_rejects(rejects: list[dict], uri: str, opts: StorageOptions | None) -> None:
    fs, path = filesystem(uri, opts)
    with fs.open(path, "wt", encoding="utf-8") as f:
        for r in rejects:
            f.write(json.dumps(r, default=str) + "\n")


def import_labels(cfg: ImportConfig, reviewers: dict | None = None) -> dict:
    """Labels of a file into the store as one new version.

    Label Studio exports carry their own decisions (accept / correct / reject, reviewer and
    time, the guideline the task was pushed with): every person's newest annotation of a task
    is one record (several people may label one task); ``reviewers`` maps Label Studio user
    ids to e-mail addresses. Other formats are recorded as ``decision`` (default ``correct``:
    people's boxes).
    With ``skip_invalid`` the valid rows are imported and the invalid ones are written, with
    their problems, to ``rejects_uri`` (default: next to the input), so nothing is lost.
    """
    from grounding.convert import read_labels
    from grounding.store import ReviewStore, decision_record, is_store

    input_uri, fmt, store, opts = cfg.input, cfg.from_fmt, cfg.store, cfg.storage
    decision, reviewer, skip_invalid = cfg.decision, cfg.reviewer, cfg.skip_invalid
    labels = cfg.label_set()
    kw = {"every_annotation": True, "reviewers": reviewers} if fmt == "labelstudio" else {}
    if fmt == "labelstudio" and labels:
        kw["labels"] = labels
    res = read_labels(input_uri, fmt, opts, skip_invalid=skip_invalid, **kw)
    records, unreviewed = [], 0
    for it in res.items:
        d = it.get("_decision", decision) if fmt == "labelstudio" else decision
        if d is None:  # a Label Studio task nobody annotated yet
            unreviewed += 1
            continue
        rec = decision_record(it, d, predicted=it.get("_predicted"),
                              reviewer=it.get("_reviewer") or reviewer,
                              reviewed_at=it.get("_reviewed_at"),
                              guideline=it.get("_guideline"), role=it.get("_role"),
                              source=f"import:{fmt}")
        if "_annotation" in it:
            rec["record_id"] = _annotation_id(rec, it["_annotation"])
        records.append(rec)
    app_id, stored = None, 0
    if fmt == "labelstudio" and records:
        # `review pull` reads the whole project each time: a decision already in the store
        # (same person, same annotation, same edit time) is not appended again.
        have = ReviewStore(store, opts).record_ids() if is_store(store, opts) else set()
        stored = sum(r["record_id"] in have for r in records)
        records = [r for r in records if r["record_id"] not in have]
        # Derived from what is appended: two pulls racing with the same news land once.
        app_id = "labelstudio-import:" + _digest(sorted(r["record_id"] for r in records))
    out = {"input": input_uri, "format": fmt, "store": store, "version": None,
           "records": len(records), "unreviewed": unreviewed, "rejected_rows": len(res.rejects),
           "decisions": dict(Counter(r["decision"] for r in records))}
    if fmt == "labelstudio":
        out["already_stored"] = stored
    if res.rejects:
        rejects_uri = cfg.rejects or input_uri.rsplit(".", 1)[0] + ".rejects.jsonl"
        _save_rejects(res.rejects, rejects_uri, opts)
        out["rejects"] = rejects_uri
    if records:
        out["version"] = ReviewStore(store, opts).append(records, source=f"import:{fmt}",
                                                         note=input_uri, app_id=app_id)
    return out


def _digest(value) -> str:
    import hashlib

    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:32]


def _annotation_id(rec: dict, ann: dict) -> str:
    """A Label Studio decision's record id, the same on every pull: the task's item, the person,
    the annotation and its edit time, and what it decided (an edit is a new decision)."""
    return _digest([rec[k] for k in ("item_id", "reviewer", "decision", "boxes", "role")]
                   + [ann.get("id"), ann.get("updated_at"), ann.get("created_at")])


def _image_urls(images: TaskImages, items: list[dict], where: str, opts):
    """``url(ref)``: how Label Studio reaches each item's image (a rewritten path prefix, or
    the embedded metadata-free PNG)."""
    from grounding.convert import embed_all

    pngs = embed_all(items, where, opts, images.blur_faces) if images.embed_images else {}
    root, prefix = images.image_root, images.image_url_prefix

    def url(ref: str) -> str:
        if images.embed_images:
            return pngs[ref]
        if root and prefix and ref.startswith(root):
            return prefix + ref[len(root):].lstrip("/")
        return ref

    return url


def _gold_tasks(cfg: GoldTasks, items: list[dict], opts) -> tuple[set[str], dict]:
    """``(gold items that go to people whatever routing says, what to report)``. With a
    share: ``round(share x tasks)`` of the job's gold items, the same seeded choice as the
    overlap's (`overlap_items`); all of them when the job has fewer (``gold_short`` says how
    many are missing)."""
    if not cfg.gold:
        return set(), {}
    from grounding.gold import load_gold

    gold = load_gold(cfg.gold, cfg.gold_format, opts)
    in_job = [it["item_id"] for it in items if it["item_id"] in gold]
    out = {"gold_in_job": len(in_job)}
    if cfg.gold_share is None:
        return set(), out | {"gold_tasks": len(in_job)}
    want = round(cfg.gold_share * len(items))
    chosen = overlap_items(in_job, min(1.0, want / len(in_job)) if in_job else 0.0)
    out |= {"gold_tasks": len(chosen)}
    if want > len(chosen):
        out["gold_short"] = want - len(chosen)
    return chosen, out


def export_tasks(cfg: ReviewExportConfig) -> dict:
    """A job's predictions as Label Studio tasks (least-confident first) at ``tasks_uri``,
    with the project's labeling config written next to it (``label_config.xml``).

    ``image_root``/``image_url_prefix`` rewrite image references into URLs Label Studio can
    load (e.g. ``/data/images`` -> ``/data/local-files/?d=images``); ``embed_images`` puts a
    metadata-free PNG into each task instead.
    """
    from grounding import guideline as guidelines
    from grounding.convert import fill_sizes
    from grounding.convert.labelstudio import LABEL_CONFIG, write

    output, tasks_uri, opts = cfg.output, cfg.tasks, cfg.storage
    rules = guidelines.load(cfg.guideline)
    items = job_items(output, opts)
    problems = fill_sizes(items, opts)
    if problems:
        from grounding.labels import LabelFormatError

        raise LabelFormatError(output, problems)
    from pipelines.routing import route

    gold_ids, gold_out = _gold_tasks(cfg.gold_tasks, items, opts)
    routed = route([it for it in items if it["item_id"] not in gold_ids], cfg.routing, opts,
                   JobOutput(output, opts).job_record().get("job_id"))
    for it in routed["audit"]:
        it["route"] = "audit"
    # gold items chosen for the share go to people, mixed in like any other task
    items = routed["review"] + routed["audit"] + [it for it in items
                                                   if it["item_id"] in gold_ids]

    url = _image_urls(cfg.images, items, output, opts)
    fs, path = filesystem(tasks_uri, opts)
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    write(items, fs, path, model_version=cfg.model_version, image_url=url, guideline=rules.id)
    with fs.open(join(parent, "label_config.xml"), "wt") as f:
        f.write(LABEL_CONFIG)
    # For a project made by hand: paste into Settings > Instructions.
    with fs.open(join(parent, "instructions.html"), "wt", encoding="utf-8") as f:
        f.write(rules.html())
    out = {"job": output, "tasks": tasks_uri, "n": len(items),
           "label_config": join(tasks_uri.rsplit("/", 1)[0], "label_config.xml"),
           "instructions": join(tasks_uri.rsplit("/", 1)[0], "instructions.html"),
           "guideline": rules.id}
    out |= gold_out
    if cfg.routing.auto_accept_precision is not None:
        out |= {"auto_accepted": len(routed["auto"]), "audited": len(routed["audit"]),
                "to_review": len(routed["review"]), "store_version": routed["version"],
                "keys": routed["keys"]}
    return out


class LabelStudioError(RuntimeError):
    """Label Studio refused a request (status and its answer in the message)."""


def _ls_session(url: str, token: str):
    import requests

    s = requests.Session()
    # Legacy API tokens ("Token"); personal access tokens are JWTs and go as "Bearer".
    kind = "Bearer" if token.count(".") == 2 else "Token"
    s.headers["Authorization"] = f"{kind} {token}"
    return s


def _ls_call(s, method: str, url: str, ok=(200, 201), **kw):
    r = s.request(method, url, timeout=120, **kw)
    if r.status_code not in ok:
        raise LabelStudioError(f"Label Studio {method} {url}: HTTP {r.status_code}: {r.text[:500]}")
    return r.json()


def _project(s, url: str, project: int | None, title: str | None, rules) -> int:
    """``project`` checked to show ``rules`` (`_instructions`), or a new project titled
    ``title`` with them as its instructions."""
    from grounding.convert.labelstudio import LABEL_CONFIG

    if project is not None:
        _instructions(s, url, project, rules)
        return project
    return _ls_call(s, "POST", f"{url}/api/projects",
                    json={"title": title[:50], "label_config": LABEL_CONFIG,
                          "expert_instruction": rules.html(), "show_instruction": True})["id"]


def _instructions(s, url: str, project: int, rules) -> None:
    """Make an existing project show ``rules``: set its instructions where it has none; refuse
    a project showing another guideline or instructions of its own (its earlier decisions were
    made under those: the tasks must not say otherwise)."""
    from grounding import guideline as guidelines

    have = _ls_call(s, "GET", f"{url}/api/projects/{project}")
    shown = guidelines.from_instructions(have.get("expert_instruction"))
    if shown == rules.id:
        if not have.get("show_instruction"):
            _ls_call(s, "PATCH", f"{url}/api/projects/{project}", json={"show_instruction": True})
        return
    if shown is not None or (have.get("expert_instruction") or "").strip():
        what = f"guideline {shown}" if shown else "instructions of its own"
        raise LabelStudioError(
            f"Label Studio project {project} shows {what}, not guideline {rules.id}: push to a "
            "new project (leave out --project), or push with the guideline it shows, so that "
            "every decision is made under the guideline it records")
    _ls_call(s, "PATCH", f"{url}/api/projects/{project}",
             json={"expert_instruction": rules.html(), "show_instruction": True})


def push_to_label_studio(cfg: ReviewPushConfig) -> dict:
    """Create a Label Studio project (or use ``project``) and import a job's predictions as
    tasks, least-confident first (Label Studio's REST API: ``/api/projects``,
    ``/api/projects/{id}/import``).

    The labeling guideline (``guideline``, default the shipped one) becomes the project's
    instructions (``expert_instruction``, shown before labeling: ``show_instruction``; the
    labeling screen shows them too) and each task's ``data.guideline`` (``NAME@VERSION``),
    which every decision pulled back records."""
    import tempfile

    from grounding import guideline as guidelines

    url, token, project = cfg.label_studio.url.rstrip("/"), cfg.label_studio.token(), cfg.project
    rules = guidelines.load(cfg.guideline)
    if cfg.adjudicate is not None:
        return _push_adjudication(cfg, rules, url, token)
    with tempfile.TemporaryDirectory() as d:
        routed = export_tasks(ReviewExportConfig(output=cfg.output, tasks=f"{d}/tasks.json",
                                                 images=cfg.images, routing=cfg.routing,
                                                 storage=cfg.storage, guideline=cfg.guideline,
                                                 gold_tasks=cfg.gold_tasks))
        with open(f"{d}/tasks.json") as f:
            tasks = json.load(f)
    with _ls_session(url, token) as s:
        title = None
        if project is None:
            job = JobOutput(cfg.output, cfg.storage).job_record()
            title = cfg.title or f"groundlabel {job.get('job_id') or cfg.output}"
        project = _project(s, url, project, title, rules)
        chosen = overlap_items([t["data"]["item_id"] for t in tasks], cfg.overlap, cfg.seed)
        for t in tasks:
            t["data"]["overlap"] = cfg.annotators if t["data"]["item_id"] in chosen else 1
        res = _ls_call(s, "POST", f"{url}/api/projects/{project}/import", json=tasks,
                       params={"return_task_ids": "true"})
        if chosen:
            _overlap(s, url, project, tasks, res.get("task_ids"), cfg.annotators)
    out = {"project": project, "tasks": res.get("task_count", len(tasks)), "url": url,
           "guideline": rules.id}
    if cfg.overlap:
        out |= {"overlapped": len(chosen), "annotators": cfg.annotators, "seed": cfg.seed}
    return out | {k: v for k, v in routed.items()
                  if k in ("auto_accepted", "audited", "keys", "gold_tasks", "gold_in_job",
                           "gold_short")}


def _push_adjudication(cfg: ReviewPushConfig, rules, url: str, token: str) -> dict:
    """The store's adjudication queue as tasks (`grounding.convert.labelstudio.
    adjudication_tasks`) in a new project (or ``project``); nothing is created when the queue
    is empty."""
    from grounding.convert import fill_sizes
    from grounding.convert.labelstudio import adjudication_tasks
    from grounding.store import ReviewStore, is_store

    if not is_store(cfg.adjudicate, cfg.storage):
        raise FileNotFoundError(f"{cfg.adjudicate}: no reviewed-label store there")
    store = ReviewStore(cfg.adjudicate, cfg.storage)
    version = store.latest()
    queue = store.unresolved(version).to_pylist()
    out = {"store": cfg.adjudicate, "store_version": version, "guideline": rules.id,
           "items": len({r["item_id"] for r in queue}), "url": url}
    if not queue:
        return out | {"project": None, "tasks": 0}
    images = [{"item_id": r["item_id"], "image": r["image"], "width": r["width"],
               "height": r["height"]} for r in queue]
    problems = fill_sizes(images, cfg.storage)
    if problems:
        from grounding.labels import LabelFormatError

        raise LabelFormatError(cfg.adjudicate, problems)
    for r, im in zip(queue, images, strict=True):
        r["width"], r["height"] = im["width"], im["height"]
    tasks = adjudication_tasks(queue, _image_urls(cfg.images, images, cfg.adjudicate,
                                                  cfg.storage), rules.id)
    project = cfg.project
    with _ls_session(url, token) as s:
        project = _project(s, url, project, cfg.title or f"groundlabel adjudication v{version}",
                           rules)
        res = _ls_call(s, "POST", f"{url}/api/projects/{project}/import", json=tasks)
    return out | {"project": project, "tasks": res.get("task_count", len(tasks))}


def _overlap(s, url: str, project: int, tasks: list[dict], ids: list | None, k: int) -> None:
    """Give each imported task its overlap (``data.overlap``: k people or 1), the way Label
    Studio 1.23.2 keeps it: per task (``overlap``, which its label stream and ``is_labeled``
    follow). An import gives every new task the project's ``maximum_annotations``; changing
    that setting afterwards rewrites the tasks with overlap > 1 (or, with none, all of them),
    so it is raised to k only after the tasks are set, and must be 1 or k beforehand."""
    if not ids or len(ids) != len(tasks):
        raise LabelStudioError(f"Label Studio project {project}: the import did not return the "
                               f"new tasks' ids ({len(ids or [])} for {len(tasks)} tasks), so "
                               "their overlap cannot be set")
    have = _ls_call(s, "GET", f"{url}/api/projects/{project}").get("maximum_annotations") or 1
    if have not in (1, k):
        raise LabelStudioError(
            f"Label Studio project {project} has {have} annotations per task, not {k} or 1: "
            f"push --annotators {have}, or to a new project")
    for task_id, t in zip(ids, tasks, strict=True):
        if t["data"]["overlap"] != have:
            _ls_call(s, "PATCH", f"{url}/api/tasks/{task_id}",
                     json={"overlap": t["data"]["overlap"]})
    if have != k:
        _ls_call(s, "PATCH", f"{url}/api/projects/{project}", json={"maximum_annotations": k})


def _reviewers(s, url: str) -> dict:
    """``{user id: e-mail}`` of the organization's users (Label Studio's export names an
    annotation's author by id only); empty where the token may not list users (the ids are
    recorded then)."""
    r = s.get(f"{url}/api/users", timeout=120)
    if r.status_code != 200:
        return {}
    body = r.json()
    users = body.get("results", []) if isinstance(body, dict) else body
    return {u["id"]: u["email"] for u in users
            if isinstance(u, dict) and u.get("id") is not None and u.get("email")}


def pull_from_label_studio(cfg: ReviewPullConfig) -> dict:
    """Download a project's JSON export (annotated tasks) and import its review decisions into
    the store: every person's newest annotation of a task, with their e-mail address (from
    ``/api/users``), its time and the guideline the task was pushed with. A decision already in the store (the same
    annotation, not edited since) is not appended again, so pulling a project repeatedly adds
    only what changed. The raw export is kept at ``export_uri`` (default: next to the store,
    under ``exports/``) so every version can be traced back to what Label Studio said."""
    url, project, store, opts = cfg.label_studio.url.rstrip("/"), cfg.project, cfg.store, cfg.storage
    with _ls_session(url, cfg.label_studio.token()) as s:
        tasks = _ls_call(s, "GET", f"{url}/api/projects/{project}/export",
                         params={"exportType": "JSON"})
        reviewers = _reviewers(s, url)
    import datetime as dt

    stamp = dt.datetime.now(dt.UTC).strftime("%Y%m%dT%H%M%S")
    export_uri = cfg.export or join(store, "exports", f"labelstudio-{project}-{stamp}.json")
    fs, path = filesystem(export_uri, opts)
    fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    with fs.open(path, "wt") as f:
        json.dump(tasks, f)
    res = import_labels(ImportConfig(input=export_uri, from_fmt="labelstudio", store=store,
                                     labels=cfg.labels, skip_invalid=cfg.skip_invalid,
                                     storage=opts), reviewers=reviewers)
    res["project"] = project
    return res
