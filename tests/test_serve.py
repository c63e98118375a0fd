"""The lesion service over real HTTP: Ray Serve on a local Ray, models from a sqlite MLflow
registry.

Serve is deployed from serve/config.yaml's applications (see tests/_serve_support.py) on
127.0.0.1 and a free port; the models are the smoke UNIT and DRN trained a few steps here.
"""

from __future__ import annotations

import base64
import io
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `serve` is a top-level package

from _serve_support import (  # noqa: E402
    BODY_PART,
    CONFIG_YAML,
    Service,
    dicom_bytes,
    make_registry,
    png_bytes,
    radiograph,
    start_service,
)

from boneaug import serving  # noqa: E402

pytestmark = pytest.mark.slow
CHOSEN_T = 0.42  # the t a training chain tagged the scorer's version with


@pytest.fixture(scope="module")
def service(ray_session: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    registry = make_registry(tmp_path_factory.mktemp("serve-registry"), pseudo_label_t=CHOSEN_T)
    yield from start_service(registry)


@pytest.fixture(scope="module")
def image() -> np.ndarray:
    return radiograph(256, 128, seed=3)


def _png(b64: str) -> np.ndarray:
    from PIL import Image

    array = np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))))
    return array.astype(np.float32) / (65535.0 if array.dtype == np.uint16 else 255.0)


# ---------------------------------------------------------------------------------------------
# pure helpers (no Serve)


def test_auto_box_lies_on_bone_and_is_deterministic() -> None:
    image = radiograph(512, 256, seed=1)
    boxes = {serving.auto_box(image, min_mean_intensity=0.15, rng=np.random.default_rng(7))
             for _ in range(3)}
    assert len(boxes) == 1
    x0, y0, x1, y1 = boxes.pop()
    assert x1 - x0 == y1 - y0 > 8
    assert image[y0:y1, x0:x1].mean() > 0.5  # inside the bone, not soft tissue (~0.2)
    assert abs((x0 + x1) / 2 - 128) < 20  # on the bone's axis
    others = {serving.auto_box(image, min_mean_intensity=0.15, rng=np.random.default_rng(s))
              for s in range(8)}
    assert len(others) > 1  # the seed chooses among the brightest windows
    landscape = serving.auto_box(image.T.copy(), min_mean_intensity=0.15,
                                 rng=np.random.default_rng(7))
    assert landscape == (y0, x0, y1, x1)
    with pytest.raises(serving.RequestError) as err:
        serving.auto_box(np.full((64, 32), 0.05, np.float32), min_mean_intensity=0.15,
                         rng=np.random.default_rng(0))
    assert err.value.reason == "no_bone"


def test_decode_png_8_and_16_bit_and_box_parsing(image: np.ndarray) -> None:
    sixteen = serving.decode_radiograph(png_bytes(image, bits=16))
    eight = serving.decode_radiograph(png_bytes(image, bits=8))
    assert sixteen.kind == eight.kind == "png" and sixteen.shape == (256, 128)
    assert np.abs(sixteen.pixels - image).max() < 1e-4
    assert np.abs(eight.pixels - image).max() < 0.5 / 255 + 1e-6
    assert serving.parse_box(" auto ") is None
    assert serving.parse_box("1, 2,30,40") == (1, 2, 30, 40)
    for bad in ("1,2,3", "a,b,c,d", "1.5,2,3,4", ""):
        with pytest.raises(serving.RequestError):
            serving.parse_box(bad)


