"""Turning uploaded bytes into one RGB image: format sniffing, size limits, EXIF orientation, mode conversion.

Every failure on bad input surfaces as an :class:`~app.errors.ImageDecodeError` subclass; nothing else escapes for
untrusted bytes.
"""

from __future__ import annotations

import logging
import re
import struct
import traceback
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO

import numpy as np
from PIL import ExifTags, Image, ImageFile, UnidentifiedImageError

from app.errors import CorruptImageError, ImageTooLargeError, UnsupportedFormatError
from app.imaging.exif import taken_at_of
from app.imaging.plugins import register_plugins

log = logging.getLogger(__name__)

__all__ = ["DecodedImage", "decode_image", "header_pixels", "sniff_format"]


@dataclass(frozen=True, slots=True)
class DecodedImage:
    """One decoded upload, ready to embed and to store.

    Attributes:
        image: fully loaded ``PIL.Image.Image`` in mode ``"RGB"`` (8 bits per channel), first frame only, EXIF
            orientation applied, transparency composited on white. Independent of the input bytes.
        format: Pillow's format name, sniffed from the bytes: ``"JPEG"``, ``"MPO"``, ``"PNG"``, ``"GIF"``,
            ``"WEBP"``, ``"HEIF"``, ``"AVIF"``, ``"TIFF"``, ``"BMP"``...
        mime_type: MIME type of the original bytes, e.g. ``"image/jpeg"``; ``"application/octet-stream"`` when
            Pillow knows none.
        extension: lower-case file extension to store the original under, without the dot: ``"jpg"``, ``"png"``,
            ``"heic"``, ``"avif"``...
        width: width of the ORIGINAL picture in pixels (after EXIF transpose); equal to ``image.width`` unless
            ``decode_image(..., draft_size=...)`` decoded a JPEG at a reduced scale.
        height: height of the original picture in pixels (after EXIF transpose), as for ``width``.
        taken_at: EXIF ``DateTimeOriginal`` as timezone-aware UTC (:mod:`app.imaging.exif`), ``None`` without one.
    """

    image: Image.Image
    format: str
    mime_type: str
    extension: str
    width: int
    height: int
    taken_at: datetime | None = None


# Formats Pillow could open that we refuse on purpose, with the reason given to the client.
_DENIED = {
    "EPS": "PostScript/EPS files are not accepted: rendering them runs Ghostscript on untrusted input",
    "MPEG": "MPEG video is not an image format this service indexes",
}

# Exceptions Pillow and its plugins raise for malformed data while opening or decoding. Pillow documents none of
# this, so the tuple comes from reading the plugins and fuzzing them: ZeroDivisionError and IndexError come from bogus
# header fields, RuntimeError from the libavif/libheif bindings.
_DECODE_ERRORS = (
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    struct.error,
    IndexError,
    KeyError,
    ZeroDivisionError,
    RuntimeError,
)

_ORIENTATION_TRANSPOSE = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

# Orientations 5-8 turn the picture by 90 degrees, so the stored width and height swap.
_SWAPS_AXES = frozenset(
    {Image.Transpose.TRANSPOSE, Image.Transpose.ROTATE_270, Image.Transpose.TRANSVERSE, Image.Transpose.ROTATE_90}
)

_EXTENSIONS = {"JPEG": "jpg", "MPO": "jpg", "TIFF": "tif", "PPM": "pnm", "SGI": "sgi"}
# MPO is a JPEG with more pictures appended; every JPEG reader shows the first, so browsers can display it as one.
_MIME_TYPES = {"MPO": "image/jpeg"}
_HEIC_BRANDS = {b"heic", b"heix", b"heim", b"heis"}

_JXL_SIGNATURES = (b"\xff\x0a", b"\x00\x00\x00\x0cJXL \r\n\x87\n")
_WHITE = (255, 255, 255)


def _allowed_formats() -> list[str]:
    return [fmt for fmt in Image.ID if fmt not in _DENIED]


def sniff_format(data: bytes) -> str | None:
    """Name the format of ``data`` from its magic bytes alone (the first 16 bytes; no header parsing, no decoding).

    Args:
        data: the raw upload.

    Returns:
        Pillow's format name of the first registered, accepted plugin whose signature matches (``"JPEG"`` also for
        MPO files, ``"PNG"``, ``"HEIF"``...), or ``None`` when no such plugin recognises the bytes. Formats whose
        plugins have no signature check (e.g. TGA) are never named. Raises nothing.
    """
    register_plugins()
    prefix = data[:16]  # the same prefix Image.open hands to the plugins' signature checks
    return next((fmt for fmt in _allowed_formats() if _signature_matches(fmt, prefix)), None)


