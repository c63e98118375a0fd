"""What a job prints: its stage lines, one progress bar per long loop on a terminal, plain lines
elsewhere, and none of Ray's own INFO chatter unless asked for.

- `Progress`: a tqdm bar when stderr is a terminal (and the job is not ``--verbose``); else one
  logged line per step, as a log file or CI wants them. Inside a Ray worker stderr is never a
  terminal, so a loop there logs its lines and the driver relays them.
- `quiet_ray` (driver) and `train_logging` (Ray Train's workers and controller): Ray Data's
  execution plans, Ray Train's metric reports, worker-group and checkpoint notices go to the Ray
  session's log files (``<session>/logs``) instead of the terminal; warnings and errors still
  show. ``--verbose`` (`set_verbose`) keeps everything on the terminal.
"""

from __future__ import annotations

import logging
import os
import sys
from types import TracebackType
from typing import Any

VERBOSE_VAR = "BONEAUG_VERBOSE"  # exported, so Ray workers started afterwards see it too
RAY_LOGGERS = ("ray.train", "ray.tune", "ray.air", "ray.serve", "ray.util")
DRIVER_LOG = "boneaug-driver-ray.log"
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"  # a job's log lines


def set_verbose(verbose: bool) -> None:
    """Record the choice for this process and the Ray workers it starts (call before
    `ray.init`). Quiet, a local Ray's workers and actors (Ray Data's split coordinators among
    them) also keep Ray Data's INFO logs and Ray's deprecation warnings off the terminal."""
    os.environ[VERBOSE_VAR] = "1" if verbose else ""
    # Ray folds lines of different workers that differ only in digits into one "[repeated 2x
    # across cluster]": the epoch lines of trainings side by side (their run names differ in t
    # or seed) would vanish. Read when ray is first imported
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    if verbose:
        return
    os.environ.setdefault("PYTHONWARNINGS", "ignore::DeprecationWarning")
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # e.g. "Creating initial ... tables"
    os.environ.setdefault("RAY_DATA_LOGGING_CONFIG", _ray_data_logging_config())


def verbose() -> bool:
    return bool(os.environ.get(VERBOSE_VAR))


def interactive() -> bool:
    """Bars, not lines: stderr is a terminal and the job is not verbose."""
    return sys.stderr.isatty() and not verbose()


class Progress:
    """A counted loop: ``with Progress(12, "[drn] baseline", log) as p: p.step(line, auc=..)``.

    On a terminal the bar advances and shows the keyword values; elsewhere `line` is logged.
    """

    def __init__(self, total: int, desc: str, logger: logging.Logger, *, initial: int = 0,
                 unit: str = "it") -> None:
        self.logger = logger
        self.bar: Any = None
        if interactive():
            from tqdm import tqdm

            self.bar = tqdm(total=total, initial=initial, desc=desc, unit=unit, leave=True,
                            dynamic_ncols=True, file=sys.stderr)

    def step(self, line: str, n: int = 1, **shown: float) -> None:
        if self.bar is None:
            self.logger.info("%s", line)
            return
        self.bar.set_postfix({k: f"{v:.3f}" for k, v in shown.items()}, refresh=False)
        self.bar.update(n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, kind: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()


class _BelowWarning(logging.Filter):
    """Keeps a console handler to warnings and errors for Ray's records: those of its loggers,
    and of its modules that log under their file name (Ray Train's report notices)."""

    RAY_SOURCE = f"{os.sep}ray{os.sep}"

    def filter(self, record: logging.LogRecord) -> bool:
        ray = record.name.startswith("ray") or self.RAY_SOURCE in record.pathname
        return record.levelno >= logging.WARNING or not ray


def quiet_ray() -> None:
    """Ray's INFO logs in this process go to the session's log files, not the terminal (call
    after `ray.init`); a no-op when verbose. Ray Data progress bars are off either way: the jobs
    report their own progress, and Ray's per-pass bars, dozens per training, would bury it."""
    import ray
    import ray.data
    from ray.util.debug import log_once

    ray.data.DataContext.get_current().enable_progress_bars = False
    log_once("ray_data_progress_manager_disabled")  # we turned them off: no notice that we did
    if verbose():
        return
    file_handler = _driver_file(_session_logs(ray))
    for name in ("ray", "ray.data", *RAY_LOGGERS):
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if not isinstance(handler, logging.FileHandler) and not _is_session_file(handler):
                _filter(handler)
        if file_handler is not None and name != "ray.data":  # Ray Data keeps its own file
            if file_handler not in logger.handlers and (name == "ray" or not logger.propagate):
                logger.addHandler(file_handler)
    for handler in logging.getLogger().handlers:  # the job's own console handler
        if not isinstance(handler, logging.FileHandler):
            _filter(handler)


def train_logging() -> Any:
    """Ray Train's `LoggingConfig` for a trainer's RunConfig: its worker-group, report and
    checkpoint notices stay in the session's ray-train-* log files unless verbose."""
    import ray.train

    return ray.train.LoggingConfig(log_level="INFO" if verbose() else "WARNING")


def _ray_data_logging_config() -> str:
    """A file with Ray Data's own logging config, its console handler raised to WARNING (its
    log file keeps everything); Ray Data reads RAY_DATA_LOGGING_CONFIG in every process."""
    import copy
    import json
    import tempfile

    from ray.data._internal.logging import DEFAULT_CONFIG

    config = copy.deepcopy(DEFAULT_CONFIG)
    config["handlers"]["console"]["level"] = "WARNING"
    # its one warning says that progress bars are off, which every split coordinator repeats
    config["loggers"]["ray.data._internal.progress"] = {
        "level": "DEBUG", "handlers": ["file"], "propagate": False}
    path = os.path.join(tempfile.gettempdir(), f"boneaug-ray-data-logging-{os.getuid()}.json")
    with open(f"{path}.tmp", "w") as handle:
        json.dump(config, handle)  # JSON is YAML, which is what Ray Data parses
    os.replace(f"{path}.tmp", path)
    return path


_DRIVER_FILES: dict[str, logging.Handler] = {}


def _driver_file(logs: str | None) -> logging.Handler | None:
    """One handler per session log file, however often `quiet_ray` runs (a Tune trial each)."""
    if logs is None:
        return None
    path = os.path.join(logs, DRIVER_LOG)
    if path not in _DRIVER_FILES:
        handler = logging.FileHandler(path)
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
        _DRIVER_FILES[path] = handler
    return _DRIVER_FILES[path]


def _filter(handler: logging.Handler) -> None:
    if not any(isinstance(f, _BelowWarning) for f in handler.filters):
        handler.addFilter(_BelowWarning())


def _is_session_file(handler: logging.Handler) -> bool:
    return type(handler).__name__ == "SessionFileHandler"


def _session_logs(ray: Any) -> str | None:
    """<session dir>/logs of the Ray instance this process is attached to, if it knows one."""
    node = getattr(ray._private.worker, "_global_node", None)
    if node is None:
        return None
    path = os.path.join(node.get_session_dir_path(), "logs")
    return path if os.path.isdir(path) else None


__all__ = ["LOG_FORMAT", "Progress", "interactive", "quiet_ray", "set_verbose", "train_logging",
           "verbose"]