def test_check_health_raises_until_a_model_loads(service: Service) -> None:
    """A replica's models, in-process: unhealthy with no model, healthy once one loads."""
    from serve.app import RegistryModels
    from serve.schemas import ModelsConfig

    models = RegistryModels("translator", serving.run_translator)
    with pytest.raises(RuntimeError, match="no model loaded"):
        models.check_health()
    uri = service.registry.uri
    models.swap(models.stage(ModelsConfig.model_validate(
        {"models": {"tibia": {"name": "boneaug-unit-absent"}}, "tracking_uri": uri})))
    with pytest.raises(RuntimeError, match="boneaug-unit-absent"):
        models.check_health()
    staged = models.stage(ModelsConfig.model_validate(
        {"models": {"tibia": {"name": "boneaug-unit-tibia", "version": "1"}},
         "tracking_uri": uri}))
    assert models.models() == {}  # staged, not served yet
    models.swap(staged)
    models.check_health()
    assert models.models() == {"tibia": {"name": "boneaug-unit-tibia", "version": "1"}}
    with pytest.raises(Exception, match="one of alias or version, not both"):
        ModelsConfig.model_validate(
            {"models": {"tibia": {"name": "x", "alias": "champion", "version": "1"}}})


def test_token_is_required_to_start() -> None:
    from boneaug.errors import ConfigError
    from serve.app import require_token

    for environ in ({}, {"BONEAUG_API_TOKEN": ""}, {"BONEAUG_API_TOKEN": "short"}):
        with pytest.raises(ConfigError, match="refusing to start"):
            require_token(environ)
    assert require_token({"BONEAUG_API_TOKEN": " " + "k" * 20 + "\n"}) == "k" * 20


def test_request_errors_answer_with_their_status_reason_and_message() -> None:
    """One error type for every route: a client's bad input is a 422, a model that cannot
    answer a 503, both as the documented ErrorResponse body and never a traceback."""
    import asyncio
    import json

    from serve.app import _unservable

    for exc, status in ((serving.RequestError("bad_box", "box 'x' must be ..."), 422),
                        (serving.RequestError("model_error", "the scorer failed: ValueError",
                                              status=503), 503),
                        (serving.RequestError("model_timeout", "took over 30 s", status=503), 503)):
        response = asyncio.run(_unservable(None, exc))  # type: ignore[arg-type]
        assert response.status_code == status
        assert json.loads(response.body) == {"reason": exc.reason, "message": exc.message}


def test_config_yaml_in_sync_with_code(tmp_path: Path) -> None:
    """`serve build serve.app:app` now == the applications of serve/config.yaml (name aside)."""
    from click.testing import CliRunner
    from ray.serve.scripts import build

    out = tmp_path / "built.yaml"
    result = CliRunner().invoke(build, ["serve.app:app", "-o", str(out)])
    assert result.exit_code == 0, result.output
    built = yaml.safe_load(out.read_text())["applications"]
    shipped = yaml.safe_load(CONFIG_YAML.read_text())
    assert shipped["applications"][0].pop("name") == "boneaug"
    built[0].pop("name")
    assert shipped["applications"] == built, (
        "serve/config.yaml is stale: regenerate it (see its header)")
    assert shipped["http_options"]["request_timeout_s"] > 0
    deployments = {d["name"]: d for d in built[0]["deployments"]}
    assert set(deployments) == {"Api"}  # the models run in its replicas (see serve.app.Api)
    for d in deployments.values():
        assert d["ray_actor_options"]["num_cpus"] == 0.5
        assert d["autoscaling_config"]["min_replicas"] >= 1


# ---------------------------------------------------------------------------------------------
# success paths


def test_public_routes_need_no_token(service: Service) -> None:
    health = service.session.get(service.base + "/healthz", timeout=10)
    assert health.status_code == 200 and health.json() == {"status": "ok"}
    page = service.session.get(service.base + "/", timeout=10)
    assert page.status_code == 200 and "<canvas" in page.text and "/v1/lesions" in page.text
    assert "default-src 'none'" in page.headers["content-security-policy"]
    assert "http://" not in page.text and "https://" not in page.text  # no external assets


