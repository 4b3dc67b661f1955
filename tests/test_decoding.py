"""Tests of app.imaging.decode against the real files in ../shared/datasets/formats (see its manifest.csv)."""

from __future__ import annotations

import csv
import importlib.util
import io
import struct
import time
import warnings

import numpy as np
import pytest
from PIL import Image, ImageFile, features

from app.errors import CorruptImageError, ImageDecodeError, ImageTooLargeError, UnsupportedFormatError
from app.imaging.decode import DecodedImage, decode_image, sniff_format
from app.imaging.plugins import register_plugins
from tests.helpers import FORMATS

MAX_PIXELS = 100_000_000  # the Settings.max_image_pixels default


def _manifest() -> list[dict[str, str]]:
    path = FORMATS / "manifest.csv"
    if not path.is_file():
        return []
    with path.open(newline="", encoding="utf-8") as fh:
        return list(csv.DictReader(fh))


ROWS = _manifest()
OK_EXPECTS = {
    "ok",
    "ok_apply_exif_transpose",
    "ok_first_frame",
    "ok_ignore_bad_exif",
    "ok_sniff_content",
    "ok_needs_pillow_heif",
}
JXL_PLUGIN = any(importlib.util.find_spec(name) is not None for name in ("pillow_jxl", "jxlpy"))
# Corrupt files whose headers declare billions of pixels: refusing them by size, before reading on, is a clean reject.
GIANT_HEADERS = {"broken/invalid.1.gif", "broken/bug793470-crasher.png"}


def _read(rel: str) -> bytes:
    return (FORMATS / rel).read_bytes()


def _decode(rel: str, max_pixels: int = MAX_PIXELS) -> DecodedImage:
    return decode_image(_read(rel), max_pixels=max_pixels)


def _thumb(im: Image.Image) -> np.ndarray:
    """64x64 grayscale float thumbnail, for comparing pictures irrespective of re-encoding."""
    return np.asarray(im.convert("L").resize((64, 64), Image.Resampling.BILINEAR), dtype=np.float32)


def _mad(a: Image.Image, b: Image.Image) -> float:
    return float(np.abs(_thumb(a) - _thumb(b)).mean())


def _assert_decoded(result: DecodedImage) -> None:
    assert isinstance(result, DecodedImage)
    assert result.image.mode == "RGB"
    assert result.width > 0 and result.height > 0
    assert result.image.size == (result.width, result.height)
    # Fully loaded and detached from the upload: a plain image, not a lazily-read file object.
    assert type(result.image) is Image.Image
    assert result.format and result.mime_type and result.extension
    assert result.extension == result.extension.lower() and not result.extension.startswith(".")


def _white_composite(im: Image.Image) -> Image.Image:
    rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")


