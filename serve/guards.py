"""The endpoint's guards, checked before a request reaches the engine: API keys, the body
(size, JSON and its nesting depth, schema), the image (URI allow-list, fetch, decode, size,
aspect ratio), the token budget (prompt + image + answer within ``max_model_len``) and the
errors they raise (`ApiError`, answered as a 4xx JSON ``{"error": {"code", "message"}}``).

Run::

    python -c "from serve.guards import UriAllowList as U; print(U(['s3://b/img/']).why_not('s3://b/img/x.png'))"
"""

from __future__ import annotations

import json
import threading
from dataclasses import replace

from pydantic import ValidationError

from grounding.uris import Uri, UriError, parse_uri


def _parse(uri: str | Uri, *, what: str) -> Uri:
    """``uri`` parsed by `grounding.uris.parse_uri` (a plain path is a ``file`` URI), local
    files resolved to their real path; ValueError saying why it cannot be compared safely."""
    got = uri if isinstance(uri, Uri) else parse_uri(uri, what=what)
    return got.resolved_path()


class UriAllowList:
    """Image URIs a request may name, compared on the PARSED `grounding.uris.Uri`, never on raw
    text, and that same object is what `load_image` fetches:

    * the scheme and the host (case-insensitive) and the port must be a prefix's own;
    * the path must lie under the prefix's path, which is taken to end at a ``/``
      (``s3://b/img`` allows ``s3://b/img/x.png``, never ``s3://b/img-private/x.png``);
    * local files are compared by REAL path (symlinks followed, the prefix's too): a link in
      the allowed folder pointing outside it is refused;
    * user information (``https://trusted@evil.example/``) is refused, in prefixes too;
    * everything `grounding.uris.parse_uri` refuses (``.``/``..`` segments also encoded, an
      encoded ``/``, ``::``, whitespace and control characters, backslashes, fragments, a query
      outside http(s)) is refused rather than normalised away.

    An empty list allows nothing (requests send the image itself, base64). Redirects are
    checked by the fetch, which follows none (`grounding.images.read_bytes`).
    """

    def __init__(self, prefixes: list[str]):
        self.prefixes = list(prefixes)
        self._places: list[Uri] = []
        for p in prefixes:
            what = f"allowed URI prefix {p!r}"
            place = _parse(p, what=what)
            if place.query:
                raise ValueError(f"{what} has a query")
            path = place.path if place.path.endswith("/") else place.path + "/"
            self._places.append(replace(place, path=path))

    def why_not(self, uri: str | Uri) -> str | None:
        """None when ``uri`` is allowed, else the reason (safe to show to the client). Give it
        the parsed `Uri` that will be fetched (a string is parsed here)."""
        if not self._places:
            return "image URIs are not accepted here: send the image as base64"
        try:
            got = _parse(uri, what="the image URI")
        except ValueError as e:
            return str(e)
        for want in self._places:
            if (got.scheme, got.host, got.port) == (want.scheme, want.host, want.port) and (
                    got.path + "/").startswith(want.path) and got.path + "/" != want.path:
                return None
        return ("the image URI is not under an allowed prefix ("
                + ", ".join(self.prefixes) + ")")


class ApiError(Exception):
    """A request refused with an HTTP status and a stable error code."""

    def __init__(self, status: int, code: str, message: str):
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


# Image errors -> HTTP status.
_IMAGE_STATUS = {"too_large": 413, "missing": 422, "fetch_failed": 422, "empty_image": 422,
                 "corrupt": 422, "zero_size": 422, "bad_image_ref": 400,
                 "unsupported_format": 415}


# A request body is one flat object (depth 1). Anything much deeper is hostile; the bound is
# explicit so that no nesting reaches a recursive parser or validator (json's C scanner raises
# RecursionError near depth 1000, which is caught too).
MAX_JSON_DEPTH = 8


