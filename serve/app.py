"""Ray Serve app: synthesise a lesion on an uploaded radiograph (translate + blend + score).

    HTTP -> Api (one deployment, autoscaled; each replica does all of it):
              FastAPI ingress: auth, limits, decode, crop, blend, encode
              translate_batch (UNIT h -> l, @serve.batch)   boneaug-unit-<body_part>@alias
              score_batch     (DRN probability, @serve.batch) boneaug-drn-<body_part>@alias

Routes: POST /v1/lesions, POST /v1/score, POST /v1/preview, GET /v1/models (bearer token);
GET /healthz and GET / (the demo page) without a token; /docs and /openapi.json need the token
unless the ingress's user_config says `public_docs: true`.

Models come from the MLflow registry by name + alias, named in the deployment's `user_config`
(`translator` and `scorer`, each a `schemas.ModelsConfig`). `reconfigure` loads the new models and
swaps them in atomically, so `serve deploy` with a changed user_config (another alias, or
`revision` bumped after an alias moved) switches models without restarting replicas or failing a
request.

Auth: the bearer token is read from the environment variable BONEAUG_API_TOKEN of the replica
process (set it on every node before `ray start`, e.g. from a secret store); it is never in code or
in config.yaml. When it is unset or shorter than 16 characters the ingress refuses to start.

Run: `BONEAUG_API_TOKEN=... serve run serve/config.yaml` (from the repository root), or
`serve run serve.app:build_app profile=smoke num_gpus=0.5`.

No `from __future__ import annotations` here: FastAPI reads the route signatures' types at runtime.
"""

import asyncio
import base64
import hmac
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

import numpy as np
from fastapi import Depends, FastAPI, File, Form, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import BaseModel
from ray import serve

from boneaug import serving, tracking
from boneaug.config import BodyPart, BoneaugConfig, TrackingConfig, load_config
from boneaug.errors import ConfigError
from serve.schemas import (
    AppArgs,
    ErrorResponse,
    HealthResponse,
    LesionModels,
    LesionResponse,
    ModelRef,
    ModelsConfig,
    ModelsResponse,
    ModelVersion,
    PreviewResponse,
    ScoreResponse,
    ServiceConfig,
)

log = logging.getLogger("boneaug.serve")

TOKEN_ENV = "BONEAUG_API_TOKEN"
MIN_TOKEN_LENGTH = 16
PUBLIC_PATHS = frozenset({"/", "/healthz"})
DOCS_PATHS = frozenset({"/docs", "/openapi.json"})


# ---------------------------------------------------------------------------------------------
# models (each replica holds its own; see Api)


@dataclass(frozen=True)
class ModelOutput:
    """One request's answer from a model: values, or why there are none."""

    values: np.ndarray | None = None
    name: str = ""
    version: str = ""
    error: str | None = None  # "not_served" | "no_model" | "model_error"
    message: str = ""
    tags: dict[str, str] = field(default_factory=dict)  # of the registered version that answered


@dataclass(frozen=True)
class _Loaded:
    name: str
    version: str
    model: Any  # torch.nn.Module in eval mode, on `device`
    device: str
    tags: dict[str, str]  # the registered version's, read at every reconfigure


Served = dict[str, _Loaded]  # body part -> model; replaced whole, never changed in place


