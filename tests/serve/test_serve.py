"""The online endpoint on a real Ray Serve with the vLLM engine: answers, guards, hot-swap under
load with zero failed requests, refusal of a broken adapter, and a 1,000-request fuzz."""

from __future__ import annotations

import base64
import io
import json
import os
import random
import threading
import time

import pytest
import requests
from support import bomb_png, free_port, random_lora

from grounding.registry import AdapterRegistry

pytestmark = pytest.mark.slow
KEY = "test-key-1"


def _png(img) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def svc(ray_local, tiny_model, random_adapter, tmp_path_factory, proxy_gate):
    from ray import serve

    from grounding.synth import make_sample
    from serve.app import build_app
    from serve.config import ServeConfig

    tmp = tmp_path_factory.mktemp("serve")
    reg = AdapterRegistry(str(tmp / "registry"))
    a = reg.register(random_adapter, {"note": "A"}, name="adapter-a")
    b = reg.register(random_lora(tiny_model, tmp / "b", 7), {"note": "B"}, name="adapter-b")
    (tmp / "imgs").mkdir()
    sample = make_sample(3, "base", 0)
    sample.image.save(tmp / "imgs" / "one.png")
    # The keys as a cluster mounts them from a Secret: a file only the service reads.
    (tmp / "api-keys").write_text(f"{KEY}\nother-key\n")
    (tmp / "api-keys").chmod(0o600)
    port = free_port()
    cfg = ServeConfig(registry=str(tmp / "registry"), poll_s=0.5, api_keys_env="GL_TEST_KEYS",
                      api_keys_file=str(tmp / "api-keys"),
                      allowed_uri_prefixes=[str(tmp / "imgs") + "/"], max_body_bytes=2_000_000,
                      max_image_pixels=4_000_000, port=port)
    proxy_gate(cfg)  # the gate in front of Serve's proxy (tests/serve/conftest.py)
    serve.start(http_options={"host": "127.0.0.1", "port": port,
                              "request_timeout_s": cfg.request_timeout_s})
    serve.run(build_app(cfg), name="groundlabel-test", route_prefix="/")
    url = f"http://127.0.0.1:{port}"
    yield {"url": url, "reg": reg, "a": a, "b": b, "tmp": tmp, "sample": sample,
           "b64": base64.b64encode(_png(sample.image)).decode()}
    serve.delete("groundlabel-test")
    serve.shutdown()


def _post(svc, body=None, key=KEY, raw=None, headers=None):
    h = {"X-API-Key": key} if key else {}
    h.update(headers or {})
    if raw is not None:
        return requests.post(f"{svc['url']}/v1/ground", data=raw, headers=h, timeout=120)
    return requests.post(f"{svc['url']}/v1/ground", json=body, headers=h, timeout=120)


def test_answers_base64_and_uri(svc):
    s = svc["sample"]
    r = _post(svc, {"image": svc["b64"], "text": s.text})
    assert r.status_code == 200, r.text
    out = r.json()
    assert out["image_size"] == list(s.image.size) and out["adapter"] is None
    assert out["boxes"] and out["status"] in ("ok", "clipped")
    b = out["boxes"][0]
    assert 0 <= b["x1"] <= b["x2"] <= s.image.size[0] and 0 < b["score"] <= 1
    r2 = _post(svc, {"image": str(svc["tmp"] / "imgs" / "one.png"), "text": s.text})
    assert r2.status_code == 200 and r2.json()["boxes"] == out["boxes"]
    r3 = _post(svc, {"image": "data:image/png;base64," + svc["b64"], "text": s.text,
                     "family": "qwen3_vl"})
    assert r3.status_code == 200
    m = requests.get(f"{svc['url']}/v1/models", headers={"X-API-Key": KEY}, timeout=30).json()
    assert m["family"] == "qwen3_vl" and {x["name"] for x in m["registry"]} >= {"adapter-a"}
    assert requests.get(f"{svc['url']}/healthz", timeout=30).json() == {"status": "ok"}
    assert requests.get(f"{svc['url']}/readyz", timeout=30).status_code == 200
    metrics = requests.get(f"{svc['url']}/metrics", headers={"Authorization": f"Bearer {KEY}"},
                           timeout=30).text
    assert "groundlabel_requests_total" in metrics
    assert "groundlabel_batch_retries_total" in metrics
    assert "groundlabel_engine_rejections_total" in metrics
    spec = requests.get(f"{svc['url']}/openapi.json", timeout=30).json()
    assert "/v1/ground" in spec["paths"]
    body = spec["paths"]["/v1/ground"]["post"]["requestBody"]["content"]["application/json"]
    assert set(body["schema"]["required"]) == {"image", "text"}  # the schema fuzzing starts from
    assert requests.get(f"{svc['url']}/docs", timeout=30).status_code == 200


