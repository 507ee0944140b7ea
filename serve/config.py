"""Settings of the online endpoint (``groundlabel serve``; also the ``args`` of a ``serve run``
config, see cluster/serve-config.yaml)."""

from __future__ import annotations

from pydantic import Field, field_validator, model_validator

from grounding.engines.base import EngineConfig
from grounding.settings import RaySettings, Settings
from grounding.storage import StorageOptions


class ServeConfig(Settings):
    """The endpoint: model, adapters, guards, batching."""

    inference: EngineConfig = Field(default_factory=EngineConfig,
                                    description="The model and engine each replica runs.")
    registry: str | None = Field(None, description="Adapter registry (folder or s3://) to "
                                 "follow: its production adapter is served by default and "
                                 "swapped in within poll_s of a promotion or rollback.")
    adapters_dir: str | None = Field(None, description="Folder of adapter folders, when there "
                                     "is no registry; requests name them by folder name.")
    poll_s: float = Field(1.0, gt=0, description="How often the registry pointer is read.")
    api_keys_env: str = Field("GROUNDLABEL_API_KEYS", description="Environment variable with "
                              "comma-separated API keys, read in each replica's (and the "
                              "proxy's) own process environment when api_keys_file is unset. "
                              "Never copied into a runtime_env (Ray's dashboard shows those). "
                              "Unset or empty is refused unless the endpoint listens on "
                              "loopback only or --insecure-no-auth is given.")
    api_keys_file: str | None = Field(None, description="File with the API keys (one a line, "
                                      "or comma-separated), read by the replicas and the "
                                      "proxy's gate: the path of a mounted Kubernetes Secret. "
                                      "Re-read when it changes. Takes precedence over "
                                      "api_keys_env.")
    insecure_no_auth: bool = Field(False, description="Serve WITHOUT API keys on a non-loopback "
                                   "host (a warning is logged). Without this flag the endpoint "
                                   "refuses to start when no keys are set and it is reachable "
                                   "from other machines.")
    metrics_public: bool = Field(False, description="Answer GET /metrics without an API key. "
                                 "Off by default: with keys set, a scraper sends one "
                                 "(Authorization: Bearer); /healthz and /readyz are always "
                                 "public.")
    max_body_bytes: int = Field(8 * 1024 * 1024, ge=1024, description="Larger request bodies "
                                "are refused with 413.")
    max_image_pixels: int = Field(16_000_000, ge=1, description="Decoded images above this "
                                  "many pixels are refused with 413.")
    max_text_chars: int = Field(1000, ge=1, description="Longest referring expression.")
    body_timeout_s: float = Field(10.0, gt=0, description="Deadline to receive a request's "
                                  "whole body, from its headers; a client still sending is "
                                  "answered 408 and its connection closed.")
    request_timeout_s: float = Field(60.0, gt=0, description="Deadline of a whole request "
                                     "(Serve's proxy answers 408 and cancels it in the "
                                     "replica; the replica enforces it too).")
    max_requests_per_key: int = Field(32, ge=1, description="Requests one API key may have in "
                                      "flight at once (per proxy and per replica); more are "
                                      "answered 429 before their body is read.")
    cpu_workers: int = Field(2, ge=1, description="Threads per replica for the CPU work of a "
                             "request (JSON parsing, image decoding, token counting), and the "
                             "most requests doing it at once: the event loop only routes.")
    allowed_uri_prefixes: list[str] = Field(default_factory=list, description="Image URIs a "
                                            "request may name: same scheme, host and port as "
                                            "one of these, and a path under its folder (e.g. "
                                            "s3://bucket/images/); no user@host, no '..', no "
                                            "redirects. Empty = base64 images only.")
    max_batch_size: int = Field(32, ge=1, description="Requests batched into one engine call.")
    batch_wait_ms: float = Field(10.0, ge=0, description="How long a batch waits to fill.")
    num_replicas: int = Field(1, ge=1, description="Serve replicas (one engine each).")
    num_cpus: float = Field(1.0, gt=0, description="CPUs per replica.")
    num_gpus: float = Field(0.0, ge=0, description="GPUs per replica (default: "
                            "--tensor-parallel-size when that is over 1).")
    host: str = Field("127.0.0.1", description="HTTP host of Serve's proxy.")
    port: int = Field(8000, ge=1, le=65535, description="HTTP port of Serve's proxy.")
    storage: StorageOptions = Field(default_factory=StorageOptions,
                                    description="Object storage for the registry and images.")
    ray: RaySettings = Field(default_factory=RaySettings, description="The Ray cluster.")

    def api_keys(self) -> list[str]:
        """The API keys: from ``api_keys_file`` when set, else from this process's
        environment (``api_keys_env``), stripped."""
        from serve.gate import read_api_keys

        return read_api_keys(self.api_keys_env, self.api_keys_file)

    def gate_settings(self):
        """The settings of the request gate (`serve.gate`) in the proxy and the replicas: key
        source (never the keys), limits and deadlines."""
        from serve.gate import GateSettings
        from serve.guards import max_json_values

        keyed = ["/v1/"] + ([] if self.metrics_public else ["/metrics"])
        return GateSettings(api_keys_env=self.api_keys_env, api_keys_file=self.api_keys_file,
                            keyed_prefixes=keyed, max_body_bytes=self.max_body_bytes,
                            body_timeout_s=self.body_timeout_s,
                            request_timeout_s=self.request_timeout_s,
                            max_requests_per_key=self.max_requests_per_key,
                            max_json_values=max_json_values(self.max_text_chars))

    def auth_refusal(self, host: str) -> str | None:
        """Why the endpoint must not start without keys when its proxy listens on ``host``
        (None: it may). No keys is allowed on a loopback host, or with ``insecure_no_auth``."""
        if self.api_keys() or self.insecure_no_auth or is_loopback(host):
            return None
        return (f"no API keys: set {self.api_keys_env} (comma-separated keys) in the "
                f"replicas' environment or name a file of keys with --api-keys-file, or pass --insecure-no-auth (insecure_no_auth: true) "
                f"to serve without authentication on {host!r}, which is not a loopback address")

    @model_validator(mode="after")
    def _gpus_follow_tensor_parallel(self) -> ServeConfig:
        self.num_gpus = self.inference.actor_gpus(self.num_gpus, "--num-gpus")
        return self

    @field_validator("allowed_uri_prefixes")
    @classmethod
    def _prefixes_parse(cls, v: list[str]) -> list[str]:
        from serve.guards import UriAllowList

        try:
            UriAllowList(v)
        except ValueError as e:
            raise ValueError(f"--allowed-uri-prefixes: {e}") from None
        return v


def is_loopback(host: str | None) -> bool:
    """True for a host only this machine reaches (127.0.0.0/8, ::1, localhost); False for
    0.0.0.0, ::, names and anything unknown."""
    import ipaddress

    if not host:
        return False
    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
