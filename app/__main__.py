"""``python -m app``: serve the API, docs and UI with uvicorn on HOST:PORT from the settings."""

from __future__ import annotations

import uvicorn

from app.config import Settings


def main() -> None:
    """Start uvicorn with ``app.main:app``; blocks until interrupted."""
    settings = Settings()
    uvicorn.run("app.main:app", host=settings.host, port=settings.port, log_level=settings.log_level.lower())


if __name__ == "__main__":
    main()
