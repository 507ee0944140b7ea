"""Stage 2, fetch_images: fetch, decode, normalise to RGB and resize each image (CPU tasks).

The image is resized here to exactly what the model's processor would make of it (Qwen
``smart_resize`` with the checkpoint's min/max pixels), so the inference actors get model-ready
pixels and spend their time in the engine; the image is never decoded larger than that needs
(`grounding.images.decode_for_model`). The ORIGINAL size as displayed (EXIF orientation applied)
is kept: boxes are converted back to it. A bad image, or an image reference that
`grounding.uris` refuses, becomes an error row with a code from `grounding.images`.
"""

from __future__ import annotations

import time

import pyarrow as pa

from grounding.resize import ResizeSpec
from grounding.storage import StorageOptions
from pipelines import schema
from pipelines.stages import Stage, StageFn


class FetchImages(StageFn):
    name = "fetch_images"
    needs = ("row_id", "image", "image_bytes", "gold", "gold_type", "error_code")
    after = "stage 'read'"

    def __init__(self, storage: StorageOptions, resize: ResizeSpec, max_bytes: int,
                 max_pixels: int):
        self.storage = storage
        self.resize = resize
        self.max_bytes = max_bytes
        self.max_pixels = max_pixels

    @classmethod
    def stage(cls, storage: StorageOptions, resize: ResizeSpec, max_bytes: int, max_pixels: int,
              batch_size: int) -> Stage:
        return Stage(cls, {"storage": storage, "resize": resize, "max_bytes": max_bytes,
                           "max_pixels": max_pixels}, batch_size=batch_size)

    def __call__(self, batch: pa.Table) -> pa.Table:
        out = [self._one(row) for row in self.check(batch)]
        return schema.table(out, schema.FETCHED)

    def _one(self, row: dict) -> dict:
        from grounding.images import ImageError, decode_for_model, fit_to_model, read_bytes
        from grounding.labels import inline_ref, is_inline

        if row["error_code"]:
            if isinstance(row["image"], str) and is_inline(row["image"]):
                row["image"] = inline_ref(row["image"].encode())  # never carry bytes on
            return row
        t0 = time.perf_counter()
        try:
            ref = row["image_bytes"] if row["image_bytes"] is not None else row["image"]
            # a string is parsed once (grounding.uris): a bad URI is a bad_image_ref row
            data = read_bytes(ref, self.storage, self.max_bytes)
            if not isinstance(ref, str) or is_inline(ref):
                # Privacy: inline images (bytes, base64, data: URIs) leave this stage as their
                # hash, so no image bytes reach the output, exports or logs.
                row["image"] = inline_ref(data)
            # Decoded no larger than the model takes; dec.size is the displayed ORIGINAL size
            # (EXIF orientation applied), which gold boxes and the model's boxes refer to.
            dec = decode_for_model(data, self.resize.max_pixels, self.max_pixels)
        except ImageError as e:
            if not isinstance(ref, str) or is_inline(ref):
                row["image"] = "inline:unreadable"
            row.update(error_code=e.code, error=str(e))
            return row
        w, h = dec.size
        gold = row["gold"]
        if gold is not None and row["gold_type"] == "norm1":
            gold = [gold[0] * w, gold[1] * h, gold[2] * w, gold[3] * h]
        elif gold is not None and row["gold_type"] == "norm1000":
            gold = [gold[0] * w / 1000, gold[1] * h / 1000, gold[2] * w / 1000, gold[3] * h / 1000]
        try:
            img = fit_to_model(dec, self.resize)  # exactly resized_size((w, h))
        except ValueError as e:  # e.g. aspect ratio over 200
            row.update(error_code="too_large", error=f"image cannot be resized for the model: {e}")
            return row
        rw, rh = img.size
        row.update(pixels=img.tobytes(), in_width=rw, in_height=rh, width=w, height=h,
                   gold=gold, fetch_ms=(time.perf_counter() - t0) * 1000)
        return row
