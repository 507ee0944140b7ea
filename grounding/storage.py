"""Object storage through fsspec: ``s3://`` via s3fs (any S3-compatible endpoint) and local paths.

The one place for storage: `StorageOptions` is the settings group every verb that touches
storage composes (``--s3-endpoint-url``, ``--s3-region``, ``--s3-anon``, declared here once), and
`filesystem` is the one function that turns a URI into a filesystem. The same options object
travels to every Ray worker, so they reach the same endpoint; credentials come from the
environment (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``, ``AWS_PROFILE`` or an instance
role), never from flags or files in the repository.
"""

from __future__ import annotations

from pydantic import BaseModel, Field


class StorageOptions(BaseModel):
    """Storage: how to reach object storage (s3:// URIs); local paths need nothing."""

    s3_endpoint_url: str | None = Field(None, description="S3-compatible endpoint for s3:// "
                                        "URIs (MinIO, moto, R2 ...); default: AWS. Credentials "
                                        "come from AWS_* environment variables or a role.")
    s3_region: str | None = Field(None, description="S3 region (default: from the environment "
                                  "or the endpoint).")
    s3_anon: bool = Field(False, description="Anonymous S3 access (public buckets).")

    def fsspec_kwargs(self, uri: str) -> dict:
        """Keyword arguments for ``fsspec.open``/``url_to_fs`` of ``uri`` (none for local)."""
        if not isinstance(uri, str) or not uri.startswith(("s3://", "s3a://")):
            return {}
        kw: dict = {"anon": self.s3_anon}
        client: dict = {}
        if self.s3_endpoint_url:
            client["endpoint_url"] = self.s3_endpoint_url
        if self.s3_region:
            client["region_name"] = self.s3_region
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


def folder_files(path) -> dict[str, bytes]:
    """The plain files of a (small) local folder, e.g. an adapter, by name: what a Ray task on
    another node needs, since the folder itself exists only on this node."""
    from pathlib import Path

    return {f.name: f.read_bytes() for f in Path(path).iterdir() if f.is_file()}


def write_folder(files: dict[str, bytes], dest) -> str:
    """`folder_files` written back as folder ``dest`` (created); returns its path."""
    from pathlib import Path

    Path(dest).mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (Path(dest) / name).write_bytes(data)
    return str(dest)
