"""The Serve deployment: a FastAPI ingress in front of one model loaded from a checkpoint.

Thin glue: :class:`~lepton_ray.serve.runner.ModelRunner` decodes and validates each request on
its own (a bad one gets a 4xx before it can join a batch), then ``@serve.batch`` groups valid
requests into one model call. No ``from __future__ import annotations`` here: Serve pickles this
class by value, and FastAPI must still resolve ``Request`` in the route signatures.
"""

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from ray import serve

from lepton_ray.serve.codec import RequestError


@serve.deployment(ray_actor_options={"num_cpus": 1})
@serve.ingress()
class ModelServer:
    """One replica: the model runner, the batching queue and the replica's FastAPI app."""

    def __init__(self, cfg: Any):
        from lepton_ray.serve.runner import ModelRunner

        self.runner = ModelRunner(cfg)
        self.cfg = cfg
        self.predict_batch.set_max_batch_size(cfg.max_batch_size)
        self.predict_batch.set_batch_wait_timeout_s(cfg.batch_wait_timeout_s)

    def __serve_build_asgi_app__(self) -> FastAPI:
        # Built per replica, after __init__, so routes are bound to this replica's model.
        api = FastAPI(title="lepton_ray model endpoint", version="1",
                      description=f"Model {self.runner.version} from {self.cfg.checkpoint}")

        @api.exception_handler(RequestError)
        async def _request_error(_: Request, exc: RequestError) -> JSONResponse:
            return JSONResponse({"error": str(exc)}, status_code=exc.status)

        api.add_api_route("/v1/predict", self.predict, methods=["POST"],
                          summary='Classify images: JSON {"instances": [...]} or {"images": [base64]}, or a PNG/JPEG body')
        api.add_api_route("/healthz", self.healthz, methods=["GET"], summary="Ready once the model has loaded")
        api.add_api_route("/v1/model", self.model_info, methods=["GET"],
                          summary="Classes, input shape, version and training metrics")
        return api

    @serve.batch(max_batch_size=64, batch_wait_timeout_s=0.005)
    async def predict_batch(self, requests: list) -> list:
        return self.runner.predict_many(requests)

    async def predict(self, request: Request) -> dict[str, Any]:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > self.cfg.max_request_bytes:
            raise RequestError(413, f"request body of {declared} bytes exceeds the {self.cfg.max_request_bytes}-byte limit")
        images = self.runner.decode(await request.body(), request.headers.get("content-type", ""))
        return {"predictions": await self.predict_batch(images), "model_version": self.runner.version}

    async def healthz(self) -> dict[str, Any]:
        return {"status": "ok", "model_version": self.runner.version}

    async def model_info(self) -> dict[str, Any]:
        return self.runner.info()
