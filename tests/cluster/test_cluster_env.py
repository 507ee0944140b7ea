"""One environment for the whole cluster: the image cluster/Dockerfile builds from the GPU lock.

For every file under cluster/ (and the Makefile's submit paths) this builds the set of packages
a node would run with: the lock the Dockerfile installs, plus whatever a runtime_env's `pip`
or the cluster launcher's setup commands install on top. Every package named anywhere must be
pinned at the lock's version (an unpinned `peft` resolves whatever PyPI has that day, e.g. a
transformers outside our range), every third-party import of our code must be satisfied by the
set, every manifest must run the one image, and the launcher must start Ray from that
environment (not from whatever `ray` is on the AMI's PATH).
"""

from __future__ import annotations

import json
import re
import shlex
import tomllib
from pathlib import Path

import pytest
import yaml
from envs import OUR_PACKAGES, ROOT, canonical, distribution_of, read_lock, third_party_imports

CLUSTER = ROOT / "cluster"
BASE_IMAGE = "rayproject/ray:2.60.0-py311-gpu"
# Files that start containers (or launcher nodes) of their own; the others run on those.
WITH_IMAGES = {"raycluster.yaml", "rayjob-label.yaml", "rayservice.yaml", "retrain-cronjob.yaml",
               "cluster-launcher.yaml"}
MANIFESTS = sorted(p.name for p in CLUSTER.glob("*.yaml"))


def the_image() -> str:
    """The image every node runs: the Makefile's IMAGE, at pyproject.toml's version (the one
    documented place, cluster/README.md)."""
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    m = re.search(r"^IMAGE \?= (\S+)$", (ROOT / "Makefile").read_text(), re.M)
    assert m, "the Makefile names the cluster image: IMAGE ?= ..."
    return m.group(1).replace("$(VERSION)", version)


def dockerfile() -> str:
    path = CLUSTER / "Dockerfile"
    assert path.exists(), "cluster/Dockerfile builds the one cluster image"
    return path.read_text()


def image_lock() -> tuple[str, dict[str, str]]:
    """The lock the Dockerfile installs (as pinned) and its pins."""
    text = dockerfile()
    installs = [line for line in _run_lines(text) if re.search(r"\bpip install\b", line)]
    locks = {m for line in installs for m in re.findall(r"-r\s+(\S+\.lock\.txt)", line)}
    assert locks == {"requirements/gpu.lock.txt"}, installs
    for line in installs:
        if "-r requirements/gpu.lock.txt" in line:
            assert "--no-deps" in line, f"the lock is installed as pinned: {line}"
    return "requirements/gpu.lock.txt", read_lock(ROOT / "requirements" / "gpu.lock.txt")


def _run_lines(dockerfile_text: str) -> list[str]:
    """The shell commands of the RUN instructions (continuations joined, split at &&)."""
    joined = re.sub(r"\\\n", " ", dockerfile_text)
    out = []
    for line in joined.splitlines():
        if line.strip().startswith("RUN "):
            out += [c.strip() for c in line.strip()[4:].split("&&")]
    return out


def _walk(node, key: str):
    """Every value of ``key`` anywhere in a parsed YAML document."""
    if isinstance(node, dict):
        for k, v in node.items():
            if k == key:
                yield v
            yield from _walk(v, key)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v, key)


def images_of(name: str) -> list[str]:
    doc = yaml.safe_load((CLUSTER / name).read_text())
    found = [v for v in _walk(doc, "image") if isinstance(v, str)]
    docker = doc.get("docker") if isinstance(doc, dict) else None
    if docker and docker.get("image"):
        found.append(docker["image"])
    return found


def runtime_envs(name: str) -> list[dict]:
    """The runtime envs a manifest passes: runtimeEnvYAML, a Serve app's runtime_env, a
    `--runtime-env-json` or `--runtime-env FILE` of a `ray job submit`, the file itself."""
    doc = yaml.safe_load((CLUSTER / name).read_text())
    envs: list[dict] = []
    if name == "runtime-env.yaml":
        return [doc]
    for text in _walk(doc, "runtimeEnvYAML"):
        envs.append(yaml.safe_load(text))
    for text in _walk(doc, "serveConfigV2"):
        envs += [a.get("runtime_env") or {} for a in yaml.safe_load(text)["applications"]]
    if "applications" in doc:
        envs += [a.get("runtime_env") or {} for a in doc["applications"]]
    for cmd in _walk(doc, "command"):
        if "--runtime-env-json" in cmd:
            envs.append(json.loads(cmd[cmd.index("--runtime-env-json") + 1]))
    return envs


def launcher_installs() -> list[str]:
    """The cluster launcher's commands that install packages."""
    doc = yaml.safe_load((CLUSTER / "cluster-launcher.yaml").read_text())
    cmds = [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                          "worker_setup_commands") for c in doc.get(key) or []]
    return [c for c in cmds if re.search(r"pip install|make install", c)]


