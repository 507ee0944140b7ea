"""``groundlabel``: one command line for the whole loop.

`VERBS` is the whole CLI: each verb names its config (a typed `grounding.settings.Settings`
model; `groundlabel.flags` turns its fields into flags and loads ``--config FILE.yaml`` into it)
and the function that runs it. Both are ``module:name`` strings, imported only when needed, so
``--help`` answers at once without torch, vLLM or Ray.

Examples::

    groundlabel demo --n 8 --out demo-out
    groundlabel label --input data/synth/data.jsonl --output runs/label-1
    groundlabel parse --family qwen3_vl --image-size 640 480 '[{"bbox_2d": [10, 20, 500, 600]}]'
    groundlabel eval-synth --domain shifted --n 200
    groundlabel report runs/label-1      # -> runs/label-1/_report/report.html
    groundlabel review export runs/label-1 --tasks review/tasks.json
    groundlabel review import review/export.json --store reviewed/
    groundlabel review push runs/label-1 --url http://ls:8080 --overlap 0.1 --annotators 2
    groundlabel review agreement reviewed/
    groundlabel export reviewed/ --to coco --out labels.json
    groundlabel store migrate reviewed-old/ reviewed/
    groundlabel retrain --store reviewed/ --registry adapters/
    groundlabel synth --out data/shifted --n 500 --domain shifted
    groundlabel export-model --out runs/onnx && groundlabel ground --onnx runs/onnx x.png "the red circle"
    groundlabel tiny build --out /tmp/tiny && groundlabel tiny train --model /tmp/tiny --out /tmp/t
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Verb:
    """One verb: its help, its config model and its function (``module:name`` strings).

    ``run`` takes the config and returns what is printed: a dict as JSON, a list as one JSON
    line per item, a string as is; an int is the exit code; None prints nothing. ``fixed``
    settings are set by the verb and get no flag."""

    help: str
    config: str
    run: str
    fixed: dict[str, Any] = field(default_factory=dict)


C = "groundlabel.commands"
VERBS: dict[str, Verb] = {
    "label": Verb("Bulk-label image-text shards (local or s3://) into Parquet boxes, on Ray.",
                  "pipelines.config:LabelJobConfig", f"{C}:label"),
    "eval": Verb("Acc@0.5, mean IoU and parse failures of a labeled output, as JSON.",
                 "pipelines.summary:EvalConfig", "pipelines.summary:evaluate"),
    "report": Verb("One self-contained HTML page of a labeled output: summary, metrics, errors, "
                   "and the least confident rows drawn.",
                   "pipelines.report:ReportConfig", "pipelines.report:report"),
    "export": Verb("Write labels in another format: a store snapshot (accepted + corrected "
                   "items), a job's predictions, or a label file.",
                   "pipelines.review:ExportConfig", "pipelines.review:export_labels"),
    "import": Verb("Import labels (people's boxes) from a file into the reviewed-label store as "
                   "one new version.", "pipelines.review:ImportConfig",
                   "pipelines.review:import_labels"),
    "review export": Verb("A job's predictions as Label Studio tasks, least-confident first, "
                          "plus the project's label_config.xml; with --auto-accept-precision, "
                          "rows sure enough skip people (recorded as `auto`).",
                          "pipelines.review:ReviewExportConfig", "pipelines.review:export_tasks"),
    "review import": Verb("A Label Studio JSON export into the store (same as `groundlabel "
                          "import --from labelstudio`).", "pipelines.review:ImportConfig",
                          "pipelines.review:import_labels",
                          fixed={"from_fmt": "labelstudio", "decision": "correct",
                                 "reviewer": None}),
    "review push": Verb("Create a Label Studio project from a job's predictions (REST API; "
                        "token in LABEL_STUDIO_API_KEY).", "pipelines.review:ReviewPushConfig",
                        "pipelines.review:push_to_label_studio"),
    "review pull": Verb("Import a Label Studio project's reviews into the store (keeps the raw "
                        "export next to it).", "pipelines.review:ReviewPullConfig",
                        "pipelines.review:pull_from_label_studio"),
    "review calibrate": Verb("Fit calibrated confidence (P(right) from the raw score) per "
                             "model + adapter + prompt version from the store's reviews, into "
                             "the registry.", "pipelines.routing:CalibrateConfig",
                             "pipelines.routing:calibrate"),
    "review agreement": Verb("How well reviewers agree, from the store: boxes matched at IoU "
                             ">= 0.5 and mean IoU, decision agreement and Cohen's kappa; "
                             "overall, per guideline version, per person and per pair.",
                             "pipelines.review:ReviewAgreementConfig",
                             "pipelines.review:review_agreement"),
    "review log": Verb("The store's versions: what each commit added.",
                       "pipelines.review:ReviewLogConfig", "pipelines.review:review_log"),
    "store migrate": Verb("Convert a reviewed-label store of the old layout (data/*.parquet + "
                          "_log/) into a Delta table, keeping every version number and record; "
                          "rerun to resume.", f"{C}:StoreMigrateConfig", f"{C}:store_migrate"),
    "serve": Verb("Start the online endpoint (Ray Serve + FastAPI): POST /v1/ground, hot-swaps "
                  "the registry's production adapter.", "serve.config:ServeConfig",
                  f"{C}:serve"),
    "retrain": Verb("Train a LoRA adapter on reviewed labels (Ray Train), gate it on held-out "
                    "labels through vLLM, register it, promote it if better.",
                    "train.config:RetrainConfig", "train.retrain:retrain"),
    "schedule": Verb("Retrain on a cron schedule when enough new reviewed labels arrived.",
                     "train.schedule:ScheduleConfig", f"{C}:schedule"),
    "merge": Verb("Merge a LoRA adapter into a standalone checkpoint (vLLM/transformers).",
                  "train.merge:MergeConfig", "train.merge:merge"),
    "export-model": Verb("Export a checkpoint (+ a registry adapter, merged) as an ONNX folder "
                         "for the edge: graphs, tokenizer, processor settings, manifest.",
                         "train.onnx_export:ExportConfig", "train.onnx_export:export_model"),
    "ground": Verb("Boxes for one image and expression from an ONNX export folder "
                   "(onnxruntime only: no torch, vLLM or Ray).",
                   "grounding.edge.runner:GroundConfig", "grounding.edge.runner:ground"),
    "adapters list": Verb("Registered adapters (* = production).",
                          f"{C}:AdaptersConfig", f"{C}:adapters_list"),
    "adapters show": Verb("One adapter's metadata (default: production).",
                          f"{C}:AdapterShowConfig", f"{C}:adapters_show"),
    "adapters promote": Verb("Point production at an adapter.",
                             f"{C}:AdapterPromoteConfig", f"{C}:adapters_promote"),
    "adapters rollback": Verb("Undo the last promotion.",
                              f"{C}:AdapterRollbackConfig", f"{C}:adapters_rollback"),
    "adapters history": Verb("Every promotion, refusal and rollback.",
                             f"{C}:AdaptersConfig", f"{C}:adapters_history"),
    "adapters migrate": Verb("Convert an adapter registry of the old layout (meta.json, events/, "
                             "production.json) into one on a Delta table, every adapter, "
                             "calibration and event kept; rerun to resume.",
                             f"{C}:AdaptersMigrateConfig", f"{C}:adapters_migrate"),
    "demo": Verb("Label a few synthetic images through vLLM, print Acc@0.5, draw PNGs.",
                 "pipelines.demo:DemoConfig", f"{C}:demo"),
    "eval-synth": Verb("Acc@0.5 of a model (or adapter) on a held-out synthetic set.",
                       "train.evaluate:SynthEvalConfig", "train.evaluate:evaluate_synthetic"),
    "parse": Verb("Parse raw model text into boxes in original-image pixels (JSON).",
                  f"{C}:ParseConfig", f"{C}:parse"),
    "synth": Verb("Write a synthetic grounding set (PNGs + seed JSONL with true boxes).",
                  f"{C}:SynthConfig", f"{C}:synth"),
    "tiny build": Verb("Write a randomly initialised tiny Qwen3-VL folder.",
                       f"{C}:TinyBuildConfig", f"{C}:tiny_build"),
    "tiny train": Verb("Train it from scratch on synthetic data (CPU).",
                       "train.base:BaseTrainConfig", f"{C}:tiny_train"),
    "tiny probe": Verb("How well a checkpoint's vision features separate the synthetic colours "
                       "(a linear probe, held-out accuracy).",
                       "train.probe:ProbeConfig", "train.probe:colour_probe"),
}
# Help of the verbs that only group steps.
GROUPS = {
    "review": "Human review in Label Studio: tasks out, decisions in.",
    "store": "The reviewed-label store (a Delta table): maintenance.",
    "adapters": "The adapter registry: list, show, promote, rollback, history, migrate.",
    "tiny": "Build, train or probe the tiny Qwen3-VL used by tests and demo.",
}
EPILOG = """loop: label (bulk boxes) -> review (people fix them) -> retrain (adapter from reviews)
      -> serve (online endpoint picks up the promoted adapter)
