"""Search filters and ``taken_at`` (issue #9, item 2) from the API down: the EXIF date read at ingest, the filter
parameters of every search endpoint (query string, form, JSON body), their 4xx answers, the CLI flags, and
``fsck --backfill`` for rows indexed before ``taken_at`` was stored.

The backends' own filtering is checked by the contract suite (tests/test_vectordb_contract.py); here, on the
embedded PostgreSQL, expected results are computed by hand from the stored vectors and :meth:`SearchFilter.matches`.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import replace
from datetime import UTC, datetime

import numpy as np
import pytest
from fastapi.testclient import TestClient

from app.errors import InvalidParameterError
from app.ids import image_id_for
from app.imaging.exif import parse_exif_datetime, read_taken_at
from app.indexing.fsck import backfill_taken_at
from app.main import create_app
from app.vectordb.base import ImageMetadata, SearchFilter
from tests.helpers import CI_STALL_DEADLINES, PROJECT_ROOT, create_database, make_settings

ROTATED = "formats/jpeg_exif_orientation"  # phone shots taken 2017-11-07, no UTC offset recorded
FILES = {
    "trips/2017/rot1.jpg": f"{ROTATED}/exif-rotn-1.jpg",
    "trips/2017/rot3.jpg": f"{ROTATED}/exif-rotn-3.jpg",
    "trips/2017/sub/rot6.jpg": f"{ROTATED}/exif-rotn-6.jpg",
    "trips/2017b/rot8.jpg": f"{ROTATED}/exif-rotn-8.jpg",
    "home/flower.webp": "formats/webp/flower.webp",
    "home/alpha.png": "formats/png/alpha_channel_image.png",
    "home/aero1.jpg": "instance_small/images/ocv_aero_viewpoint/aero1.jpg",
    "home/aero3.jpg": "instance_small/images/ocv_aero_viewpoint/aero3.jpg",
    "work/kite1.png": None,  # filled in the fixture: the first two plasma_Kite images
    "work/kite2.png": None,
}


# --- pure functions ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("value", "offset", "subsec", "expected"),
    [
        ("2017:11:07 22:14:06", None, None, datetime(2017, 11, 7, 22, 14, 6, tzinfo=UTC)),
        (b"2017:11:07 22:14:06\x00", None, None, datetime(2017, 11, 7, 22, 14, 6, tzinfo=UTC)),
        ("2020:01:02 03:04:05", "+02:00", "5", datetime(2020, 1, 2, 1, 4, 5, 500000, tzinfo=UTC)),
        ("2020:01:02 03:04:05", "-05:30", None, datetime(2020, 1, 2, 8, 34, 5, tzinfo=UTC)),
        ("2020:01:02 03:04:05", "garbage", None, datetime(2020, 1, 2, 3, 4, 5, tzinfo=UTC)),
        ("0000:00:00 00:00:00", None, None, None),
        ("    :  :     :  :  ", None, None, None),
        ("2020:13:40 25:00:00", None, None, None),
        (None, None, None, None),
        (12345, None, None, None),
    ],
)
def test_exif_datetime_parsing(value, offset, subsec, expected):
    assert parse_exif_datetime(value, offset, subsec) == expected


def test_taken_at_is_read_from_real_files(datasets):
    assert read_taken_at((datasets / ROTATED / "exif-rotn-6.jpg").read_bytes()) == datetime(
        2017, 11, 7, 22, 14, 6, tzinfo=UTC
    )
    assert read_taken_at((datasets / "formats/png/alpha_channel_image.png").read_bytes()) is not None
    assert read_taken_at(next((datasets / "caltech101_subset/images").glob("*/*.jpg")).read_bytes()) is None
    assert read_taken_at(b"not an image") is None


def test_filter_normalisation_and_errors():
    f = SearchFilter.create(path_prefix="./trips/2017/", formats="jpeg, heif,,", min_width=0)
    assert f.path_prefix == "trips/2017/" and f.formats == ("HEIF", "JPEG") and f.min_width == 0
    assert SearchFilter.create(path_prefix="/").empty and SearchFilter.create().empty
    naive = SearchFilter.create(taken_after=datetime(2020, 1, 1))
    assert naive.taken_after == datetime(2020, 1, 1, tzinfo=UTC)
    for bad in (
        {"formats": " , "},
        {"min_width": -1},
        {"taken_after": datetime(2020, 1, 2), "taken_before": datetime(2020, 1, 1)},
        {"indexed_after": datetime(2020, 1, 1), "indexed_before": datetime(2020, 1, 1)},
    ):
        with pytest.raises(ValueError):
            SearchFilter.create(**bad)


def test_filter_matches_is_the_reference_meaning():
    at = datetime(2024, 5, 1, tzinfo=UTC)
    m = ImageMetadata("trips/2024/a.jpg", "JPEG", 4000, 3000, 10, at, datetime(2024, 4, 1, tzinfo=UTC))
    assert SearchFilter.create(path_prefix="trips").matches(m)
    assert SearchFilter.create(path_prefix="trips/2024").matches(m)
    assert not SearchFilter.create(path_prefix="trips/20").matches(m)  # folders, not string prefixes
    assert SearchFilter.create(formats="jpeg").matches(m) and not SearchFilter.create(formats="PNG").matches(m)
    assert SearchFilter.create(indexed_after=at).matches(m)  # after is inclusive, before exclusive
    assert not SearchFilter.create(indexed_before=at).matches(m)
    assert SearchFilter.create(min_width=4000, min_height=3000).matches(m)
    assert not SearchFilter.create(min_height=3001).matches(m)
    undated = replace(m, taken_at=None)
    assert not SearchFilter.create(taken_after=datetime(2000, 1, 1)).matches(undated)
    assert not SearchFilter.create(taken_before=datetime(2100, 1, 1)).matches(undated)


# --- through the API --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def indexed(tmp_path_factory, pg_server, offline_embedder, datasets):
    """A client on the FILES above; yields ``(client, {stored name: id})``."""
    tmp = tmp_path_factory.mktemp("filters")
    settings = make_settings(tmp / "data", create_database(pg_server), **CI_STALL_DEADLINES)
    kites = sorted((datasets / "instance_small/images/plasma_Kite").iterdir())[:2]
    sources = {name: datasets / rel for name, rel in FILES.items() if rel is not None}
    sources["work/kite1.png"], sources["work/kite2.png"] = kites
    with TestClient(create_app(settings, embedder=offline_embedder)) as client:
        ids = {}
        for name, path in sources.items():
            r = client.post("/index_image", files={"file": (name, path.read_bytes())})
            assert r.status_code == 201, r.text
            ids[name] = image_id_for(path.read_bytes())
        yield client, ids


def expected(client, query_id: str, f: SearchFilter, k: int = 20) -> list[str]:
    """Ids passing ``f``, best first by cosine to ``query_id``'s stored vector, the query left out (by hand)."""
    db = client.app.state.service.db
    q = db.get(query_id).vector
    rows = [r for batch in db.scan(100) for r in batch]
    scored = [(r.id, float(r.vector @ q)) for r in rows if r.id != query_id and f.matches(r.metadata)]
    return [i for i, _ in sorted(scored, key=lambda t: -t[1])][:k]


