"""Model management routes: load, unload and hot-reload models at run time (admin key only).

    POST /v1/models/load    {"model": "b", "path": "/models/b", "session_len": 4096}
    POST /v1/models/unload  {"model": "b"}
    POST /v1/models/reload  {"model": "b", "path": "/models/b-awq"}      # path: default the old one
    POST /v1/load_lora_adapter    {"lora_name": "sql", "lora_path": "/adapters/sql"}   # vLLM's
    POST /v1/unload_lora_adapter  {"lora_name": "sql"}

They are off unless the server has admin keys (--admin-api-keys). A load is refused with 400
before anything is allocated when the weights and the KV cache would not fit in free memory; an
adapter with 400 naming what is wrong with it.
"""
from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI, Request
from pydantic import Field

from quantserve.serve.errors import APIError
from quantserve.serve.middleware import bearer_matches
from quantserve.serve.protocol import ErrorResponse, ModelCard, Strict

ADMIN_ERRORS = {s: {"model": ErrorResponse} for s in (400, 401, 403, 404, 409)}


class EngineOverrides(Strict):
    """Engine settings for this model instead of the server's (LMDeploy's names)."""
    session_len: int | None = Field(None, gt=0)
    max_batch_size: int | None = Field(None, gt=0)
    cache_max_entry_count: float | str | None = None
    cache_max_tokens: int | None = Field(None, gt=0)
    quant_policy: int | None = None
    dtype: str | None = None

    def values(self) -> dict:
        return {k: v for k, v in self.model_dump(exclude={"model", "path"}).items() if v is not None}


class LoadRequest(EngineOverrides):
    model: str = Field(min_length=1, max_length=256, description="the name to serve it under")
    path: str | None = Field(None, description="model directory or .gguf (default: MODELS_DIR/<model>)")


class ReloadRequest(EngineOverrides):
    model: str = Field(min_length=1, max_length=256)
    path: str | None = Field(None, description="the new weights (default: the current path)")


class UnloadRequest(Strict):
    model: str = Field(min_length=1, max_length=256)


class LoadLoRARequest(Strict):
    lora_name: str = Field(min_length=1, max_length=256, description="the model name it is served under")
    lora_path: str = Field(min_length=1, max_length=4096, description="a PEFT LoRA directory on the server")
    base_model_name: str | None = Field(None, description="the served model it adapts (default: the first)")


class UnloadLoRARequest(Strict):
    lora_name: str = Field(min_length=1, max_length=256)


class Unloaded(Strict):
    id: str
    object: str = "model"
    deleted: bool = True


def add_model_admin_routes(app: FastAPI, state) -> None:
    @app.post("/v1/models/load", response_model=ModelCard, responses=ADMIN_ERRORS)
    async def load_model(body: LoadRequest, request: Request):
        require_admin(state, request)
        return await state.models.load(body.model, model_path(state, body.model, body.path), body.values())

    @app.post("/v1/models/unload", response_model=Unloaded, responses=ADMIN_ERRORS)
    async def unload_model(body: UnloadRequest, request: Request):
        require_admin(state, request)
        await state.models.unload(body.model)
        return {"id": body.model}

    @app.post("/v1/models/reload", response_model=ModelCard, responses=ADMIN_ERRORS)
    async def reload_model(body: ReloadRequest, request: Request):
        require_admin(state, request)
        path = model_path(state, body.model, body.path) if body.path else None
        return await state.models.reload(body.model, path, body.values())


    @app.post("/v1/load_lora_adapter", response_model=ModelCard, responses=ADMIN_ERRORS)
    async def load_lora_adapter(body: LoadLoRARequest, request: Request):
        require_admin(state, request)
        return await state.models.add_adapter(body.lora_name, body.lora_path, body.base_model_name)

    @app.post("/v1/unload_lora_adapter", response_model=Unloaded, responses=ADMIN_ERRORS)
    async def unload_lora_adapter(body: UnloadLoRARequest, request: Request):
        require_admin(state, request)
        await state.models.remove_adapter(body.lora_name)
        return {"id": body.lora_name}


def require_admin(state, request: Request) -> None:
    keys = [k.encode() for k in state.config.admin_api_keys]
    if not keys:
        raise APIError(403, "model management is off: start the server with --admin-api-keys", None,
                       "admin_disabled")
    if not bearer_matches(request.headers.get("authorization", "").encode(), keys):
        raise APIError(401, "model management needs an admin key (send 'Authorization: Bearer <admin key>')",
                       None, "invalid_api_key")


def model_path(state, name: str, path: str | None) -> str:
    """An explicit path as given; a relative one or none at all is looked up in the models directory."""
    models_dir = state.config.models_dir
    if path is not None and (Path(path).is_absolute() or models_dir is None):
        return path
    if models_dir is None:
        raise APIError(400, "give the model's path (this server has no --models-dir)", "path", "invalid_value")
    return str(Path(models_dir) / (path or name))
