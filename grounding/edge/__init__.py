"""Edge deployment: an exported ONNX model folder run with onnxruntime and numpy alone
(no torch, vLLM or Ray). See docs/edge.md."""

class ExportError(ValueError):
    """An ONNX export or export folder refused before any work: a checkpoint the exporter
    cannot handle, an adapter of another base, a folder from another groundlabel version."""


FORMAT = 1
"""Version of the export folder's layout (manifest.json's ``format``)."""


def groundlabel_version() -> str:
    """The installed groundlabel's version (the runner refuses a folder from another)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("groundlabel")
    except PackageNotFoundError:  # a source checkout that was never installed
        return "0+unknown"
