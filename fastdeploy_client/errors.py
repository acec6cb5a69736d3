"""Error codes of the client and the error dict every failure comes back as.

The seed's contract is that failures are *returned* (or yielded by a stream), never raised, as
`{"error_msg": str, "error_code": int, "req_id": str}`. When the server answered with an HTTP error,
`error_code` is that HTTP status; the codes below are used only for failures the client detects
itself. They reuse HTTP numbers so a caller can treat both kinds alike.
"""
from __future__ import annotations

from typing import Any

ERR_INVALID_ARGUMENT = 400
"""The call's arguments cannot be turned into a request (e.g. an empty or malformed `message`)."""
ERR_TIMEOUT = 408
"""`timeout` seconds passed before the answer was complete (connect, headers or stream)."""
ERR_BAD_RESPONSE = 502
"""The server answered something unusable: malformed JSON/SSE, a dropped connection mid-answer."""
ERR_UNREACHABLE = 503
"""No connection could be made: refused, unknown host, network unreachable."""


class ClientError(Exception):
    """Internal carrier of a failure; ChatBot converts it into the error dict at its boundary."""

    def __init__(self, code: int, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def error_dict(code: int, message: str, req_id: str | None) -> dict[str, Any]:
    return {"error_msg": message, "error_code": code, "req_id": req_id}