class RegistryModels:
    """One kind of model (the translator or the scorer) by body part, from the MLflow registry.

    `stage` resolves every alias and loads what changed; `swap` then replaces the whole dict in
    one assignment. A body part whose new model fails to load keeps its previous one (the error is
    logged and kept for `check_health`'s message). A request reads `served` once and hands that
    dict to its batch calls, so it is answered by the models of its start. Failures are answered
    per request (`ModelOutput.error`), never raised through the batch, so one bad batch cannot
    kill a replica.
    """

    def __init__(self, kind: str, run: Callable[[Any, np.ndarray], np.ndarray]) -> None:
        self.kind, self._run = kind, run
        self.served: Served = {}
        self._errors: dict[str, str] = {}

    def swap(self, staged: tuple[Served, dict[str, str]]) -> None:
        self.served, self._errors = staged

    def stage(self, config: ModelsConfig) -> tuple[Served, dict[str, str]]:
        """The models `config` names, loading only what changed, and the errors of those that
        would not load; nothing served changes."""
        import torch

        device = config.device
        if device == "auto":
            device = "cuda" if torch.cuda.is_available() else "cpu"
        tracking.configure(TrackingConfig(tracking_uri=config.tracking_uri))
        loaded = {bp: m for bp, m in self.served.items() if bp in config.models}
        errors: dict[str, str] = {}
        for body_part, ref in config.models.items():
            try:
                name, version = tracking.resolve(ref.uri)
                tags = tracking.version_tags(name, str(version))
                current = loaded.get(body_part)
                if current and ((current.name, current.version, current.device)
                                == (name, version, device)):
                    loaded[body_part] = replace(current, tags=tags)
                    continue
                model = tracking.load_torch_model(f"models:/{name}/{version}").to(device)
                loaded[body_part] = _Loaded(name, str(version), model, device, tags)
                log.info("%s: %s serves %s version %s on %s", self.kind, body_part, name, version,
                         device)
            except Exception as exc:  # noqa: BLE001 - keep serving what loads; report the rest
                errors[body_part] = f"{ref.uri}: {type(exc).__name__}: {exc}"
                log.error("%s: cannot load %s for %s: %s", self.kind, ref.uri, body_part, exc)
        return loaded, errors

    def check_health(self) -> None:
        if not self.served:
            raise RuntimeError(
                f"{self.kind}: no model loaded; errors: {self._errors or 'none recorded'}")

    def models(self) -> dict[str, dict[str, str]]:
        return {bp: {"name": m.name, "version": m.version} for bp, m in self.served.items()}

    async def run_batch(self, requests: list[tuple[Served, str, np.ndarray]]) -> list[ModelOutput]:
        """Group a batch of (the request's `served`, body part, (1, 1, H, W) array) by model and
        shape, run each group once, answer each request."""
        outputs: list[ModelOutput | None] = [None] * len(requests)
        groups: dict[tuple[int, tuple[int, ...]], tuple[_Loaded, list[int]]] = {}
        for i, (served, body_part, array) in enumerate(requests):
            model = served.get(body_part)
            if model is None:
                reason = "no_model" if not served else "not_served"
                outputs[i] = ModelOutput(error=reason, message=(
                    f"the {self.kind} serves no model for body part {body_part!r}; "
                    f"served: {sorted(served) or 'none'}"))
            else:
                groups.setdefault((id(model), array.shape), (model, []))[1].append(i)
        for model, indices in groups.values():
            stacked = np.concatenate([requests[i][2] for i in indices], axis=0)  # (B, 1, H, W)
            try:
                values = await asyncio.to_thread(self._run, model.model, stacked)
            except Exception as exc:  # noqa: BLE001 - answer each request (503), keep the replica
                log.exception("%s: %s %s failed on a batch of %d", self.kind, model.name,
                              model.version, len(indices))
                for i in indices:
                    outputs[i] = ModelOutput(error="model_error",
                                             message=f"the {self.kind} failed: "
                                             f"{type(exc).__name__}", name=model.name,
                                             version=model.version)
                continue
            for j, i in enumerate(indices):
                outputs[i] = ModelOutput(values=values[j:j + 1], name=model.name,
                                         version=model.version, tags=model.tags)
        return [o for o in outputs if o is not None]


# ---------------------------------------------------------------------------------------------
# the HTTP ingress


