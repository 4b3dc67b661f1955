"""The image-id and timestamp rules of :mod:`app.ids`, which every store and backend uses."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime, timedelta, timezone

import pytest

from app.ids import from_epoch_us, image_id_for, image_id_of_file, is_valid_image_id, to_epoch_us


def test_image_id_is_the_sha256_of_the_bytes_in_memory_and_on_disk(tmp_path):
    data = b"\xff\xd8not really a jpeg" * 1000
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    assert image_id_for(data) == image_id_of_file(path) == hashlib.sha256(data).hexdigest()
    assert is_valid_image_id(image_id_for(data))


@pytest.mark.parametrize(
    "bad", ["", "ab" * 31, "ab" * 33, "AB" * 32, "g" * 64, "ab" * 32 + "\n", "../" + "a" * 61, None, 12, b"a" * 64]
)
def test_malformed_ids_are_refused(bad):
    assert not is_valid_image_id(bad)


def test_timestamps_round_trip_to_the_microsecond_and_naive_ones_are_utc():
    when = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    assert from_epoch_us(to_epoch_us(when)) == when
    other_zone = when.astimezone(timezone(timedelta(hours=5, minutes=30)))
    assert from_epoch_us(to_epoch_us(other_zone)) == when
    assert from_epoch_us(to_epoch_us(when)).tzinfo is UTC
    assert to_epoch_us(datetime(2026, 1, 2, 3, 4, 5, 678901)) == to_epoch_us(when)
    assert to_epoch_us(datetime(1970, 1, 1, tzinfo=UTC)) == 0