def _png_b64(w: int, h: int) -> str:
    from PIL import Image

    return base64.b64encode(_png(Image.new("RGB", (w, h), (200, 30, 30)))).decode()


@pytest.mark.parametrize("case", [
    "no_key", "wrong_key", "bearer_ok", "too_big", "bomb", "uri_outside", "uri_metadata",
    "uri_dotdot", "empty_text", "bad_json", "extra_field", "unknown_adapter", "corrupt",
    "wrong_family", "no_route", "nested_json", "deep_json", "wrong_type", "huge_number",
    "wide_image", "tall_image", "long_prompt", "models_no_key", "metrics_no_key",
    "health_no_key"])
def test_guards(svc, case):
    t = svc["sample"].text
    img = svc["b64"]
    allowed = str(svc["tmp"] / "imgs") + "/"
    want = {"no_key": 401, "wrong_key": 401, "bearer_ok": 200, "too_big": 413, "bomb": 413,
            "uri_outside": 403, "uri_metadata": 403, "uri_dotdot": 403, "empty_text": 422,
            "bad_json": 400, "extra_field": 422, "unknown_adapter": 404, "corrupt": 422,
            "wrong_family": 422, "no_route": 404,
            "nested_json": 400,     # nesting past MAX_JSON_DEPTH, inside a plausible body
            "deep_json": 400,       # 50,000 levels: refused before parsing (too many values)
            "wrong_type": 422,      # text is a number
            "huge_number": 400,     # 5,000 digits: past Python's int-parsing limit (4,300)
            "wide_image": 422,      # 402x2 px: aspect ratio 201, over the label job's 200
            "tall_image": 422,      # 2x402 px
            "long_prompt": 413,     # 990 characters, ~3 tokens each: over max_model_len
            "models_no_key": 401,   # /v1/models needs a key when keys are set
            "metrics_no_key": 401,  # metrics_public is off by default
            "health_no_key": 200,   # /healthz and /readyz stay public
            }[case]
    if case == "no_key":
        r = _post(svc, {"image": img, "text": t}, key=None)
    elif case == "wrong_key":
        r = _post(svc, {"image": img, "text": t}, key="nope")
    elif case == "bearer_ok":
        r = _post(svc, {"image": img, "text": t}, key=None,
                  headers={"Authorization": "Bearer other-key"})
    elif case == "too_big":
        r = _post(svc, {"image": "A" * 3_000_000, "text": t})
    elif case == "bomb":
        r = _post(svc, {"image": base64.b64encode(bomb_png()).decode(), "text": t})
    elif case == "uri_outside":
        r = _post(svc, {"image": "/etc/passwd", "text": t})
    elif case == "uri_metadata":
        r = _post(svc, {"image": "http://169.254.169.254/latest/meta-data/", "text": t})
    elif case == "uri_dotdot":
        r = _post(svc, {"image": allowed + "../../etc/passwd", "text": t})
    elif case == "empty_text":
        r = _post(svc, {"image": img, "text": "   "})
    elif case == "bad_json":
        r = _post(svc, raw=b"{not json", headers={"content-type": "application/json"})
    elif case == "extra_field":
        r = _post(svc, {"image": img, "text": t, "evil": 1})
    elif case == "unknown_adapter":
        r = _post(svc, {"image": img, "text": t, "adapter": "no-such-adapter"})
    elif case == "corrupt":
        r = _post(svc, {"image": base64.b64encode(b"\x89PNG\r\n\x1a\n" + b"x" * 200).decode(),
                        "text": t})
    elif case == "wrong_family":
        r = _post(svc, {"image": img, "text": t, "family": "florence2"})
    elif case == "nested_json":
        r = _post(svc, raw=b'{"image": ' + b"[" * 20 + b'"x"' + b"]" * 20 + b', "text": "x"}',
                  headers={"content-type": "application/json"})
    elif case == "deep_json":
        r = _post(svc, raw=b"[" * 50_000 + b"]" * 50_000,
                  headers={"content-type": "application/json"})
    elif case == "wrong_type":
        r = _post(svc, {"image": img, "text": 5})
    elif case == "huge_number":
        r = _post(svc, raw=b'{"image": "x", "text": ' + b"9" * 5000 + b"}",
                  headers={"content-type": "application/json"})
    elif case == "wide_image":
        r = _post(svc, {"image": _png_b64(402, 2), "text": t})
    elif case == "tall_image":
        r = _post(svc, {"image": _png_b64(2, 402), "text": t})
    elif case == "long_prompt":
        r = _post(svc, {"image": img, "text": "\U0001d518\u00e9\u4e2d" * 330})
    elif case == "models_no_key":
        r = requests.get(f"{svc['url']}/v1/models", timeout=30)
    elif case == "metrics_no_key":
        r = requests.get(f"{svc['url']}/metrics", timeout=30)
    elif case == "health_no_key":
        r = requests.get(f"{svc['url']}/readyz", timeout=30)
        assert requests.get(f"{svc['url']}/healthz", timeout=30).status_code == 200
    else:
        r = requests.get(f"{svc['url']}/v2/nothing", timeout=30)
    assert r.status_code == want, (case, r.status_code, r.text)
    if want != 200:
        err = r.json()["error"]
        assert err["code"] and err["message"], r.text
    codes = {"nested_json": "json_too_deep", "deep_json": "json_too_large",
             "wide_image": "bad_aspect_ratio", "tall_image": "bad_aspect_ratio",
             "long_prompt": "prompt_too_long"}
    if case in codes:
        assert r.json()["error"]["code"] == codes[case], r.text