def test_lesion_png_matches_the_in_process_pipeline(service: Service, image: np.ndarray) -> None:
    from boneaug import tracking
    from boneaug.config import TrackingConfig

    upload = png_bytes(image)
    response = service.post("/v1/lesions", upload, {"body_part": BODY_PART, "box": "50,100,78,128",
                                                     "seed": "5", "n": "3"})
    assert response.status_code == 200, response.text
    body = response.json()
    config = service.registry.config
    assert body["image_format"] == "png" and body["media_type"] == "image/png"
    assert body["box"] == [50, 100, 78, 128] and body["n"] == 3.0
    x0, y0, x1, y1 = body["crop"]
    assert x1 - x0 == y1 - y0 >= 28 and x0 <= 50 and y0 <= 100 and x1 >= 78 and y1 >= 128
    assert 0.0 <= body["score"] <= 1.0
    # the t the chain chose (a tag on the scorer's version), not the profile's
    assert body["threshold"] == CHOSEN_T != config.augment.t[BODY_PART]
    assert body["passes_threshold"] == (body["score"] >= body["threshold"])
    assert body["models"] == {"translator": {"name": "boneaug-unit-tibia", "version": "1"},
                              "scorer": {"name": "boneaug-drn-tibia", "version": "1"}}
    blended = _png(body["image"])
    patch = _png(body["patch_png"])
    assert blended.shape == image.shape and patch.shape == (config.patches.size,) * 2
    original = serving.decode_radiograph(upload).pixels
    outside = np.ones(image.shape, bool)
    outside[y0:y1, x0:x1] = False
    assert np.abs(blended - original)[outside].max() < 1e-4  # untouched outside the crop
    assert np.abs(blended - original)[~outside].max() > 1e-3  # and a lesion inside it

    # the same functions in-process, with the same registered models, give the same answer
    tracking.configure(TrackingConfig(tracking_uri=service.registry.uri))
    unit = tracking.load_torch_model("models:/boneaug-unit-tibia@champion")
    drn = tracking.load_torch_model("models:/boneaug-drn-tibia@champion")
    local = serving.synthesise(
        original, (50, 100, 78, 128), serving.Recipe.from_config(config, BODY_PART, n=3.0),
        translate=lambda p: serving.run_translator(unit, p),
        score=lambda x: serving.run_scorer(drn, x), rng=np.random.default_rng(5))
    assert list(local.crop) == body["crop"]
    assert body["score"] == pytest.approx(local.probability, abs=1e-5)
    assert np.abs(blended - local.blended).max() < 1e-4
    assert np.abs(patch - local.translated).max() <= 0.5 / 255 + 1e-6


def test_lesion_dicom_in_dicom_out_with_provenance(service: Service, image: np.ndarray) -> None:
    from boneaug.io.dicom import XrayImage, read_provenance, read_xray

    upload = dicom_bytes(image)
    source = read_xray(upload)
    assert isinstance(source, XrayImage)
    response = service.post("/v1/lesions", upload,
                            {"body_part": BODY_PART, "box": "auto", "preview": "true"})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["image_format"] == "dicom" and body["media_type"] == "application/dicom"
    data = base64.b64decode(body["image"])
    derived = read_xray(data)
    assert isinstance(derived, XrayImage) and (derived.rows, derived.columns) == image.shape
    assert derived.study_uid == source.study_uid and derived.sop_uid != source.sop_uid
    provenance = read_provenance(data)
    assert (provenance["translator_model"] == "boneaug-unit-tibia"
            and provenance["translator_version"] == "1")
    assert provenance["scorer_model"] == "boneaug-drn-tibia" and provenance["scorer_version"] == "1"
    assert provenance["box"] == ",".join(map(str, body["box"]))
    assert provenance["n"] == pytest.approx(body["n"]) and provenance["blend"] == "alpha"
    assert provenance["score"] == pytest.approx(body["score"], abs=1e-5)
    x0, y0, x1, y1 = body["box"]
    assert source.pixels[y0:y1, x0:x1].mean() > 0.4  # the auto box sits on bone
    assert _png(body["preview_png"]).shape == image.shape


