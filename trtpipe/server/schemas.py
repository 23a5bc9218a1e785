"""Request and error documents of the JSON endpoints, declared once for validation and OpenAPI.

The hot routes read raw bytes and validate them in one pass (pydantic's JSON parser with the
schema, ``TypeAdapter.validate_json``) instead of through FastAPI body parameters, so a request
is parsed once and ``/openapi.json`` still shows its schema (``openapi_extra`` on the routes).
The documents are ``TypedDict``s: validation returns plain dicts (no model objects to build),
which measured about half the cost of ``BaseModel`` on a v2 binary-tensor header. Strict types:
``"1"`` is not an integer and ``"no"`` is not a boolean. Errors name the field
(``inputs[0].shape[1] must be non-negative``); malformed JSON, lone surrogates (``"\\ud800"``)
and nesting past pydantic's depth limit are "malformed JSON".
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import ConfigDict, Field, TypeAdapter, ValidationError, WithJsonSchema
from typing_extensions import NotRequired, TypedDict

from trtpipe.errors import InputError

V2_DATATYPES = [
    "BOOL",
    "UINT8",
    "UINT16",
    "UINT32",
    "UINT64",
    "INT8",
    "INT16",
    "INT32",
    "INT64",
    "FP16",
    "FP32",
    "FP64",
    "BYTES",
]
MAX_RANK = 8
MAX_EMBEDDING_INPUTS = 2048

STRICT = ConfigDict(strict=True, extra="allow")


class TensorParameters(TypedDict, total=False):
    """Per-tensor parameters (others are kept and passed on)."""

    __pydantic_config__ = STRICT  # type: ignore[misc]
    binary_data_size: Annotated[int, Field(ge=0)]
    binary_data: bool
    shared_memory_region: str
    shared_memory_byte_size: Annotated[int, Field(ge=0)]
    shared_memory_offset: Annotated[int, Field(ge=0)]


class RequestParameters(TypedDict, total=False):
    """Request-wide parameters (others are kept and passed on)."""

    __pydantic_config__ = STRICT  # type: ignore[misc]
    binary_data_output: bool
    truncation: bool


class InferInputTensor(TypedDict):
    """One input: ``data`` as JSON (flat or nested, row-major) or ``binary_data_size`` bytes."""

    __pydantic_config__ = STRICT  # type: ignore[misc]
    name: Annotated[str, Field(min_length=1)]
    datatype: Annotated[str, WithJsonSchema({"type": "string", "enum": V2_DATATYPES})]
    shape: Annotated[list[Annotated[int, Field(ge=0)]], Field(max_length=MAX_RANK)]
    data: NotRequired[
        Annotated[Any, WithJsonSchema({"description": "values, flat or nested row-major"})]
    ]
    parameters: NotRequired[TensorParameters]


class InferRequestedOutput(TypedDict):
    __pydantic_config__ = STRICT  # type: ignore[misc]
    name: Annotated[str, Field(min_length=1)]
    parameters: NotRequired[TensorParameters]


class InferRequestDocument(TypedDict):
    """KServe v2 inference request (the JSON part when binary tensor data follows)."""

    __pydantic_config__ = STRICT  # type: ignore[misc]
    id: NotRequired[str]
    inputs: Annotated[list[InferInputTensor], Field(min_length=1)]
    outputs: NotRequired[list[InferRequestedOutput]]
    parameters: NotRequired[RequestParameters]


class EmbeddingsRequest(TypedDict):
    """OpenAI ``/v1/embeddings`` request."""

    __pydantic_config__ = ConfigDict(strict=True, extra="ignore")  # type: ignore[misc]
    input: Annotated[
        Any,
        WithJsonSchema(
            {
                "anyOf": [
                    {"type": "string"},
                    {
                        "type": "array",
                        "items": {"type": "string"},
                        "minItems": 1,
                        "maxItems": MAX_EMBEDDING_INPUTS,
                    },
                ],
                "description": "a text or a list of texts (token-id input is not supported)",
            }
        ),
    ]
    model: NotRequired[str | None]
    encoding_format: NotRequired[Literal["float", "base64"] | None]
    dimensions: NotRequired[
        Annotated[int | None, Field(description="not supported: the width is fixed")]
    ]
    user: NotRequired[str | None]


class ErrorResponse(TypedDict):
    """Every KServe v2 / server error: one line, no traceback."""

    error: str


class OpenAIErrorDetail(TypedDict):
    message: str
    type: Literal["invalid_request_error", "server_error"]
    param: None
    code: None


class OpenAIErrorResponse(TypedDict):
    """Errors under ``/v1``, in OpenAI's shape (what the openai client parses)."""

    error: OpenAIErrorDetail


