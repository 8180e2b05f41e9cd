"""A kopf retry is logged (and posted as an Event) as a WARNING; a permanent failure stays an ERROR."""

from __future__ import annotations

import logging

import pytest

from nightjar.runner import RetryIsAWarning


@pytest.fixture
def kopf_objects(caplog: pytest.LogCaptureFixture):  # type: ignore[no-untyped-def]
    logger = logging.getLogger("kopf.objects")
    flt = RetryIsAWarning()
    logger.addFilter(flt)
    caplog.set_level(logging.DEBUG, logger="kopf.objects")
    yield logger
    logger.removeFilter(flt)


# kopf's own texts (kopf/_core/actions/execution.py), with a Nightjar Retry message in them.
RETRY = "Handler 'verification_reconcile' failed temporarily: scratch server starting, retrying in 2 s"
TIMING_OUT = "Handler 'backup_delete' failed temporarily but will exceed 10 retries: storage unreachable"
PERMANENT = "Handler 'backup_reconcile' failed permanently: spec.storageRef names no BackupStorage"


def test_a_temporary_failure_is_a_warning(
    kopf_objects: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    kopf_objects.error(RETRY)
    kopf_objects.error(TIMING_OUT)
    assert [(r.levelno, r.levelname) for r in caplog.records] == [
        (logging.WARNING, "WARNING"),
        (logging.WARNING, "WARNING"),
    ]
    assert caplog.records[0].getMessage() == RETRY  # the text is kept whole


def test_a_permanent_failure_and_other_errors_stay_errors(
    kopf_objects: logging.Logger, caplog: pytest.LogCaptureFixture
) -> None:
    kopf_objects.error(PERMANENT)
    kopf_objects.error("Handler 'x' failed with an exception. Will retry.")
    kopf_objects.info("Handler 'y' failed temporarily: at INFO it is left as it is")
    assert [r.levelno for r in caplog.records] == [logging.ERROR, logging.ERROR, logging.INFO]
