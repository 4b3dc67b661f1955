"""What an ``IMAGE_STORE_URL`` says: where the originals live (``file:///path`` or ``s3://bucket/prefix``).

Only the URL's grammar, so it sits at the bottom of the import layers, below both of its readers: the settings
(:class:`app.config.Settings` refuses a malformed URL at start-up) and the image stores
(:func:`app.storage.from_settings` opens the store it names), so neither has to import the other for it.
"""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

__all__ = ["parse_store_url"]


def parse_store_url(url: str | None) -> tuple[str, str, str]:
    """``(scheme, location, prefix)`` of an ``IMAGE_STORE_URL``: ``("file", "/path", "")`` or
    ``("s3", "bucket", "prefix")``. Raises ``ValueError`` for any other form."""
    if not url:
        return "file", "", ""
    parts = urlsplit(url)
    if parts.scheme == "file":
        if parts.netloc not in ("", "localhost") or not parts.path:
            raise ValueError(f"IMAGE_STORE_URL {url!r}: a file URL is file:///absolute/path")
        return "file", unquote(parts.path), ""
    if parts.scheme == "s3":
        if not parts.netloc or parts.query or parts.fragment:
            raise ValueError(f"IMAGE_STORE_URL {url!r}: an S3 URL is s3://bucket or s3://bucket/prefix")
        return "s3", parts.netloc, parts.path.strip("/")
    raise ValueError(f"IMAGE_STORE_URL {url!r}: only file:///path and s3://bucket/prefix are supported")