def _expected(svc, adapter):
    r = _post(svc, {"image": svc["b64"], "text": svc["sample"].text, "adapter": adapter})
    assert r.status_code == 200, r.text
    assert r.json()["adapter"] == adapter
    return r.json()["raw_text"]


def test_hot_swap_under_load_fails_nothing(svc):
    reg = svc["reg"]
    want = {None: _expected(svc, None), "adapter-a": _expected(svc, "adapter-a"),
            "adapter-b": _expected(svc, "adapter-b")}
    assert len(set(want.values())) == 3  # three distinguishable answers
    log, stop = [], threading.Event()

    def client():
        while not stop.is_set():
            t = time.time()
            try:
                r = _post(svc, {"image": svc["b64"], "text": svc["sample"].text})
                log.append((t, r.status_code, r.json().get("adapter"), r.json().get("raw_text")))
            except Exception as e:  # noqa: BLE001 - a failed request is what we count
                log.append((t, repr(e), None, None))

    threads = [threading.Thread(target=client) for _ in range(4)]
    for th in threads:
        th.start()
    time.sleep(3)
    switches = {}
    for action in ["adapter-a", "adapter-b", "rollback"]:
        t0 = time.time()
        target = reg.rollback() if action == "rollback" else (reg.promote(action) and action)
        while time.time() - t0 < 30:
            seen = [x for x in log if x[0] > t0 and x[2] == target]
            if seen:
                switches[action] = round(seen[0][0] - t0, 2)
                break
            time.sleep(0.1)
        time.sleep(2)
    stop.set()
    for th in threads:
        th.join(60)
    failed = [x for x in log if x[1] != 200]
    mixed = [x for x in log if x[1] == 200 and want[x[2]] != x[3]]
    report = {"requests": len(log), "failed": len(failed), "mixed": len(mixed),
              "switch_s": switches}
    print("\nhot-swap:", json.dumps(report))
    (svc["tmp"] / "hotswap.json").write_text(json.dumps(report))
    assert not failed and not mixed, report
    assert set(switches) == {"adapter-a", "adapter-b", "rollback"}, report
    assert all(v < 10 for v in switches.values()), report
    assert reg.production() == "adapter-a"  # rolled back from b


