"""The thin verbs: each takes its typed config and calls into its package.

Configs of verbs that exist only on the command line (the registry's steps, ``parse``, ``synth``,
``tiny build``) are declared here; every other config lives beside the code it configures.
Heavy imports stay inside the functions.
"""

from __future__ import annotations

import json
from typing import Literal

from pydantic import Field

from grounding.settings import RegistryURI, Settings
from grounding.storage import StorageOptions
from grounding.tinymodel import TinyModelConfig


# ---- the loop -------------------------------------------------------------------------------
def label(cfg) -> int:
    from pipelines.label import label as run

    summary = run(cfg)
    return 0 if summary["rows"] == summary["unique_rows"] else 1


def serve(cfg) -> None:
    from serve.run import start

    start(cfg)


def schedule(cfg) -> None:
    from train.schedule import run

    run(cfg)


def demo(cfg) -> None:
    from pipelines.demo import run

    run(cfg)


# ---- the reviewed-label store ---------------------------------------------------------------
class StoreMigrateConfig(Settings):
    """``groundlabel store migrate OLD NEW``."""

    old: str = Field(description="Store of the old layout (data/*.parquet + _log/), folder or "
                     "s3://; read only.", json_schema_extra={"positional": True})
    new: str = Field(description="Where the Delta store goes (folder or s3://): empty, or a "
                     "stopped migration of OLD to resume.", json_schema_extra={"positional": True})
    storage: StorageOptions = Field(default_factory=StorageOptions, description="Object storage.")


def store_migrate(cfg: StoreMigrateConfig) -> dict:
    """Old version k becomes version k, every record kept; prints what was migrated."""
    from grounding.store import migrate

    return migrate(cfg.old, cfg.new, cfg.storage)


# ---- the adapter registry -------------------------------------------------------------------
class AdaptersConfig(Settings):
    """``groundlabel adapters list|history``."""

    registry: RegistryURI
    storage: StorageOptions = Field(default_factory=StorageOptions, description="Object storage.")

    def open(self):
        from grounding.registry import AdapterRegistry

        return AdapterRegistry(self.registry, self.storage)


class AdapterShowConfig(AdaptersConfig):
    """``groundlabel adapters show [NAME]``."""

    name: str | None = Field(None, description="Adapter name (default: production).",
                             json_schema_extra={"positional": True})


class AdapterRollbackConfig(AdaptersConfig):
    """``groundlabel adapters rollback``."""

    reason: str = Field("manual", description="Why (recorded).")
    expected: str | None = Field(None, description="Act only if production is this adapter "
                                 "('base': the base model); default: production as this "
                                 "command reads it. Refused if production moved meanwhile.")
    force: bool = Field(False, description="Commit unconditionally, whatever production is by "
                        "then (recorded as forced, with what it replaced).")
    key: str | None = Field(None, description="Idempotency key: a command re-run with the same "
                            "key is the same event (default: a new one each run).")

    def expect(self) -> dict:
        if self.expected is None:
            return {}
        return {"expected": None if self.expected == "base" else self.expected}


class AdapterPromoteConfig(AdapterRollbackConfig):
    """``groundlabel adapters promote NAME``."""

    name: str = Field(description="Adapter name.", json_schema_extra={"positional": True})


class AdaptersMigrateConfig(Settings):
    """``groundlabel adapters migrate OLD NEW``."""

    old: str = Field(description="Registry of the old layout (meta.json, events/, "
                     "production.json), folder or s3://; read only.",
                     json_schema_extra={"positional": True})
    new: str = Field(description="Where the registry goes (folder or s3://): empty, or a "
                     "stopped migration of OLD to resume.", json_schema_extra={"positional": True})
    storage: StorageOptions = Field(default_factory=StorageOptions, description="Object storage.")


def adapters_migrate(cfg: AdaptersMigrateConfig) -> dict:
    """Every adapter, calibration and event kept, production as it was."""
    from grounding.registry import migrate

    return migrate(cfg.old, cfg.new, cfg.storage)


def adapters_list(cfg: AdaptersConfig) -> str:
    reg = cfg.open()
    prod = reg.production()
    lines = []
    for m in reg.list():
        lines.append(f"{'*' if m['name'] == prod else ' '} {m['name']}  labels v"
                     f"{m.get('snapshot_version')}  {_gate_brief(m.get('gate') or {})}  "
                     f"{m['registered_at']}")
    lines.append(f"production: {prod or '(base model)'}")
    return "\n".join(lines)