def _signature_matches(fmt: str, prefix: bytes) -> bool:
    accept = Image.OPEN.get(fmt, (None, None))[1]
    if accept is None:
        return False
    try:
        result = accept(prefix)
    except (SyntaxError, IndexError, TypeError, struct.error):  # what Image.open tolerates from these checks
        return False
    # A str result is Pillow's way of saying "no, and here is a warning"; only a true non-str is a match.
    return bool(result) and not isinstance(result, str)


#: Peak memory of :func:`decode_image`, bytes per decoded pixel, by format and mode; measured with
#: ``bench/decode_cost.py`` (16 MP images, peak RSS growth of a fresh process; docs/benchmarks.md, "Decode cost"),
#: rounded up. An 8-bit RGB photo costs 4 bytes per pixel: Pillow's raster (RGB is stored as 32-bit pixels), which
#: the decoder hands back without a copy. Other modes add the RGB image they are converted to; WebP decodes through
#: libwebp's RGBA canvas, HEIC and AVIF through their library's own buffer; 32-bit modes go through float32 arrays.
#: Measured (2026-12-07): RGB (JPEG, PNG, TIFF: 3.9-4.0), 1/L/P (palette GIF and PNG: 5.0), RGBA (PNG, TIFF: 9.0),
#: I;16 (7.4), F (17.0). Not measured, estimated from the conversions they go through: LA/PA (as RGBA plus one
#: band), CMYK/RGBX (as RGBA, rounded up), YCbCr/LAB/HSV (a 4-byte raster and its RGB conversion), I (as F).
RGB_DECODE_BYTES_PER_PIXEL = 4.0
DECODE_BYTES_PER_PIXEL_BY_MODE = {
    "1": 5.0,
    "L": 5.0,
    "P": 5.0,
    "PA": 10.0,
    "LA": 10.0,
    "RGB": 4.0,
    "YCbCr": 8.0,
    "LAB": 8.0,
    "HSV": 8.0,
    "RGBA": 9.0,
    "RGBa": 9.0,
    "RGBX": 10.0,
    "CMYK": 10.0,
    "I;16": 7.5,
    "I;16B": 7.5,
    "I;16L": 7.5,
    "I;16N": 7.5,
    "I": 17.0,
    "F": 17.0,
}
#: formats whose decoder costs more than their mode says (measured the same way: WebP 16.0 and 17.0, HEIC 6.9,
#: AVIF 8.9)
DECODE_BYTES_PER_PIXEL_BY_FORMAT = {
    ("WEBP", "RGB"): 16.0,
    ("WEBP", "RGBA"): 17.0,
    ("HEIF", "RGB"): 7.0,
    ("AVIF", "RGB"): 9.0,
}
#: modes not in the table: as the costliest measured one
_UNKNOWN_MODE_BYTES_PER_PIXEL = 17.0


def decode_cost(data: bytes, *, max_pixels: int, draft_size: int | None = None) -> int:
    """Peak bytes that :func:`decode_image` with the same arguments is expected to take, from the header only.

    :func:`header_pixels` (the drafted size for JPEG) times the measured bytes per pixel of the image's format and
    mode (:data:`DECODE_BYTES_PER_PIXEL_BY_FORMAT`, else :data:`DECODE_BYTES_PER_PIXEL_BY_MODE`), plus, for a
    progressive or multi-scan JPEG, the whole image's DCT coefficients (:func:`jpeg_coefficient_bytes`: at full
    resolution whatever the draft scale, and as large for a truncated file as for the whole). Returns 0 where
    :func:`header_pixels` does (nothing will be decoded). Raises nothing.
    """
    pixels = header_pixels(data, max_pixels=max_pixels, draft_size=draft_size)
    if pixels == 0:
        return 0
    try:
        with Image.open(BytesIO(data), formats=_allowed_formats()) as im:
            fmt, mode, size = im.format, im.mode, im.size
            layers = list(getattr(im, "layer", None) or [])
            progressive = bool(im.info.get("progressive"))
    except Exception:  # noqa: BLE001 - header_pixels read it a moment ago; charge the worst case if not now
        return int(pixels * _UNKNOWN_MODE_BYTES_PER_PIXEL)
    if draft_size and fmt in ("JPEG", "MPO") and mode in ("CMYK", "YCCK"):
        mode = "CMYK"
    per_pixel = DECODE_BYTES_PER_PIXEL_BY_FORMAT.get(
        (fmt, mode), DECODE_BYTES_PER_PIXEL_BY_MODE.get(mode, _UNKNOWN_MODE_BYTES_PER_PIXEL)
    )
    cost = int(pixels * per_pixel)
    if fmt in ("JPEG", "MPO") and layers and _jpeg_needs_whole_image_buffer(data, progressive, len(layers)):
        cost += jpeg_coefficient_bytes(size, layers)
    return cost


