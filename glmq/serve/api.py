"""What ``glmq serve`` accepts: OpenAI's image requests, checked in full before anything is queued.

``POST /v1/images/generations`` takes a JSON object and ``POST /v1/images/edits`` a multipart form; both go
through one set of field rules here, so a request is judged the same way whichever endpoint it reached.
A request that breaks a rule gets an :class:`ApiError`, answered as OpenAI answers errors::

    {"error": {"message": "...", "type": "invalid_request_error", "param": "n", "code": "invalid_value"}}

Fields (OpenAI's, and three extensions):

- ``prompt`` (required): non-empty text, at most ``Limits.max_prompt_chars`` characters.
- ``n``: images to make, 1 to ``Limits.max_n``.
- ``size``: ``"WIDTHxHEIGHT"`` in multiples of 32, each side from 32 to ``Limits.max_side``; ``"auto"`` or
  absent: ``Limits.default_size``.
- ``response_format``: ``"b64_json"`` only (the server keeps no files to link to, so ``"url"`` is refused).
- ``output_format``: ``"png"`` (default), ``"jpeg"`` or ``"webp"``.
- extensions: ``seed`` (image i uses ``seed + i``; random when absent, and returned either way), ``steps``
  (denoising steps, 1 to ``Limits.max_steps``), ``guidance`` (classifier-free guidance scale).
- accepted and ignored, since they do not change what GLM-Image makes: ``model``, ``user``, ``quality``,
  ``style``, ``moderation``, ``safety_identifier``, ``output_compression``.
- edits: one or several ``image`` (or ``image[]``) file parts, each at most ``Limits.max_upload_bytes`` and
  ``Limits.max_reference_pixels``, at most ``Limits.max_references`` of them; ``mask`` is refused (GLM-Image
  edits from the prompt, not a mask).

Any other field is refused by name: a misspelt ``seeed`` must not silently make a random image.
"""

from __future__ import annotations

import json
import math
import secrets
from dataclasses import dataclass, field

from glmq.errors import GlmqError

SEED_RANGE = 2**64  # torch.Generator.manual_seed takes 0 .. 2**64 - 1
OUTPUT_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}  # OpenAI's name -> PIL's
IGNORED = frozenset({"model", "user", "quality", "style", "moderation", "safety_identifier", "output_compression"})
COMMON = frozenset({"prompt", "n", "size", "response_format", "output_format", "seed", "steps", "guidance"})
IMAGE_PARTS = ("image", "image[]")


@dataclass(frozen=True)
class Limits:
    """What one request may ask for; the server's flags set these."""

    max_n: int = 10
    max_side: int = 2048
    max_steps: int = 100
    max_guidance: float = 20.0
    max_prompt_chars: int = 4000
    max_references: int = 4
    max_upload_bytes: int = 20 * 2**20
    max_reference_pixels: int = 4096 * 4096
    default_size: tuple[int, int] = (1024, 1024)  # (width, height)
    default_steps: int = 50
    default_guidance: float = 1.5

    def body_bytes(self, edits: bool) -> int:
        """The largest request body worth reading: a JSON request is small; an edit carries its uploads."""
        return (self.max_references * self.max_upload_bytes if edits else 0) + 2**20


