"""How well a checkpoint's vision tower tells the synthetic world's colours apart: a linear probe.

For the objects of ``base`` and ``shifted`` images (`grounding.synth`), the vision tower's output
tokens (after the spatial merger: what the language model sees; one token per
``patch_size * spatial_merge_size`` px square of the processor-resized image) whose square's
centre lies inside the object's box (xyxy pixels of the original image, scaled to the resized
one) are averaged into one feature per object. A multinomial logistic regression
(scikit-learn) is fitted on the objects of the first half of the images and scored on the
objects of the other half, so no image is in both.

Reported: accuracy over all eight colours, over the four shifted colours among themselves
(what retraining on the shifted domain needs the features to separate), and over the base
colours. Issue 32 asks for the shifted colours' separability before and after the bundled
base is rebuilt.

Run::

    groundlabel tiny probe --model models/tiny-qwen3-vl --n 200
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class ProbeConfig(BaseModel):
    """Settings of the colour probe."""

    model: str = Field(description="Checkpoint folder (a Qwen3-VL / Qwen2.5-VL layout).")
    n: int = Field(200, gt=3, description="Images per domain (base, shifted); half fit the "
                   "probe, half score it.")
    seed: int = Field(5000, description="Seed of the synthetic images (not a training, "
                      "validation or test seed of `train.base`).")
    threads: int = Field(1, description="torch threads.")


def object_tokens(sample, grid_thw, patch: int, merge: int) -> list[tuple[str, list[int]]]:
    """(colour, indices of the merged vision tokens whose square's centre lies inside the
    object's box) for each object of ``sample`` that covers at least one token centre.
    ``grid_thw``: the processor's patch grid of this image; a merged token covers
    ``patch * merge`` px of the resized image, in row-major order over the merged grid.
    Boxes are xyxy pixels of the original image, scaled here to the resized one."""
    _, gh, gw = (int(v) for v in grid_thw)
    cell = patch * merge
    rows, cols = gh // merge, gw // merge
    w, h = sample.image.size
    sx, sy = (cols * cell) / w, (rows * cell) / h        # original px -> resized px
    res = []
    for o in sample.objects:
        x1, y1, x2, y2 = o.box[0] * sx, o.box[1] * sy, o.box[2] * sx, o.box[3] * sy
        idx = [r * cols + c for r in range(rows) for c in range(cols)
               if x1 <= (c + 0.5) * cell <= x2 and y1 <= (r + 0.5) * cell <= y2]
        if idx:
            res.append((o.color, idx))
    return res


def object_features(model, processor, sample) -> list[tuple[str, object, object]]:
    """(colour, mean merged vision feature, mean RGB of the same tokens' input pixels) for each
    object of ``sample`` (`object_tokens`). The pixels are the reference: a probe on them shows
    how much colour the token choice itself leaves visible (triangles and circles leave
    background in their corner tokens)."""
    import torch

    vis = model.model.visual
    merge = vis.config.spatial_merge_size
    inputs = processor.image_processor(images=[sample.image], return_tensors="pt")
    grid = inputs["image_grid_thw"]
    with torch.no_grad():
        out = model.model.get_image_features(inputs["pixel_values"], grid)
    feats = out.pooler_output[0]
    # the processor lays patches out merger group by merger group (row-major over the merged
    # grid, then the merge x merge patches of each group), channels first within a patch
    pv = inputs["pixel_values"]
    pix = pv.reshape(-1, merge * merge, 3, pv.shape[-1] // 3).mean(dim=(1, 3)).numpy()
    return [(colour, feats[idx].mean(0).float().numpy(), pix[idx].mean(0))
            for colour, idx in object_tokens(sample, grid[0], vis.config.patch_size, merge)]


def colour_probe(cfg: ProbeConfig) -> dict:
    """The probe's held-out accuracies (module docstring)."""
    import numpy as np
    import torch
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from grounding.synth import PALETTES, make_sample

    torch.set_num_threads(cfg.threads)
    processor = AutoProcessor.from_pretrained(cfg.model)
    model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=torch.float32).eval()
    split: dict[str, list] = {"fit": [], "score": []}
    for domain in ("base", "shifted"):
        for i in range(cfg.n):
            part = "fit" if i < cfg.n // 2 else "score"
            split[part] += object_features(model, processor, make_sample(i, domain, cfg.seed))
    y = {k: np.array([o[0] for o in v]) for k, v in split.items()}
    every = list(PALETTES["base"]) + list(PALETTES["shifted"])

    def probe(col: int) -> dict:
        x = {k: np.stack([o[col] for o in v]) for k, v in split.items()}
        scale = StandardScaler().fit(x["fit"])
        # scikit-learn's default L2 strength (C = 1): on a few hundred objects and 256
        # features an unregularised probe fits the training half perfectly and says little
        clf = LogisticRegression(max_iter=5000).fit(scale.transform(x["fit"]), y["fit"])
        proba = clf.predict_proba(scale.transform(x["score"]))

        def among(colours) -> dict:
            m = np.isin(y["score"], colours)
            keep = np.isin(clf.classes_, colours)  # the probe's choice among these colours only
            pick = clf.classes_[keep][proba[m][:, keep].argmax(1)]
            return {"objects": int(m.sum()), "accuracy": round(float((pick == y["score"][m]).mean()), 4)}

        return {"all_colours": among(every), "shifted_among_themselves":
                among(list(PALETTES["shifted"])), "base_among_themselves":
                among(list(PALETTES["base"]))}

    return {"model": cfg.model, "images_per_domain": cfg.n, "seed": cfg.seed,
            "objects_fit": len(y["fit"]), "objects_scored": len(y["score"]),
            "vision_features": probe(1), "input_pixels": probe(2)}
