"""Decoding cost of the worst images the endpoint accepts (issue 27): peak memory and time of
one decode, before the fix (``grounding/images.py`` at the commit before it) and after, at full
size (`grounding.images.decode`) and for a model (`grounding.images.decode_for_model` with the
model's ``max_pixels``: the bundled tiny model's 65,536 and Qwen's usual 28*28*1280).

Each decode runs in a fresh process; its peak RSS is reset after imports and after the file's
bytes are read (``/proc/self/clear_refs``), and the figure is the growth of the peak (``VmHWM``)
over the resident size then (Linux only). Images, all
under the endpoint's 16 M pixel limit (``max_image_pixels``):

* ``png16``: a 16-bit greyscale PNG, 4000x4000, compressed to a few hundred KB;
* ``gif_screen``: a 40-byte GIF whose logical screen is 3999x3999 (one 1x1 frame);
* ``jpeg``: a 4000x4000 noisy RGB JPEG (quality 90);
* ``png_rgb``: a 4000x4000 RGB PNG.

Run::

    .venv/bin/python bench/bench_decode.py --out bench/decode.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "e62835b^"  # the commit before the fix
TARGETS = {"tiny": 65_536, "qwen_1280": 28 * 28 * 1280}


def _inputs(d: Path) -> dict[str, Path]:
    import io
    import struct

    import numpy as np
    from PIL import Image

    out = {}
    a = (np.arange(4000 * 4000, dtype=np.uint32) % 65536).astype(np.uint16).reshape(4000, 4000)
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, format="PNG", compress_level=9)
    out["png16"] = buf.getvalue()
    head = b"GIF89a" + struct.pack("<HH", 3999, 3999) + bytes([0x80, 0, 0]) + b"\0\0\0\xff\xff\xff"
    out["gif_screen"] = (head + b"\x2c" + struct.pack("<HHHH", 0, 0, 1, 1) + b"\0"
                         + b"\x02\x02\x44\x01\x00" + b"\x3b")
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 256, (4000, 4000, 3), np.uint8))
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=90)
    out["jpeg"] = buf.getvalue()
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", compress_level=1)
    out["png_rgb"] = buf.getvalue()
    paths = {}
    for name, data in out.items():
        paths[name] = d / name
        paths[name].write_bytes(data)
    return paths


def _one(path: str, impl: str, target: int | None) -> dict:
    """Run in the child: decode once, report growth of peak RSS and the time."""
    data = Path(path).read_bytes()
    if impl == "before":
        import importlib.util

        spec = importlib.util.spec_from_file_location("images_before", os.environ["GL_BEFORE"])
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        run = lambda: mod.decode(data, 16_000_000)  # noqa: E731
    else:
        from grounding.images import decode, decode_for_model

        if target is None:
            run = lambda: decode(data, 16_000_000)  # noqa: E731
        else:
            run = lambda: decode_for_model(data, target, 16_000_000).image  # noqa: E731
    import numpy  # noqa: F401 - imported before the baseline, as the decode may use it
    from PIL import Image  # noqa: F401

    # Linux keeps ru_maxrss across exec (the parent's peak would show): reset the peak of THIS
    # process instead (clear_refs 5) and read it back from VmHWM.
    Path("/proc/self/clear_refs").write_text("5")
    base = _status("VmRSS")
    t0 = time.perf_counter()
    img = run()
    dt = time.perf_counter() - t0
    peak = _status("VmHWM")
    return {"seconds": round(dt, 3), "peak_rss_growth_mb": round((peak - base) / 1024, 1),
            "decoded_size": list(img.size)}


def _cpu() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _status(field: str) -> int:
    """A /proc/self/status figure in KiB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="bench/decode.json", help="Where the figures go.")
    ap.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        path, impl, target = args.child
        print(json.dumps(_one(path, impl, None if target == "-" else int(target))))
        return

    with tempfile.TemporaryDirectory() as d:
        before = Path(d) / "images_before.py"
        before.write_text(subprocess.run(["git", "show", f"{BEFORE}:grounding/images.py"],
                                         cwd=ROOT, capture_output=True, text=True,
                                         check=True).stdout)
        paths = _inputs(Path(d))
        env = dict(os.environ, GL_BEFORE=str(before), PYTHONPATH=str(ROOT))
        results = []
        runs = [("before", None), ("after_full", None)] + [
            (f"after_model_{k}", v) for k, v in TARGETS.items()]
        for name, path in paths.items():
            for impl, target in runs:
                r = subprocess.run([sys.executable, __file__, "--child", str(path),
                                    "before" if impl == "before" else "after",
                                    "-" if target is None else str(target)],
                                   env=env, capture_output=True, text=True, check=True)
                row = {"image": name, "bytes": path.stat().st_size, "decode": impl,
                       "target_pixels": target, **json.loads(r.stdout.strip().splitlines()[-1])}
                results.append(row)
                print(json.dumps(row))
    out = {"machine": f"{os.cpu_count()} cores, {_cpu()}",
           "python": platform.python_version(), "before": BEFORE, "results": results,
           "command": "bench/bench_decode.py --out " + args.out}
    Path(args.out).write_text(json.dumps(out, indent=2) + "\n")


if __name__ == "__main__":
    main()
