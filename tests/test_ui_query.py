"""The web UI's query rules without a browser or a server (ui/query.py): what the form searches for, what a link
holds and how a link is read back, and the words a person reads."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone

import pytest

from app.vectordb.base import ImageMetadata, SearchFilter, SearchHit
from ui.query import UiFilters, UiQuery, caption, file_size, from_link, photos, results_found, to_link, when

ID = "a" * 64


def test_form_decides_the_kind_of_query():
    assert UiQuery.from_form("/tmp/a.jpg", "", " ") == UiQuery("image", upload="/tmp/a.jpg")
    assert UiQuery.from_form(None, " red car ", None) == UiQuery("text", text="red car")
    assert UiQuery.from_form("/tmp/a.jpg", "red", "") == UiQuery("combined", upload="/tmp/a.jpg", text="red")
    assert UiQuery.from_form(None, "red", "people") == UiQuery("combined", text="red", negative="people")
    assert UiQuery.from_form(None, "", "people") is None  # only words to avoid: nothing to look for
    assert UiQuery.from_form(None, None, None) is None
    # The stored image shown as the query counts when no photo is chosen: "like this result, but not these words".
    assert UiQuery.from_form(None, "", "", ID) == UiQuery("id", image_id=ID)
    assert UiQuery.from_form(None, "", "flag", ID) == UiQuery("combined", image_id=ID, negative="flag")
    assert UiQuery.from_form("/tmp/a.jpg", "", "", ID) == UiQuery("image", upload="/tmp/a.jpg")


def test_link_round_trip():
    filters = UiFilters(
        top_k=7,
        folder="trips/2024",
        formats=("JPEG", "PNG"),
        taken_after="2024-01-01",
        min_score=0.5,
        expand=True,
        indexed_after="2026-12-01",
        indexed_before="2026-12-07",
        min_width=800,
        min_height=600,
    )
    query = UiQuery("id", image_id=ID)
    link = to_link(query, filters, default_top_k=20)
    assert link.startswith(f"?id={ID}&top_k=7&folder=trips%2F2024&formats=JPEG%2CPNG")
    # The REST API's names for the added dates and the minimum size.
    assert "&indexed_after=2026-12-01&indexed_before=2026-12-07&min_width=800&min_height=600&" in link
    params = dict(pair.split("=", 1) for pair in link[1:].split("&"))
    from urllib.parse import unquote_plus

    back = from_link({k: unquote_plus(v) for k, v in params.items()}, default_top_k=20, max_top_k=100)
    assert back.query == query and back.filters == filters and back.problems == []
    # Defaults stay out of the link; an upload cannot travel in one.
    assert to_link(UiQuery("text", text="a red car"), UiFilters(top_k=20), 20) == "?text=a+red+car"
    assert to_link(UiQuery("image", upload="/tmp/x.jpg"), filters, 20) == ""


def test_a_hand_edited_link_still_opens():
    link = from_link(
        {"id": "not-an-id", "top_k": "5000", "min_score": "high", "formats": "jpeg,xcf", "taken_before": "yesterday"},
        default_top_k=20,
        max_top_k=100,
    )
    assert link.query is None and link.filters.top_k == 100 and link.filters.formats == ("JPEG",)
    assert link.filters.min_score is None and link.filters.taken_before == ""
    assert len(link.problems) == 3  # the id, the score and the date each say what was wrong
    assert "minimum score" in link.problems[0] and "taken until date" in link.problems[1]
    assert "results per page" in from_link({"top_k": "ten"}, 20, 100).problems[0]
    sizes = from_link({"min_width": "wide", "min_height": "-4", "indexed_after": "monday"}, 20, 100)
    assert sizes.filters == UiFilters(top_k=20) and len(sizes.problems) == 3
    assert "added from date (indexed_after)" in sizes.problems[0] and "minimum width (min_width)" in sizes.problems[1]
    assert from_link({"min_width": "0"}, 20, 100).filters.min_width is None  # 0 pixels: no minimum
    assert from_link({"text": "dog", "not": "cat"}, 20, 100).query == UiQuery("combined", text="dog", negative="cat")


def test_filters_become_the_services_options():
    options = UiFilters(top_k=5, folder="./trips/", taken_after="2024-07-01", taken_before="2024-07-31").options(10)
    assert options.offset == 10 and options.filters.path_prefix == "trips/"
    # "until" includes its whole last day.
    assert options.filters.taken_before == datetime(2024, 8, 1, tzinfo=UTC)
    assert UiFilters(top_k=5).options().filters is None
    with pytest.raises(ValueError, match="2024-07-31"):
        UiFilters(top_k=5, taken_after="31/07/2024").options()
    # Messages name the filters as the page labels them ("Taken until", not "Taken before").
    with pytest.raises(ValueError, match=r"^Taken from \(2024-08-01\) must be on or before Taken until"):
        UiFilters(top_k=5, taken_after="2024-08-01", taken_before="2024-07-01").options()
    with pytest.raises(ValueError, match="^Taken until must be a date"):
        UiFilters(top_k=5, taken_before="soon").options()


def test_added_dates_and_minimum_sizes_are_the_rest_apis_filters():
    # The same SearchFilter the REST API builds from indexed_after=2026-12-01&indexed_before=2026-12-08
    # &min_width=800&min_height=600: "until" a day is before the next day's midnight, UTC.
    options = UiFilters(
        top_k=5, indexed_after="2026-12-01", indexed_before="2026-12-07", min_width=800, min_height=600
    ).options()
    assert options.filters == SearchFilter.create(
        indexed_after=datetime(2026, 12, 1, tzinfo=UTC),
        indexed_before=datetime(2026, 12, 8, tzinfo=UTC),
        min_width=800,
        min_height=600,
    )
    with pytest.raises(ValueError, match=r"^Added from \(2026-12-08\) must be on or before Added until"):
        UiFilters(top_k=5, indexed_after="2026-12-08", indexed_before="2026-12-07").options()
    for bad in (-1, 2.5, 1_000_001):
        with pytest.raises(ValueError, match=r"^Minimum height must be a whole number of pixels from 0 to 1,000,000"):
            UiFilters(top_k=5, min_height=bad).options()


def test_words_for_people():
    assert photos(1) == "1 photo" and photos(273) == "273 photos" and photos(12345) == "12,345 photos"
    assert results_found(1, 0.0091) == "1 result · 9 ms" and results_found(8, 0.012) == "8 results · 12 ms"
    assert file_size(1) == "1 byte" and file_size(0) == "0 bytes" and file_size(812) == "812 bytes"
    assert file_size(3282) == "3.3 kB" and file_size(12_400_000) == "12.4 MB"
    assert when(None) == "unknown" and when(datetime(2024, 7, 31, 14, 5, tzinfo=UTC)) == "2024-07-31 14:05 UTC"
    assert when(datetime(2024, 7, 31, 14, 5, tzinfo=timezone(timedelta(hours=2)))) == "2024-07-31 14:05 +0200"
    meta = ImageMetadata("trips/a long name.jpg", "JPEG", 10, 10, 100, datetime(2024, 1, 1, tzinfo=UTC))
    assert caption(3, SearchHit(ID, 0.91234, meta)) == "#3 · 0.912 · trips/a long name.jpg"
