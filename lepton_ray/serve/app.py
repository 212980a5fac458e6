"""The Serve application: an HTTP ingress that holds the model itself (one hop, the default), or
sits in front of one (or, during a canary, two) model deployments (two hops).

    one hop:  HTTP -> Ingress "<name>-ingress" (FastAPI ... + ModelCore: @serve.batch; autoscaled)
    two hops: HTTP -> Ingress "<name>-ingress" (FastAPI: header and body limits, auth,
                      decode/validate, canary routing, retry, metrics)
                   -> ModelServer "<name>-model"  (@serve.batch -> one forward pass; autoscaled)
                   -> ModelServer "<name>-canary" (only while a canary is configured)

Each hop between Serve processes costs a few ms of CPU per request, so without a canary the
model runs in the ingress replica; the request handling is the same code either way, only
:meth:`Ingress._ask` differs (a method call, or a call through a deployment handle).

Thin glue: decoding and validation are the pure functions of :mod:`lepton_ray.serve.codec`, so a
bad request gets its 4xx in the ingress and never reaches a batch; the canary's verdict is
:class:`lepton_ray.serve.canary.CanaryTrial`. A model call that fails (a replica died, the model
raised) is retried once, on the stable version, before the client sees a 503 with ``Retry-After``.
Every error the app answers is JSON of one shape, ``{"error": "<one line>"}``
(:func:`error_response`), 404, 405, 422 and 500 included; what Serve's own proxy answers before
the app is reached (a route prefix nobody serves, a replica killed with requests in flight in the
one-hop layout) is Serve's.

No ``from __future__ import annotations`` here: Serve pickles these classes by value, and FastAPI
must still resolve ``Request`` in the route signatures.
"""

import asyncio
import os
import time
from typing import Any

import numpy as np
from fastapi import Depends, FastAPI, Request
from fastapi.responses import JSONResponse, Response
from ray import serve

from lepton_ray.serve.codec import RequestError

OPEN_PATHS = ("/healthz", "/docs", "/openapi.json", "/docs/oauth2-redirect")
LATENCY_MS = [1, 2, 5, 10, 20, 50, 100, 200, 500, 1000, 2000, 5000, 10000]
BATCH_SIZES = [1, 2, 4, 8, 16, 32, 64, 128, 256, 512]
MAX_HEADER_BYTES = 16 << 10
"""Request headers larger than this in total (names, values, separators) get a 431. Browsers and
HTTP clients send under 2 KiB; nginx's and HAProxy's default buffers stop near 8-16 KiB, and
Serve's own proxy sets no limit at all (a 4 MB header was read and answered)."""
RETRY_AFTER_S = 1
"""What a 503 tells the client to wait: a replacement replica is usually routable within seconds."""
PREDICT_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "instances": {
                            "type": "array",
                            "description": "pixel arrays 0-255, [H][W], [H][W][C] or flat",
                        },
                        "images": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "base64 PNG/JPEG",
                        },
                        "texts": {
                            "type": "array",
                            "items": {"type": "string"},
                            "description": "a text classifier's texts (UTF-8, cut to its block)",
                        },
                    },
                }
            },
            "multipart/form-data": {
                "schema": {
                    "type": "object",
                    "properties": {
                        "file": {"type": "array", "items": {"type": "string", "format": "binary"}}
                    },
                }
            },
            "image/png": {"schema": {"type": "string", "format": "binary"}},
            "image/jpeg": {"schema": {"type": "string", "format": "binary"}},
            "application/octet-stream": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": "uint8 pixels of N images (H, W, C order) with an "
                    "X-Shape: N,H,W,C header; without it, one PNG/JPEG",
                }
            },
            "application/x-npy": {
                "schema": {
                    "type": "string",
                    "format": "binary",
                    "description": ".npy array of N images, (N, H, W[, C]), pixels 0-255",
                }
            },
        },
    }
}