def test_score_and_models(service: Service, image: np.ndarray) -> None:
    response = service.post("/v1/score", png_bytes(image), {"body_part": BODY_PART})
    assert response.status_code == 200, response.text
    body = response.json()
    assert 0.0 <= body["probability"] <= 1.0
    assert (body["model"], body["version"]) == ("boneaug-drn-tibia", "1")
    again = service.post("/v1/score", dicom_bytes(image), {"body_part": BODY_PART}).json()
    # 12-bit DICOM vs 16-bit PNG
    assert again["probability"] == pytest.approx(body["probability"], abs=2e-3)
    models = service.session.get(service.base + "/v1/models", headers=service.auth,
                                 timeout=10).json()
    assert models["body_parts"] == [BODY_PART]
    preview = service.post("/v1/preview", dicom_bytes(image)).json()
    assert (preview["rows"], preview["columns"], preview["kind"]) == (256, 128, "dicom")


# ---------------------------------------------------------------------------------------------
# auth and bad input


def test_auth_is_required_everywhere_but_page_and_health(service: Service,
                                                         image: np.ndarray) -> None:
    upload = png_bytes(image)
    wrong = {"Authorization": "Bearer " + "x" * 32}
    for method, path in (("POST", "/v1/lesions"), ("POST", "/v1/score"), ("POST", "/v1/preview"),
                         ("GET", "/v1/models"), ("GET", "/openapi.json"), ("GET", "/docs")):
        kwargs = ({"files": {"file": ("x", upload)}, "data": {"body_part": BODY_PART}}
                  if method == "POST" else {})
        missing = service.session.request(method, service.base + path, timeout=10, **kwargs)
        assert missing.status_code == 401, (path, missing.text)
        assert missing.headers["www-authenticate"].startswith("Bearer")
        assert missing.json()["reason"] == "missing_token"
        bad = service.session.request(method, service.base + path, headers=wrong, timeout=10,
                                      **kwargs)
        assert bad.status_code == 403, (path, bad.text)
        basic = service.session.request(method, service.base + path,
                                        headers={"Authorization": "Basic eDp5"},
                                        timeout=10, **kwargs)
        assert basic.status_code == 401
    docs = service.session.get(service.base + "/openapi.json", headers=service.auth, timeout=10)
    assert docs.status_code == 200 and "/v1/lesions" in docs.json()["paths"]
    assert service.session.get(service.base + "/docs", headers=service.auth,
                               timeout=10).status_code == 200