def jpeg_coefficient_bytes(size: tuple[int, int], layers: list[tuple[int, int, int, int]]) -> int:
    """Bytes of the DCT coefficients libjpeg keeps for a whole progressive or multi-scan JPEG while it decodes it.

    Such a file refines every 8x8 block of the whole picture scan after scan, so libjpeg holds all of them at once
    (``jdcoefct.c``, the "full-image coefficient buffer": 64 coefficients of 2 bytes per block of each component,
    at the component's own sampling), whatever the draft scale: a 100 MP 4:4:4 file needs 600 MB even when it is
    decoded to 1/8 of its size, a truncated file just as much as the whole. ``size``: (width, height) from the
    header; ``layers``: Pillow's ``JpegImageFile.layer``, ``(id, h, v, table)`` per component (the sampling
    factors; 1 to 4 each). Raises nothing.
    """
    width, height = size
    factors = [(max(1, h), max(1, v)) for _, h, v, _ in layers]
    h_max = max(h for h, _ in factors)
    v_max = max(v for _, v in factors)
    blocks = 0
    for h, v in factors:
        # The component's 8x8 blocks across and down, rounded up to whole MCUs as jdcoefct.c allocates them.
        across = _round_up(_ceil_div(_ceil_div(width * h, h_max), 8), h)
        down = _round_up(_ceil_div(_ceil_div(height * v, v_max), 8), v)
        blocks += across * down
    return blocks * 64 * 2


