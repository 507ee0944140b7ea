"""``groundlabel``: one command line for the whole loop.

Every verb is a thin function that parses its typed config (see `grounding.config`) and calls
into its package. Heavy imports (torch, vllm, ray) happen inside those calls, so ``--help``
answers at once.

Examples::

    groundlabel demo --n 8 --out demo-out
    groundlabel parse --family qwen3_vl --image-size 640 480 '[{"bbox_2d": [10, 20, 500, 600]}]'
    groundlabel eval-synth --domain shifted --n 200
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


def build_parser() -> argparse.ArgumentParser:
    # Config classes are imported here, not the modules that use torch/vllm/ray.
    from grounding.tinymodel import TinyModelConfig
    from pipelines.config import LabelJobConfig
    from pipelines.demo import DemoConfig
    from train.base import BaseTrainConfig
    from train.evaluate import SynthEvalConfig

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
    return int(args.fn(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
