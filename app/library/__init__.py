"""Photo libraries indexed in place (issue #26): folders the service reads where they are, never copies, and keeps
in sync by scans and watching.

- :mod:`app.library.model`: what a library is (name, roots, exclusion globs) and how its files are named;
- :mod:`app.library.walk`: walking the roots with ``scandir`` + ``stat``, and resolving a file safely inside them;
- :mod:`app.library.state`: the libraries' tables (PostgreSQL shared by replicas, or a SQLite file) and scan leases;
- :mod:`app.library.visibility`: the one rule for whether an image is visible, hidden (offline) or gone;
- :mod:`app.library.scan`: one scan: walk, compare, hash, ingest, mark offline, purge;
- :mod:`app.library.files`: library files read as originals (``GET /image``, thumbnails), checked against their
  records;
- :mod:`app.library.libraries`: the service's libraries: create, list, scan in the background, purge, delete;
- :mod:`app.library.watch`: following changes with inotify (``LIBRARY_WATCH``).
"""