def _ceil_div(a: int, b: int) -> int:
    return -(-a // b)


def _round_up(a: int, b: int) -> int:
    return _ceil_div(a, b) * b


def _jpeg_needs_whole_image_buffer(data: bytes, progressive: bool, components: int) -> bool:
    # libjpeg buffers the whole image's coefficients for progressive files and for sequential ones whose first scan
    # does not carry every component (jdapimin.c, has_multiple_scans); a file whose scans cannot be found is charged
    # as such too (it may be truncated right after its header).
    if progressive:
        return True
    scan = _jpeg_first_scan_components(data)
    return scan is None or scan < components


def _jpeg_first_scan_components(data: bytes) -> int | None:
    # Walk the marker segments from SOI to the first SOS (start of scan) and read its component count.
    i = 2
    while i + 4 < len(data):
        if data[i] != 0xFF:
            return None
        marker = data[i + 1]
        if marker == 0xFF:  # fill byte
            i += 1
            continue
        if marker in (0x01, 0xD8) or 0xD0 <= marker <= 0xD7:  # markers without a length
            i += 2
            continue
        if marker == 0xDA:
            return data[i + 4]
        i += 2 + int.from_bytes(data[i + 2 : i + 4], "big")
    return None


def header_pixels(data: bytes, *, max_pixels: int, draft_size: int | None = None) -> int:
    """Pixels that :func:`decode_image` with the same arguments will decode, read from the header only.

    For JPEG with ``draft_size``, the reduced scale libjpeg will decode at (1/2, 1/4 or 1/8, chosen as Pillow's
    ``JpegImageFile.draft`` does). Returns 0 for input :func:`decode_image` refuses before decoding pixels (no
    image, unreadable header, over ``max_pixels``), so the caller reserves nothing for it. Raises nothing.
    """
    register_plugins()
    try:
        with Image.open(BytesIO(data), formats=_allowed_formats()) as im:
            width, height = im.size
            fmt = im.format
    except Exception:  # noqa: BLE001 - decode_image reports the real error; here it only means "nothing to hold"
        return 0
    pixels = width * height
    if width <= 0 or height <= 0 or pixels > max_pixels:
        return 0
    if draft_size and fmt in ("JPEG", "MPO"):
        scale = min(width // draft_size, height // draft_size)
        scale = next((s for s in (8, 4, 2) if scale >= s), 1)
        pixels = -(-width // scale) * -(-height // scale)
    return pixels


def decode_image(data: bytes, *, max_pixels: int, draft_size: int | None = None) -> DecodedImage:
    """Decode an uploaded image into one 8-bit RGB picture.

    The format is sniffed from the bytes. Width x height is checked against ``max_pixels`` from the header before
    any pixel is decoded. Only the first frame of animations and multi-page files is decoded. The EXIF orientation
    is applied (a broken EXIF block is ignored). Alpha and transparency keys are composited on white; CMYK,
    palette and grayscale images are converted to RGB; 16/32-bit integer and float images are scaled into 0..255
    (by a power of two matching the bits the data uses, so 16-bit data is divided by 256) rather than clipped.

    Pillow's own bomb guard (``Image.MAX_IMAGE_PIXELS``, refusing above twice its value, about 179 MP by default) still
    applies as a backstop; ``Settings.max_image_pixels`` is capped at that value so the configured limit is real.

    Args:
        data: the raw upload.
        max_pixels: largest accepted ``width * height`` in pixels, >= 1.
        draft_size: for JPEG (and MPO) only, let libjpeg decode straight at 1/2, 1/4 or 1/8 scale
            (``Image.draft("RGB", (s, s))``), choosing the smallest scale whose width AND height both stay
            >= ``draft_size`` pixels; other formats ignore it. Meant for embedding: pass the model's input size so
            a 12 MP photo is decoded at about 1.5 MP, several times faster. ``None`` (default) decodes at full size.
            ``width``/``height`` of the result stay those of the original either way.

    Returns:
        The decoded image with its format, MIME type, storage extension and ORIGINAL size (after EXIF transpose).

    Raises:
        UnsupportedFormatError: empty input, or bytes no installed decoder reads (unknown data, text, SVG, JPEG XL
            without a plugin...); the message names the detected format when there is one.
        ImageTooLargeError: the header declares more than ``max_pixels`` pixels (or Pillow's bomb guard fired).
        CorruptImageError: the format is recognised but the header or the pixel data is corrupt or truncated.
        ValueError: ``max_pixels`` < 1 or ``draft_size`` < 1 (a programming error, not bad input).
    """
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    if draft_size is not None and draft_size < 1:
        raise ValueError(f"draft_size must be >= 1, got {draft_size}")
    register_plugins()
    if not data:
        raise UnsupportedFormatError("The upload is empty: no image data")
    if data[:4] == b"\x00\x00\x01\x00":
        _check_ico_frames(data, max_pixels)

    fmt: str | None = None
    im: Image.Image | None = None
    try:
        im = Image.open(BytesIO(data), formats=_allowed_formats())
        fmt = im.format or "image"
        if isinstance(im, ImageFile.StubImageFile):
            raise UnsupportedFormatError(f"{fmt} files are not supported: they are not raster photos")
        _check_pixels(im.size, max_pixels)
        original_size = im.size
        drafted = draft_size is not None and fmt in ("JPEG", "MPO")
        if drafted:
            # DCT-domain downscaling inside libjpeg; it also shrinks im.size, hence original_size above.
            im.draft("RGB", (draft_size, draft_size))
        im.load()
        # Some containers only learn the real size while loading; keep the promise made to callers anyway.
        _check_pixels(im.size, max_pixels)
        if not drafted:
            original_size = im.size
        transpose = _orientation_transpose(im)
        taken_at = taken_at_of(im)
        rgb = _to_rgb(im, fmt)
        if transpose is not None:
            rgb = rgb.transpose(transpose)
        if rgb is im:
            # Detach from the file object (and from any later frames) so the result stands alone: a new Image
            # around the same decoded raster, not a copy of it (the copy was half of an RGB decode's peak memory,
            # 4 of 8 bytes per pixel: docs/benchmarks.md, "Decode cost"). Closing the file image below drops
            # only its own reference to the raster (Pillow's Image.close).
            rgb = im._new(im.im)
    except Image.DecompressionBombError as exc:
        _drop_raster(exc, im)
        # Pillow's message quotes its own guard, not the limit the user configured.
        declared = re.search(r"\((\d+) pixels\)", str(exc))
        size = f"declares {int(declared.group(1)):,} pixels" if declared else "is too large to decode safely"
        limit = min(max_pixels, 2 * (Image.MAX_IMAGE_PIXELS or 0) or max_pixels)
        raise ImageTooLargeError(f"The image {size}, over the limit of {limit:,} pixels") from exc
    except UnidentifiedImageError:
        raise _unidentified_error(data) from None
    except _DECODE_ERRORS as exc:
        _drop_raster(exc, im)
        name = fmt or sniff_format(data) or "image"
        raise CorruptImageError(f"The {name} data is corrupt or truncated: {exc}") from exc
    finally:
        if im is not None:
            im.close()  # `with` would not: ImageFile.__exit__ only lets go of the file, the raster stays

    extension, mime_type = _storage_type(fmt, data)
    width, height = original_size
    if transpose in _SWAPS_AXES:
        width, height = height, width
    return DecodedImage(rgb, fmt, mime_type, extension, width, height, taken_at)


def _drop_raster(exc: BaseException, im: Image.Image | None) -> None:
    # A decode that fails part-way (a truncated or partial file) has allocated the whole raster for what the header
    # claims, and the exception would keep it alive through its traceback (the decoder and the image file are locals
    # of Pillow's frames in it) until the error is garbage-collected: after the request's decode admission has
    # ended, and past the heap trim that follows it (issue #27: a burst of truncated 100 MP PNGs left 400 MB
    # resident). Let go of it before the error leaves the decoder.
    if im is not None:
        im.close()
    traceback.clear_frames(exc.__traceback__)


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise CorruptImageError(f"The image header declares an empty size {width}x{height}")
    if width * height > max_pixels:
        raise ImageTooLargeError(
            f"The image is {width}x{height} = {width * height:,} pixels, over the limit of {max_pixels:,} pixels"
        )


def _check_ico_frames(data: bytes, max_pixels: int) -> None:
    # Pillow's ICO plugin decodes the biggest entry inside Image.open, and the directory's one-byte sizes (<= 256)
    # say nothing about the PNG or DIB actually embedded, so read each entry's own header first.
    count = int.from_bytes(data[4:6], "little")
    for i in range(count):
        entry = data[6 + 16 * i : 22 + 16 * i]
        if len(entry) < 16:
            return  # a truncated directory is Pillow's to report as corrupt
        offset = int.from_bytes(entry[12:16], "little")
        frame = data[offset : offset + 24]
        if frame[:8] == b"\x89PNG\r\n\x1a\n" and len(frame) == 24:
            width, height = struct.unpack(">II", frame[16:24])
        elif len(frame) >= 12:
            width, height = struct.unpack("<ii", frame[4:12])
            width, height = abs(width), abs(height) // 2  # a DIB icon's height counts the colour and the AND mask
        else:
            continue
        if width * height > max_pixels:
            raise ImageTooLargeError(
                f"The ICO file holds a {width}x{height} = {width * height:,} pixel image, "
                f"over the limit of {max_pixels:,} pixels"
            )


def _orientation_transpose(im: Image.Image) -> Image.Transpose | None:
    # Our own lookup rather than ImageOps.exif_transpose: that one re-serialises the EXIF block afterwards, which can
    # fail on exactly the broken blocks we want to survive, and it copies the image when there is nothing to do.
    try:
        return _ORIENTATION_TRANSPOSE.get(im.getexif().get(ExifTags.Base.Orientation))
    except Exception as exc:  # noqa: BLE001 - metadata parsing fails in undocumented ways; orientation is optional
        log.debug("ignoring unreadable EXIF orientation: %r", exc)
        return None


def _to_rgb(im: Image.Image, fmt: str) -> Image.Image:
    if im.mode in ("I", "F") or im.mode.startswith("I;16"):
        im = _high_depth_to_l(im)
    if im.mode == "RGB" and "transparency" not in im.info:
        return im
    try:
        if im.has_transparency_data:
            # convert() copies even an RGBA image: 4 bytes per pixel more at the decode's peak, for nothing.
            rgba = im if im.mode == "RGBA" else im.convert("RGBA")
            flat = Image.new("RGB", im.size, _WHITE)
            flat.paste(rgba, mask=rgba.getchannel("A"))
            return flat
        return im.convert("RGB")
    except ValueError as exc:  # Pillow has no conversion for a few exotic modes (e.g. LAB)
        raise UnsupportedFormatError(f"{fmt} images in colour mode {im.mode} are not supported: {exc}") from exc


def _high_depth_to_l(im: Image.Image) -> Image.Image:
    # Image.convert("L") clips 16/32-bit values at 255, which turns a 16-bit photo almost white. Scale by a power of
    # two instead, sized to the bits the data actually uses: full-range 16-bit data is divided by 256, while 10/12/14-
    # bit sensor data or 8-bit values stored in a 16-bit container (both common in TIFF) stay visible, not black.
    arr = np.asarray(im)
    if im.mode != "F" and arr.min() >= 0:
        shift = max(0, int(arr.max()).bit_length() - 8)
        out = (arr >> shift).astype(np.uint8)
    elif im.mode == "F" and np.nanmin(arr) >= 0.0 and np.nanmax(arr) <= 1.0:
        scaled = arr * np.float32(255.0)  # one float32 temporary, worked on in place (each step used to copy)
        scaled += np.float32(0.5)
        out = np.nan_to_num(scaled, copy=False).astype(np.uint8)
    else:
        out = _stretch(arr)
    key = im.info.get("transparency")
    if isinstance(key, int) and not isinstance(key, bool):
        out[arr == key] = 255  # a tRNS colour key on 16-bit gray: transparent pixels become the white background
    return Image.fromarray(out)


def _stretch(arr: np.ndarray) -> np.ndarray:
    # Values of unknown range (negative integers, float HDR): map the image's own min..max onto 0..255.
    # One float32 copy, worked on in place: each step of the expression used to allocate another full-size array.
    values = arr.astype(np.float32)
    finite = np.isfinite(values)
    if not finite.any():
        return np.zeros(arr.shape, np.uint8)
    lo = float(np.min(values, where=finite, initial=np.inf))
    hi = float(np.max(values, where=finite, initial=-np.inf))
    del finite
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    values -= np.float32(lo)
    values *= np.float32(scale)
    values += np.float32(0.5)
    return np.nan_to_num(values, copy=False, nan=0.0, posinf=255.0, neginf=0.0).astype(np.uint8)


def _unidentified_error(data: bytes) -> UnsupportedFormatError | CorruptImageError:
    fmt = sniff_format(data)
    if fmt is not None:
        return CorruptImageError(f"The data starts like a {fmt} file, but its header is corrupt or unsupported")
    head = data[:1024].lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if data.startswith(_JXL_SIGNATURES):
        return UnsupportedFormatError(
            "JPEG XL is not supported: no JPEG XL decoder is installed (install the pillow-jxl-plugin package)"
        )
    if head.startswith((b"<svg", b"<?xml")) and b"<svg" in head:
        return UnsupportedFormatError("SVG (vector graphics) is not supported: upload a raster image")
    if data.startswith(b"%PDF"):
        return UnsupportedFormatError("PDF documents are not supported: upload a raster image")
    for denied, reason in _DENIED.items():
        if _signature_matches(denied, data[:16]):
            return UnsupportedFormatError(reason)
    if data[4:8] == b"ftyp":
        brand = data[8:12].decode("ascii", "replace")
        return UnsupportedFormatError(
            f"ISO media file with brand '{brand}' is not a supported image (HEIF/AVIF need pillow-heif / AVIF support)"
        )
    return UnsupportedFormatError("Unrecognised image format: the data matches no supported image type")


def _storage_type(fmt: str, data: bytes) -> tuple[str, str]:
    if fmt == "HEIF":
        # One Pillow format covers both; .heic/image/heic is the HEVC-coded still image that phones write.
        return ("heic", "image/heic") if data[8:12] in _HEIC_BRANDS else ("heif", "image/heif")
    extension = _EXTENSIONS.get(fmt)
    if extension is None:
        registered = [ext for ext, name in Image.registered_extensions().items() if name == fmt]
        extension = registered[0].lstrip(".") if registered else fmt.lower()
    mime_type = _MIME_TYPES.get(fmt) or Image.MIME.get(fmt) or "application/octet-stream"
    return extension.lower(), mime_type