def error_response(
    status: int, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    """The one shape of every error the endpoint answers: ``{"error": "<one line>"}``."""
    return JSONResponse({"error": message}, status_code=status, headers=headers)


def add_error_handlers(api: FastAPI) -> None:
    """Every error as :func:`error_response`: ours (:class:`RequestError`), the router's 404/405
    (``{"detail"}`` by default), FastAPI's request validation (a list of dicts by default) and
    anything unexpected (a plain-text 500 by default)."""
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @api.exception_handler(RequestError)
    async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
        return error_response(exc.status, str(exc), exc.headers)

    @api.exception_handler(HTTPException)
    async def _http_error(request: Request, exc: HTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 404:
            message = f"no route {request.url.path} (POST .../v1/predict or /v1/generate, GET .../v1/model)"
        elif exc.status_code == 405:
            message = f"{request.method} is not allowed on {request.url.path}"
        return error_response(exc.status_code, message, getattr(exc, "headers", None))

    @api.exception_handler(RequestValidationError)
    async def _validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        first = (exc.errors() or [{}])[0]
        where = ".".join(str(p) for p in first.get("loc", ()))
        return error_response(422, f"invalid request: {where} {first.get('msg', '')}".strip())

    @api.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        # Starlette logs the traceback after this answer; the client learns only the type.
        return error_response(500, f"internal error ({type(exc).__name__})")


class RequestMeter:
    """Answers 431 to oversized headers (before any route, auth or body reading), and counts every
    HTTP request by route and status, and its latency: a plain ASGI middleware (Starlette's
    ``@app.middleware("http")`` runs each request through an extra task and memory
    stream, paid on every request of a CPU-bound replica)."""

    def __init__(self, app: Any, ingress: "Ingress"):
        self.app, self.ingress = app, ingress

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        start, status = time.perf_counter(), 500
        header_bytes = sum(len(k) + len(v) + 4 for k, v in scope["headers"])  # "k: v\r\n"
        if header_bytes > MAX_HEADER_BYTES:
            # Before the app (and the body) is touched: no route, no auth, no decoding for it.
            app = error_response(
                431,
                f"request headers of {header_bytes} bytes exceed the {MAX_HEADER_BYTES}-byte limit",
            )
        else:
            app = self.app

        async def send_status(message: dict) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await app(scope, receive, send_status)
        finally:
            ingress = self.ingress
            tags = {"app": ingress.cfg.name, "route": scope["path"].rsplit("/", 1)[-1] or "/"}
            ingress.latency.observe((time.perf_counter() - start) * 1e3, tags=tags)
            ingress.requests.inc(tags=tags | {"code": str(status)})


class ModelCore:
    """The checkpoint's model behind a batching queue (no HTTP of its own): the body of a
    ``ModelServer`` replica, or held by the ingress replica itself in one-hop mode."""

    def __init__(self, cfg: Any):
        from ray.util import metrics

        from lepton_ray.serve.generate import TokenStreams
        from lepton_ray.serve.runner import ModelRunner

        self.runner = ModelRunner(cfg)
        self.predict.set_max_batch_size(cfg.max_batch_size)
        self.predict.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)
        self.tags = {"app": cfg.name, "version": self.runner.version}
        self.batch_size = metrics.Histogram(
            "lepton_serve_batch_size",
            "Requests per model call",
            boundaries=BATCH_SIZES,
            tag_keys=("app", "version"),
        )
        # A language model's sequences share one scheduler of max_batch_size slots; None: images.
        observe = lambda n: self.batch_size.observe(n, tags=self.tags)  # noqa: E731
        self.streams = TokenStreams.of(self.runner, cfg.max_batch_size, observe)

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.0)
    async def predict(self, requests: list) -> list:
        """(N_i, H, W, C) uint8 per request -> ``{"predictions", "model_version"}`` per request."""
        self.batch_size.observe(len(requests), tags=self.tags)
        return [
            {"predictions": p, "model_version": self.runner.version}
            for p in self.runner.predict_many(requests)
        ]

    async def generate(self, request: Any) -> Any:
        """A language model's tokens for ``request``, then its finish reason and usage."""
        async for item in self.streams.stream(request):
            yield item

    async def info(self) -> dict[str, Any]:
        info = self.runner.info()
        return info | ({"generation": self.streams.info()} if self.streams else {})

    def pid(self) -> int:
        """The replica's process id (the failure tests kill it)."""
        return os.getpid()