class ApiError(Exception):
    """An answer other than 200, in OpenAI's error shape (:meth:`body`)."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 type: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type or ("invalid_request_error" if status < 500 else "server_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def _invalid(param: str, message: str, code: str = "invalid_value") -> ApiError:
    return ApiError(400, f"{param}: {message}", param=param, code=code)


@dataclass(frozen=True)
class ImageRequest:
    """One checked request: ``n`` images of one prompt, size, schedule and set of references."""

    prompt: str
    n: int
    width: int
    height: int
    steps: int
    guidance: float
    seed: int  # of the first image; image i uses (seed + i) mod 2**64
    output_format: str = "png"
    references: tuple = field(default=(), repr=False)  # PIL images (edits)

    @property
    def seeds(self) -> list[int]:
        return [(self.seed + i) % SEED_RANGE for i in range(self.n)]

    @property
    def batch_key(self) -> tuple:
        """Requests with equal keys can share one pipeline call: same size, schedule and reference count (the
        AR generates the same grids for them)."""
        return (self.width, self.height, self.steps, self.guidance, len(self.references))


# -- one field at a time --------------------------------------------------------------------------------------
# ``form``: the value came from a multipart form, where every value is text; JSON values must have their type.

def _int(fields: dict, name: str, default: int | None, low: int, high: int, *, form: bool) -> int | None:
    value = fields.get(name)
    if value is None:
        return default
    if form and isinstance(value, str) and value.strip().lstrip("-").isdigit():
        try:
            value = int(value.strip())
        except ValueError:  # more digits than Python converts (4300)
            raise _invalid(name, f"must be between {low} and {high}") from None
    if isinstance(value, bool) or not isinstance(value, int):
        raise _invalid(name, f"expected an integer, got {_show(value)}", "invalid_type")
    if not low <= value <= high:
        raise _invalid(name, f"must be between {low} and {high}, got {_show(value)}")
    return value


def _float(fields: dict, name: str, default: float, low: float, high: float, *, form: bool) -> float:
    value = fields.get(name)
    if value is None:
        return default
    if form and isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise _invalid(name, f"expected a number, got {_show(value)}", "invalid_type") from None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise _invalid(name, f"expected a number, got {_show(value)}", "invalid_type")
    try:
        value = float(value)
    except OverflowError:  # an integer beyond any float
        value = math.inf
    if not math.isfinite(value) or not low <= value <= high:
        raise _invalid(name, f"must be a number between {low:g} and {high:g}, got {_show(value)}")
    return value


def _str(fields: dict, name: str) -> str | None:
    value = fields.get(name)
    if value is not None and not isinstance(value, str):
        raise _invalid(name, f"expected a string, got {_show(value)}", "invalid_type")
    return value


def _show(value) -> str:
    """A value as an error message quotes it: short, whatever the client sent."""
    if isinstance(value, int) and not isinstance(value, bool) and abs(value) >= 10**30:
        return "a very large integer"
    text = json.dumps(value) if isinstance(value, (int, float, str, bool, type(None))) else type(value).__name__
    return text if len(text) <= 40 else text[:37] + "..."


def _size(fields: dict, limits: Limits) -> tuple[int, int]:
    from glmq.io.images import parse_size

    text = _str(fields, "size")
    if text is None or text == "auto":
        return limits.default_size
    try:
        width, height = parse_size(text, "size")
    except GlmqError as e:
        raise ApiError(400, str(e), param="size", code="invalid_value") from None
    if max(width, height) > limits.max_side:
        raise _invalid("size", f"{text}: each side may be at most {limits.max_side} pixels on this server")
    return width, height


def _check_fields(fields: dict, allowed: frozenset) -> None:
    for name in fields:
        if name not in allowed and name not in IGNORED:
            if name == "mask":
                raise ApiError(400, "mask is not supported: GLM-Image edits follow the prompt, not a mask",
                               param="mask", code="unsupported_parameter")
            raise ApiError(400, f"unknown parameter {_show(name)}", param=str(name)[:64], code="unknown_parameter")


def check_request(fields: dict, limits: Limits, *, form: bool = False, references: tuple = ()) -> ImageRequest:
    """An :class:`ImageRequest` from a request's fields (JSON values, or text from a form), or an ApiError."""
    prompt = _str(fields, "prompt")
    if prompt is None or not prompt.strip():
        raise ApiError(400, "prompt is required", param="prompt", code="missing_required_parameter")
    if len(prompt) > limits.max_prompt_chars:
        raise _invalid("prompt", f"{len(prompt)} characters; at most {limits.max_prompt_chars}")
    response_format = _str(fields, "response_format")
    if response_format not in (None, "b64_json"):
        hint = ("this server keeps no files to link to; ask for 'b64_json'" if response_format == "url"
                else "the only format is 'b64_json'")
        raise ApiError(400, f"response_format {response_format!r} is not supported: {hint}",
                       param="response_format", code="unsupported_value")
    output_format = _str(fields, "output_format") or "png"
    if output_format not in OUTPUT_FORMATS:
        raise _invalid("output_format", f"{output_format!r}; choose one of {', '.join(OUTPUT_FORMATS)}")
    width, height = _size(fields, limits)
    seed = _int(fields, "seed", None, 0, SEED_RANGE - 1, form=form)
    return ImageRequest(
        prompt=prompt, n=_int(fields, "n", 1, 1, limits.max_n, form=form), width=width, height=height,
        steps=_int(fields, "steps", limits.default_steps, 1, limits.max_steps, form=form),
        guidance=_float(fields, "guidance", limits.default_guidance, 0.0, limits.max_guidance, form=form),
        seed=secrets.randbelow(SEED_RANGE) if seed is None else seed, output_format=output_format,
        references=references)


def _reject_constant(name: str):
    raise ValueError(f"{name} is not a number JSON allows")


def parse_generation(body: bytes, limits: Limits) -> ImageRequest:
    """``POST /v1/images/generations``: a JSON object."""
    try:
        fields = json.loads(body, parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise ApiError(400, f"the body is not valid JSON ({e.__class__.__name__})", code="invalid_json") from None
    if not isinstance(fields, dict):
        raise ApiError(400, "the body must be a JSON object", code="invalid_json")
    _check_fields(fields, COMMON)
    return check_request(fields, limits)


def parse_edit(fields: dict, uploads: list[tuple[str, bytes]], limits: Limits) -> ImageRequest:
    """``POST /v1/images/edits``: the form's text ``fields`` (each sent once) and its ``image`` uploads as
    ``(part name, bytes)``."""
    from glmq.io.images import decode_image

    _check_fields(fields, COMMON)
    if not uploads:
        raise ApiError(400, "image is required: upload one or more files as 'image' (or 'image[]')",
                       param="image", code="missing_required_parameter")
    if len(uploads) > limits.max_references:
        raise _invalid("image", f"{len(uploads)} images; at most {limits.max_references}")
    references = []
    for i, (part, data) in enumerate(uploads):
        if len(data) > limits.max_upload_bytes:
            raise _invalid(part, f"image {i + 1} is {len(data)} bytes; at most {limits.max_upload_bytes}",
                           "image_too_large")
        try:
            references.append(decode_image(data, f"image {i + 1}", max_pixels=limits.max_reference_pixels))
        except GlmqError as e:
            raise _invalid(part, str(e), "invalid_image") from None
    return check_request(fields, limits, form=True, references=tuple(references))