CASES = [
    {"path_prefix": "trips/2017"},
    {"path_prefix": "home/"},
    {"formats": "png,webp"},
    {"formats": "JPEG", "path_prefix": "home"},
    {"taken_after": "2017-11-07T22:14:10", "taken_before": "2017-11-07T22:14:20Z"},
    {"taken_after": "2000-01-01"},
    {"min_width": 1000},
    {"min_height": 400, "formats": "jpeg"},
    {"indexed_after": "2000-01-01T00:00:00+02:00"},
    {"indexed_before": "2000-01-01T00:00:00Z"},
]


@pytest.mark.slow
@pytest.mark.parametrize("params", CASES, ids=lambda p: ",".join(p))
def test_every_filter_through_the_api_matches_the_reference(indexed, params):
    client, ids = indexed
    query = ids["home/aero1.jpg"]
    filters = SearchFilter.create(
        **{
            k: (datetime.fromisoformat(v.replace("Z", "+00:00")) if k.endswith(("_after", "_before")) else v)
            for k, v in params.items()
        }
    )
    want = expected(client, query, filters)
    r = client.get(f"/image/{query}/similar", params={**params, "top_k": 20})
    assert r.status_code == 200, r.text
    got = r.json()["results"]
    assert [h["id"] for h in got] == want
    # The same filter as form fields of POST /search_image, and as JSON members of POST /search.
    data = (client.app.state.service.image_file(query)).read_bytes()
    form = client.post("/search_image", files={"file": ("q.jpg", data)}, data={**params, "top_k": "20"})
    assert [h["id"] for h in form.json()["results"]] == want, form.text
    body = {"positive": [{"image_id": query}], "top_k": 20, **params}
    if "formats" in params:
        body["formats"] = params["formats"].split(",")  # JSON arrays work too
    combined = client.post("/search", json=body)
    assert [h["id"] for h in combined.json()["results"]] == want, combined.text


@pytest.mark.slow
def test_results_carry_taken_at(indexed):
    client, ids = indexed
    r = client.get(f"/image/{ids['home/aero1.jpg']}/similar", params={"top_k": 20, "path_prefix": "trips"})
    by_name = {h["filename"]: h for h in r.json()["results"]}
    assert by_name["trips/2017/sub/rot6.jpg"]["taken_at"] == "2017-11-07T22:14:06Z"
    r = client.get(
        f"/image/{ids['home/flower.webp']}/similar", params={"top_k": 20, "path_prefix": "home", "formats": "JPEG"}
    )
    assert {h["filename"]: h["taken_at"] for h in r.json()["results"]} == {
        "home/aero1.jpg": None,
        "home/aero3.jpg": None,
    }


