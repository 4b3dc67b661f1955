"""``python -m app``: serve the API, docs and UI with uvicorn on HOST:PORT from the settings."""

from __future__ import annotations

import uvicorn

from app.api.connections import server_options
from app.config import Settings


def main() -> None:
    """Start uvicorn with ``app.main:app``; blocks until interrupted. Slow clients are bounded by
    HTTP_HEADER_TIMEOUT_S and HTTP_KEEP_ALIVE_S (:func:`app.api.connections.server_options`)."""
    settings = Settings()
    uvicorn.run("app.main:app", host=settings.host, port=settings.port, **server_options(settings))


if __name__ == "__main__":
    main()