@pytest.fixture
def no_pixel_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make any pixel decode fail the test, to prove a refusal happened from the header alone."""

    def refuse(self: Image.Image, *args: object, **kwargs: object) -> None:
        raise AssertionError(f"pixels of a {self.format} {self.size} image were decoded")

    # Every plugin that decodes pixels ends in ImageFile.load, including the PNG/DIB entries inside an ICO.
    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


# --- every manifest row -------------------------------------------------------------------------------------------


def test_manifest_is_complete() -> None:
    assert len(ROWS) == 121
    assert {row["expect"] for row in ROWS} <= OK_EXPECTS | {
        "ok_needs_jxl_plugin",
        "reject",
        "reject_or_partial",
        "reject_too_large",
        "decoder_dependent",
    }


@pytest.mark.parametrize("row", ROWS, ids=[row["path"] for row in ROWS])
def test_manifest_row(row: dict[str, str]) -> None:
    data = _read(row["path"])
    expect = row["expect"]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Pillow warns about the broken EXIF blocks some rows carry on purpose
        try:
            outcome: DecodedImage | ImageDecodeError = decode_image(data, max_pixels=MAX_PIXELS)
        except ImageDecodeError as exc:  # anything else escaping is a failure
            outcome = exc

    if expect in OK_EXPECTS or (expect == "ok_needs_jxl_plugin" and JXL_PLUGIN):
        assert isinstance(outcome, DecodedImage), f"{row['path']} ({row['detail']}): {outcome!r}"
        _assert_decoded(outcome)
    elif expect == "ok_needs_jxl_plugin":
        assert isinstance(outcome, UnsupportedFormatError), repr(outcome)
        assert "JPEG XL" in str(outcome)
    elif expect == "reject":
        allowed: tuple[type[Exception], ...] = (CorruptImageError, UnsupportedFormatError)
        if row["path"] in GIANT_HEADERS:
            allowed += (ImageTooLargeError,)
        assert isinstance(outcome, allowed), f"{row['path']}: {outcome!r}"
        assert str(outcome)
    elif expect == "reject_too_large":
        assert isinstance(outcome, ImageTooLargeError), f"{row['path']}: {outcome!r}"
    elif expect in ("reject_or_partial", "decoder_dependent"):
        if isinstance(outcome, DecodedImage):
            _assert_decoded(outcome)
        else:
            assert str(outcome)
    else:
        pytest.fail(f"unknown expect value {expect!r}")


@pytest.mark.parametrize("row", [r for r in ROWS if r["expect"] == "reject_too_large"], ids=lambda r: r["path"])
def test_bombs_are_refused_from_the_header(row: dict[str, str], no_pixel_decoding: None) -> None:
    data = _read(row["path"])
    start = time.perf_counter()
    with pytest.raises(ImageTooLargeError):
        decode_image(data, max_pixels=MAX_PIXELS)
    assert time.perf_counter() - start < 1.0
    # Also when the configured limit is far above Pillow's own guard.
    with pytest.raises(ImageTooLargeError):
        decode_image(data, max_pixels=10**12)


# --- limits -------------------------------------------------------------------------------------------------------


def test_max_pixels_is_configurable(no_pixel_decoding: None) -> None:
    data = _read("jpeg/bridge_rgb.jpg")  # 1600 x 1004
    with pytest.raises(ImageTooLargeError, match="1600x1004"):
        decode_image(data, max_pixels=1600 * 1004 - 1)


def test_max_pixels_is_inclusive() -> None:
    result = decode_image(_read("jpeg/bridge_rgb.jpg"), max_pixels=1600 * 1004)
    assert result.image.size == (1600, 1004)


def test_max_pixels_must_be_positive() -> None:
    with pytest.raises(ValueError):
        decode_image(_read("jpeg/bridge_rgb.jpg"), max_pixels=0)


def test_ico_limit_uses_the_embedded_image_size(no_pixel_decoding: None) -> None:
    # Pillow decodes the largest ICO entry inside Image.open, so the check must come before it.
    with pytest.raises(ImageTooLargeError):
        decode_image(_read("other/hopper.ico"), max_pixels=16 * 16 - 1)


def test_ico_directory_cannot_hide_a_big_embedded_png(no_pixel_decoding: None) -> None:
    png = io.BytesIO()
    Image.new("RGB", (1500, 1000), (10, 20, 30)).save(png, "PNG")
    payload = png.getvalue()
    # One directory entry claiming 256x256 (size byte 0), pointing at a 1500x1000 PNG.
    ico = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 0, 0, 0, 0, 1, 32, len(payload), 22) + payload
    with pytest.raises(ImageTooLargeError, match="1500x1000"):
        decode_image(ico, max_pixels=1_000_000)


# --- unsupported and corrupt input --------------------------------------------------------------------------------


def test_empty_bytes_are_unsupported() -> None:
    with pytest.raises(UnsupportedFormatError, match="empty"):
        decode_image(b"", max_pixels=MAX_PIXELS)


def test_random_bytes_are_unsupported() -> None:
    data = np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes()
    with pytest.raises(UnsupportedFormatError):
        decode_image(data, max_pixels=MAX_PIXELS)


@pytest.mark.parametrize(
    ("data", "named"),
    [
        (b"just some text, not an image\n", "Unrecognised"),
        (b'<?xml version="1.0"?>\n<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>', "SVG"),
        (b"%PDF-1.7\n", "PDF"),
        (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "EPS"),
    ],
)
def test_unsupported_formats_are_named(data: bytes, named: str) -> None:
    with pytest.raises(UnsupportedFormatError, match=named):
        decode_image(data, max_pixels=MAX_PIXELS)


@pytest.mark.skipif(JXL_PLUGIN, reason="a JPEG XL plugin is installed")
@pytest.mark.parametrize("rel", ["jxl/splines.jxl", "jxl/square-extended-size-container.jxl"])
def test_jpeg_xl_without_plugin_says_so(rel: str) -> None:
    # splines.jxl is a bare codestream (FF 0A), the other one the ISO-BMFF container.
    with pytest.raises(UnsupportedFormatError, match="JPEG XL"):
        _decode(rel)


def test_corrupt_header_of_a_known_format_is_corrupt() -> None:
    with pytest.raises(CorruptImageError, match="PNG"):
        _decode("broken/invalid.1.png")


def test_truncated_pixel_data_is_corrupt() -> None:
    data = _read("jpeg/flower_progressive.jpg")
    with pytest.raises(CorruptImageError):
        decode_image(data[: len(data) // 2], max_pixels=MAX_PIXELS)


@pytest.mark.parametrize(
    "rel",
    [
        "jpeg/hopper_16bit_qtables.jpg",
        "png/p_trns_single.png",
        "gif/hopper.gif",
        "webp/flower.webp",
        "tiff/hopper_lzw.tif",
        "avif/hopper.avif",
        "bmp/hopper_rle8.bmp",
        "heic/samplefilehub.heif",
    ],
)
def test_damaged_files_fail_cleanly(rel: str) -> None:
    data = _read(rel)
    rng = np.random.default_rng(len(data))
    variants = [data[:n] for n in (1, 3, 8, 16, 40, 100, len(data) // 3, len(data) - 1)]
    for _ in range(15):
        damaged = bytearray(data)
        for pos in rng.integers(0, min(len(data), 512), 4):
            damaged[pos] ^= 0xFF
        variants.append(bytes(damaged))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for variant in variants:
            try:
                _assert_decoded(decode_image(variant, max_pixels=MAX_PIXELS))
            except ImageDecodeError:
                pass


# --- what the decoded picture looks like --------------------------------------------------------------------------


def test_exif_orientation_is_applied() -> None:
    reference = _decode("jpeg_exif_orientation/Landscape_1.jpg").image
    rotated = reference.transpose(Image.Transpose.ROTATE_90).resize(reference.size)
    wrong = _mad(rotated, reference)
    for n in range(9):
        result = _decode(f"jpeg_exif_orientation/Landscape_{n}.jpg")
        assert (result.width, result.height) == reference.size, n
        assert _mad(result.image, reference) < 3.0 < wrong / 10, n


def test_exif_orientation_is_applied_to_real_phone_photos() -> None:
    assert _decode("jpeg_exif_orientation/exif-rotn-1.jpg").image.size == (4032, 3024)
    assert _decode("jpeg_exif_orientation/exif-rotn-6.jpg").image.size == (3024, 4032)
    assert _decode("jpeg_exif_orientation/exif-rotn-8.jpg").image.size == (3024, 4032)


def test_webp_exif_orientation_is_applied() -> None:
    upright = _decode("tiff/hopper.tif").image
    with Image.open(FORMATS / "webp/hopper_orientation_6.webp") as raw:
        stored = raw.convert("RGB")
    result = _decode("webp/hopper_orientation_6.webp")
    assert _mad(result.image, upright) < 5.0
    assert _mad(stored, upright) > 30.0


def test_png_exif_chunk_orientation_is_applied() -> None:
    with Image.open(FORMATS / "png/exif_imagemagick_orientation.png") as raw:
        assert raw.getexif().get(0x0112) == 3
        expected = raw.convert("RGB").transpose(Image.Transpose.ROTATE_180)
    assert _mad(_decode("png/exif_imagemagick_orientation.png").image, expected) < 1.0


@pytest.mark.parametrize(
    "rel",
    [
        "png/p_trns_single.png",
        "png/rgb_trns.png",
        "png/l_trns.png",
        "png/i_trns.png",
        "png/1_trns.png",
        "gif/dispose_bgnd_transparency.gif",
        "avif/transparency.avif",
        "avif/star.avifs",
    ],
)
def test_transparency_is_composited_on_white(rel: str) -> None:
    with Image.open(FORMATS / rel) as raw:
        transparent = np.asarray(raw.convert("RGBA"))[..., 3] == 0
    assert transparent.any()
    out = np.asarray(_decode(rel).image)
    assert (out[transparent] >= 250).all()


@pytest.mark.parametrize("rel", ["png/rgb_trns.png", "avif/star.avifs"])
def test_transparency_is_not_just_dropped(rel: str) -> None:
    # These files store green / black under their transparent pixels; dropping alpha would show that colour.
    with Image.open(FORMATS / rel) as raw:
        rgba = np.asarray(raw.convert("RGBA"))
    transparent = rgba[..., 3] == 0
    assert (rgba[..., :3][transparent] < 128).any()
    assert (np.asarray(_decode(rel).image)[transparent] == 255).all()


def test_opaque_rgba_keeps_its_colours() -> None:
    # bridge_rgba.png has an alpha channel that is 255 everywhere.
    with Image.open(FORMATS / "png/bridge_rgba.png") as raw:
        expected = np.asarray(raw.convert("RGB"))
    assert np.array_equal(np.asarray(_decode("png/bridge_rgba.png").image), expected)


@pytest.mark.parametrize("rel", ["jpeg/bridge_cmyk.jpg", "png/bridge_L.png", "png/bridge_P.png", "webp/bridge_F.webp"])
def test_colour_modes_match_the_rgb_original(rel: str) -> None:
    assert _mad(_decode(rel).image, _decode("jpeg/bridge_rgb.jpg").image) < 8.0


@pytest.mark.parametrize(
    "rel",
    [
        "png_16bit/Nikon-D300-12bit_2020_g1_dt.png",
        "png_16bit/Sony-DSC-RX1RM2-14bit_709_v4_krita.png",
        "png_16bit/Google-Pixel2XL-16bit_acescg_g1_v4_krita.png",
        "png_16bit/mode_16bit.png",
        "tiff/16bit.cropped.tif",
        "tiff/chessboard_GRAY_U16.tif",
    ],
)
def test_16_bit_images_are_scaled_not_clipped(rel: str) -> None:
    pixels = np.asarray(_decode(rel).image)
    assert 10 < pixels.mean() < 245
    assert pixels.std() > 1  # not a flat field (some of these are low-contrast 64x64 crops)


def test_full_range_16_bit_gray_is_divided_by_256() -> None:
    ramp = (np.arange(256 * 16, dtype=np.uint32) * 16).reshape(16, 256)  # 0..65520
    buf = io.BytesIO()
    Image.fromarray(ramp.astype(np.uint16)).save(buf, "PNG")
    out = np.asarray(decode_image(buf.getvalue(), max_pixels=MAX_PIXELS).image)[..., 0]
    assert np.array_equal(out, (ramp >> 8).astype(np.uint8))


@pytest.mark.parametrize("rel", ["animated/giphy.gif", "jpeg/frozenpond.mpo", "tiff/multipage.tiff"])
def test_only_the_first_frame_is_used(rel: str) -> None:
    with Image.open(FORMATS / rel) as raw:
        first = np.asarray(_white_composite(raw), dtype=np.float32)
        raw.seek(1)
        second = np.asarray(_white_composite(raw), dtype=np.float32)
    out = np.asarray(_decode(rel).image, dtype=np.float32)
    assert np.abs(out - first).mean() < 0.5
    assert second.shape != out.shape or np.abs(out - second).mean() > 10


def test_animations_of_one_clip_agree() -> None:
    frames = [_decode(f"animated/iss634.{ext}").image for ext in ("apng", "gif", "webp")]
    assert _mad(frames[0], frames[1]) < 2.0 and _mad(frames[0], frames[2]) < 2.0


# --- format, MIME type and extension ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rel", ["wrong_extension/ukbench09380.png", "wrong_extension/ukbench09380.bmp", "wrong_extension/ukbench09380.svg"]
)
def test_content_not_name_decides_the_format(rel: str) -> None:
    result = _decode(rel)
    assert (result.format, result.mime_type, result.extension) == ("JPEG", "image/jpeg", "jpg")
    assert result.image.size == (640, 480)


@pytest.mark.parametrize(
    ("rel", "fmt", "mime", "ext"),
    [
        ("jpeg/bridge_rgb.jpg", "JPEG", "image/jpeg", "jpg"),
        ("jpeg/frozenpond.mpo", "MPO", "image/jpeg", "jpg"),
        ("png/bridge_rgba.png", "PNG", "image/png", "png"),
        ("animated/aero.gif", "GIF", "image/gif", "gif"),
        ("webp/flower.webp", "WEBP", "image/webp", "webp"),
        ("tiff/hopper_bigtiff.tif", "TIFF", "image/tiff", "tif"),
        ("bmp/g_rgb24.bmp", "BMP", "image/bmp", "bmp"),
        ("heic/iphone_13_pro_max.HEIC", "HEIF", "image/heic", "heic"),
        ("heic/nokia_autumn_1440x960.heic", "HEIF", "image/heif", "heif"),
        ("avif/hopper.avif", "AVIF", "image/avif", "avif"),
        ("other/test-card-lossless.jp2", "JPEG2000", "image/jp2", "jp2"),
        ("other/hopper.qoi", "QOI", "application/octet-stream", "qoi"),
    ],
)
def test_format_mime_and_extension(rel: str, fmt: str, mime: str, ext: str) -> None:
    result = _decode(rel)
    assert (result.format, result.mime_type, result.extension) == (fmt, mime, ext)


def test_sniff_format_reads_only_the_signature() -> None:
    assert sniff_format(_read("wrong_extension/ukbench09380.png")) == "JPEG"
    assert sniff_format(_read("png/bridge_L.png")) == "PNG"
    assert sniff_format(_read("heic/IMG_5195.HEIC")) == "HEIF"
    assert sniff_format(_read("hostile/bomb_749MP.jpg")) == "JPEG"
    assert sniff_format(b"") is None
    assert sniff_format(b"\x01") is None
    if not JXL_PLUGIN:
        assert sniff_format(_read("jxl/splines.jxl")) is None


def test_register_plugins_is_idempotent() -> None:
    register_plugins()
    ids = list(Image.ID)
    register_plugins()
    assert list(Image.ID) == ids
    assert "HEIF" in ids and "AVIF" in ids
    if features.check_module("avif"):
        # Pillow's native AVIF plugin, not pillow_avif's replacement.
        assert Image.OPEN["AVIF"][0].__module__ == "PIL.AvifImagePlugin"


def test_fast_enough_for_a_phone_photo() -> None:
    # Guards against accidental extra full-size copies or float conversions on the common path.
    data = _read("jpeg_exif_orientation/exif-rotn-6.jpg")
    decode_image(data, max_pixels=MAX_PIXELS)
    start = time.perf_counter()
    decode_image(data, max_pixels=MAX_PIXELS)
    assert time.perf_counter() - start < 3.0
