"""Robust image decoding: every input becomes an RGB ``PIL.Image`` or a reason why it cannot.

Handled: missing/empty files, corrupt or unknown formats, truncated data, decompression bombs and huge images
(JPEG draft decoding, then a thumbnail), CMYK, greyscale, 1-bit, palette, RGBA/LA (composited onto white), 16-bit
and float images (rescaled to 8 bit), EXIF rotation, 1-pixel images. Nothing here raises on bad data.
"""
from __future__ import annotations

import io
import logging
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

logger = logging.getLogger(__name__)

DEFAULT_MAX_PIXELS = 50_000_000  # refuse to decode more than this (decompression bombs)
DEFAULT_MAX_SIDE = 1024  # images are shrunk to this longest side right after decoding


@dataclass(frozen=True)
class LoadedImage:
    """``image`` is RGB when decoding worked; otherwise ``None`` and ``reason`` says why."""

    image: Image.Image | None
    reason: str | None = None

    @property
    def ok(self) -> bool:
        return self.image is not None


def read_image_bytes(path: str | Path) -> tuple[bytes | None, str | None]:
    """File bytes, or ``(None, reason)`` when the file is missing, unreadable or empty."""
    p = Path(path)
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        return None, f"image file not found: {p}"
    except IsADirectoryError:
        return None, f"image path is a directory: {p}"
    except OSError as exc:
        return None, f"image file unreadable: {p}: {exc.strerror or exc}"
    if not data:
        return None, f"image file is empty: {p}"
    return data, None


def _to_rgb(im: Image.Image) -> Image.Image:
    mode = im.mode
    if mode in ("I;16", "I;16B", "I;16L", "I;16N", "I", "F"):
        arr = np.asarray(im, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scaled = np.zeros_like(arr) if hi <= lo else (arr - lo) / (hi - lo) * 255.0
        return Image.fromarray(np.nan_to_num(scaled).astype(np.uint8)).convert("RGB")
    if mode == "P":
        im = im.convert("RGBA") if "transparency" in im.info else im.convert("RGB")
        mode = im.mode
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    if mode != "RGB":
        return im.convert("RGB")
    return im


def load_image(
    source: str | Path | bytes | Image.Image,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_side: int = DEFAULT_MAX_SIDE,
) -> LoadedImage:
    """Decode ``source`` (path, bytes or PIL image) into an RGB image no larger than ``max_side``; never raises."""
    try:
        if isinstance(source, Image.Image):
            im = source
            if im.width * im.height > max_pixels:
                return LoadedImage(None, f"image too large: {im.width}x{im.height} pixels > {max_pixels}")
        else:
            if isinstance(source, (bytes, bytearray, memoryview)):
                data = bytes(source)
                if not data:
                    return LoadedImage(None, "image data is empty")
            else:
                data, reason = read_image_bytes(source)
                if data is None:
                    return LoadedImage(None, reason)
            with warnings.catch_warnings():
                warnings.simplefilter("error", Image.DecompressionBombWarning)
                im = Image.open(io.BytesIO(data))
                if im.width * im.height > max_pixels:
                    if im.format == "JPEG":
                        im.draft("RGB", (max_side, max_side))  # DCT-domain downscale, decodes a fraction
                    if im.width * im.height > max_pixels:
                        return LoadedImage(
                            None, f"image too large: {im.width}x{im.height} pixels > {max_pixels} (max_pixels)"
                        )
                elif im.format == "JPEG" and max(im.size) > 2 * max_side:
                    im.draft("RGB", (max_side, max_side))
                im.load()
        if im.width < 1 or im.height < 1:
            return LoadedImage(None, f"image has no pixels ({im.width}x{im.height})")
        im = ImageOps.exif_transpose(im) or im
        im = _to_rgb(im)
        if max(im.size) > max_side:
            im = im.copy()
            im.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
        return LoadedImage(im)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        return LoadedImage(None, f"image too large (decompression bomb guard): {exc}")
    except UnidentifiedImageError:
        return LoadedImage(None, "not a decodable image (corrupt file or unsupported format)")
    except OSError as exc:
        msg = str(exc)
        if "truncated" in msg.lower():
            return LoadedImage(None, f"truncated image data: {msg}")
        return LoadedImage(None, f"corrupt image data: {msg}")
    except (ValueError, SyntaxError, MemoryError, Exception) as exc:  # noqa: BLE001 - one bad file must not stop a batch
        return LoadedImage(None, f"image could not be decoded: {type(exc).__name__}: {exc}")


def describe(source: Any) -> str:
    """Short name of an image input for messages."""
    if isinstance(source, (str, Path)):
        return str(source)
    if isinstance(source, Image.Image):
        return f"PIL image {source.mode} {source.width}x{source.height}"
    return f"{len(source)} bytes" if hasattr(source, "__len__") else type(source).__name__
