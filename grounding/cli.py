"""``groundlabel``: one command line for the whole loop.

Every verb is a thin function that parses its typed config (see `grounding.config`) and calls
into its package. Heavy imports (torch, vllm, ray) happen inside those calls, so ``--help``
answers at once.

Examples::

    groundlabel demo --n 8 --out demo-out
    groundlabel parse --family qwen3_vl --image-size 640 480 '[{"bbox_2d": [10, 20, 500, 600]}]'
    groundlabel eval-synth --domain shifted --n 200
    groundlabel report runs/label-1      # -> runs/label-1/_report/report.html
    groundlabel review export runs/label-1 --tasks review/tasks.json
    groundlabel review import review/export.json --store reviewed/
    groundlabel export reviewed/ --to coco --out labels.json
    groundlabel synth --out data/shifted --n 500 --domain shifted
    groundlabel tiny build --out /tmp/tiny && groundlabel tiny train --model /tmp/tiny --out /tmp/t
"""

from __future__ import annotations

import argparse
import json
import sys

from grounding.config import add_model_args, model_from_args

EPILOG = """loop: label (bulk boxes) -> review (people fix them) -> retrain (adapter from reviews)
      -> serve (online endpoint picks up the promoted adapter)
Run `groundlabel VERB --help` for the settings of each verb."""


def _cmd_parse(args: argparse.Namespace) -> int:
    from grounding.families import get_family
    from grounding.resize import ResizeSpec

    fam = get_family(args.family)
    w, h = args.image_size
    resize = None
    if fam.needs_resize or args.max_pixels or args.min_pixels:
        resize = ResizeSpec(min_pixels=args.min_pixels or 56 * 56,
                            max_pixels=args.max_pixels or 28 * 28 * 1280,
                            factor=args.factor)
    text = args.text if args.text != "-" else sys.stdin.read()
    res = fam.parse(text, (w, h), resize)
    out = {"family": fam.name, "image_size": [w, h], "status": res.status,
           "clipped": res.clipped, "fixed": res.fixed, "dropped": res.dropped,
           "message": res.message,
           "boxes": [b.model_dump(exclude_none=True) for b in res.boxes]}
    print(json.dumps(out, indent=2))
    return 0 if res.boxes or res.status == "empty" else 1


def _cmd_synth(args: argparse.Namespace) -> int:
    from grounding.synth import write_dataset

    path = write_dataset(args.out, args.n, args.domain, args.seed)
    print(f"wrote {args.n} {args.domain} samples: {path}")
    return 0


def _cmd_tiny_build(args: argparse.Namespace) -> int:
    from grounding.tinymodel import TinyModelConfig, build

    cfg = model_from_args(TinyModelConfig, args, args.config)
    out = build(args.out, cfg)
    print(f"tiny Qwen3-VL (random weights) written to {out}")
    return 0


def _cmd_tiny_train(args: argparse.Namespace) -> int:
    from train.base import BaseTrainConfig, train

    metrics = train(model_from_args(BaseTrainConfig, args, args.config))
    print(json.dumps({k: metrics[k] for k in ("base", "shifted", "steps", "train_seconds")},
                     indent=2))
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from pipelines.demo import DemoConfig, run

    run(model_from_args(DemoConfig, args, args.config))
    return 0


def _cmd_eval_synth(args: argparse.Namespace) -> int:
    from train.evaluate import SynthEvalConfig, evaluate_synthetic

    print(json.dumps(evaluate_synthetic(model_from_args(SynthEvalConfig, args, args.config)),
                     indent=2))
    return 0


def _cmd_label(args: argparse.Namespace) -> int:
    from pipelines.config import LabelJobConfig
    from pipelines.label import label

    summary = label(model_from_args(LabelJobConfig, args, args.config))
    return 0 if summary["rows"] == summary["unique_rows"] else 1


def _cmd_eval(args: argparse.Namespace) -> int:
    from grounding.storage import StorageOptions
    from pipelines.summary import evaluate

    opts = StorageOptions(endpoint_url=args.s3_endpoint_url)
    print(json.dumps(evaluate(args.pred, args.gold, opts), indent=2))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from grounding.storage import StorageOptions
    from pipelines.report import write_report

    opts = StorageOptions(endpoint_url=args.s3_endpoint_url)
    reviewed = None
    if args.store:
        from grounding.store import ReviewStore

        snap = ReviewStore(args.store, opts).snapshot(args.version, ("accept", "correct"))
        reviewed = {r["row_id"]: r["boxes"] for r in snap.to_pylist() if r["row_id"]}
    print(write_report(args.output, args.out, opts, n_thumbs=args.n, reviewed=reviewed))
    return 0


