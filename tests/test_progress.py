"""What a job prints: bars on a terminal, lines elsewhere, Ray's INFO chatter in its log files."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest

from boneaug import progress


@pytest.fixture
def quiet(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(progress.VERBOSE_VAR, "")


def test_off_a_terminal_each_step_is_one_logged_line(
    quiet: None, caplog: pytest.LogCaptureFixture
) -> None:
    log = logging.getLogger("boneaug.test.progress")
    with caplog.at_level(logging.INFO, logger=log.name), progress.Progress(3, "[x]", log) as bar:
        assert bar.bar is None  # pytest's stderr is not a terminal
        for i in range(3):
            bar.step(f"[x] step {i + 1}/3", loss=0.5)
    assert [r.getMessage() for r in caplog.records] == ["[x] step 1/3", "[x] step 2/3",
                                                        "[x] step 3/3"]


def test_on_a_terminal_the_steps_move_one_bar_and_log_nothing(
    quiet: None, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    terminal = io.StringIO()
    monkeypatch.setattr(progress, "interactive", lambda: True)
    monkeypatch.setattr(progress.sys, "stderr", terminal)
    log = logging.getLogger("boneaug.test.progress")
    with caplog.at_level(logging.INFO, logger=log.name):
        with progress.Progress(4, "[drn] baseline", log, initial=1, unit="epoch") as bar:
            for _ in range(3):
                bar.step("never logged", auc=0.8125)
    assert not caplog.records
    shown = terminal.getvalue()
    assert "[drn] baseline" in shown and "4/4" in shown and "auc=0.812" in shown


def test_verbose_means_lines_even_on_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(progress.VERBOSE_VAR, "1")
    monkeypatch.setattr(progress.sys.stderr, "isatty", lambda: True, raising=False)
    assert progress.verbose() and not progress.interactive()
    assert progress.train_logging().log_level == "INFO"
    progress.set_verbose(False)
    assert progress.train_logging().log_level == "WARNING"


def test_ray_info_goes_to_the_session_log_not_the_console_warnings_still_show(
    quiet: None, ray_session: None
) -> None:
    import ray

    console = io.StringIO()
    handler = logging.StreamHandler(console)
    for name in ("ray.data", "ray.train"):
        logging.getLogger(name).addHandler(handler)
    try:
        progress.quiet_ray()
        progress.quiet_ray()  # again, as every Tune trial does: still one file handler
        logging.getLogger("ray.data").info("Execution plan of Dataset test")
        logging.getLogger("ray.train").info("Reporting training result 1")
        logging.getLogger("ray.train").warning("a worker died")
        logging.getLogger("boneaug.x").info("not Ray: untouched")  # no handler here, no output
    finally:
        for name in ("ray.data", "ray.train"):
            logging.getLogger(name).removeHandler(handler)
    assert console.getvalue() == "a worker died\n"
    session = Path(ray._private.worker._global_node.get_session_dir_path())
    driver_log = (session / "logs" / progress.DRIVER_LOG).read_text()
    assert driver_log.count("Reporting training result 1") == 1
    assert "Execution plan of Dataset test" in (session / "logs" / "ray-data" /
                                                "ray-data.log").read_text()


def test_a_ray_module_logging_under_its_file_name_is_kept_off_the_console(quiet: None) -> None:
    console = io.StringIO()
    handler = logging.StreamHandler(console)
    handler.addFilter(progress._BelowWarning())
    log = logging.getLogger("/venv/site-packages/ray/train/v2/_internal/execution/context.py")
    record = log.makeRecord(log.name, logging.INFO, "/venv/site-packages/ray/train/context.py",
                            1, "Reporting training result 1", (), None)
    handler.handle(record)
    mine = logging.getLogger("boneaug.train.unit")
    handler.handle(mine.makeRecord(mine.name, logging.INFO, "/work/boneaug/train/unit.py", 1,
                                   "[unit] iteration 4/4", (), None))
    assert console.getvalue() == "[unit] iteration 4/4\n"


def test_the_console_gets_the_result_tables_and_the_report_keeps_the_rest() -> None:
    from boneaug.runtime import console_summary

    markdown = "\n\n".join([
        "# boneaug report", "| Type | AUC |\n|---|---|\n| Baseline | 0.80 |",
        "Paired AUC difference against the baseline:", "| Type | ΔAUC |\n|---|---|",
        "Test AUC by conspicuity band: each band's positives", "| Type | [0, 0.3) |\n|---|---|",
        "Learning curve: the baseline trained on a share", "| positives | AUC |\n|---|---|",
        "![Learning curve, humerus](learning_curve_humerus.png)",
        "Side by side with the paper (Table 3a)", "| Type | paper |\n|---|---|",
        "Paper note: Table 3 has no t column",
        "Validation-chosen t: per type and training seed", "| Type | seed 0 |\n|---|---|",
        "report done"])
    shown = console_summary(markdown)
    assert shown == "\n".join([
        "| Type | AUC |\n|---|---|\n| Baseline | 0.80 |",
        "Paired AUC difference against the baseline:", "| Type | ΔAUC |\n|---|---|",
        "report done"])


def test_quiet_workers_keep_ray_datas_progress_notice_and_mlflows_info_off_the_console(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each Ray Data split coordinator (a separate process) warned that progress bars are off,
    and MLflow announced its table creation: the workers' logging config sends the first to
    Ray Data's file only, and MLflow starts at WARNING."""
    import json
    import os

    monkeypatch.setenv(progress.VERBOSE_VAR, "1")  # restored afterwards, with the rest
    for var in ("RAY_DATA_LOGGING_CONFIG", "MLFLOW_LOGGING_LEVEL", "PYTHONWARNINGS"):
        monkeypatch.delenv(var, raising=False)
    progress.set_verbose(False)
    assert os.environ["MLFLOW_LOGGING_LEVEL"] == "WARNING"
    config = json.loads(Path(os.environ["RAY_DATA_LOGGING_CONFIG"]).read_text())
    notice = config["loggers"]["ray.data._internal.progress"]
    assert notice["handlers"] == ["file"] and notice["propagate"] is False
    assert config["loggers"]["ray.data"]["handlers"] == ["file", "console"]  # the rest still shows