def json_depth(value) -> int:
    """Nesting depth of parsed JSON (a scalar is 0, ``{}``/``[]`` 1), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        v, d = stack.pop()
        if isinstance(v, dict | list):
            deepest = max(deepest, d)
            if d > MAX_JSON_DEPTH:
                break  # deep enough to refuse: no need to walk the rest
            stack.extend((c, d + 1) for c in (v.values() if isinstance(v, dict) else v))
    return deepest


def max_json_values(max_text_chars: int) -> int:
    """The most ``[``, ``{`` and ``,`` bytes a request body can need: the body is one flat
    object of at most four string fields (3 commas, 1 brace), and only the text (at most
    ``max_text_chars``) or a URI can hold these characters in any number."""
    return 2 * max_text_chars + 256


def check_json_size(body: bytes, max_values: int) -> None:
    """ApiError 400 ``json_too_large`` when ``body`` has more ``[``, ``{`` and ``,`` bytes than
    ``max_values``, counted with ``bytes.count`` (C speed, no Python objects built): an 8 MB
    ``[0,0,...]`` is 4 million values that ``json.loads`` would take seconds and hundreds of
    MB to build, all of them refused by the schema afterwards. Bytes inside strings are
    counted too, which only over-counts: the bound leaves room for a text made of them."""
    n = body.count(b",") + body.count(b"[") + body.count(b"{")
    if n > max_values:
        raise ApiError(400, "json_too_large", f"the body has {n} JSON values or more; a "
                       f"request is one object of at most 4 string fields ({max_values} "
                       "brackets and commas at most)")


def parse_json(body: bytes, max_values: int | None = None):
    """The body parsed as JSON, or ApiError 400 (more than ``max_values`` brackets and commas,
    see `check_json_size`; not JSON; nested deeper than `MAX_JSON_DEPTH`). CPU work: the
    endpoint runs it in its own bounded pool, never on the event loop."""
    if max_values is not None:
        check_json_size(body, max_values)
    try:
        data = json.loads(body)
    except RecursionError:
        raise ApiError(400, "json_too_deep", f"JSON nested deeper than {MAX_JSON_DEPTH} "
                       "levels") from None
    except (ValueError, UnicodeDecodeError):
        raise ApiError(400, "bad_json", "the body is not JSON") from None
    if json_depth(data) > MAX_JSON_DEPTH:
        raise ApiError(400, "json_too_deep", f"JSON nested deeper than {MAX_JSON_DEPTH} levels")
    return data


def check_auth(cfg, request) -> None:
    """ApiError 401 unless the request carries one of the configured API keys (none configured:
    allowed, which `serve.config.ServeConfig.auth_refusal` permits only on loopback or with
    ``--insecure-no-auth``). The gate (`serve.gate`) checks this before the body is read; this
    is the route's own check."""
    from serve.gate import matching_key, presented_key

    keys = cfg.api_keys()
    if keys and matching_key(keys, presented_key(request.headers)) is None:
        raise ApiError(401, "unauthorized", "missing or wrong API key (X-API-Key header "
                       "or Authorization: Bearer)")


async def read_request(cfg, request) -> bytes:
    """The body's bytes, or ApiError 413. Only I/O: parse it with `parse_request`, off the
    event loop."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > cfg.max_body_bytes:
        raise ApiError(413, "payload_too_large",
                       f"body of {declared} bytes, limit {cfg.max_body_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        chunks.append(chunk)
        size += len(chunk)
        if size > cfg.max_body_bytes:
            raise ApiError(413, "payload_too_large",
                           f"body over the limit of {cfg.max_body_bytes} bytes")
    return b"".join(chunks)


def _proper_unicode(name: str, value: str) -> None:
    """ApiError 422 ``invalid_unicode`` for a string that is not valid Unicode text: JSON's
    ``"\\ud800"`` escapes decode to lone surrogates, which no UTF-8 encoder (tokenizers,
    logs, storage) accepts."""
    if value.isascii():
        return
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(422, "invalid_unicode", f"{name} is not valid Unicode (a lone "
                       "surrogate such as \\ud800)") from None


def parse_request(cfg, body: bytes, family: str):
    """``body`` as a `GroundRequest`, or ApiError 4xx (JSON size and depth, schema, Unicode,
    text, family). CPU work: run it in the endpoint's pool."""
    from serve.schema import GroundRequest

    data = parse_json(body, max_json_values(cfg.max_text_chars))
    try:
        req = GroundRequest.model_validate(data)
    except ValidationError as e:
        problems = "; ".join(f"{'.'.join(map(str, p['loc'])) or 'body'}: {p['msg']}"
                             for p in e.errors()[:5])
        raise ApiError(422, "bad_request", problems.encode("utf-8", "replace").decode())\
            from None
    for name in ("text", "image", "adapter", "family"):
        if (value := getattr(req, name)) is not None:
            _proper_unicode(name, value)
    if not req.text.strip():
        raise ApiError(422, "empty_text", "text (the referring expression) is empty")
    if len(req.text) > cfg.max_text_chars:
        raise ApiError(413, "text_too_long",
                       f"text has {len(req.text)} characters, limit {cfg.max_text_chars}")
    if req.family and req.family != family:
        raise ApiError(422, "wrong_family", f"this endpoint serves family {family!r}, "
                       f"not {req.family!r}")
    return req

def fetch_image(cfg, uris: UriAllowList, ref: str) -> bytes:
    """The request's image bytes, or ApiError 4xx. A path/URI is parsed once; that parsed
    object (local files: their real path) is checked against ``uris`` and fetched."""
    from grounding.images import ImageError, is_base64_image, read_bytes
    from grounding.uris import looks_like_uri

    try:
        src: str | Uri = ref
        if not ref.startswith("data:") and not is_base64_image(ref) and looks_like_uri(ref):
            if not uris.prefixes:  # refused before the path is so much as looked up
                raise ApiError(403, "uri_not_allowed", uris.why_not(ref) or "")
            try:
                src = _parse(ref, what="the image URI")
            except UriError as e:
                raise ApiError(403, "uri_not_allowed", str(e)) from None
            if why := uris.why_not(src):
                raise ApiError(403, "uri_not_allowed", why)
        # The allow-list checked this URI only: a redirect elsewhere is refused, not followed.
        return read_bytes(src, cfg.storage, max_bytes=cfg.max_body_bytes,
                          follow_redirects=False)
    except ImageError as e:
        raise ApiError(_IMAGE_STATUS.get(e.code, 422), e.code, str(e)) from None


def load_image(cfg, uris: UriAllowList, ref: str):
    """The request's image (RGB PIL, the displayed frame at its full size), or ApiError 4xx.
    `load_model_image` decodes no more pixels than the model takes."""
    return load_model_image(cfg, uris, ref, None).image


def load_model_image(cfg, uris: UriAllowList, ref: str, resize):
    """The request's image as a `grounding.images.Decoded`: ``image`` (RGB) resized to exactly
    the model input of ``resize`` (a `grounding.resize.ResizeSpec`; the model's processor then
    leaves it as it is), ``size`` the displayed ORIGINAL ``(width, height)``, which boxes are
    mapped to and reported in. ``resize`` None: the full-size image. ApiError 4xx otherwise
    (422 ``bad_aspect_ratio`` for an image the model cannot take)."""
    from grounding.images import Decoded, ImageError, decode_for_model, fit_to_model

    data = fetch_image(cfg, uris, ref)
    try:
        dec = decode_for_model(data, resize.max_pixels if resize is not None else None,
                               cfg.max_image_pixels)
    except ImageError as e:
        raise ApiError(_IMAGE_STATUS.get(e.code, 422), e.code, str(e)) from None
    if resize is None:
        return dec
    check_image_shape(resize, dec.size)
    return Decoded(fit_to_model(dec, resize), dec.size)


def check_image_shape(resize, size: tuple[int, int]) -> tuple[int, int]:
    """The model-input ``(width, height)`` of an image of ``size``, or ApiError 422 when the
    model cannot take it: the label job's rule (`grounding.resize.smart_resize`, an aspect
    ratio over `grounding.resize.MAX_RATIO`), checked here so it never fails inside vLLM."""
    try:
        return resize.resized_size(size)
    except ValueError as e:
        raise ApiError(422, "bad_aspect_ratio", f"image {size[0]}x{size[1]} cannot be resized "
                       f"for the model: {e}") from None


class TokenBudget:
    """Tokens a request takes in the engine, counted as the model counts them, so that a
    prompt over ``max_model_len`` is refused before it is batched (vLLM would fail the whole
    batch with it).

    Total = the chat prompt's text tokens (the model's own tokenizer; the one image
    placeholder left out) + the image's tokens + ``max_new_tokens``. Image tokens are the
    Qwen processor's: ``(resized_h / patch) * (resized_w / patch) / merge**2`` =
    ``resized_h * resized_w / factor**2`` with ``factor = patch * merge`` and the resized size
    from the checkpoint's `grounding.resize.ResizeSpec` (``smart_resize``).
    """

    def __init__(self, model: str, resize, max_model_len: int, max_new_tokens: int):
        from transformers import AutoTokenizer

        # Our own tokenizer object: the engine's is used by vLLM in another thread, and a Rust
        # tokenizer shared across threads can fail with "Already borrowed".
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        self._lock = threading.Lock()  # ours is shared by the replica's CPU-pool threads too
        self.resize, self.max_model_len, self.max_new_tokens = resize, max_model_len, max_new_tokens
        pad = self.tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.image_pad = pad if isinstance(pad, int) and pad != self.tokenizer.unk_token_id \
            else None
        self.control_tokens = control_tokens(self.tokenizer)

    def check_text(self, text: str) -> None:
        """ApiError 422 ``control_token_in_text`` when the referring expression spells one of
        the tokenizer's special tokens (see `control_tokens`)."""
        found = [t for t in self.control_tokens if t in text]
        if found:
            raise ApiError(422, "control_token_in_text", "the text contains the model's "
                           f"control token(s) {', '.join(found[:5])}: they would be read as "
                           "chat structure (turns, image placeholders), not as text")

    def image_tokens(self, model_size: tuple[int, int]) -> int:
        """Tokens of an image whose model input is ``model_size`` (width, height)."""
        w, h = model_size
        return (w // self.resize.factor) * (h // self.resize.factor)

    def count(self, prompt: str, model_size: tuple[int, int]) -> int:
        """Prompt + image + answer tokens of one request."""
        try:
            with self._lock:
                ids = self.tokenizer.encode(prompt, add_special_tokens=False)
        except (TypeError, ValueError) as e:  # tokenizers: TypeError for a lone surrogate
            raise ApiError(422, "bad_text", f"the tokenizer cannot read the text "
                           f"({type(e).__name__})") from None
        pads = ids.count(self.image_pad) if self.image_pad is not None else 0
        return len(ids) - pads + pads * self.image_tokens(model_size) + self.max_new_tokens

    def check(self, prompt: str, model_size: tuple[int, int]) -> int:
        """The request's token count, or ApiError 413 ``prompt_too_long``."""
        n = self.count(prompt, model_size)
        if n > self.max_model_len:
            raise ApiError(413, "prompt_too_long",
                           f"the request needs {n} tokens (prompt, image and "
                           f"{self.max_new_tokens} answer tokens), the model takes "
                           f"{self.max_model_len}: shorten the text")
        return n


def control_tokens(tokenizer) -> list[str]:
    """The strings a request's text must not contain: every token the tokenizer marks
    *special* (its special tokens and its added tokens flagged ``special``: chat-turn markers
    such as ``<|im_start|>``, image placeholders such as ``<|image_pad|>``/``<|vision_start|>``,
    box markers, end of text). Tokenizers split these out of ordinary text, so a text holding
    one would forge chat structure: a turn, an assistant answer, or extra image placeholders.
    Taken from the tokenizer, not from a list per family, so that it holds for every family;
    added tokens NOT flagged special (e.g. the tiny model's coordinate numbers ``0``..``1000``,
    PaliGemma's ``<loc0000>``) are ordinary vocabulary and stay allowed."""
    found = set(getattr(tokenizer, "all_special_tokens", []) or [])
    for tok in (getattr(tokenizer, "added_tokens_decoder", {}) or {}).values():
        if getattr(tok, "special", False):
            found.add(str(tok.content))
    return sorted((t for t in found if t and t.strip()), key=len, reverse=True)
