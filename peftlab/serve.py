"""`peftlab serve RUN`: a finished run as an HTTP API (FastAPI + uvicorn, `pip install
peftlab[serve]`).

The model loads once, merged into its base when that base is not quantized (one matmul per
layer instead of two). Each task adds its own endpoints (`serve_routes` in its module);
this module holds what they share: /health, /info, /v1/models, bearer-key auth, JSON errors
in OpenAI's shape, input limits, and the micro-batcher that gathers concurrent requests
into one forward pass. Model calls run on one worker thread, one batch at a time, so the
event loop keeps accepting requests while the model works.
"""

import asyncio
import json
import os
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from peftlab.errors import PeftlabError


@dataclass
class ServeLimits:
    max_chars: int = 8192  # characters per text (prompt, question, context)
    max_inputs: int = 64  # texts per request
    max_new_tokens: int = 256  # causal LM: the most tokens one request may ask for
    max_image_bytes: int = 10 * 2**20  # image classification: bytes per uploaded image
    max_batch: int = 32  # inputs gathered into one forward pass
    batch_wait_ms: float = 5.0  # how long the first input of a batch waits for company


@dataclass
class Served:
    """What the endpoints share: the loaded run and one worker thread for model calls."""
    model: Any
    tokenizer: Any
    recipe: Any
    info: dict
    run_dir: Path
    limits: ServeLimits
    model_id: str
    executor: ThreadPoolExecutor = field(default_factory=lambda: ThreadPoolExecutor(1))

    @property
    def device(self):
        return next(self.model.parameters()).device

    def batcher(self, run_batch: Callable[[list], list]) -> "MicroBatcher":
        return MicroBatcher(run_batch, self.limits.max_batch,
                            self.limits.batch_wait_ms / 1000, self.executor)

    async def call(self, function: Callable, *args):
        """Run one model call on the worker thread (generation, which is not batched)."""
        return await asyncio.get_running_loop().run_in_executor(self.executor, function, *args)


class MicroBatcher:
    """Inputs from concurrent requests, gathered: the first waits up to `wait` seconds for
    others, up to `max_batch` in all, then one call of `run_batch(inputs) -> outputs` on the
    worker thread answers them all (in order)."""

    def __init__(self, run_batch: Callable[[list], list], max_batch: int, wait: float,
                 executor: ThreadPoolExecutor):
        self.run_batch, self.max_batch, self.wait = run_batch, max(max_batch, 1), wait
        self.executor = executor
        self.queue: asyncio.Queue | None = None
        self.batch_sizes: list[int] = []  # for the load test and /info

    async def submit(self, inputs: list) -> list:
        if self.queue is None:
            self.queue = asyncio.Queue()
            asyncio.get_running_loop().create_task(self._gather())
        loop = asyncio.get_running_loop()
        futures = [loop.create_future() for _ in inputs]
        for item, future in zip(inputs, futures):
            self.queue.put_nowait((item, future))
        return list(await asyncio.gather(*futures))

    async def _gather(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.wait
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), left))
                except TimeoutError:
                    break
            self.batch_sizes.append(len(batch))
            try:
                outputs = await loop.run_in_executor(self.executor, self.run_batch,
                                                     [item for item, _ in batch])
                for (_, future), output in zip(batch, outputs):
                    future.set_result(output)
            except Exception as err:  # noqa: BLE001  every waiting request hears of it
                for _, future in batch:
                    if not future.done():
                        future.set_exception(err)


def check_texts(texts: list[str], limits: ServeLimits, name: str = "texts") -> None:
    """Empty or oversize inputs are the client's mistake: a 4xx naming the field."""
    from fastapi import HTTPException
    if not texts:
        raise HTTPException(422, f"{name}: give at least one")
    if len(texts) > limits.max_inputs:
        raise HTTPException(413, f"{name}: {len(texts)} inputs, at most {limits.max_inputs} "
                                 f"per request")
    for i, text in enumerate(texts):
        if not text.strip():
            raise HTTPException(422, f"{name}[{i}] is empty")
        if len(text) > limits.max_chars:
            raise HTTPException(413, f"{name}[{i}]: {len(text)} characters, at most "
                                     f"{limits.max_chars}")


