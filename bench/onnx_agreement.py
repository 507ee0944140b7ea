"""Tokens of the ONNX runner against the transformers engine (or vLLM: --engine vllm), image by
image.

Both greedy, one image per call, under the family's grammar (or not: --no-constrained), on
synthetic test-seed images (seed 1000) of each domain, and with --demo on the demo's images
(`groundlabel demo`: 8 base images, seed 0). Prints per set: images, answers equal, Acc@0.5 of
each, where the answers first differ (character), and the first differing rows; writes JSON
with --out.

With --adapter DIR the engine serves base + that LoRA unmerged (as the endpoint does) while
the ONNX folder holds the merged model (`export-model --registry ...`).

    .venv/bin/python bench/onnx_agreement.py --onnx runs/onnx --n 200 --domains base robust --demo
    .venv/bin/python bench/onnx_agreement.py --onnx runs/onnx-prod --adapter runs/lora --n 200
    .venv/bin/python bench/onnx_agreement.py --onnx runs/onnx --engine vllm --n 200 --demo
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
    ap.add_argument("--adapter", default=None, help="LoRA the transformers engine applies "
                    "unmerged (the ONNX folder must hold the same adapter merged)")
    ap.add_argument("--demo", action="store_true", help="also the demo's 8 images (seed 0)")
    ap.add_argument("--engine", default="transformers", choices=["transformers", "vllm"],
                    help="the engine to compare with (the keys say hf for either)")
    ap.add_argument("--no-constrained", action="store_true")
    ap.add_argument("--out", default=None)
    a = ap.parse_args(argv)

    from grounding.boxes import Box
    from grounding.edge.runner import OnnxGrounder
    from grounding.engines import EngineConfig, load_engine
    from grounding.engines.grounder import Grounder, GroundingRequest
    from grounding.synth import iter_samples

    runner = OnnxGrounder(a.onnx, constrained=not a.no_constrained)
    model = a.model or runner.manifest["source"]["model"]
    hf = Grounder(load_engine(EngineConfig(model=model, engine=a.engine,
                                           constrained=not a.no_constrained)))
    name = None
    if a.adapter:
        name = "a"
        hf.engine.add_adapter(name, a.adapter)
    report: dict = {"onnx": a.onnx, "model": model, "engine": a.engine, "adapter": a.adapter,
                    "source": runner.manifest["source"], "constrained": not a.no_constrained,
                    "sets": {}}
    sets = [(d, d, a.seed, a.n) for d in a.domains]
    if a.demo:
        sets.append(("demo", "base", 0, 8))
    for label, domain, seed, n in sets:
        same = hits_h = hits_o = 0
        diffs = []
        t_h = t_o = 0.0
        for i, s in enumerate(iter_samples(n, domain, seed)):
            t0 = time.perf_counter()
            rh = hf.ground([GroundingRequest(s.image, s.text, name)])[0]
            t1 = time.perf_counter()
            go = runner.generate(s.image, s.text)
            ro = runner.reader.read(go, s.image.size)
            t2 = time.perf_counter()
            t_h += t1 - t0
            t_o += t2 - t1
            truth = Box(x1=s.bbox[0], y1=s.bbox[1], x2=s.bbox[2], y2=s.bbox[3])
            hit_h = bool(rh.boxes) and rh.boxes[0].iou(truth) >= 0.5
            hit_o = bool(ro.boxes) and ro.boxes[0].iou(truth) >= 0.5
            hits_h += hit_h
            hits_o += hit_o
            if rh.raw_text == ro.raw_text:
                same += 1
            else:
                ht, ot = rh.raw_text, ro.raw_text
                first = next((k for k, (x, y) in enumerate(zip(ht, ot, strict=False))
                              if x != y),
                             min(len(ht), len(ot)))
                diffs.append({"i": i, "hf": ht, "onnx": ot, "first_char": first,
                              "hit_hf": hit_h, "hit_onnx": hit_o})
        report["sets"][label] = {
            "domain": domain, "seed": seed, "images": n, "equal_text": same,
            "acc_hf": hits_h / n, "acc_onnx": hits_o / n,
            "s_per_image_hf": t_h / n, "s_per_image_onnx": t_o / n, "diffs": diffs}
        print(label, json.dumps({k: v for k, v in report["sets"][label].items()
                                 if k != "diffs"}), flush=True)
        for d in diffs[:5]:
            print("  diff", d, flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(report, f, indent=2)
    return report


if __name__ == "__main__":
    main()