def error_response(status: int, reason: str, message: str,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(ErrorResponse(reason=reason, message=message).model_dump(),
                        status_code=status, headers=headers)


@dataclass
class _Gate:
    """What the ASGI gate checks before a request reaches a route (set by the Api replica).

    A replica is one process, so this module-level holder is per replica: Serve pickles the
    FastAPI app by value into the replica, while this module (and the gate class) is imported
    there by reference, so both the Api instance and the middleware see the same holder.
    """

    token: str | None = None
    max_upload_bytes: int = ServiceConfig().max_upload_bytes
    public_docs: bool = False


_GATE = _Gate()


def configure_gate(*, token: str | None = None, max_upload_bytes: int | None = None,
                   public_docs: bool | None = None) -> None:
    """Set the replica's gate. Api methods call this module function (pickled by reference)
    rather than touching `_GATE`, which would be captured by value with the deployment class."""
    if token is not None:
        _GATE.token = token
    if max_upload_bytes is not None:
        _GATE.max_upload_bytes = max_upload_bytes
    if public_docs is not None:
        _GATE.public_docs = public_docs


def require_token(environ: Mapping[str, str]) -> str:
    """The service token from the environment; refuse to start without a usable one."""
    token = (environ.get(TOKEN_ENV) or "").strip()
    if len(token) < MIN_TOKEN_LENGTH:
        raise ConfigError(f"refusing to start: set {TOKEN_ENV} to a secret of at least "
                          f"{MIN_TOKEN_LENGTH} characters in the environment of every Ray node, "
                          "e.g. `export BONEAUG_API_TOKEN=$(openssl rand -hex 24)` "
                          "before `ray start` "
                          f"(it is {'unset' if not token else f'{len(token)} characters'})")
    return token


def read_page() -> str:
    """The demo page, read next to this module on the replica's machine."""
    page = Path(__file__).with_name("page.html")
    return (page.read_text() if page.exists()
            else "<!doctype html><title>boneaug</title><p>page.html missing")


class _TooLarge(Exception):
    pass


class GateMiddleware:
    """Auth first (401/403, before the body is read), then the upload limit (413)."""

    def __init__(self, app: Callable[..., Awaitable[None]]) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        gate = _GATE
        path = scope.get("path", "")
        headers = {k.decode("latin-1").lower(): v.decode("latin-1")
                   for k, v in scope.get("headers", [])}
        public = path in PUBLIC_PATHS or (gate.public_docs and path in DOCS_PATHS)
        if not public:
            failure = check_token(headers.get("authorization"), gate.token)
            if failure is not None:
                await failure(scope, receive, send)
                return
        limit = gate.max_upload_bytes
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            await _too_large(limit)(scope, receive, send)
            return
        received = 0
        exceeded = False

        async def limited_receive() -> dict[str, Any]:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    exceeded = True
                    raise _TooLarge()
            return message

        async def guarded_send(message: dict[str, Any]) -> None:
            if not exceeded:
                await send(message)

        try:
            await self.app(scope, limited_receive, guarded_send)
        except _TooLarge:
            pass
        except Exception:
            if not exceeded:
                raise
        if exceeded:
            await _too_large(limit)(scope, receive, send)


def _too_large(limit: int) -> JSONResponse:
    return error_response(413, "upload_too_large", f"the request body exceeds {limit} bytes; "
                          "downsample or compress the radiograph")


def check_token(header: str | None, token: str | None) -> JSONResponse | None:
    """None when `header` carries the bearer token; else the 401/403 response to send."""
    challenge = {"WWW-Authenticate": 'Bearer realm="boneaug"'}
    if not header:
        return error_response(401, "missing_token", "send 'Authorization: Bearer <token>'",
                              challenge)
    scheme, _, value = header.partition(" ")
    if scheme.lower() != "bearer" or not value.strip():
        return error_response(401, "missing_token",
                              "the Authorization header must be 'Bearer <token>'", challenge)
    if token is None or not hmac.compare_digest(value.strip().encode(), token.encode()):
        return error_response(403, "bad_token", "the bearer token is not valid for this service")
    return None


# Everything a route method uses must be defined above the Api class: @serve.ingress pickles the
# FastAPI app (routes included) by value when the class is decorated.

api = FastAPI(
    title="boneaug",
    version="0.1.0",
    description="Synthesise a bone lesion on a radiograph (UNIT translation, alpha blending, "
                "DRN score). Every route except / and /healthz needs "
                "'Authorization: Bearer <token>'.",
    docs_url=None, redoc_url=None, openapi_url=None,
)
api.add_middleware(GateMiddleware)
bearer = HTTPBearer(auto_error=False, description="the service token (BONEAUG_API_TOKEN)")
# documented; GateMiddleware checks
Auth = Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)]

ERRORS: dict[int | str, dict[str, Any]] = {
    status: {"model": ErrorResponse, "description": text}
    for status, text in ((401, "no bearer token"), (403, "wrong token"), (413, "upload too large"),
                         (422, "bad input: not an image, corrupt, box outside the image, ..."),
                         (503, "no model loaded for the body part, or a model call timed out"))
}


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
    problems = "; ".join(f"{'.'.join(str(p) for p in e.get('loc', ()))}: {e.get('msg', '')}"
                         for e in exc.errors())
    return error_response(422, "invalid_request", problems[:2000] or "invalid request")


