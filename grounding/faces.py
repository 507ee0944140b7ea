"""Faces kept private when image bytes leave a job: detect and blur them (``--blur-faces``).

Used on every path that writes image pixels out of the job: ``--embed-images`` label exports,
Label Studio tasks with embedded images (`grounding.convert.embedded`), and the HTML report's
thumbnails (`pipelines.report`). Boxes are never changed: only pixels are.

The detector is dlib's HOG + linear SVM frontal-face detector from the ``dlib-bin`` wheel. Its
model is compiled into the extension module (``get_frontal_face_detector()``), so nothing is
downloaded at run time; code and model are under the Boost licence. Chosen over:

* OpenCV's Haar cascades: the OpenCV 5.0 wheel ships neither the cascade files nor
  ``cv2.CascadeClassifier``;
* facenet-pytorch's MTCNN: pins ``numpy<2``, ``torch<2.3``, ``Pillow<10.3``;
* mediapipe: no face model in its wheel, and it pulls a second OpenCV;
* YuNet / RetinaFace packages: they download their weights.

Limits, stated: HOG finds frontal and near-frontal faces of about 28 px and more (after the
one 2x upsampling done here); turned, tiny or heavily occluded faces can be missed. Blurring is
a de-identification aid, not a guarantee.

Coordinates: face boxes are xyxy pixels of the image given (the original image on every path).
"""

from __future__ import annotations

import functools

PAD = 0.3        # HOG boxes cover brows to chin: grow each side by this share (1.5x above)
UPSAMPLE = 1     # one 2x pyramid step: faces down to ~28 px


@functools.cache
def _detector():
    # One per process: dlib's detector is not documented as thread-safe, and building it
    # deserialises the model (fast, but not free).
    import dlib

    return dlib.get_frontal_face_detector()


def detect_faces(img, upsample: int = UPSAMPLE) -> list[tuple[int, int, int, int, float]]:
    """Faces in a PIL image: ``[(x1, y1, x2, y2, score)]``, xyxy pixels of ``img``."""
    import numpy as np

    rgb = np.ascontiguousarray(np.asarray(img.convert("RGB")))
    rects, scores, _ = _detector().run(rgb, upsample, 0.0)
    return [(r.left(), r.top(), r.right(), r.bottom(), float(s))
            for r, s in zip(rects, scores, strict=True)]


def blur_region(box: tuple[int, int, int, int], width: int, height: int,
                pad: float = PAD) -> tuple[int, int, int, int]:
    """The area blurred for a detected face: the box grown by ``pad`` per side (more above,
    for forehead and hair), clipped to the image."""
    x1, y1, x2, y2 = box
    w, h = x2 - x1, y2 - y1
    return (max(0, int(x1 - pad * w)), max(0, int(y1 - 1.5 * pad * h)),
            min(width, int(x2 + pad * w + 1)), min(height, int(y2 + pad * h + 1)))


def blur_faces(img, upsample: int = UPSAMPLE):
    """``(copy of img with every detected face blurred, face boxes)`` (PIL, RGB).

    The blur is strong (sigma = a sixth of the region's long side): features gone, not
    softened; a face blurred like this is not detected again."""
    from PIL import ImageFilter

    out = img.convert("RGB")
    faces = detect_faces(out, upsample)
    for f in faces:
        x1, y1, x2, y2 = blur_region(f[:4], out.width, out.height)
        if x2 <= x1 or y2 <= y1:
            continue
        region = out.crop((x1, y1, x2, y2))
        sigma = max(2.0, max(x2 - x1, y2 - y1) / 6)
        out.paste(region.filter(ImageFilter.GaussianBlur(sigma)), (x1, y1))
    return out, faces
