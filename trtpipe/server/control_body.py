"""The small JSON body of a control request: repository load/unload/index and shared memory
registration. Read with a size limit, so a client cannot make the server buffer a large body
for a request that only carries a few fields.
"""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import Request

from trtpipe.server.protocol import ProtocolError

MAX_CONTROL_BODY = 64 << 10


async def control_body(request: Request) -> dict[str, Any]:
    """The optional JSON object of a control request (empty body: ``{}``)."""
    body = b""
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_CONTROL_BODY:
            raise ProtocolError(f"control request body is over {MAX_CONTROL_BODY} bytes")
    if not body.strip():
        return {}
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise ProtocolError(f"malformed JSON in control request: {exc}") from None
    if not isinstance(doc, dict):
        raise ProtocolError("control request must be a JSON object")
    params = doc.get("parameters", {})
    if not isinstance(params, dict):
        raise ProtocolError("'parameters' must be an object")
    return doc
