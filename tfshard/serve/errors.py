"""The front's errors: OpenAI-shaped JSON bodies, and engine exceptions mapped to HTTP statuses."""

from tfshard.serve import api


class ApiError(Exception):
    """An HTTP error answered with OpenAI's error body.

    The body is `{"error": {"message", "type", "param", "code"}}`, as OpenAI's API and its
    clients expect; `:predict` answers the same shape.

    Args:
        status: the HTTP status code.
        message: what is wrong and what would work, naming the field.
        param: the request field at fault (e.g. "max_tokens", "prompt", "instances"), or
            None.
        code: a short machine-readable code (e.g. "model_not_found"), or None.
        type: OpenAI's error type: "invalid_request_error" (4xx), "authentication_error"
            (401), "rate_limit_error" (429), "server_error" (5xx).
        headers: extra response headers (e.g. `{"Retry-After": "2"}`).
    """

    def __init__(self, status, message, param=None, code=None, type=None, headers=None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.type = type or default_type(status)
        self.headers = dict(headers or {})

    def body(self):
        """The JSON-ready error body: `{"error": {...}}`."""
        return error_body(self.message, self.type, self.param, self.code)


def default_type(status):
    """OpenAI's error type for an HTTP status.

    Args:
        status: the HTTP status code.

    Returns:
        "authentication_error" for 401, "rate_limit_error" for 429, "server_error" for
        5xx, else "invalid_request_error".
    """
    if status == 401:
        return "authentication_error"
    if status == 429:
        return "rate_limit_error"
    if status >= 500:
        return "server_error"
    return "invalid_request_error"


def error_body(message, type="invalid_request_error", param=None, code=None):
    """An OpenAI-style error object.

    Args:
        message: the human-readable message.
        type: the error type.
        param: the field at fault, or None.
        code: a short code, or None.

    Returns:
        `{"error": {"message", "type", "param", "code"}}`.
    """
    return {"error": {"message": str(message), "type": type, "param": param, "code": code}}


def from_engine(exc):
    """The `ApiError` that answers an engine exception.

    Args:
        exc: an `api.QueueFull`, `api.Unavailable` or `api.BadRequest`.

    Returns:
        An `ApiError`: 429 with `Retry-After` for `QueueFull`, 503 for `Unavailable`, 400
        naming the exception's field for `BadRequest`.

    Raises:
        TypeError: `exc` is none of those (the caller lets it become a 500).
    """
    if isinstance(exc, api.QueueFull):
        retry = max(1, int(round(float(getattr(exc, "retry_after", 1) or 1))))
        return ApiError(429, f"{exc} The server is at its queue limit: retry after "
                             f"{retry} s.", code="queue_full",
                        headers={"Retry-After": str(retry)})
    if isinstance(exc, api.Unavailable):
        return ApiError(503, f"The model is not available: {exc}", code="unavailable")
    if isinstance(exc, api.BadRequest):
        return ApiError(400, str(exc), param=getattr(exc, "field", None),
                        code="invalid_value")
    raise TypeError(f"not an engine exception: {type(exc).__name__}: {exc}")


ENGINE_ERRORS = (api.QueueFull, api.Unavailable, api.BadRequest)


# pydantic's names of a union's members, as a message says them.
UNION_MEMBERS = {"str": "a string", "int": "an integer", "float": "a number",
                 "bool": "true or false", "list[str]": "a list of strings",
                 "list[int]": "a list of integers", "list[ContentPart]": "a list of text parts",
                 "dict[str,any]": "an object", "list[any]": "a list"}


def field_name(loc):
    """A field's path as a message names it: `messages[0].content`."""
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "body"


def shown(value):
    """A value, short, for a message."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def describe_validation(errors):
    """One message and the field at fault, from pydantic's validation errors.

    Args:
        errors: `RequestValidationError.errors()`: dicts with "loc", "msg", "input".

    Returns:
        `(message, param)`: every field's error as "FIELD: what would work (got VALUE)",
        joined by "; " (a union's members said as one: "stop: send a string or a list of
        strings"), and the first field at fault (its top-level name, e.g. "messages").
    """
    parts, param, unions = [], None, {}
    for err in errors:
        loc = [p for p in err.get("loc", ()) if p != "body"]
        # A union member's tag ("str", "list[str]") in the path: gather the members.
        tags = [i for i, p in enumerate(loc) if isinstance(p, str) and p in UNION_MEMBERS]
        if err.get("type") == "json_invalid":
            detail = (err.get("ctx") or {}).get("error", "")
            parts.append(f"the body is not valid JSON ({detail}); send a JSON object")
            continue
        param = param or (str(loc[0]) if loc else None)
        if tags:
            field = field_name(loc[:tags[0]])
            if field not in unions:
                unions[field] = ([], err.get("input"))
                parts.append(field)
            unions[field][0].append(UNION_MEMBERS[loc[tags[0]]])
            continue
        field = field_name(loc)
        if err.get("type") == "missing":
            parts.append(f"{field}: a required field is missing")
        else:
            parts.append(f"{field}: {err.get('msg', 'invalid')} (got {shown(err.get('input'))})")
    for field, (members, value) in unions.items():
        wants = " or ".join(dict.fromkeys(members))
        parts[parts.index(field)] = f"{field}: send {wants} (got {shown(value)})"
    return "; ".join(parts) or "invalid request", param