def _too_large_chunks(total: int) -> Iterator[bytes]:
    boundary = b"--b0undary\r\n"
    yield boundary + b'Content-Disposition: form-data; name="file"; filename="x"\r\n\r\n'
    chunk = b"\0" * 65536
    for _ in range(total // len(chunk) + 1):
        yield chunk


def test_every_bad_input_is_a_4xx_with_a_reason(service: Service, image: np.ndarray) -> None:
    import pydicom.data
    from PIL import Image

    good_png = png_bytes(image)
    good_dicom = dicom_bytes(image)
    rgb = io.BytesIO()
    Image.fromarray(np.zeros((64, 32, 3), np.uint8)).save(rgb, format="PNG")
    def testdata(name: str) -> bytes:  # real DICOM objects shipped with pydicom (no download)
        return Path(pydicom.data.get_testdata_file(name, download=False)).read_bytes()

    lesion = {"body_part": BODY_PART}
    cases = [
        # (name, path, upload, fields, status, reason)
        ("not an image", "/v1/lesions", b"hello, this is not a radiograph" * 10, lesion, 422,
         "not_dicom"),
        ("empty file", "/v1/score", b"", lesion, 422, "empty_upload"),
        ("truncated DICOM", "/v1/lesions", good_dicom[: len(good_dicom) // 2], lesion, 422,
         "truncated"),
        ("colour DICOM", "/v1/score", testdata("SC_rgb_small_odd.dcm"), lesion, 422, "colour"),
        ("multi-frame DICOM", "/v1/lesions", testdata("rtdose.dcm"), lesion, 422, "multi_frame"),
        ("truncated real DICOM", "/v1/score", testdata("MR_truncated.dcm"), lesion, 422,
         "truncated"),
        ("huge DICOM", "/v1/score", dicom_bytes(np.zeros((7000, 16), np.float32)), lesion, 422,
         "absurd_dimensions"),
        ("truncated PNG", "/v1/lesions", good_png[: len(good_png) // 2], lesion, 422,
         "corrupt_png"),
        ("colour PNG", "/v1/score", rgb.getvalue(), lesion, 422, "unsupported_png"),
        ("huge dimensions", "/v1/score", png_bytes(np.zeros((7000, 16), np.float32), bits=8),
         lesion, 422, "image_too_large"),
        ("tiny image", "/v1/lesions", png_bytes(np.zeros((8, 8), np.float32)), lesion, 422,
         "image_too_small"),
        ("box outside", "/v1/lesions", good_png, {**lesion, "box": "100,200,140,300"}, 422,
         "box_outside_image"),
        ("negative box", "/v1/lesions", good_png, {**lesion, "box": "-5,0,10,10"}, 422,
         "box_outside_image"),
        ("empty box", "/v1/lesions", good_png, {**lesion, "box": "10,10,10,20"}, 422,
         "box_outside_image"),
        ("malformed box", "/v1/lesions", good_png, {**lesion, "box": "1;2;3;4"}, 422, "bad_box"),
        ("no bone for auto", "/v1/lesions", png_bytes(np.full((64, 32), 0.02, np.float32)), lesion,
         422, "no_bone"),
        ("n = 0", "/v1/lesions", good_png, {**lesion, "n": "0"}, 422, "invalid_request"),
        ("n = nan", "/v1/lesions", good_png, {**lesion, "n": "nan"}, 422, "invalid_request"),
        ("n = inf", "/v1/lesions", good_png, {**lesion, "n": "inf"}, 422, "invalid_request"),
        ("unknown body part", "/v1/score", good_png, {"body_part": "skull"}, 422,
         "invalid_request"),
        ("body part not served", "/v1/lesions", good_png, {"body_part": "femur"}, 422,
         "body_part_not_served"),
        ("dicom from png", "/v1/lesions", good_png, {**lesion, "format": "dicom"}, 422,
         "dicom_needs_dicom_upload"),
        ("unknown format", "/v1/lesions", good_png, {**lesion, "format": "jpeg"}, 422,
         "invalid_request"),
        ("seed < 0", "/v1/lesions", good_png, {**lesion, "seed": "-1"}, 422, "invalid_request"),
        ("path as body part", "/v1/score", good_png, {"body_part": "../../etc/passwd"}, 422,
         "invalid_request"),
    ]
    for name, path, upload, fields, status, reason in cases:
        response = service.post(path, upload, fields)
        assert response.status_code == status, (name, response.status_code, response.text)
        assert response.json()["reason"] == reason, (name, response.text)
        assert response.json()["message"], name

    missing_file = service.session.post(service.base + "/v1/score", headers=service.auth,
                                        data={"body_part": BODY_PART}, timeout=10)
    assert missing_file.status_code == 422 and missing_file.json()["reason"] == "invalid_request"
    as_json = service.session.post(service.base + "/v1/lesions", headers=service.auth,
                                   json={"file": "x"}, timeout=10)
    assert 400 <= as_json.status_code < 500

    limit = service.deployment("Api")["user_config"]["max_upload_bytes"]
    declared = service.post("/v1/lesions", b"\0" * (limit + 1), lesion)
    assert declared.status_code == 413 and declared.json()["reason"] == "upload_too_large"
    chunked = service.session.post(
        service.base + "/v1/lesions", data=_too_large_chunks(limit + 1),
        headers={**service.auth, "Content-Type": "multipart/form-data; boundary=b0undary"},
        timeout=30)
    assert chunked.status_code == 413, chunked.text

    # the replicas survived all of it
    assert service.post("/v1/score", good_png, lesion).status_code == 200


def test_fuzz_openapi_schema_no_5xx(service: Service, image: np.ndarray) -> None:
    """Schemathesis: positive and negative cases for every operation; nothing may answer 5xx."""
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis import GenerationMode

    schema = schemathesis.openapi.from_url(service.base + "/openapi.json", headers=service.auth,
                                           timeout=30)
    upload = png_bytes(image)
    statuses: list[tuple[str, int]] = []
    failures: list[str] = []

    for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
        @settings(max_examples=60, derandomize=True, database=None, deadline=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=schema.as_strategy(generation_mode=mode))
        def run(case: object) -> None:
            if (case.method == "POST" and isinstance(case.body, dict) and "file" in case.body
                    and len(statuses) % 2):
                # every other upload is a real radiograph: reach the pipeline
                case.body["file"] = upload
            response = case.call(base_url=service.base, headers=service.auth, timeout=60)
            statuses.append((f"{case.method} {case.path}", response.status_code))
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} -> {response.status_code}: "
                                f"{response.text[:300]}")

        run()

    from collections import Counter

    print(f"\nfuzz: {len(statuses)} requests: "
          + ", ".join(f"{op} {status} x{k}"
                      for (op, status), k in sorted(Counter(statuses).items())))
    assert not failures, failures
    assert len(statuses) >= 60
    # fuzzed fields reached the models
    assert any(s == 200 for op, s in statuses if op.startswith("POST"))
    assert service.session.get(service.base + "/healthz", timeout=10).status_code == 200


# ---------------------------------------------------------------------------------------------
# model switch


def test_model_switch_by_alias_without_downtime(service: Service, image: np.ndarray) -> None:
    import copy

    from _serve_support import train_translator
    from ray import serve

    upload = png_bytes(image)
    fields = {"body_part": BODY_PART, "box": "50,100,78,128", "format": "png"}
    replica = serve.get_deployment_handle("Api", app_name="boneaug")
    replica_before = replica.replica.remote().result(timeout_s=30)
    seen: list[tuple[int, str]] = []
    stop = threading.Event()

    def hammer() -> None:
        while not stop.is_set():
            try:
                response = service.post("/v1/lesions", upload, fields, timeout=60)
                version = (response.json()["models"]["translator"]["version"] if response.ok
                           else response.text)
                seen.append((response.status_code, version))
            except Exception as exc:  # noqa: BLE001 - a failed request is a finding, not a crash
                seen.append((0, repr(exc)))

    def wait_for_requests(count: int) -> None:
        deadline = time.monotonic() + 120
        while len(seen) < count and time.monotonic() < deadline:
            time.sleep(0.05)

    worker = threading.Thread(target=hammer, daemon=True)
    worker.start()
    try:
        wait_for_requests(3)
        new_version = service.registry.add(
            "unit", train_translator(service.registry.config, iterations=1, seed=11),
            alias="champion")
        config = copy.deepcopy(service.config)
        (deployment,) = config["applications"][0]["deployments"]
        deployment["user_config"]["translator"]["revision"] = 1
        t0 = time.monotonic()
        service.apply(config)
        while time.monotonic() - t0 < 60:
            models = service.session.get(service.base + "/v1/models", headers=service.auth,
                                         timeout=10).json()
            if models["translator"][BODY_PART]["version"] == new_version:
                break
            time.sleep(0.2)
        wait_for_requests(len(seen) + 3)
    finally:
        stop.set()
        worker.join(timeout=60)
    print(f"\nswitch: {len(seen)} requests during the switch, versions {[v for _, v in seen]}")
    assert all(status == 200 for status, _ in seen), seen
    versions = [v for _, v in seen]
    assert versions[0] == "1" and versions[-1] == new_version == "2"
    assert versions == sorted(versions)  # once switched, never back
    # reconfigured, not restarted
    assert replica.replica.remote().result(timeout_s=30) == replica_before