@pytest.mark.slow
@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({"taken_after": "yesterday"}, "taken_after"),
        ({"formats": ","}, "formats"),
        ({"min_width": -5}, "min_width"),
        ({"taken_after": "2020-01-02", "taken_before": "2020-01-01"}, "taken_after must be before taken_before"),
        ({"path_prefix": "x" * 2000}, "path_prefix"),
    ],
)
def test_bad_filters_are_422_with_a_reason(indexed, params, fragment):
    client, ids = indexed
    r = client.get(f"/image/{ids['home/aero1.jpg']}/similar", params=params)
    assert r.status_code == 422, r.text
    assert fragment in json.dumps(r.json()["detail"])


@pytest.mark.slow
def test_a_filter_given_twice_differently_is_422(indexed):
    client, ids = indexed
    r = client.post(
        "/search",
        params={"formats": "PNG"},
        json={"positive": [{"image_id": ids["home/aero1.jpg"]}], "formats": ["JPEG"]},
    )
    assert r.status_code == 422 and "formats" in r.json()["detail"]


@pytest.mark.slow
def test_filtered_search_fills_top_k_when_enough_match(indexed):
    client, ids = indexed
    r = client.get(f"/image/{ids['home/aero1.jpg']}/similar", params={"formats": "JPEG", "top_k": 5})
    assert len(r.json()["results"]) == 5
    assert {h["format"] for h in r.json()["results"]} == {"JPEG"}


def test_search_options_refuse_a_bad_filter_as_a_domain_error():
    from app.api.search_params import SearchParams

    with pytest.raises(InvalidParameterError, match="min_width"):
        SearchParams(min_width=-1).options()
    assert SearchParams(formats="jpeg").options().filters == SearchFilter.create(formats="JPEG")
    assert SearchParams().options().filters is None


# --- fsck --backfill --------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_backfill_gives_old_rows_their_taken_at(tmp_path, database_url, offline_embedder, datasets):
    settings = make_settings(tmp_path / "data", database_url, **CI_STALL_DEADLINES)
    with TestClient(create_app(settings, embedder=offline_embedder)) as client:
        service = client.app.state.service
        names = ["exif-rotn-1.jpg", "exif-rotn-3.jpg"]
        ids = [service.index_image((datasets / ROTATED / n).read_bytes(), n).id for n in names]
        plain = service.index_image(
            (datasets / "instance_small/images/ocv_aero_viewpoint/aero1.jpg").read_bytes(), "a.jpg"
        ).id
        before = {i: service.db.get(i) for i in [*ids, plain]}
        assert all(before[i].metadata.taken_at is not None for i in ids)
        # What a database written before taken_at existed holds: the same rows without it.
        service.db.upsert([replace(r, metadata=replace(r.metadata, taken_at=None)) for r in before.values()])
        assert service.db.get(ids[0]).metadata.taken_at is None

        result = backfill_taken_at(service.db, service.store, batch_size=2)
        assert (result.rows, result.filled, result.without_date) == (3, 2, 1)
        for i in ids:
            after = service.db.get(i)
            assert after.metadata.taken_at == before[i].metadata.taken_at
            np.testing.assert_array_equal(after.vector, before[i].vector)  # not re-embedded
            assert after.metadata.indexed_at == before[i].metadata.indexed_at
        service.db.upsert([replace(before[ids[1]], metadata=replace(before[ids[1]].metadata, taken_at=None))])

    # The command line, in its own process, with the service's settings from the environment.
    env = {**os.environ, "DATA_DIR": str(settings.data_dir), "DATABASE_URL": database_url, "EMBEDDER": "none"}
    out = subprocess.run(
        [sys.executable, str(PROJECT_ROOT / "scripts/fsck.py"), "--backfill", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout.splitlines()[-1])["backfill"] == {"rows": 3, "filled": 1, "without_date": 1}


def test_find_similar_passes_the_filter_flags_as_parameters():
    from app.cli.find_similar import build_request, parse_args

    args = parse_args(
        ["--id", "a" * 64, "--folder", "trips/2024", "--formats", "jpeg,heif", "--taken-after", "2024-07-01"]
        + ["--min-width", "1000"]
    )
    request = build_request(args, None)
    assert request["url"] == f"/image/{'a' * 64}/similar"
    assert request["params"] == {
        "path_prefix": "trips/2024",
        "formats": "jpeg,heif",
        "taken_after": "2024-07-01",
        "min_width": "1000",
    }