def _opts(args: argparse.Namespace):
    from grounding.storage import StorageOptions

    return StorageOptions(endpoint_url=args.s3_endpoint_url)


def _cmd_export(args: argparse.Namespace) -> int:
    from pipelines.review import export_labels

    print(json.dumps(export_labels(args.source, args.to, args.out, _opts(args), args.from_fmt,
                                   args.version, args.embed_images), indent=2))
    return 0


def _cmd_import(args: argparse.Namespace) -> int:
    from pipelines.review import import_labels

    labels = set(args.labels.split(",")) if args.labels else None
    res = import_labels(args.input, args.from_fmt, args.store, _opts(args), args.decision,
                        args.reviewer, args.skip_invalid, args.rejects, labels)
    print(json.dumps(res, indent=2))
    return 0


def _cmd_review_export(args: argparse.Namespace) -> int:
    from pipelines.review import export_tasks

    print(json.dumps(export_tasks(args.output, args.tasks, _opts(args), args.model_version,
                                  args.image_root, args.image_url_prefix, args.embed_images),
                     indent=2))
    return 0


def _ls_token() -> str:
    import os

    token = os.environ.get("LABEL_STUDIO_API_KEY")
    if not token:
        raise FileNotFoundError("set LABEL_STUDIO_API_KEY to a Label Studio API token "
                                "(Account & Settings; kept out of flags and shell history)")
    return token


def _cmd_review_push(args: argparse.Namespace) -> int:
    from pipelines.review import push_to_label_studio

    print(json.dumps(push_to_label_studio(
        args.output, args.url, _ls_token(), args.title, args.project, _opts(args),
        image_root=args.image_root, image_url_prefix=args.image_url_prefix,
        embed_images=args.embed_images), indent=2))
    return 0


def _cmd_review_pull(args: argparse.Namespace) -> int:
    from pipelines.review import pull_from_label_studio

    labels = set(args.labels.split(",")) if args.labels else None
    print(json.dumps(pull_from_label_studio(
        args.url, _ls_token(), args.project, args.store, args.export, _opts(args),
        skip_invalid=args.skip_invalid, labels=labels), indent=2))
    return 0


def _cmd_retrain(args: argparse.Namespace) -> int:
    from train.retrain import RetrainConfig, retrain

    res = retrain(model_from_args(RetrainConfig, args, args.config))
    print(json.dumps(res, indent=2, default=str))
    return 0


def _cmd_schedule(args: argparse.Namespace) -> int:
    from train.schedule import ScheduleConfig, run

    run(model_from_args(ScheduleConfig, args, args.config))
    return 0


def _cmd_merge(args: argparse.Namespace) -> int:
    from train.merge import MergeConfig, merge

    print(merge(model_from_args(MergeConfig, args, args.config)))
    return 0


def _registry(args: argparse.Namespace):
    from train.registry import AdapterRegistry

    return AdapterRegistry(args.registry, _opts(args))


def _cmd_adapters(args: argparse.Namespace) -> int:
    reg = _registry(args)
    if args.adapters_verb == "list":
        prod = reg.production()
        for m in reg.list():
            acc = ((m.get("gate") or {}).get("candidate") or {}).get("acc@0.5")
            print(f"{'*' if m['name'] == prod else ' '} {m['name']}  labels v"
                  f"{m.get('snapshot_version')}  acc@0.5 {acc}  {m['registered_at']}")
        print(f"production: {prod or '(base model)'}")
    elif args.adapters_verb == "show":
        name = args.name or reg.production()
        print(json.dumps(reg.show(name) if name else {"production": None}, indent=2))
    elif args.adapters_verb == "promote":
        print(json.dumps({"promoted": args.name, "event": reg.promote(args.name, args.reason)}))
    elif args.adapters_verb == "rollback":
        print(json.dumps({"production": reg.rollback(args.reason)}))
    elif args.adapters_verb == "history":
        for e in reg.events():
            print(json.dumps(e))
    return 0


