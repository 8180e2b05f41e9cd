"""kopf registration only: each handler is a guard and one call into ``nightjar.reconcile``."""

from __future__ import annotations

import logging
from typing import Any

import kopf

from nightjar import __version__
from nightjar.constants import FINALIZER, KOPF_PERSISTENCE_PREFIX

log = logging.getLogger("nightjar")


@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, **_: Any) -> None:
    settings.persistence.finalizer = FINALIZER
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=KOPF_PERSISTENCE_PREFIX)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(prefix=KOPF_PERSISTENCE_PREFIX)
    settings.posting.level = logging.INFO
    settings.watching.server_timeout = 300
    log.info("nightjar operator ready (version %s)", __version__)
