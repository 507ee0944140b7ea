"""Object storage through fsspec: ``s3://`` via s3fs (any S3-compatible endpoint) and local paths.

One function gives the filesystem for a URI; the same ``StorageOptions`` travel to every Ray
worker, so they reach the same endpoint with credentials from the environment (never from
files in the repository).
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class StorageOptions(BaseModel):
    """How to reach object storage. Credentials come from the environment
    (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` or an instance role)."""

    endpoint_url: str | None = Field(None, description="S3 endpoint (MinIO, moto, R2 ...); "
                                     "None means AWS.")
    region: str | None = Field(None, description="S3 region.")
    anon: bool = Field(False, description="Anonymous access (public buckets).")

    def fsspec_kwargs(self, uri: str) -> dict:
        if not uri.startswith(("s3://", "s3a://")):
            return {}
        kw: dict = {"anon": self.anon}
        client: dict = {}
        if self.endpoint_url:
            client["endpoint_url"] = self.endpoint_url
        if self.region:
            client["region_name"] = self.region
        if client:
            kw["client_kwargs"] = client
        return kw


def filesystem(uri: str, options: StorageOptions | None = None):
    """``(fsspec filesystem, path without scheme)`` for a URI or local path."""
    import fsspec

    options = options or StorageOptions()
    fs, path = fsspec.core.url_to_fs(uri, **options.fsspec_kwargs(uri))
    return fs, path


def arrow_filesystem(uri: str, options: StorageOptions | None = None):
    """``(pyarrow filesystem, path)`` wrapping fsspec, for Ray Data / pyarrow readers and writers."""
    from pyarrow.fs import FSSpecHandler, PyFileSystem

    fs, path = filesystem(uri, options)
    return PyFileSystem(FSSpecHandler(fs)), path


def join(base: str, *parts: str) -> str:
    return "/".join([base.rstrip("/"), *[p.strip("/") for p in parts]])
