"""Images in OpenAI requests, checked alike by the front door and by the engine that reads them.

Chat messages may carry `{"type": "image_url", "image_url": {"url": ...}}` content parts; the url is a
`data:image/...;base64,...` URL, or a `file://` URL / absolute path under one of the allowed folders
(experiment.runner.media_dirs; none by default, so no file is read). Nothing is fetched over the network. An
image that does not decode, or exceeds the byte or pixel limit, is a `MediaError` (the servers answer 400 with
its message and code). `/v1/images/generations` sizes are "WIDTHxHEIGHT".

Pillow is imported only where an image is decoded.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PART_TYPES = ("text", "image_url")  # what a vision-language model of the transformers engine takes
SIZE = re.compile(r"([1-9][0-9]{0,5})x([1-9][0-9]{0,5})")
_DATA_URL = re.compile(r"data:([^,]*?);base64,", re.IGNORECASE)


class MediaError(ValueError):
    """A request's image or size the server cannot take: HTTP 400 with this message and code."""

    def __init__(self, message: str, code: str = "invalid_image") -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class ImageLimits:
    max_bytes: int = 4 << 20  # one image, encoded
    max_pixels: int = 4096 * 4096  # width x height
    dirs: tuple[str, ...] = ()  # file URLs and paths are read only under these (resolved) folders


def limits_of(settings: Any) -> ImageLimits:
    """The limits of a ServeSettings (or anything with its attribute names)."""
    default = ImageLimits()
    return ImageLimits(
        max_bytes=int(getattr(settings, "max_image_bytes", default.max_bytes)),
        max_pixels=int(getattr(settings, "max_image_pixels", default.max_pixels)),
        dirs=tuple(getattr(settings, "media_dirs", default.dirs) or ()),
    )


# ------------------------------------------------------------------------------------- content parts
def image_urls(messages: list, types: tuple[str, ...] = PART_TYPES) -> list[tuple[str, str]]:
    """(where, url) of every image part, in order; a part of another type, or malformed, is a MediaError.

    `messages` is already known to be a list of objects whose content is a string, null or a list of
    objects with a string "type" (flagscale.serve.frontdoor.checks)."""
    found = []
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            where = f"messages[{i}].content[{j}]"
            kind = part.get("type")
            if kind not in types:
                raise MediaError(
                    f"{where}.type={str(kind)[:40]!r}: this model takes content parts of type {', '.join(types)}",
                    "unsupported_content_part",
                )
            if kind == "text" and not isinstance(part.get("text"), str):
                raise MediaError(f"{where}.text must be a string", "invalid_content_part")
            if kind == "image_url":
                found.append((where, _url_of(part.get("image_url"), where)))
    return found


def _url_of(value: Any, where: str) -> str:
    url = value.get("url") if isinstance(value, dict) else value  # some clients send the URL string itself
    if not isinstance(url, str) or not url:
        raise MediaError(f'{where}.image_url must be {{"url": "data:image/png;base64,..."}}', "invalid_content_part")
    return url


# ---------------------------------------------------------------------------------------------- bytes
def image_bytes(url: str, limits: ImageLimits, where: str = "image") -> bytes:
    """The encoded bytes a data: URL carries, or of a file under the allowed folders."""
    if url[:5].lower() == "data:":
        return _data_url(url, limits, where)
    if url.startswith("file://") or url.startswith("/"):
        return _file(url, limits, where)
    scheme = url.split(":", 1)[0][:20] if ":" in url else "a relative path"
    raise MediaError(
        f"{where}: {scheme} images are not fetched; send a data:image/...;base64 URL, or a file:// URL or absolute "
        "path under experiment.runner.media_dirs",
        "unsupported_image_url",
    )


def _data_url(url: str, limits: ImageLimits, where: str) -> bytes:
    head = _DATA_URL.match(url)
    if head is None:
        raise MediaError(f"{where}: a data URL must be data:<type>;base64,<data>", "invalid_image")
    payload = url[head.end() :]
    if len(payload) // 4 * 3 > limits.max_bytes + 3:  # before decoding it
        raise MediaError(_too_big(where, len(payload) // 4 * 3, limits), "image_too_large")
    try:
        raw = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise MediaError(f"{where}: the data URL is not valid base64", "invalid_image") from None
    if len(raw) > limits.max_bytes:
        raise MediaError(_too_big(where, len(raw), limits), "image_too_large")
    return raw


def _file(url: str, limits: ImageLimits, where: str) -> bytes:
    path = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file://") else url
    if not limits.dirs:
        raise MediaError(
            f"{where}: file images are off; set experiment.runner.media_dirs to the folders they may come from",
            "unsupported_image_url",
        )
    real = Path(path).resolve()  # symlinks and .. resolved before the folder check
    if not any(real.is_relative_to(folder) for folder in limits.dirs):
        raise MediaError(f"{where}: {path} is not under experiment.runner.media_dirs", "unsupported_image_url")
    try:
        size = real.stat().st_size
        if not real.is_file():
            raise OSError("not a file")
        if size > limits.max_bytes:
            raise MediaError(_too_big(where, size, limits), "image_too_large")
        return real.read_bytes()
    except OSError:
        raise MediaError(f"{where}: no such image file: {path}", "invalid_image") from None


def _too_big(where: str, size: int, limits: ImageLimits) -> str:
    return (
        f"{where}: the image has {size} bytes, over the limit of {limits.max_bytes} (experiment.runner.max_image_bytes)"
    )


# --------------------------------------------------------------------------------------------- decode
def decode(raw: bytes, limits: ImageLimits, where: str = "image"):
    """The image as an RGB PIL image, or a MediaError: not an image, or more pixels than the limit."""
    from PIL import Image

    try:
        image = Image.open(io.BytesIO(raw))
    except Image.DecompressionBombError:
        raise MediaError(f"{where}: the image has too many pixels", "image_too_large") from None
    except Exception:  # Pillow raises UnidentifiedImageError, and others for odd headers
        raise MediaError(f"{where}: not an image (cannot be decoded)", "invalid_image") from None
    width, height = image.size
    if width * height > limits.max_pixels:
        raise MediaError(
            f"{where}: the image is {width}x{height}, over the limit of {limits.max_pixels} pixels "
            "(experiment.runner.max_image_pixels)",
            "image_too_large",
        )
    try:
        image.load()  # a truncated or corrupt image fails here, not in the model
        return image.convert("RGB")
    except Exception:
        raise MediaError(f"{where}: not an image (cannot be decoded)", "invalid_image") from None


def load_images(messages: list, limits: ImageLimits) -> list:
    """Every image of the messages' content parts, decoded (RGB), in order."""
    return [decode(image_bytes(url, limits, where), limits, where) for where, url in image_urls(messages)]


# ---------------------------------------------------------------------------------------------- sizes
def parse_size(value: Any) -> tuple[int, int]:
    """(width, height) of "WIDTHxHEIGHT", or a MediaError."""
    match = SIZE.fullmatch(value) if isinstance(value, str) else None
    if match is None:
        raise MediaError(f'"size"={str(value)[:40]!r}: expected "WIDTHxHEIGHT", e.g. "512x512"', "invalid_size")
    return int(match.group(1)), int(match.group(2))
