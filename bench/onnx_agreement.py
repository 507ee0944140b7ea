"""Tokens of the ONNX runner against the transformers engine, image by image.

Both greedy, one image per call, under the family's grammar (or not: --no-constrained), on
synthetic test-seed images (seed 1000) of each domain. Prints per domain: images, token
sequences equal, Acc@0.5 of each, and the first differing rows; writes JSON with --out.

    .venv/bin/python bench/onnx_agreement.py --onnx runs/onnx --n 200 --domains base robust
"""

from __future__ import annotations

import argparse
import json
import time


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--onnx", required=True, help="export folder")
    ap.add_argument("--model", default=None, help="checkpoint the HF engine loads (default: "
                    "the manifest's source model; give the merged checkpoint for an adapter)")
    ap.add_argument("--n", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1000)
    ap.add_argument("--domains", nargs="+", default=["base", "robust"])
    ap.add_argument("--no-constrained", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    from grounding.boxes import Box
    from grounding.edge.runner import OnnxGrounder
    from grounding.engines import EngineConfig
    from grounding.engines.grounder import Grounder, GroundingRequest
    from grounding.engines.hf_engine import HFEngine
    from grounding.synth import iter_samples

    runner = OnnxGrounder(a.onnx, constrained=not a.no_constrained)
    model = a.model or runner.manifest["source"]["model"]
    hf = Grounder(HFEngine(EngineConfig(model=model, engine="transformers",
                                        constrained=not a.no_constrained)))
    report: dict = {"onnx": a.onnx, "model": model, "constrained": not a.no_constrained,
                    "domains": {}}
    for domain in a.domains:
        same = hits_h = hits_o = 0
        diffs = []
        t_h = t_o = 0.0
        for i, s in enumerate(iter_samples(a.n, domain, a.seed)):
            t0 = time.perf_counter()
            rh = hf.ground([GroundingRequest(s.image, s.text)])[0]
            t1 = time.perf_counter()
            go = runner.generate(s.image, s.text)
            ro = runner.reader.read(go, s.image.size)
            t2 = time.perf_counter()
            t_h += t1 - t0
            t_o += t2 - t1
            truth = Box(x1=s.bbox[0], y1=s.bbox[1], x2=s.bbox[2], y2=s.bbox[3])
            hits_h += bool(rh.boxes) and rh.boxes[0].iou(truth) >= 0.5
            hits_o += bool(ro.boxes) and ro.boxes[0].iou(truth) >= 0.5
            if rh.raw_text == ro.raw_text:
                same += 1
            else:
                diffs.append({"i": i, "hf": rh.raw_text, "onnx": ro.raw_text})
        report["domains"][domain] = {
            "images": a.n, "equal_text": same, "acc_hf": hits_h / a.n, "acc_onnx": hits_o / a.n,
            "s_per_image_hf": t_h / a.n, "s_per_image_onnx": t_o / a.n, "diffs": diffs[:20]}
        print(domain, json.dumps({k: v for k, v in report["domains"][domain].items()
                                  if k != "diffs"}), flush=True)
        for d in diffs[:5]:
            print("  diff", d, flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