Run `groundlabel VERB --help` for the settings of each verb."""


def resolve(ref: str):
    """``module:name`` -> the object (imports the module)."""
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def build_parser() -> argparse.ArgumentParser:
    """The parser of every verb, generated from `VERBS` (imports config modules only)."""
    from groundlabel.flags import add_model_args

    p = argparse.ArgumentParser(
        prog="groundlabel",
        description="Batch labeling, review, retraining and serving for visual grounding "
                    "(image + referring expression -> boxes), on Ray and vLLM.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="verb", metavar="VERB", required=True)
    steps: dict[str, Any] = {}
    for name, verb in VERBS.items():
        group, _, step = name.rpartition(" ")
        if group and group not in steps:
            g = sub.add_parser(group, help=GROUPS[group], description=GROUPS[group])
            steps[group] = g.add_subparsers(dest="step", metavar="STEP", required=True)
        sp = (steps[group] if group else sub).add_parser(step, help=verb.help,
                                                          description=verb.help)
        sp.add_argument("--config", help="YAML file with these settings; flags override it.")
        add_model_args(sp, resolve(verb.config), verb.fixed)
        sp.set_defaults(_verb=name)
    return p


def _show(result) -> int:
    if isinstance(result, bool) or result is None:
        return 0
    if isinstance(result, int):
        return result
    if isinstance(result, str):
        print(result)
    elif isinstance(result, list):
        for item in result:
            print(json.dumps(item, default=str))
    else:
        print(json.dumps(result, indent=2, default=str))
    return 0


# Bad input, not a bug: the error classes that get one clear message and exit status 2.
USER_ERRORS = ("grounding.labels:LabelFormatError", "grounding.store:StoreError",
               "pipelines.review:LabelStudioError", "grounding.registry:RegistryError",
               "pipelines.output:OutputError", "grounding.atomic:UnsafeStorage",
               "grounding.lease:LeaseLost", "train.tracking:TrackingError",
               "grounding.edge:ExportError", "grounding.guideline:GuidelineError")


def _user_errors() -> tuple[type[BaseException], ...]:
    """`USER_ERRORS` whose modules are loaded: an error can only come from a loaded module, and
    importing the others would pull pyarrow, Ray ... into verbs that need none of them
    (`groundlabel ground --onnx` on a `.[edge]` install has no pyarrow)."""
    errors: list[type[BaseException]] = [FileNotFoundError]
    for ref in USER_ERRORS:
        module, _, name = ref.partition(":")
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def main(argv: list[str] | None = None) -> int:
    from groundlabel.flags import model_from_args

    args = build_parser().parse_args(argv)
    verb = VERBS[args._verb]
    cfg = model_from_args(resolve(verb.config), args, args.config, verb.fixed)
    try:
        return _show(resolve(verb.run)(cfg))
    except Exception as e:
        if not isinstance(e, _user_errors()):
            raise
        # Bad input, not a bug: one clear message (every problem listed), no traceback.
        print(f"groundlabel {args._verb}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