INFER_REQUEST = TypeAdapter(InferRequestDocument)
EMBEDDINGS_REQUEST = TypeAdapter(EmbeddingsRequest)


class SchemaError(InputError):
    """A JSON document that does not fit its schema (HTTP 400)."""


def parse_infer_document(raw: bytes | memoryview) -> dict[str, Any]:
    """The v2 infer JSON document, validated; plain dicts and lists come back."""
    doc: dict[str, Any] = validate(INFER_REQUEST, raw, "infer request")
    return doc


def parse_embeddings_document(raw: bytes) -> dict[str, Any]:
    doc: dict[str, Any] = validate(EMBEDDINGS_REQUEST, raw, "embeddings request")
    return doc


def validate(adapter: TypeAdapter[Any], raw: bytes | memoryview, what: str) -> Any:
    try:
        return adapter.validate_json(bytes(raw) if isinstance(raw, memoryview) else raw)
    except ValidationError as exc:
        raise SchemaError(describe(exc, what)) from None


# Top-level fields whose absence has its own wording.
REQUIRED_MESSAGES = {
    ("inputs",): "infer request needs a non-empty 'inputs' list",
    ("input",): "'input' is required: a string or a non-empty list of strings",
}


def describe(exc: ValidationError, what: str) -> str:
    """One line naming the field of the first error (``inputs[0].shape[1] must be ...``)."""
    error = exc.errors(include_url=False)[0]
    kind, loc, ctx = error["type"], tuple(error["loc"]), error.get("ctx") or {}
    if kind == "json_invalid":
        return f"malformed JSON in {what}: {ctx.get('error', error['msg'])}"
    if loc in REQUIRED_MESSAGES and kind in ("missing", "too_short"):
        return REQUIRED_MESSAGES[loc]
    if not loc and kind in ("dict_type", "model_type", "model_attributes_type"):
        return f"{what} must be a JSON object"
    return f"{what}: {field_path(loc)} {phrase(kind, ctx, error['msg'])}"


def field_path(loc: tuple[Any, ...]) -> str:
    path = ""
    for part in loc:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or "document"


def phrase(kind: str, ctx: dict[str, Any], message: str) -> str:
    if kind == "greater_than_equal" and ctx.get("ge") == 0:
        return "must be non-negative"
    simple = {
        "missing": "is required",
        "dict_type": "must be an object",
        "model_type": "must be an object",
        "list_type": "must be a list",
        "string_type": "must be a string",
        "int_type": "must be an integer",
        "bool_type": "must be true or false",
        "string_too_short": "must not be empty",
    }
    if kind in simple:
        return simple[kind]
    if kind == "too_short":
        return f"must hold at least {ctx.get('min_length')} item(s)"
    if kind == "too_long":
        return f"must hold at most {ctx.get('max_length')} items"
    if kind == "literal_error":
        return f"must be one of {ctx.get('expected')}"
    return message[:1].lower() + message[1:]


# -- OpenAPI --------------------------------------------------------------------------------
DOCUMENTS: dict[str, TypeAdapter[Any]] = {
    "InferRequest": INFER_REQUEST,
    "EmbeddingsRequest": EMBEDDINGS_REQUEST,
}


def request_body(name: str) -> dict[str, Any]:
    """``openapi_extra`` for a route that reads its body raw: the document's schema."""
    assert name in DOCUMENTS
    ref = {"$ref": f"#/components/schemas/{name}"}
    return {"requestBody": {"required": True, "content": {"application/json": {"schema": ref}}}}


def error_responses(openai: bool = False) -> dict[int | str, dict[str, Any]]:
    """``responses=`` for a route: the statuses it answers besides 200, and their body."""
    model = OpenAIErrorResponse if openai else ErrorResponse
    reasons = {
        400: "the request does not fit the protocol or the model (the message says how)",
        404: "unknown model or version",
        500: "a device failed while running the batch",
        503: "queue full, model not ready, or the server is shutting down",
        504: "not answered within the request timeout",
    }
    return {status: {"model": model, "description": text} for status, text in reasons.items()}


def install_openapi(app: Any) -> None:
    """Add the request documents to the app's ``/openapi.json`` components."""
    generate = app.openapi

    def openapi() -> dict[str, Any]:
        if app.openapi_schema:
            return dict(app.openapi_schema)
        document: dict[str, Any] = generate()
        schemas = document.setdefault("components", {}).setdefault("schemas", {})
        for name, adapter in DOCUMENTS.items():
            schema = adapter.json_schema(ref_template="#/components/schemas/{model}")
            schemas.update(schema.pop("$defs", {}))
            schemas[name] = schema
        app.openapi_schema = document
        return document

    app.openapi = openapi
