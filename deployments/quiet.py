"""Quiet logs: a refused request (bad input, overload, a deadline) is the client's matter and is
logged as one line, without a traceback; a server fault is logged once, with its traceback, where it
happened. Ray Serve logs every exception a replica raises as "Request failed." at ERROR with its
traceback, in the replica and again in the proxy; so the ingress raises nothing (it sets the status
and answers), and the cell, which raises to the ingress, filters Serve's record into one line."""
from __future__ import annotations

import logging

from s2d.core.request import cause_of, status_of

SERVE_LOGGER = "ray.serve"


def level_of(http_status: int) -> int:
    """A client's error (4xx) at INFO, one of the server's (5xx: a deadline, a failed engine) at WARNING."""
    return logging.INFO if http_status < 500 else logging.WARNING


class QuietRefusals(logging.Filter):
    """Serve's "Request failed." record of an s2d error with a status, as one line at level_of."""

    def filter(self, record: logging.LogRecord) -> bool:
        e = record.exc_info[1] if record.exc_info else None
        status = status_of(cause_of(e)) if e is not None else None
        if status is not None:
            record.levelno = level_of(status.http)
            record.levelname = logging.getLevelName(record.levelno)
            record.msg, record.args = "request ended %s: %s", (status.grpc, str(cause_of(e))[:300])
            record.exc_info, record.exc_text = None, None
        return True


def install_quiet_refusals():
    """In a replica's process (idempotent)."""
    logger = logging.getLogger(SERVE_LOGGER)
    if not any(isinstance(f, QuietRefusals) for f in logger.filters):
        logger.addFilter(QuietRefusals())
