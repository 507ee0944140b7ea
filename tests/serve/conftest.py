"""Serve tests: the request gate (serve/gate.py) goes in front of Ray Serve's proxy, as
``groundlabel serve`` and cluster/rayservice.yaml install it. Ray's proxy reads the two
variables from its own environment, which a local Ray inherits when it starts (tests/conftest.py
``ray_local``), so they are set here, at collection, before any fixture starts Ray. A module's
fixture writes its gate settings with the ``proxy_gate`` fixture; until then the proxy's gate
only refuses Ray's own headers."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

# serve.gate's PROXY_CALLBACK_ENV, PROXY_CALLBACK and GATE_ENV.
os.environ.setdefault("RAY_SERVE_HTTP_PROXY_CALLBACK_IMPORT_PATH", "serve.gate:proxy_middlewares")
os.environ.setdefault("GROUNDLABEL_GATE",
                      str(Path(tempfile.mkdtemp(prefix="gl-gate-")) / "gate.json"))


@pytest.fixture(scope="session")
def proxy_gate():
    """``write(cfg)``: the proxy's gate takes ``cfg``'s settings (its ServeConfig)."""

    def write(cfg) -> None:
        raw = os.environ["GROUNDLABEL_GATE"]
        if hasattr(cfg, "gate_settings") and not raw.startswith("{"):
            tmp = Path(raw).with_suffix(".tmp")
            tmp.write_text(cfg.gate_settings().model_dump_json())
            tmp.replace(raw)

    return write


@pytest.fixture(scope="module", autouse=True)
def _no_proxy_gate_settings_from_another_module():
    """Each module starts with no gate settings (a module that wants them writes its own)."""
    raw = os.environ["GROUNDLABEL_GATE"]
    if not raw.startswith("{"):
        Path(raw).unlink(missing_ok=True)
    yield