def _gate_brief(g: dict) -> str:
    """The gate's verdict in a few words: held-out Acc@0.5 production -> candidate, n, p, the
    earlier-labels (old) and regression scores, and passed or refused."""
    acc = (g.get("candidate") or {}).get("acc@0.5")
    h = g.get("heldout")
    if not h:  # an adapter gated before the paired test: only its own score was recorded
        return f"acc@0.5 {acc}"
    out = (f"acc@0.5 {h.get('production')}->{h.get('candidate')} n={h.get('n')} "
           f"p={h.get('p_better', 1):.2g}")
    for part in ("old", "regression"):
        c = g.get(part) or {}
        if c.get("n"):
            out += f"  {part} {c.get('production')}->{c.get('candidate')}"
    n_reasons = len(g.get("reasons") or [])
    return out + ("  gate passed" if g.get("passed")
                  else f"  refused ({n_reasons} reasons: adapters show)")


def adapters_show(cfg: AdapterShowConfig) -> dict:
    """The adapter's meta: base model, snapshot, replay counts, recipe and the gate's verdict
    (n, both scores, discordant counts, p-values, the rule, unreadable items, reasons)."""
    reg = cfg.open()
    name = cfg.name or reg.production()
    return reg.show(name) if name else {"production": None}


def adapters_promote(cfg: AdapterPromoteConfig) -> str:
    event = cfg.open().promote(cfg.name, cfg.reason, force=cfg.force, key=cfg.key,
                               **cfg.expect())
    return json.dumps({"promoted": cfg.name, "event": event})


def adapters_rollback(cfg: AdapterRollbackConfig) -> str:
    return json.dumps({"production": cfg.open().rollback(cfg.reason, force=cfg.force,
                                                          key=cfg.key, **cfg.expect())})


def adapters_history(cfg: AdaptersConfig) -> list[dict]:
    return cfg.open().events()


# ---- tools ----------------------------------------------------------------------------------
class ParseConfig(Settings):
    """``groundlabel parse``: raw model text -> boxes in original-image pixels."""

    family: str = Field(description="Model family: qwen2_vl, qwen2_5_vl, qwen3_vl, internvl2, "
                        "florence2, paligemma.")
    image_size: tuple[int, int] = Field(description="Original image width and height in pixels.",
                                        json_schema_extra={"metavar": ("W", "H")})
    min_pixels: int | None = Field(None, description="Processor min pixels (Qwen2.5-VL resize).")
    max_pixels: int | None = Field(None, description="Processor max pixels (Qwen2.5-VL resize).")
    factor: int = Field(28, description="patch_size * merge_size of the processor.")
    text: str = Field(description="Raw model output ('-' reads standard input).",
                      json_schema_extra={"positional": True})


def parse(cfg: ParseConfig) -> int:
    import sys

    from grounding.families import get_family
    from grounding.resize import ResizeSpec

    fam = get_family(cfg.family)
    w, h = cfg.image_size
    resize = None
    if fam.needs_resize or cfg.max_pixels or cfg.min_pixels:
        resize = ResizeSpec(min_pixels=cfg.min_pixels or 56 * 56,
                            max_pixels=cfg.max_pixels or 28 * 28 * 1280, factor=cfg.factor)
    text = cfg.text if cfg.text != "-" else sys.stdin.read()
    res = fam.parse(text, (w, h), resize)
    out = {"family": fam.name, "image_size": [w, h], "status": res.status,
           "clipped": res.clipped, "fixed": res.fixed, "dropped": res.dropped,
           "message": res.message,
           "boxes": [b.model_dump(exclude_none=True) for b in res.boxes]}
    print(json.dumps(out, indent=2))
    return 0 if res.boxes or res.status == "empty" else 1


class SynthConfig(Settings):
    """``groundlabel synth``: a synthetic grounding set with true boxes."""

    out: str = Field(description="Output folder.")
    n: int = Field(100, ge=1, description="Number of samples.")
    domain: Literal["base", "shifted", "robust"] = Field(
        "base", description="base: red/green/blue/yellow on grey; shifted: unseen colours; "
        "robust: base colours on varied backgrounds, sizes and aspect ratios.")
    seed: int = Field(0, description="Set seed.")


def synth(cfg: SynthConfig) -> str:
    from grounding.synth import write_dataset

    path = write_dataset(cfg.out, cfg.n, cfg.domain, cfg.seed)
    return f"wrote {cfg.n} {cfg.domain} samples: {path}"


class TinyBuildConfig(Settings):
    """``groundlabel tiny build``."""

    out: str = Field(description="Output folder.")
    model: TinyModelConfig = Field(default_factory=TinyModelConfig,
                                   description="The tiny model's architecture.")


def tiny_build(cfg: TinyBuildConfig) -> str:
    from grounding.tinymodel import build

    return f"tiny Qwen3-VL (random weights) written to {build(cfg.out, cfg.model)}"


def tiny_train(cfg) -> dict:
    from train.base import train

    metrics = train(cfg)
    return {k: metrics[k] for k in ("base", "shifted", "steps", "train_seconds")}