def _cmd_serve(args: argparse.Namespace) -> int:
    from serve.config import ServeConfig
    from serve.run import start

    start(model_from_args(ServeConfig, args, args.config))
    return 0


def _cmd_review_log(args: argparse.Namespace) -> int:
    from grounding.store import ReviewStore

    for v in ReviewStore(args.store, _opts(args)).versions():
        print(json.dumps(v))
    return 0


def build_parser() -> argparse.ArgumentParser:
    # Config classes are imported here, not the modules that use torch/vllm/ray.
    from grounding.tinymodel import TinyModelConfig
    from pipelines.config import LabelJobConfig
    from pipelines.demo import DemoConfig
    from serve.config import ServeConfig
    from train.base import BaseTrainConfig
    from train.evaluate import SynthEvalConfig
    from train.merge import MergeConfig
    from train.retrain import RetrainConfig
    from train.schedule import ScheduleConfig

    p = argparse.ArgumentParser(
        prog="groundlabel",
        description="Batch labeling, review, retraining and serving for visual grounding "
                    "(image + referring expression -> boxes), on Ray and vLLM.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)

    def verb(name: str, help_: str, fn, model=None, **kw) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help_, description=help_, **kw)
        if model is not None:
            sp.add_argument("--config", help="YAML file with these settings; flags override it.")
            add_model_args(sp, model)
        sp.set_defaults(fn=fn)
        return sp

    verb("label", "Bulk-label image-text shards (local or s3://) into Parquet boxes, on Ray.",
         _cmd_label, LabelJobConfig)
    sp = verb("eval", "Acc@0.5, mean IoU and parse failures of a labeled output, as JSON.",
              _cmd_eval)
    sp.add_argument("--pred", required=True, help="Job output folder (or one Parquet file).")
    sp.add_argument("--gold", help="Input shards with true boxes (default: the output's own "
                    "gold column, carried from the job input).")
    sp.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for s3:// URIs.")
    sp = verb("report", "One self-contained HTML page of a labeled output: summary, metrics, "
              "errors, and the least confident rows drawn.", _cmd_report)
    sp.add_argument("output", help="Job output folder (local or s3://), or one Parquet file.")
    sp.add_argument("--out", help="Folder for report.html and thumbs/ (default: "
                    "OUTPUT/_report).")
    sp.add_argument("--n", type=int, default=24,
                    help="Number of least confident rows to draw (default 24).")
    sp.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for s3:// URIs.")
    sp.add_argument("--store", help="Reviewed-label store: draw its reviewed boxes (green) "
                    "instead of the input's true boxes.")
    sp.add_argument("--version", type=int, help="Store version (default: newest).")

    fmts = "seed, swift, coco, parquet, labelstudio"
    sp = verb("export", "Write labels in another format: a store snapshot (accepted + corrected "
              "items), a job's predictions, or a label file.", _cmd_export)
    sp.add_argument("source", help="Reviewed-label store, job output folder, or label file.")
    sp.add_argument("--to", required=True, metavar="FORMAT", help=f"Output format: {fmts}.")
    sp.add_argument("--out", required=True, help="Output file (local or s3://).")
    sp.add_argument("--from", dest="from_fmt", metavar="FORMAT",
                    help=f"Format of a label-file SOURCE: {fmts}.")
    sp.add_argument("--version", type=int, help="Store version to export (default: newest).")
    sp.add_argument("--embed-images", action="store_true",
                    help="Put each image in the file as a metadata-free PNG data: URI (default: "
                    "references only; image bytes never leave unless asked).")
    sp.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for s3:// URIs.")

    sp = verb("import", "Import labels (people's boxes) from a file into the reviewed-label "
              "store as one new version.", _cmd_import)
    sp.add_argument("input", help="Label file (local or s3://).")
    sp.add_argument("--from", dest="from_fmt", required=True, metavar="FORMAT",
                    help=f"Its format: {fmts}. Label Studio exports carry their own decisions.")
    sp.add_argument("--store", required=True, help="Reviewed-label store (folder or s3://).")
    sp.add_argument("--decision", choices=["accept", "correct", "reject"], default="correct",
                    help="Decision recorded for formats without one (default correct).")
    sp.add_argument("--reviewer", help="Who reviewed them (recorded with each decision).")
    sp.add_argument("--labels", help="Comma-separated labels the Label Studio project knows "
                    "(default: target).")
    sp.add_argument("--skip-invalid", action="store_true",
                    help="Import the valid rows and write the invalid ones, with their "
                    "problems, to --rejects (default: refuse the whole file).")
    sp.add_argument("--rejects", help="Where invalid rows go (default: INPUT.rejects.jsonl).")
    sp.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for s3:// URIs.")

    rev = sub.add_parser("review", help="Human review in Label Studio: tasks out, decisions in.")
    rsub = rev.add_subparsers(dest="review_verb", metavar="STEP", required=True)
    r = rsub.add_parser("export", help="A job's predictions as Label Studio tasks, "
                        "least-confident first, plus the project's label_config.xml.")
    r.add_argument("output", help="Job output folder (local or s3://).")
    r.add_argument("--tasks", required=True, help="Tasks JSON file to write.")
    r.add_argument("--model-version", help="model_version of the predictions (default: "
                   "model/adapter/prompt version of each row).")
    r.add_argument("--image-root", help="Image path prefix to rewrite for Label Studio ...")
    r.add_argument("--image-url-prefix", help="... into this URL prefix (e.g. "
                   "/data/local-files/?d=).")
    r.add_argument("--embed-images", action="store_true",
                   help="Embed metadata-free PNGs in the tasks instead of references.")
    r.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for s3:// URIs.")
    r.set_defaults(fn=_cmd_review_export)
    r = rsub.add_parser("import", help="A Label Studio JSON export into the store (same as "
                        "`groundlabel import --from labelstudio`).")
    r.add_argument("input", help="Label Studio JSON export file.")
    r.add_argument("--store", required=True, help="Reviewed-label store (folder or s3://).")
    r.add_argument("--labels", help="Comma-separated labels the project knows (default: target).")
    r.add_argument("--skip-invalid", action="store_true",
                   help="Import valid tasks; write invalid ones to --rejects.")
    r.add_argument("--rejects", help="Where invalid tasks go (default: INPUT.rejects.jsonl).")
    r.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for s3:// URIs.")
    r.set_defaults(fn=_cmd_import, from_fmt="labelstudio", decision="correct", reviewer=None)
    r = rsub.add_parser("push", help="Create a Label Studio project from a job's predictions "
                        "(REST API; token in LABEL_STUDIO_API_KEY).")
    r.add_argument("output", help="Job output folder (local or s3://).")
    r.add_argument("--url", required=True, help="Label Studio address, e.g. http://ls:8080.")
    r.add_argument("--title", help="Project title (default: groundlabel JOB_ID).")
    r.add_argument("--project", type=int, help="Add the tasks to this existing project instead.")
    r.add_argument("--image-root", help="Image path prefix to rewrite for Label Studio ...")
    r.add_argument("--image-url-prefix", help="... into this URL prefix.")
    r.add_argument("--embed-images", action="store_true",
                   help="Embed metadata-free PNGs in the tasks instead of references.")
    r.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for s3:// URIs.")
    r.set_defaults(fn=_cmd_review_push)
    r = rsub.add_parser("pull", help="Import a Label Studio project's reviews into the store "
                        "(keeps the raw export next to it).")
    r.add_argument("--url", required=True, help="Label Studio address.")
    r.add_argument("--project", type=int, required=True, help="Project id.")
    r.add_argument("--store", required=True, help="Reviewed-label store (folder or s3://).")
    r.add_argument("--export", help="Where to keep the raw export (default: STORE/exports/).")
    r.add_argument("--labels", help="Comma-separated labels the project knows (default: target).")
    r.add_argument("--skip-invalid", action="store_true",
                   help="Import valid tasks; write invalid ones next to the export.")
    r.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for s3:// URIs.")
    r.set_defaults(fn=_cmd_review_pull)
    r = rsub.add_parser("log", help="The store's versions: what each commit added.")
    r.add_argument("store", help="Reviewed-label store (folder or s3://).")
    r.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for s3:// URIs.")
    r.set_defaults(fn=_cmd_review_log)

    verb("serve", "Start the online endpoint (Ray Serve + FastAPI): POST /v1/ground, hot-swaps "
         "the registry's production adapter.", _cmd_serve, ServeConfig)
    verb("retrain", "Train a LoRA adapter on reviewed labels (Ray Train), gate it on held-out "
         "labels through vLLM, register it, promote it if better.", _cmd_retrain, RetrainConfig)
    verb("schedule", "Retrain on a cron schedule when enough new reviewed labels arrived.",
         _cmd_schedule, ScheduleConfig)
    verb("merge", "Merge a LoRA adapter into a standalone checkpoint (vLLM/transformers).",
         _cmd_merge, MergeConfig)
    ad = sub.add_parser("adapters", help="The adapter registry: list, show, promote, rollback.")
    asub = ad.add_subparsers(dest="adapters_verb", metavar="STEP", required=True)
    for step, help_ in [("list", "Registered adapters (* = production)."),
                        ("show", "One adapter's metadata (default: production)."),
                        ("promote", "Point production at an adapter."),
                        ("rollback", "Undo the last promotion."),
                        ("history", "Every promotion, refusal and rollback.")]:
        a = asub.add_parser(step, help=help_)
        a.add_argument("--registry", required=True, help="Adapter registry (folder or s3://).")
        a.add_argument("--s3-endpoint-url", help="S3-compatible endpoint for s3:// URIs.")
        if step in ("show", "promote"):
            a.add_argument("name", nargs="?" if step == "show" else None, help="Adapter name.")
        if step in ("promote", "rollback"):
            a.add_argument("--reason", default="manual", help="Why (recorded).")
        a.set_defaults(fn=_cmd_adapters)

    verb("demo", "Label a few synthetic images through vLLM, print Acc@0.5, draw PNGs.",
         _cmd_demo, DemoConfig)
    verb("eval-synth", "Acc@0.5 of a model (or adapter) on a held-out synthetic set.",
         _cmd_eval_synth, SynthEvalConfig)

    sp = verb("parse", "Parse raw model text into boxes in original-image pixels (JSON).",
              _cmd_parse)
    sp.add_argument("--family", required=True,
                    help="Model family: qwen2_vl, qwen2_5_vl, qwen3_vl, internvl2, florence2, "
                         "paligemma.")
    sp.add_argument("--image-size", nargs=2, type=int, metavar=("W", "H"), required=True,
                    help="Original image width and height in pixels.")
    sp.add_argument("--min-pixels", type=int, help="Processor min pixels (Qwen2.5-VL resize).")
    sp.add_argument("--max-pixels", type=int, help="Processor max pixels (Qwen2.5-VL resize).")
    sp.add_argument("--factor", type=int, default=28,
                    help="patch_size * merge_size of the processor (default 28).")
    sp.add_argument("text", help="Raw model output ('-' reads standard input).")

    sp = verb("synth", "Write a synthetic grounding set (PNGs + seed JSONL with true boxes).",
              _cmd_synth)
    sp.add_argument("--out", required=True, help="Output folder.")
    sp.add_argument("--n", type=int, default=100, help="Number of samples (default 100).")
    sp.add_argument("--domain", choices=["base", "shifted"], default="base",
                    help="base: red/green/blue/yellow; shifted: unseen colours (default base).")
    sp.add_argument("--seed", type=int, default=0, help="Set seed (default 0).")

    tiny = sub.add_parser("tiny", help="Build or train the tiny Qwen3-VL used by tests and demo.")
    tsub = tiny.add_subparsers(dest="tiny_verb", metavar="STEP", required=True)
    b = tsub.add_parser("build", help="Write a randomly initialised tiny Qwen3-VL folder.")
    b.add_argument("--out", required=True, help="Output folder.")
    b.add_argument("--config", help="YAML file with these settings; flags override it.")
    add_model_args(b, TinyModelConfig)
    b.set_defaults(fn=_cmd_tiny_build)
    t = tsub.add_parser("train", help="Train it from scratch on synthetic data (CPU).")
    t.add_argument("--config", help="YAML file with these settings; flags override it.")
    add_model_args(t, BaseTrainConfig)
    t.set_defaults(fn=_cmd_tiny_train)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    from grounding.labels import LabelFormatError
    from grounding.store import StoreError
    from pipelines.review import LabelStudioError
    from train.registry import RegistryError

    try:
        return int(args.fn(args) or 0)
    except (LabelFormatError, StoreError, FileNotFoundError, LabelStudioError,
            RegistryError) as e:
        # Bad input, not a bug: one clear message (every problem listed), no traceback.
        print(f"groundlabel {args.verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