def _merged(model):
    """Adapters merged into an unquantized base: the same function, fewer matmuls."""
    from peft import PeftModel
    if isinstance(model, PeftModel):
        return model.merge_and_unload()
    if isinstance(getattr(model, "backbone", None), PeftModel):  # mean-pooled head
        model.backbone = model.backbone.merge_and_unload()
    return model


def load_served(run_dir: str | Path, limits: ServeLimits) -> Served:
    from peftlab.artifacts import load_trained
    from peftlab.quantization import quantization_kind
    run_dir = Path(run_dir)
    model, tokenizer, recipe, info = load_trained(run_dir)
    if quantization_kind(recipe) == "none":
        model = _merged(model).eval()
    return Served(model, tokenizer, recipe, info, run_dir, limits,
                  model_id=run_dir.resolve().name)


def _batch_stats(app) -> dict:
    """How many forward passes the micro-batcher made and their mean size (1 = no gathering)."""
    sizes = getattr(getattr(app.state, "batcher", None), "batch_sizes", [])
    return {"count": len(sizes), "mean_size": sum(sizes) / len(sizes) if sizes else 0.0}


def _error(status: int, message: str, kind: str = "invalid_request_error"):
    from fastapi.responses import JSONResponse
    return JSONResponse({"error": {"message": message, "type": kind, "code": status}},
                        status_code=status)


def create_app(run_dir: str | Path, limits: ServeLimits | None = None,
               api_key: str | None = None):
    """The app for one run: shared endpoints, then the task's own. (No `from __future__
    import annotations` in this module: FastAPI reads the handlers' annotations, which name
    classes imported here, at definition time.)"""
    from fastapi import Depends, FastAPI, HTTPException, Request
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from peftlab.tasks import task_of_run
    served = load_served(run_dir, limits or ServeLimits())
    app = FastAPI(title=f"peftlab: {served.model_id}", version="1")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, err: StarletteHTTPException):
        kind = "authentication_error" if err.status_code == 401 else "invalid_request_error"
        return _error(err.status_code, str(err.detail), kind)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, err: RequestValidationError):
        problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg')}"
                             for e in err.errors()[:5])
        return _error(422, problems or "invalid request")

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        if header != f"Bearer {api_key}":
            raise HTTPException(401, "missing or wrong API key (Authorization: Bearer ...)")

    auth = Depends(authorize)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/info", dependencies=[auth])
    async def info():
        metrics_file = served.run_dir / "metrics.json"
        return {"model": served.model_id, "task": served.info["task"],
                "base_model": served.recipe.model.name,
                "strategy": served.recipe.strategy.kind,
                "labels": served.info.get("label_names") or served.info.get("tag_names"),
                "precision": served.info["precision"],
                "metrics": json.loads(metrics_file.read_text()) if metrics_file.is_file()
                else None,
                "limits": served.limits.__dict__, "batches": _batch_stats(app)}

    @app.get("/v1/models", dependencies=[auth])
    async def models():
        return {"object": "list", "data": [{"id": served.model_id, "object": "model",
                                            "created": int(time.time()),
                                            "owned_by": "peftlab"}]}

    task_of_run(served.info).serve_routes(app, served, auth)
    app.state.served = served
    return app


def serve(run_dir: str, host: str, port: int, api_key_env: str | None,
          limits: ServeLimits) -> None:
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise PeftlabError("peftlab serve needs its extra: pip install 'peftlab[serve]'") from None
    api_key = None
    if api_key_env:
        api_key = os.environ.get(api_key_env)
        if not api_key:
            raise PeftlabError(f"--api-key-env {api_key_env}: that environment variable is "
                               f"not set")
    app = create_app(run_dir, limits, api_key)
    uvicorn.run(app, host=host, port=port, log_level="info")