ModelServer = serve.deployment(ModelCore, name="ModelServer")
"""A model replica of the two-hop layout (``<name>-model``, ``<name>-canary``)."""


@serve.deployment
@serve.ingress()
class Ingress:
    """HTTP in front of the model: ``stable`` (and ``canary``) are deployment handles (two hops),
    or ``stable`` is None and this replica loads the model itself (one hop, no canary)."""

    def __init__(self, cfg: Any, stable: Any = None, canary: Any = None, auth_token: Any = None):
        from ray.util import metrics

        from lepton_ray import checkpoint
        from lepton_ray.serve.canary import CanaryJudge, CanaryTrial, VerdictRecord
        from lepton_ray.serve.codec import ClickSpec, InputSpec
        from lepton_ray.serve.generate import TextSpec

        if stable is None and canary is not None:
            raise ValueError("a canary needs the two-hop layout (a stable model deployment)")
        # One hop: the model is loaded here, so the replica is ready once __init__ returns, and
        # the spec and version come from that load (the checkpoint is read once). Two hops: the
        # manifest and metadata only, no weights.
        self.model_ready = stable is None
        if stable is None:
            stable = ModelCore(cfg.model_only())
            meta, self.version = stable.runner.meta, stable.runner.version
        else:
            described = checkpoint.describe(cfg.checkpoint, cfg.endpoint_url)
            meta, self.version = described.meta, described.version
        self.cfg, self.stable, self.canary, self.token = cfg, stable, canary, auth_token
        self.spec = InputSpec.from_meta(meta)
        self.text = TextSpec.from_meta(meta)  # a language model's context; None for images
        self.clicks = ClickSpec.from_meta(meta)  # a click model's features; None for images
        self.canary_version = (
            checkpoint.version(cfg.canary_checkpoint, cfg.endpoint_url) if canary else None
        )
        self.trial = (
            CanaryTrial(
                CanaryJudge(
                    share=cfg.canary_share,
                    min_requests=cfg.canary_min_requests,
                    tolerance=cfg.canary_tolerance,
                    max_latency_ratio=cfg.canary_max_latency_ratio,
                    min_agreement=cfg.canary_min_agreement,
                ),
                VerdictRecord(
                    cfg.store, cfg.name, self.version, self.canary_version, cfg.endpoint_url
                ),
            )
            if canary
            else None
        )
        self.requests = metrics.Counter(
            "lepton_serve_requests",
            "HTTP requests by route and status code",
            tag_keys=("app", "route", "code"),
        )
        self.latency = metrics.Histogram(
            "lepton_serve_request_latency_ms",
            "HTTP request latency (ms) in the ingress",
            boundaries=LATENCY_MS,
            tag_keys=("app", "route"),
        )
        self.model_calls = metrics.Counter(
            "lepton_serve_model_calls",
            "Model calls by version and outcome",
            tag_keys=("app", "version", "outcome"),
        )

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Built per replica, after __init__, so routes are bound to this replica's state.
        api = FastAPI(
            title="lepton_ray model endpoint",
            version="1",
            description=f"Model {self.version} from {self.cfg.checkpoint}",
        )

        add_error_handlers(api)
        api.add_middleware(RequestMeter, ingress=self)
        # No token, no dependency: FastAPI resolves each one per request, 25-60 us on 2 CPUs even
        # for one that returns at once (the route driven through ASGI in-process, with and without).
        auth = [Depends(self.authorize)] if self.token is not None else []
        api.add_api_route(
            "/v1/predict",
            self.predict,
            methods=["POST"],
            dependencies=auth,
            openapi_extra=PREDICT_BODY,
            summary='Classify images: JSON {"instances": [...]} or {"images": [base64]}, '
            "multipart files, or a PNG/JPEG body",
        )
        api.add_api_route(
            "/v1/generate",
            self.generate,
            methods=["POST"],
            dependencies=auth,
            summary="A language model's continuation of a prompt, streamed as Server-Sent Events",
        )
        api.add_api_route(
            "/healthz", self.healthz, methods=["GET"], summary="Ready once the model has loaded"
        )
        api.add_api_route(
            "/v1/model",
            self.model_info,
            methods=["GET"],
            dependencies=auth,
            summary="Classes, input shape, version, training metrics and the canary's state",
        )
        return api

    async def authorize(self, request: Request) -> None:
        import hmac

        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            given.strip().encode(), self.token.encode()
        ):
            raise RequestError(
                401,
                "missing or wrong bearer token (send 'Authorization: Bearer <token>')",
                {"WWW-Authenticate": "Bearer"},
            )

    async def predict(self, request: Request) -> Response:
        from lepton_ray.serve import codec
        from lepton_ray.serve.codec import SHAPE_HEADER, decode_body, decode_features, encode

        if self.text is not None:
            raise RequestError(400, f"model {self.version} is a language model: POST /v1/generate")
        body = await self._read_body(request)
        ctype = request.headers.get("content-type", "").lower()
        if self.clicks is not None:  # {"features": {"dense": ..., "sparse": ...}}
            images = decode_features(body, self.clicks, self.cfg.max_images_per_request)
        elif self.spec.kind == "text-label":  # {"texts": [...]}: byte-token rows
            images = codec.decode_texts(body, ctype, self.spec, self.cfg.max_images_per_request)
        elif ctype.startswith("multipart/form-data"):
            images = await self._decode_multipart(request, body)
        else:
            images = decode_body(
                body,
                ctype,
                self.spec,
                self.cfg.max_images_per_request,
                request.headers.get(SHAPE_HEADER),
            )
        # Already JSON-safe (str, int, float): rendered as is, without FastAPI's encoder walk.
        return Response(encode(await self._call_model(images)), media_type="application/json")

    async def generate(self, request: Request) -> Response:
        from lepton_ray.serve import generate

        if self.text is None:
            raise RequestError(400, f"model {self.version} is a classifier: POST /v1/predict")
        req, stream = generate.parse(await self._read_body(request), self.text)
        route = "stable"
        if self.trial is not None:
            await self.trial.sync()
            route = self.trial.pick()
        version = "canary" if route == "canary" else "stable"
        events = self._events(self.canary if version == "canary" else self.stable, req)
        if route == "mirror":  # stable answers; the canary generates the same, then is judged
            events = self.trial.mirrored(events, asyncio.ensure_future(self._timed_tokens(req)))
        record = lambda ok: self._record(version, ok)  # noqa: E731
        answered_by = self.canary_version if version == "canary" else self.version
        return await generate.respond(events, req.seed, stream, answered_by, record)

    @staticmethod
    def _events(target: Any, req: Any) -> Any:
        """A generation's events from the model: this replica's own scheduler (one hop) or a
        streaming call through its handle."""
        if isinstance(target, ModelCore):
            return target.generate(req)
        return target.options(stream=True).generate.remote(req)

    async def _timed_tokens(self, req: Any) -> tuple[Any, float]:
        """The canary's (``{"tokens": [...]}`` or None if it failed, seconds per token) on a
        mirrored generation."""
        start, tokens = time.perf_counter(), []
        try:
            async for item in self._events(self.canary, req):
                if not isinstance(item, dict):
                    tokens.append(item)
            answer = {"tokens": tokens}
        except Exception:  # noqa: BLE001 - a failing canary is what the trial is for
            answer = None
        self._record("canary", answer is not None)
        return answer, (time.perf_counter() - start) / max(1, len(tokens))

    async def _read_body(self, request: Request) -> bytes:
        limit = self.cfg.max_request_bytes
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise RequestError(
                413, f"request body of {declared} bytes exceeds the {limit}-byte limit"
            )
        body = bytearray()
        async for (
            chunk
        ) in request.stream():  # chunked bodies have no content-length: count as they come
            body += chunk
            if len(body) > limit:
                raise RequestError(413, f"request body exceeds the {limit}-byte limit")
        return bytes(body)

    async def _decode_multipart(self, request: Request, body: bytes) -> np.ndarray:
        from starlette.datastructures import UploadFile
        from starlette.formparsers import MultiPartParser

        from lepton_ray.serve.codec import decode_files, too_many_images

        async def replay() -> Any:  # the body was already read (under the size limit)
            yield body

        limit = self.cfg.max_images_per_request
        parser = MultiPartParser(request.headers, replay(), max_files=limit, max_fields=64)
        try:
            form = await parser.parse()
            files = [await v.read() for _, v in form.multi_items() if isinstance(v, UploadFile)]
        except Exception as exc:  # noqa: BLE001 - any parser failure is the client's malformed body
            # The parser stops at the first file past the limit: the same 413 as a JSON body's.
            if parser._current_files > limit:
                raise too_many_images(f"more than {limit}", limit) from None
            detail = getattr(exc, "detail", None) or str(exc) or type(exc).__name__
            raise RequestError(400, f"malformed multipart body: {detail}") from None
        return decode_files(files, self.spec, limit)

    async def _call_model(self, images: np.ndarray) -> dict[str, Any]:
        if self.trial is None:
            return await self._answer("stable", images)
        await self.trial.sync()
        route = self.trial.pick()
        if route != "mirror":
            return await self._answer(route, images)
        # The trial: the canary gets the same images at the same moment; stable answers.
        canary = asyncio.ensure_future(self._timed(self.canary, images))
        start = time.perf_counter()
        try:
            answer = await self._answer("stable", images)
        except RequestError:
            self.trial.judge_later(canary, None, time.perf_counter() - start)
            raise
        self.trial.judge_later(canary, answer, time.perf_counter() - start)
        return answer

    async def _answer(self, version: str, images: np.ndarray) -> dict[str, Any]:
        """``version``'s answer; a failed call is retried once, on the stable version."""
        for attempt in range(2):
            target = self.canary if version == "canary" else self.stable
            try:
                answer = await self._ask(target, "predict", images)
            except Exception as exc:  # noqa: BLE001 - a dead replica or a failing model: retry once on stable
                self._record(version, False)
                if attempt:
                    raise RequestError(
                        503,
                        f"model unavailable, retry shortly: {type(exc).__name__}",
                        {"Retry-After": str(RETRY_AFTER_S)},
                    ) from None
                version = "stable"
                continue
            self._record(version, True)
            self.model_ready = True
            return answer
        raise AssertionError("unreachable")

    async def _timed(self, target: Any, images: np.ndarray) -> tuple[Any, float]:
        """The canary's (answer or None if the call failed, seconds) on a mirrored request."""
        start = time.perf_counter()
        try:
            answer = await self._ask(target, "predict", images)
        except Exception:  # noqa: BLE001 - a failing canary is what the trial is for
            answer = None
        self._record("canary", answer is not None)
        return answer, time.perf_counter() - start

    @staticmethod
    async def _ask(target: Any, method: str, *args: Any) -> Any:
        """Call ``method`` on the model: in this replica (one hop) or through its handle."""
        if isinstance(target, ModelCore):
            return await getattr(target, method)(*args)
        return await getattr(target, method).remote(*args)

    def pid(self) -> int:
        """The replica's process id (the failure tests kill it)."""
        return os.getpid()

    def _record(self, version: str, ok: bool) -> None:
        name = self.canary_version if version == "canary" else self.version
        self.model_calls.inc(
            tags={"app": self.cfg.name, "version": name, "outcome": "ok" if ok else "error"}
        )

    async def healthz(self) -> Any:
        # Ready once a model replica has answered; asked at most until then, so that probes do not
        # keep a deployment that scaled to zero awake.
        if not self.model_ready:
            try:
                await asyncio.wait_for(self._ask(self.stable, "info"), timeout=5)
                self.model_ready = True
            except Exception:  # noqa: BLE001 - not loaded yet (or failing to load)
                return JSONResponse(
                    {"status": "loading", "model_version": self.version}, status_code=503
                )
        return {"status": "ok", "model_version": self.version}

    async def model_info(self) -> dict[str, Any]:
        info = await self._ask(self.stable, "info")
        if self.trial is not None:
            await self.trial.sync()
            info["canary"] = self.trial.report() | {
                "model_version": self.canary_version,
                "checkpoint": self.cfg.canary_checkpoint,
            }
        return info
