"""Blocking HTTP/1.1 POST with one overall deadline, built on `http.client`.

`http.client`'s own timeout applies to each socket operation separately, so a server that trickles
a byte every few seconds would never time out. Here every socket operation gets the time *left* on
one deadline instead, which bounds the whole request (connect, headers, body) by `timeout`.

Every failure leaves this module as a `ClientError` with a code from `errors`; closing the
connection early is how an unfinished generation gets aborted on the server.
"""
from __future__ import annotations

import http.client
import socket
import time
from collections.abc import Iterator
from contextlib import contextmanager
from fastdeploy_client.errors import ERR_BAD_RESPONSE, ERR_TIMEOUT, ERR_UNREACHABLE, ClientError

_READ_SIZE = 64 * 1024
_USER_AGENT = "fdclient/0.1"


class Deadline:
    """A point in time after which the request has failed with ERR_TIMEOUT."""

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self._end = None if seconds is None else time.monotonic() + seconds

    def remaining(self) -> float | None:
        """Seconds left (None: no limit); raises ClientError once the deadline has passed."""
        if self._end is None:
            return None
        left = self._end - time.monotonic()
        if left <= 0:
            raise self.expired()
        return left

    def expired(self) -> ClientError:
        return ClientError(ERR_TIMEOUT, f"request timed out after {self.seconds} s")


class HttpResponse:
    """An open response whose body reads honour the deadline."""

    def __init__(self, conn: http.client.HTTPConnection, sock: socket.socket,
                 resp: http.client.HTTPResponse, deadline: Deadline) -> None:
        self._conn = conn
        # Kept apart from conn.sock: http.client drops conn.sock when the response owns the socket
        # (Connection: close), yet each read still needs its timeout adjusted.
        self._sock = sock
        self._resp = resp
        self._deadline = deadline
        self.status = resp.status
        self.reason = resp.reason
        self.content_type = (resp.getheader("Content-Type") or "").split(";")[0].strip().lower()

    def iter_chunks(self) -> Iterator[bytes]:
        """Body bytes as they arrive (at most one socket read each), until the body ends."""
        while True:
            with _mapped_errors(self._deadline, "reading the response"):
                self._sock.settimeout(self._deadline.remaining())
                chunk = self._resp.read1(_READ_SIZE)
            if not chunk:
                return
            yield chunk

    def read_all(self) -> bytes:
        return b"".join(self.iter_chunks())

    def close(self) -> None:
        self._resp.close()
        self._conn.close()


def post_json(host: str, port: int, path: str, payload: bytes, deadline: Deadline,
              accept: str) -> HttpResponse:
    """POST a JSON `payload` and return once the response headers are in (any status)."""
    try:
        conn = http.client.HTTPConnection(host, port, timeout=deadline.remaining())
        conn.connect()
    except TimeoutError:
        raise ClientError(ERR_TIMEOUT, f"timed out after {deadline.seconds} s connecting to {host}:{port}")
    except OSError as exc:  # refused, unknown host, unreachable network
        raise ClientError(ERR_UNREACHABLE, f"cannot connect to {host}:{port}: {exc}") from None
    assert conn.sock is not None
    sock = conn.sock
    headers = {"Content-Type": "application/json", "Accept": accept, "User-Agent": _USER_AGENT}
    try:
        with _mapped_errors(deadline, "sending the request"):
            conn.request("POST", path, body=payload, headers=headers)
            sock.settimeout(deadline.remaining())
            resp = conn.getresponse()
    except ClientError:
        conn.close()
        raise
    return HttpResponse(conn, sock, resp, deadline)


@contextmanager
def _mapped_errors(deadline: Deadline, doing: str) -> Iterator[None]:
    """Turn socket and protocol exceptions into ClientError (timeout vs. broken answer)."""
    try:
        yield
    except TimeoutError:
        raise deadline.expired() from None
    except (OSError, http.client.HTTPException) as exc:
        detail = str(exc) or type(exc).__name__
        raise ClientError(ERR_BAD_RESPONSE, f"connection failed while {doing}: {detail}") from None
