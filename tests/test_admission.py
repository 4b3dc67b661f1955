"""Bounded decode memory (issue #8, item 3): admission by pixels in flight, read from the header; first come first
served; 503 + Retry-After when the wait is too long or the line is full; the heap trimmed afterwards."""

from __future__ import annotations

import io
import threading
import time

import pytest
from fastapi.testclient import TestClient
from PIL import Image

from app.errors import ServiceBusyError
from app.imaging.admission import PixelAdmission, release_memory
from app.imaging.decode import decode_image, header_pixels
from app.main import create_app
from tests.helpers import make_settings


def _png(width: int, height: int, colour=(200, 30, 30)) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(out, format="PNG")
    return out.getvalue()


def _jpeg(width: int, height: int) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (width, height), (10, 120, 200)).save(out, format="JPEG")
    return out.getvalue()


def test_header_pixels_counts_what_will_be_decoded():
    assert header_pixels(_png(300, 200), max_pixels=10**8) == 60_000
    # JPEG with a draft size decodes at 1/2, 1/4 or 1/8 scale (both sides stay >= the draft size).
    for size in ((2400, 1600), (1000, 3000), (600, 500)):
        data = _jpeg(*size)
        decoded = decode_image(data, max_pixels=10**8, draft_size=260).image
        assert header_pixels(data, max_pixels=10**8, draft_size=260) == decoded.width * decoded.height
    assert header_pixels(_jpeg(2400, 1600), max_pixels=10**8) == 2400 * 1600
    # Nothing to hold for what the decoder refuses from the header: over the limit, or not an image.
    assert header_pixels(_png(300, 200), max_pixels=1000) == 0
    assert header_pixels(b"not an image", max_pixels=10**8) == 0


def test_admission_bounds_pixels_in_flight_first_come_first_served():
    gate = PixelAdmission(100, max_wait_s=5)
    order: list[str] = []
    gate.acquire(80)
    threads = []
    for name, pixels in (("big", 60), ("small", 10)):
        t = threading.Thread(target=lambda n=name, p=pixels: (gate.acquire(p), order.append(n)))
        t.start()
        threads.append(t)
        time.sleep(0.1)
    # "small" would fit (80 + 10 <= 100) but waits behind "big": first come, first served.
    assert order == [] and gate.waiting == 2
    gate.release(80)
    for t in threads:
        t.join(timeout=5)
    assert order == ["big", "small"] and gate.in_flight == 70
    gate.release(60)
    gate.release(10)
    assert gate.in_flight == 0


def test_an_image_over_the_capacity_is_decoded_alone():
    gate = PixelAdmission(100, max_wait_s=1)
    with gate.admit(500):
        assert gate.in_flight == 500
    assert gate.in_flight == 0


def test_admission_gives_503_after_the_wait_or_when_the_line_is_full():
    gate = PixelAdmission(100, max_wait_s=0.3, max_waiters=1)
    gate.acquire(100)
    started = time.monotonic()
    with pytest.raises(ServiceBusyError) as waited:
        gate.acquire(50)
    assert 0.25 <= time.monotonic() - started < 2 and waited.value.retry_after_s >= 1
    assert gate.waiting == 0

    waiter = threading.Thread(target=lambda: pytest.raises(ServiceBusyError, gate.acquire, 50))
    waiter.start()
    time.sleep(0.05)
    with pytest.raises(ServiceBusyError, match="already wait"):
        gate.acquire(50)  # the line (one waiter) is full: refused at once
    waiter.join()
    gate.release(100)


def test_release_memory_is_safe_to_call():
    assert release_memory() in (True, False)


@pytest.mark.slow
def test_large_images_queue_then_get_503_with_retry_after(tmp_path, database_url, offline_embedder):
    # Capacity for one 2000x2000 image at a time, and 0.2 s of patience: of several sent at once, some wait and
    # then answer 503 + Retry-After; the rest are indexed. Every request is answered.
    settings = make_settings(tmp_path / "data", database_url, max_decode_pixels_in_flight=4_000_000, decode_wait_s=0.2)
    images = [_png(2000, 2000, (i * 40, 255 - i * 40, 90)) for i in range(5)]
    statuses: list[tuple[int, str | None]] = []
    with TestClient(create_app(settings, embedder=offline_embedder)) as client:
        gate = client.app.state.service.admission

        def post(data: bytes) -> None:
            r = client.post("/index_image", files={"file": ("big.png", data)})
            statuses.append((r.status_code, r.headers.get("retry-after")))

        threads = [threading.Thread(target=post, args=(data,)) for data in images]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert gate.in_flight == 0 and gate.waiting == 0
        codes = sorted(code for code, _ in statuses)
        assert len(codes) == 5 and set(codes) <= {201, 503} and 201 in codes, statuses
        assert all(retry is not None and int(retry) >= 1 for code, retry in statuses if code == 503)
        assert client.get("/stats").json()["count"] == codes.count(201)


class _Memory:
    """A stand-in for the process's resident memory that a test sets (bytes)."""

    def __init__(self, resident: int) -> None:
        self.resident = resident

    def __call__(self) -> int:
        return self.resident


def test_the_memory_limit_counts_what_the_process_holds_and_what_is_in_flight():
    # MEMORY_LIMIT_MB (issue #27): resident memory now + every admitted decode's estimate + this one <= the limit,
    # whatever the baseline. Units of 1 byte here, so the arithmetic reads plainly.
    memory = _Memory(600)
    gate = PixelAdmission(10**9, max_wait_s=2, memory_limit_bytes=1000, resident=memory, bytes_per_unit=1)
    gate.acquire(300)  # 600 + 300 <= 1000
    admitted: list[int] = []
    waiter = threading.Thread(target=lambda: (gate.acquire(200), admitted.append(200)))
    waiter.start()
    time.sleep(0.3)
    assert admitted == [] and gate.waiting == 1  # 600 + 300 + 200 > 1000: waits, though the pixel cap has room
    memory.resident = 450  # the process handed memory back: the head of the line notices without a release
    waiter.join(timeout=2)
    assert admitted == [200] and gate.in_flight == 500
    gate.release(300)
    gate.release(200)


def test_an_image_that_does_not_fit_the_memory_limit_even_alone_gets_503_at_once():
    gate = PixelAdmission(10**9, max_wait_s=5, memory_limit_bytes=1000, resident=_Memory(900), bytes_per_unit=1)
    started = time.monotonic()
    with pytest.raises(ServiceBusyError, match="MEMORY_LIMIT_MB") as refused:
        gate.acquire(200)
    assert time.monotonic() - started < 1 and refused.value.retry_after_s >= 1
    assert gate.in_flight == 0 and gate.waiting == 0
    with gate.admit(100):  # what fits still passes
        assert gate.in_flight == 100


def test_the_server_caps_malloc_arenas_unless_the_environment_says_otherwise():
    # app.main caps glibc's arenas at two before the server's threads allocate (issue #27); MALLOC_ARENA_MAX wins.
    import os
    import platform
    import subprocess
    import sys

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc only")
    code = "from app.imaging.admission import configure_malloc; print(configure_malloc(2))"
    env = {k: v for k, v in os.environ.items() if k != "MALLOC_ARENA_MAX"}

    def run(env: dict[str, str]) -> str:
        return subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True).stdout.strip()

    assert run(env) == "True"
    assert run({**env, "MALLOC_ARENA_MAX": "4"}) == "False"
