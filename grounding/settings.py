"""The one settings layer: typed groups that every verb's config composes.

A verb's config is a `Settings` model. Its plain fields are the verb's own; its *group* fields
are shared pieces declared once:

* `grounding.storage.StorageOptions` (``--s3-endpoint-url``, ``--s3-region``, ``--s3-anon``),
* `RaySettings` (``--ray-address``, ``--ray-num-cpus``, and the one `RaySettings.connect`),
* `grounding.engines.base.EngineConfig` (``--model``, ``--family``, ``--engine``, pixels,
  ``--max-model-len``, ...).

Groups are *flat* on the outside: their fields are flags and YAML keys of the verb itself
(``--s3-region``, ``s3_region: eu-west-1``), and a nested mapping under the group's name
(``storage: {s3_region: ...}``) loads too. Flags, YAML files and Python all build the same
object: ``LabelJobConfig(input=..., output=..., s3_region="eu-west-1")``. The command line
(`groundlabel.flags`) generates one flag per field, with the field's description as its help.

Shared fields that are not a group (the registry, the store, ...) are annotated types declared
here once and reused, so their description is written once too.
"""

from __future__ import annotations

import os
import typing
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


def group_type(annotation: Any) -> type[BaseModel] | None:
    """The settings-group model of a field annotation, or None for a plain field."""
    if typing.get_origin(annotation) is typing.Annotated:
        annotation = typing.get_args(annotation)[0]
    if isinstance(annotation, type) and issubclass(annotation, BaseModel) \
            and not issubclass(annotation, Settings):
        return annotation
    return None


class Settings(BaseModel):
    """Base of every verb's config: flat group fields, unknown keys refused (a misspelt YAML key
    or Python argument is an error, not silently ignored)."""

    model_config = ConfigDict(extra="forbid")

    @classmethod
    def groups(cls) -> dict[str, type[BaseModel]]:
        """``{field name: group model}`` of this config's settings groups."""
        out = {}
        for name, f in cls.model_fields.items():
            g = group_type(f.annotation)
            if g is not None:
                out[name] = g
        return out

    @classmethod
    def flat_fields(cls) -> dict[str, Any]:
        """Every flag-level field: ``{name: FieldInfo}``, group fields lifted to the top."""
        out: dict[str, Any] = {}
        groups = cls.groups()
        for name, f in cls.model_fields.items():
            if name in groups:
                out.update(groups[name].model_fields)
            else:
                out[name] = f
        return out

    @classmethod
    def __pydantic_init_subclass__(cls, **kw) -> None:
        # Flat names must be unique, or a flag would be ambiguous: fail at import time.
        seen: dict[str, str] = {}
        for gname, g in cls.groups().items():
            for f in g.model_fields:
                clash = seen.get(f) or (f if f in cls.model_fields else None)
                if clash:
                    raise TypeError(f"{cls.__name__}: field {f!r} of group {gname!r} clashes "
                                    f"with {clash!r}")
                seen[f] = gname

    @model_validator(mode="before")
    @classmethod
    def _lift_flat_keys(cls, data: Any) -> Any:
        """Gather flat group keys (``s3_region=...``) into their group (``storage``)."""
        if not isinstance(data, dict):
            return data
        data = dict(data)
        for gname, g in cls.groups().items():
            sub = data.get(gname)
            if isinstance(sub, BaseModel):
                sub = sub.model_dump(exclude_unset=True)
            sub = dict(sub or {})
            for k in g.model_fields:
                if k in data:
                    sub[k] = data.pop(k)  # flat keys win over a nested mapping
            if sub or gname in data:
                data[gname] = sub
        return data


class RaySettings(BaseModel):
    """Ray: which cluster to run on. `connect` is the one way any verb reaches Ray."""

    ray_address: str | None = Field(
        None, description="Ray cluster to attach to (HOST:PORT, ray://HOST:10001 or auto). "
        "Default: RAY_ADDRESS when set (as under `ray job submit`), else a private local Ray.")
    ray_num_cpus: int | None = Field(
        None, ge=1, description="CPUs a private local Ray may schedule (default: max(4, "
        "cores): engines and workers use one thread each). Ignored on a cluster.")

    def address(self) -> str | None:
        """The cluster address to attach to, or None for a private local Ray."""
        return self.ray_address or os.environ.get("RAY_ADDRESS") or None

    def connect(self, log_to_driver: bool = True) -> str:
        """Attach to the configured cluster, or start a private local Ray; returns the address
        of the GCS this process is connected to. A no-op when Ray is already initialised.

        Without an address this starts ``address="local"``: it never attaches by accident to
        another Ray running on the machine (plain ``ray.init()`` would). Under ``ray job
        submit`` the entrypoint has ``RAY_ADDRESS`` set, so the job runs on that cluster and
        reaches its GPU workers.
        """
        import ray

        if not ray.is_initialized():
            address = self.address()
            if address:
                ray.init(address=address, log_to_driver=log_to_driver)
            else:
                ray.init(address="local", num_cpus=self.ray_num_cpus or max(4, os.cpu_count() or 1),
                         include_dashboard=False, log_to_driver=log_to_driver)
        return ray.get_runtime_context().gcs_address


# ---- Shared fields that are not groups: one description each, reused by every verb ----------
RegistryURI = Annotated[str, Field(description="Adapter registry (folder or s3://): immutable "
                                   "adapter names, their metrics, the production pointer and "
                                   "the calibrations.")]
StoreURI = Annotated[str, Field(description="Reviewed-label store (folder or s3://).")]
JobOutputURI = Annotated[str, Field(description="Job output folder (local or s3://), as "
                                    "written by `groundlabel label`.")]
StoreVersion = Annotated[int | None, Field(ge=1, description="Store version (default: newest).")]
EmbedImages = Annotated[bool, Field(description="Put each image in the file as a metadata-free "
                                    "PNG data: URI (default: references only; image bytes never "
                                    "leave unless asked).")]
BlurFaces = Annotated[bool, Field(description="Blur detected faces in every image written out "
                                  "(embedded images, report thumbnails); boxes are unchanged "
                                  "(`grounding.faces`).")]

