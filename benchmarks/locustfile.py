"""Locust users for `load_serve.py`: each posts one radiograph to POST /v1/lesions in a loop.

Run by load_serve.py as `locust -f benchmarks/locustfile.py --headless ...` in its own process
(locust patches the standard library with gevent, which Ray must not see). The environment gives
the upload (BONEAUG_LOAD_UPLOAD, a file), the body part (BONEAUG_LOAD_BODY_PART), the bearer
token (BONEAUG_API_TOKEN) and where the model versions seen go (BONEAUG_LOAD_VERSIONS: JSON lines
of [seconds from the start to when the request was sent, translator version, scorer version],
written when the run stops).

A response is a failure unless it is 200 and names both model versions.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any

from locust import HttpUser, constant, events, task

UPLOAD = Path(os.environ["BONEAUG_LOAD_UPLOAD"]).read_bytes()
BODY_PART = os.environ.get("BONEAUG_LOAD_BODY_PART", "tibia")
TOKEN = os.environ["BONEAUG_API_TOKEN"]
START = time.monotonic()
SEEN: list[tuple[float, str, str]] = []


class LesionUser(HttpUser):
    wait_time = constant(0)

    @task
    def lesion(self) -> None:
        sent = round(time.monotonic() - START, 3)
        with self.client.post(
            "/v1/lesions", files={"file": ("radiograph.dcm", UPLOAD)},
            data={"body_part": BODY_PART, "box": "auto", "format": "png"},
            headers={"Authorization": f"Bearer {TOKEN}"}, name="POST /v1/lesions",
            catch_response=True, timeout=120,
        ) as response:
            if response.status_code != 200:
                response.failure(f"{response.status_code}: {response.text[:200]}")
                return
            try:
                models = response.json()["models"]
                versions = (models["translator"]["version"], models["scorer"]["version"])
            except (ValueError, KeyError, TypeError) as exc:
                response.failure(f"no model versions in the response: {exc!r}")
                return
            SEEN.append((sent, *versions))


@events.quitting.add_listener
def _write_results(environment: Any, **_: object) -> None:
    """The final totals (BONEAUG_LOAD_SUMMARY, JSON) and the versions seen."""
    total = environment.stats.total
    summary = {"requests": total.num_requests, "failures": total.num_failures,
               "rps": total.num_requests / max(total.last_request_timestamp - total.start_time,
                                               1e-9),
               **{f"p{q}": total.get_response_time_percentile(q / 100) for q in (50, 95, 99)}}
    Path(os.environ["BONEAUG_LOAD_SUMMARY"]).write_text(json.dumps(summary))
    with open(os.environ["BONEAUG_LOAD_VERSIONS"], "w") as handle:
        handle.writelines(json.dumps(row) + "\n" for row in sorted(SEEN))