def _requirement(spec: str, lock: dict[str, str], where: str) -> str:
    m = re.fullmatch(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)(\[[^\]]*\])?\s*==\s*([^\s;]+)\s*", spec)
    assert m, f"{where}: {spec!r} is not pinned (name==version from the lock)"
    name, version = canonical(m.group(1)), m.group(3)
    assert lock.get(name) == version, \
        f"{where}: {spec!r} is not the lock's version ({name}=={lock.get(name)})"
    return name


def environment_of(name: str) -> set[str]:
    """The packages a manifest's processes run with: the image's lock + what it adds."""
    _, lock = image_lock()
    packages = set(lock)
    for env in runtime_envs(name):
        pip = env.get("pip") or []
        if isinstance(pip, dict):
            pip = pip.get("packages", [])
        for spec in pip:
            if spec.startswith("-r"):
                assert spec.split()[-1].endswith("requirements/gpu.lock.txt"), (name, spec)
                continue
            packages.add(_requirement(spec, lock, name))
    if name == "cluster-launcher.yaml":
        for cmd in launcher_installs():
            assert "requirements/gpu.lock.txt" in cmd or "make install-gpu" in cmd, cmd
            assert ".[gpu" not in cmd, cmd
    return packages


def test_the_dockerfile_builds_on_ray_and_installs_the_lock_and_our_code():
    text = dockerfile()
    assert re.search(rf"^FROM {re.escape(BASE_IMAGE)}\s*$", text, re.M), "FROM " + BASE_IMAGE
    _, lock = image_lock()
    assert lock["ray"] == "2.60.0" and lock["vllm"]
    for pkg in OUR_PACKAGES:  # Serve's proxy imports serve.gate from the image, no working_dir
        assert re.search(rf"^COPY .*\b{pkg}\b", text, re.M), f"the image carries {pkg}/"
    runs = _run_lines(text)
    assert any(re.search(r"pip install .*--no-deps.* \.(\s|$)", r) for r in runs), runs
    ignore = (ROOT / ".dockerignore").read_text().split()
    assert {".venv*", "models", ".git"} <= set(ignore), "the build context leaves out venvs"


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_manifest_runs_the_one_image(name):
    images = images_of(name)
    if name in WITH_IMAGES:
        assert images, f"{name} names its image"
    assert set(images) <= {the_image()}, f"{name}: {sorted(set(images))} != {the_image()}"


def test_the_image_is_documented_and_built_by_make():
    text = (ROOT / "Makefile").read_text()
    assert re.search(r"^image:", text, re.M) and "-f cluster/Dockerfile" in text
    readme = (CLUSTER / "README.md").read_text()
    assert "make image" in readme and "docker push" in readme
    assert re.sub(r"\d+\.\d+\.\d+", "<version>", the_image()) in readme


@pytest.mark.parametrize("name", MANIFESTS)
def test_every_package_is_pinned_and_our_imports_are_satisfied(name):
    packages = environment_of(name)
    missing = [f"{distribution_of(m, 'gpu')} (import {m} in {files[0]})"
               for m, files in sorted(third_party_imports().items())
               if distribution_of(m, "gpu") not in packages]
    assert not missing, f"{name}: not installed: {missing}"


def test_runtime_envs_install_nothing_on_top_of_the_image():
    """One environment: no runtime_env pip list anywhere (three CUDA stacks per node, each
    resolved on the day), the code comes from the image (or `ray job submit --working-dir`)."""
    for name in MANIFESTS:
        for env in runtime_envs(name):
            assert not env.get("pip") and not env.get("uv") and not env.get("conda"), (name, env)


def test_the_launcher_starts_ray_from_the_environment_it_installed():
    doc = yaml.safe_load((CLUSTER / "cluster-launcher.yaml").read_text())
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for c in doc[key] if re.search(r"\bray start\b", c)]
    assert len(starts) == 2
    docker = doc.get("docker") or {}
    if docker.get("image"):
        # every command runs inside the container: PATH's ray is the image's (the lock's)
        assert docker["image"] == the_image()
        assert not launcher_installs(), "nothing is installed over the image"
        for c in starts:
            assert shlex.split(c)[0] == "ray", c
    else:
        installs = launcher_installs()
        assert installs, "the launcher installs the lock"
        venvs = {m for c in installs for m in re.findall(r"--python (\S+)/bin/python", c)} \
            or {".venv"}
        for c in starts:
            exe = shlex.split(c)[0]
            assert any(Path(exe).parent == Path(v) / "bin" or exe.endswith(f"{v}/bin/ray")
                       for v in venvs), f"{c!r} does not run the installed environment's ray"


def test_make_submit_uses_the_image_environment():
    """`make submit-*` ships only the code (--working-dir) and env vars: the packages are the
    nodes' (the image)."""
    env = yaml.safe_load((CLUSTER / "runtime-env.yaml").read_text())
    assert set(env) <= {"env_vars", "working_dir", "excludes"}, env


def test_the_launcher_config_is_valid_for_ray():
    """Ray's own schema of cluster launcher configs (shipped in the ray wheel) accepts it,
    `docker:` section included."""
    jsonschema = pytest.importorskip("jsonschema")
    import ray.autoscaler

    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(yaml.safe_load((CLUSTER / "cluster-launcher.yaml").read_text()), schema)
