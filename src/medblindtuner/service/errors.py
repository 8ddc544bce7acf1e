"""Refusals of the cloud service's domain logic.

The domain (jobs, uploads, supervision) knows nothing about HTTP frameworks, so it raises these;
`app.py` turns each into a response with `status_code` and `{"detail": message}` in one
exception handler. The status codes are the API's, so tests of the domain can assert them too.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager

DISK_FULL_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EFBIG})


class CloudError(Exception):
    """A request the service refuses: what the client is told, and with which status."""

    status_code: int = 400
    headers: dict[str, str] | None = None

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


class BadRequest(CloudError):
    """Malformed or unacceptable input (bad manifest, checksum mismatch, secret key...)."""

    status_code = 400


class Unauthorized(CloudError):
    """No bearer token at all."""

    status_code = 401
    headers = {"WWW-Authenticate": "Bearer"}


class Forbidden(CloudError):
    """A token that does not belong to this job."""

    status_code = 403


class NotFound(CloudError):
    """Unknown job, query set, artifact kind or file."""

    status_code = 404


class Conflict(CloudError):
    """Not in this state: uploads after start, a decision nobody asked for, scores too early."""

    status_code = 409


class TooLarge(CloudError):
    """Over a size limit (chunk, file, job, manifest)."""

    status_code = 413


class Unprocessable(CloudError):
    """Well-formed but semantically impossible (a best epoch the job does not keep)."""

    status_code = 422


class InsufficientStorage(CloudError):
    """The service's disk (or its database) is full: nothing of the request was recorded;
    the same request can be retried once space is freed."""

    status_code = 507


class Internal(CloudError):
    """The service's own files are not what it wrote."""

    status_code = 500


class TooManyRequests(CloudError):
    """Over a quota (requests per second of one token, job creations, live jobs)."""

    status_code = 429

    def __init__(self, message: str, retry_after_s: float = 1.0) -> None:
        super().__init__(message)
        self.headers = {"Retry-After": str(max(1, int(retry_after_s + 0.999)))}


def is_disk_full(exc: BaseException) -> bool:
    """An out-of-space failure of the file system or of the database (SQLite says so in its
    message; PostgreSQL too)."""
    if isinstance(exc, OSError) and exc.errno in DISK_FULL_ERRNOS:
        return True
    text = str(exc).lower()
    return "disk is full" in text or "no space left" in text


@contextmanager
def out_of_space_is_507(what: str) -> Iterator[None]:
    """Turn a full disk while doing `what` into a clear 507; other errors pass unchanged."""
    try:
        yield
    except CloudError:
        raise
    except Exception as exc:
        if is_disk_full(exc):
            raise InsufficientStorage(f"the service is out of disk space while {what}; "
                                      "nothing of it was recorded: retry later") from exc
        raise


def printable(text: str, limit: int = 2000) -> str:
    """A message safe to put in a JSON answer: no lone surrogates, bounded length."""
    return text[:limit].encode("utf-8", "backslashreplace").decode("utf-8")