@api.exception_handler(serving.RequestError)
async def _unservable(request: Request, exc: serving.RequestError) -> JSONResponse:
    return error_response(exc.status, exc.reason, exc.message)


@api.exception_handler(Exception)
async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error on %s %s", request.method, request.url.path)
    return error_response(500, "internal_error",
                          f"{type(exc).__name__}: the service failed; see the replica log")


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _rendered(body: BaseModel) -> Response:
    """A large answer rendered by pydantic-core in the calling thread. Returned as a Response,
    FastAPI passes it through instead of validating it again and re-encoding it on the event loop
    (6 ms for a /v1/lesions answer with its 1.4 MB of base64 against 1 ms; the route's
    response_model still documents it)."""
    return Response(body.model_dump_json(), media_type="application/json")


UploadField = Annotated[UploadFile,
                        File(description="radiograph: DICOM, or 8/16-bit grayscale PNG")]
BodyPartField = Annotated[BodyPart, Form(description="which bone (selects models, s and t)")]


@serve.deployment(
    name="Api",
    ray_actor_options={"num_cpus": 0.5},
    autoscaling_config={"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 4,
                        "upscale_delay_s": 10, "downscale_delay_s": 120},
    # Requests beyond the router's limit wait in the proxy, which retries with a back-off and
    # leaves the replica idle: at 8, 32 clients got 8.3 req/s where 8 got 17.3. They wait in the
    # replica instead, which works on `max_concurrent_images` of them at once (memory)
    max_ongoing_requests=64,
    health_check_period_s=10,
    health_check_timeout_s=30,
    graceful_shutdown_timeout_s=20,
)
@serve.ingress(api)
class Api:
    """The service: HTTP, decode, crop, blend, encode, and the two models, in one replica.

    The models run here, batched per kind (`@serve.batch`), not in deployments of their own:
    a call to another deployment cost ~12 ms (routing and the batch wait) around a UNIT or DRN
    call of ~10 ms on 2 cores, which made a /v1/lesions request 2x the same work in-process.
    Replicas scale as a whole (autoscaling; `num_gpus` gives each a GPU share).
    """

    def __init__(self) -> None:
        configure_gate(token=require_token(os.environ))
        self._translator = RegistryModels("translator", serving.run_translator)
        self._scorer = RegistryModels("scorer", serving.run_scorer)
        self._page = read_page()
        self._service = ServiceConfig()
        self._config: BoneaugConfig = load_config(self._service.profile)
        self._working = asyncio.Semaphore(self._service.max_concurrent_images)

    def reconfigure(self, user_config: dict[str, Any]) -> None:
        service = ServiceConfig.model_validate(user_config)
        self._config = load_config(service.profile)
        # both kinds load before either is swapped: a request never meets a half-made switch
        staged = self._translator.stage(service.translator), self._scorer.stage(service.scorer)
        self._translator.swap(staged[0])
        self._scorer.swap(staged[1])
        for batched, models in ((self.translate_batch, service.translator),
                                (self.score_batch, service.scorer)):
            batched.set_max_batch_size(models.max_batch_size)
            batched.set_batch_wait_timeout_s(models.batch_wait_timeout_s)
        if service.max_concurrent_images != self._service.max_concurrent_images:
            self._working = asyncio.Semaphore(service.max_concurrent_images)
        self._service = service
        configure_gate(max_upload_bytes=service.max_upload_bytes, public_docs=service.public_docs)

    def check_health(self) -> None:
        self._translator.check_health()
        self._scorer.check_health()

    def replica(self) -> str:
        """This replica's id (ops and tests: a config update reconfigures, it does not restart)."""
        return serve.get_replica_context().replica_id.unique_id

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def translate_batch(self, requests: list[tuple[Served, str, np.ndarray]]
                              ) -> list[ModelOutput]:
        """UNIT h -> l of (1, 1, S, S) patches in [0, 1]."""
        return await self._translator.run_batch(requests)

    @serve.batch(max_batch_size=8, batch_wait_timeout_s=0.0)
    async def score_batch(self, requests: list[tuple[Served, str, np.ndarray]]
                          ) -> list[ModelOutput]:
        """DRN lesion probability of (1, 1, H, W) classifier-size images."""
        return await self._scorer.run_batch(requests)

    @property
    def _limits(self) -> serving.Limits:
        s = self._service
        return serving.Limits(max_side=s.max_image_side, max_pixels=s.max_image_pixels,
                              min_side=s.min_image_side)

    # -- public -------------------------------------------------------------------------------

    @api.get("/healthz", response_model=HealthResponse, tags=["ops"])
    async def healthz(self) -> HealthResponse:
        return HealthResponse(status="ok")

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page(self) -> HTMLResponse:
        return HTMLResponse(self._page, headers={"Content-Security-Policy": (
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; "
            "img-src data: blob:; connect-src 'self'; form-action 'none'; base-uri 'none'")})

    @api.get("/openapi.json", include_in_schema=False)
    async def openapi(self) -> JSONResponse:
        return JSONResponse(api.openapi())

    @api.get("/docs", include_in_schema=False)
    async def docs(self) -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title="boneaug API")

    # -- authenticated ------------------------------------------------------------------------

    @api.get("/v1/models", response_model=ModelsResponse, responses=ERRORS, tags=["models"])
    async def models(self, _auth: Auth) -> ModelsResponse:
        translator, scorer = self._translator.models(), self._scorer.models()
        return ModelsResponse(
            translator={bp: ModelVersion(**m) for bp, m in translator.items()},
            scorer={bp: ModelVersion(**m) for bp, m in scorer.items()},
            body_parts=sorted(set(translator) & set(scorer)),
        )

    @api.post("/v1/preview", response_model=PreviewResponse, responses=ERRORS, tags=["images"])
    async def preview(self, _auth: Auth, file: UploadField) -> Response:
        async with self._working:
            image = await self._decode(file)
            return await asyncio.to_thread(self._preview_response, image)

    @api.post("/v1/score", response_model=ScoreResponse, responses=ERRORS, tags=["lesions"])
    async def score(self, _auth: Auth, file: UploadField,
                    body_part: BodyPartField) -> ScoreResponse:
        async with self._working:
            image = await self._decode(file)
            fitted = await asyncio.to_thread(serving.fit_pad, image.pixels, self._score_hw)
            out = await self._call(self.score_batch((self._scorer.served, body_part,
                                                     fitted[None, None])))
        return ScoreResponse(body_part=body_part, probability=float(out.values.reshape(-1)[0]),
                             model=out.name, version=out.version)

    @api.post("/v1/lesions", response_model=LesionResponse, responses=ERRORS, tags=["lesions"])
    async def lesions(
        self,
        _auth: Auth,
        file: UploadField,
        body_part: BodyPartField,
        box: Annotated[str, Form(
            max_length=100, description="'x0,y0,x1,y1' in the uploaded image's "
            "pixels (x1/y1 exclusive), or 'auto' to place it on the bone")] = "auto",
        n: Annotated[float | None, Form(
            gt=0, le=64, allow_inf_nan=False,
            description="blending exponent; default from the config")] = None,
        output_format: Annotated[Literal["dicom", "png"] | None, Form(
            alias="format", description="blended image as a derived DICOM or a 16-bit PNG; "
            "default: dicom for a DICOM upload, png for a PNG upload")] = None,
        seed: Annotated[int, Form(
            ge=0, le=2**32 - 1, description="crop placement and auto box")] = 0,
        preview: Annotated[bool, Form(
            description="also return an 8-bit PNG of the result")] = False,
    ) -> Response:
        requested = serving.parse_box(box)
        async with self._working:
            image = await self._decode(file)
            fmt = output_format or image.kind
            serving.check_format(image, fmt)  # before the models run
            blend_n = float(n if n is not None else self._config.augment.blend_n)
            result, answers = await self._synthesise(image.pixels, requested, body_part,
                                                     n=blend_n, seed=seed)
            return await asyncio.to_thread(self._lesion_response, image, result, fmt, body_part,
                                           answers, n=blend_n, preview=preview)

    # -- helpers ------------------------------------------------------------------------------

    @property
    def _score_hw(self) -> tuple[int, int]:
        return self._config.image.height, self._config.image.width

    async def _decode(self, file: UploadFile) -> serving.Radiograph:
        data = await file.read()
        return await asyncio.to_thread(serving.decode_radiograph, data, self._limits)

    async def _synthesise(self, image: np.ndarray, box: serving.Box | None, body_part: str, *,
                          n: float, seed: int) -> tuple[serving.LesionResult,
                                                        tuple[ModelOutput, ModelOutput]]:
        """`serving.synthesise`'s steps, with the two model calls batched across requests."""
        translators, scorers = self._translator.served, self._scorer.served  # one switch state
        recipe = serving.Recipe.from_config(self._config, body_part, n=n)
        chosen, crop, patch = await asyncio.to_thread(serving.place_and_cut, image, box, recipe,
                                                      rng=np.random.default_rng(seed))
        translator = await self._call(self.translate_batch((translators, body_part,
                                                             patch[None, None])))
        translated = translator.values[0, 0]
        blended, fitted = await asyncio.to_thread(serving.blend_and_fit, image, translated, crop,
                                                  recipe)
        scorer = await self._call(self.score_batch((scorers, body_part, fitted[None, None])))
        probability = float(scorer.values.reshape(-1)[0])
        return (serving.LesionResult(chosen, crop, patch, translated, blended, probability),
                (translator, scorer))

    @staticmethod
    def _preview_response(image: serving.Radiograph) -> Response:
        png = serving.encode_png(image.pixels, bits=8)
        return _rendered(PreviewResponse(rows=image.shape[0], columns=image.shape[1],
                                         kind=image.kind, png=_b64(png)))

    def _lesion_response(self, image: serving.Radiograph, result: serving.LesionResult,
                         fmt: Literal["dicom", "png"], body_part: str,
                         answers: tuple[ModelOutput, ModelOutput], *, n: float,
                         preview: bool) -> Response:
        """The answer to /v1/lesions: the blended image encoded, the patches, the score against
        the t the training chain chose for this scorer (its registered tag, else the profile's)."""
        translator, scorer = answers
        models = LesionModels(
            translator=ModelVersion(name=translator.name, version=translator.version),
            scorer=ModelVersion(name=scorer.name, version=scorer.version))
        threshold = float(scorer.tags.get(tracking.PSEUDO_LABEL_T_TAG,
                                          self._config.augment.t[body_part]))
        encoded, media_type = serving.encode_result(image, result, fmt, n=n,
                                                    blend=self._config.augment.blend,
                                                    models=models.model_dump())
        return _rendered(LesionResponse(
            body_part=body_part, image=_b64(encoded), image_format=fmt, media_type=media_type,
            patch_png=_b64(serving.encode_png(result.translated)),
            source_patch_png=_b64(serving.encode_png(result.patch)),
            preview_png=_b64(serving.encode_png(result.blended)) if preview else None,
            rows=image.shape[0], columns=image.shape[1], box=list(result.box),
            crop=list(result.crop), n=n, score=result.probability, threshold=threshold,
            passes_threshold=result.probability >= threshold, models=models,
        ))

    async def _call(self, answer: Awaitable[ModelOutput]) -> ModelOutput:
        """Await a batched model call's answer; map its failures to 422/503."""
        timeout = self._service.model_timeout_s
        try:
            out = await asyncio.wait_for(answer, timeout)
        except TimeoutError as exc:
            raise serving.RequestError("model_timeout", f"a model call took over {timeout} s; "
                                       "retry later", status=503) from exc
        if out.error == "not_served":
            raise serving.RequestError("body_part_not_served", out.message)
        if out.error is not None:
            raise serving.RequestError(out.error, out.message, status=503)
        return out


# ---------------------------------------------------------------------------------------------
# the application


def build_app(args: dict[str, Any] | AppArgs | None = None) -> serve.Application:
    """The application graph; `serve run serve.app:build_app profile=smoke num_gpus=0.5`."""
    a = args if isinstance(args, AppArgs) else AppArgs.model_validate(args or {})
    actor = {"num_cpus": a.num_cpus} | ({"num_gpus": a.num_gpus} if a.num_gpus else {})
    scaling: dict[str, Any] = ({} if a.num_replicas is None
                               else {"num_replicas": a.num_replicas, "autoscaling_config": None})

    def models(kind: str, alias: str) -> ModelsConfig:
        return ModelsConfig(models={bp: ModelRef(name=f"boneaug-{kind}-{bp}", alias=alias)
                                    for bp in a.body_parts}, tracking_uri=a.tracking_uri)

    service = ServiceConfig(profile=a.profile, translator=models("unit", a.translator_alias),
                            scorer=models("drn", a.scorer_alias))
    return Api.options(user_config=service.model_dump(mode="json", exclude_none=True),
                       ray_actor_options=actor, **scaling).bind()


app = build_app()