def test_broken_adapter_is_refused_and_the_old_one_keeps_serving(svc, tmp_path):
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    reg = svc["reg"]
    before = reg.production()
    broken = tmp_path / "broken"
    shutil.copytree(reg.download("adapter-b", tmp_path / "dl"), broken)
    (broken / "meta.json").unlink()
    w = load_file(broken / "adapter_model.safetensors")
    save_file({k: torch.zeros(3, 5) for k in w}, broken / "adapter_model.safetensors")
    name = reg.register(broken, {"note": "wrong shapes"}, name="adapter-broken")
    reg.promote(name)
    time.sleep(4)
    r = _post(svc, {"image": svc["b64"], "text": svc["sample"].text})
    assert r.status_code == 200 and r.json()["adapter"] == before, r.text
    models = requests.get(f"{svc['url']}/v1/models", headers={"X-API-Key": KEY},
                          timeout=30).json()
    assert models["production"] == before
    # A short stable reason code, never the exception text (paths, shapes, internals).
    assert models["refused"]["adapter-broken"] == "load_failed", models["refused"]
    r = _post(svc, {"image": svc["b64"], "text": "x", "adapter": "adapter-broken"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "unknown_adapter"
    reg.rollback()


def test_fuzz_1000_malformed_requests_no_5xx(svc):
    rng = random.Random(0)
    junk_values = [None, 0, -1, 1e308, "", " ", "x" * 5000, [], {}, [1, 2], {"a": 1}, True,
                   "\x00\xff", "data:image/png;base64,!!!", "s3://other-bucket/x.png",
                   "file:///etc/shadow", "gopher://x", "../../x", "%2e%2e/x", "A" * 70,
                   "/9j/" + "A" * 100, "iVBORw0KGgo" + "=" * 10]
    statuses = []
    for _ in range(1000):
        kind = rng.randrange(6)
        headers = {"X-API-Key": KEY}
        if kind == 0:
            body = bytes(rng.randrange(256) for _ in range(rng.randrange(0, 300)))
            r = _post(svc, raw=body, headers={"content-type": rng.choice(
                ["application/json", "text/plain", "application/octet-stream", ""])})
        elif kind == 1:
            obj = {k: rng.choice(junk_values) for k in rng.sample(
                ["image", "text", "adapter", "family", "extra"], rng.randrange(0, 5))}
            r = _post(svc, obj)
        elif kind == 2:
            r = _post(svc, rng.choice(junk_values))
        elif kind == 3:
            r = _post(svc, {"image": rng.choice(junk_values), "text": "the red circle"})
        elif kind == 4:
            r = _post(svc, {"image": svc["b64"][: rng.randrange(1, 400)], "text": "x"})
        else:
            method = rng.choice(["GET", "PUT", "DELETE", "PATCH", "POST"])
            path = rng.choice(["/v1/ground", "/v1/models", "/", "/v1/ground/x", "/%00",
                               "/v1/" + "a" * 300])
            r = requests.request(method, svc["url"] + path, headers=headers,
                                 data=b"{}" if method != "GET" else None, timeout=60)
        statuses.append(r.status_code)
    assert not [s for s in statuses if s >= 500], sorted(set(statuses))
    assert requests.get(f"{svc['url']}/healthz", timeout=30).status_code == 200
    assert _post(svc, {"image": svc["b64"], "text": svc["sample"].text}).status_code == 200
    print("\nfuzz statuses:", {s: statuses.count(s) for s in sorted(set(statuses))})


def test_property_based_fuzz_no_5xx_and_still_healthy(svc):
    """Requests generated from the endpoint's own OpenAPI schema and beyond it (see
    serve_fuzz.py): not one 5xx, every error a JSON error with a code, and afterwards the
    endpoint is healthy and answers a normal request. GL_FUZZ_EXAMPLES sets the size (the
    larger run: bench/bench_fuzz.py)."""
    from hypothesis import HealthCheck, given, settings
    from serve_fuzz import requests_

    url = svc["url"]
    spec = requests.get(f"{url}/openapi.json", timeout=30).json()
    seen: dict[str, dict[int, int]] = {}

    @settings(max_examples=int(os.environ.get("GL_FUZZ_EXAMPLES", "150")), deadline=None,
              database=None, derandomize=True, suppress_health_check=list(HealthCheck))
    @given(requests_(spec, str(svc["tmp"] / "imgs") + "/", KEY))
    def one(req):
        r = requests.post(f"{url}/v1/ground", data=req.body, headers=req.headers, timeout=120)
        by_kind = seen.setdefault(req.kind, {})
        by_kind[r.status_code] = by_kind.get(r.status_code, 0) + 1
        assert r.status_code < 500, (r.status_code, r.text[:300], req.body[:300])
        if r.status_code >= 400:
            assert r.json()["error"]["code"], r.text

    one()
    print("\nproperty fuzz statuses by kind:", json.dumps(seen, sort_keys=True))
    assert requests.get(f"{url}/healthz", timeout=30).status_code == 200
    assert requests.get(f"{url}/readyz", timeout=30).status_code == 200
    r = _post(svc, {"image": svc["b64"], "text": svc["sample"].text})
    assert r.status_code == 200 and r.json()["boxes"], r.text


def test_replicas_read_the_host_serve_really_listens_on(svc):
    """The replica's auth check asks Serve's controller for the proxy host (a `serve deploy`
    config sets it in http_options, apart from our args): here loopback, so a replica without
    keys may start; unknown would count as exposed."""
    import ray

    from serve.app import _proxy_host
    from serve.config import ServeConfig

    cfg = ServeConfig(api_keys_env="GL_UNSET_KEYS")
    host = ray.get(ray.remote(num_cpus=0)(_proxy_host).remote(cfg))
    assert host == "127.0.0.1"
    assert cfg.auth_refusal(host) is None and cfg.auth_refusal("0.0.0.0")


@pytest.mark.parametrize("name", ["../adapter-a", "adapter-a/", "./adapter-a", "a/b", "x" * 101,
                                  ".hidden", "a..b", "é"])
def test_an_invalid_adapter_name_is_422_before_storage(svc, name):
    r = _post(svc, {"image": svc["b64"], "text": "x", "adapter": name})
    assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_adapter_name", r.text


def test_an_adapter_failing_its_probe_never_answers_and_leaves_no_trace(svc, tmp_path):
    """An adapter that passes the folder checks but that vLLM refuses at load time (DoRA): the
    probe fails. Concurrent requests naming it while it is probed are all 404 (none reaches the
    engine with it), the engine's adapter list lacks it afterwards, and the refusal is one
    ``serve-refuse`` event for this replica however many requests named it."""
    import shutil
    from concurrent.futures import ThreadPoolExecutor

    reg = svc["reg"]
    dora = tmp_path / "dora"
    shutil.copytree(reg.download("adapter-b", tmp_path / "dl"), dora)
    (dora / "meta.json").unlink()
    cfg = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps(dict(cfg, use_dora=True)))
    name = reg.register(dora, {"note": "DoRA: vLLM refuses it"}, name="adapter-dora")
    time.sleep(1.5)  # > poll_s: the name is in the replica's listing

    def ask(_):
        return _post(svc, {"image": svc["b64"], "text": svc["sample"].text, "adapter": name})

    with ThreadPoolExecutor(6) as pool:
        rs = list(pool.map(ask, range(12)))
    assert [r.status_code for r in rs] == [404] * 12, [(r.status_code, r.text) for r in rs]
    assert all(r.json()["error"]["code"] == "unknown_adapter" for r in rs)
    models = requests.get(f"{svc['url']}/v1/models", headers={"X-API-Key": KEY}, timeout=30).json()
    assert name in models["refused"] and name not in models["loaded_adapters"], models
    refusals = [e for e in reg.events() if e["kind"] == "serve-refuse" and e["name"] == name]
    assert len(refusals) == 1 and refusals[0]["replica"] == models["replica"], refusals
    assert _post(svc, {"image": svc["b64"], "text": svc["sample"].text}).status_code == 200


def test_an_adapter_registered_after_start_is_found_after_the_next_poll(svc, tiny_model,
                                                                          tmp_path):
    reg = svc["reg"]
    name = reg.register(random_lora(tiny_model, tmp_path / "c", 11), {"note": "C"}, name="adapter-c")
    time.sleep(1.5)  # > poll_s
    r = _post(svc, {"image": svc["b64"], "text": svc["sample"].text, "adapter": name})
    assert r.status_code == 200 and r.json()["adapter"] == name, r.text
    assert r.json()["replica"]


# ---- issue 27: images through the endpoint -------------------------------------------------
def test_exif_orientation_is_the_size_the_endpoint_reports(svc):
    """A JPEG stored 120x60 with EXIF Orientation 6 is displayed (and labeled) 60x120."""
    from PIL import Image

    stored = Image.new("RGB", (120, 60), (200, 30, 30))
    exif = Image.Exif()
    exif[0x0112] = 6
    buf = io.BytesIO()
    stored.save(buf, format="JPEG", exif=exif)
    r = _post(svc, {"image": base64.b64encode(buf.getvalue()).decode(), "text": "the red area"})
    assert r.status_code == 200, r.text
    assert r.json()["image_size"] == [60, 120]


def test_a_uri_the_check_would_read_differently_is_a_4xx(svc):
    """A leading space (urlsplit strips it, the fetch did not: HTTP 500) and fsspec's '::'
    chaining are refused as URIs; a 1x1 GIF in base64 (under 64 characters) is an image."""
    from PIL import Image

    allowed = str(svc["tmp"] / "imgs" / "one.png")
    for ref in (" " + allowed, "\vfile://" + allowed, f"file://{allowed}::nope",
                f"file://{allowed}::http://127.0.0.1:1/secret"):
        r = _post(svc, {"image": ref, "text": "x"})
        assert r.status_code == 403 and r.json()["error"]["code"] == "uri_not_allowed", (ref, r.text)
    buf = io.BytesIO()
    Image.new("P", (1, 1)).save(buf, format="GIF")
    r = _post(svc, {"image": base64.b64encode(buf.getvalue()).decode(), "text": "x"})
    assert r.status_code == 200 and r.json()["image_size"] == [1, 1], r.text
