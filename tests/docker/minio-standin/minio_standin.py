"""The `minio` command of the MinIO stand-in (./Dockerfile): moto's S3 server behind MinIO's contract.

    minio server DIR [--address :9000] [--console-address :9001]

What a Compose file relies on from the official image, as far as docker-compose.yml uses it:
- the S3 API on port 9000 (``--address``), path-style requests (``http://minio:9000/<bucket>/<key>``);
- ``GET``/``HEAD /minio/health/live`` and ``/minio/health/ready``: 200 while the server runs (the healthcheck);
- the root credentials ``MINIO_ROOT_USER``/``MINIO_ROOT_PASSWORD`` (default minioadmin/minioadmin; the deprecated
  ``MINIO_ACCESS_KEY``/``MINIO_SECRET_KEY`` too): every S3 request must carry an AWS Signature Version 4
  ``Authorization`` header made with them, as MinIO demands; anything else gets MinIO's 403 answer
  (``AccessDenied``, ``InvalidAccessKeyId``, ``SignatureDoesNotMatch``) and never reaches moto.

Differences: moto keeps the objects in memory (DIR is accepted and left empty: a restart of the container starts
with no buckets); no console (``--console-address`` is accepted and ignored); the payload hash the client declares
(``x-amz-content-sha256``) is part of the signature but the body is not hashed again; presigned URLs (signature in
the query string) are refused; the request's clock is not checked against ours.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import re
import sys
from urllib.parse import quote, unquote

from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app
from werkzeug.serving import run_simple

try:  # moto >= 5.1: keeps S3 metadata headers with underscores, as moto_server does
    from moto.moto_server.werkzeug_app import MotoRequestHandler as _Handler
except ImportError:
    from werkzeug.serving import WSGIRequestHandler as _Handler

_AUTH = re.compile(
    r"AWS4-HMAC-SHA256\s+Credential=(?P<key>[^/,\s]+)/(?P<scope>[^,\s]+),\s*"
    r"SignedHeaders=(?P<signed>[^,\s]+),\s*Signature=(?P<sig>[0-9a-f]{64})\s*$"
)
_HEALTH = ("/minio/health/live", "/minio/health/ready")


def _error(start_response, status: str, code: str, message: str) -> list[bytes]:
    body = (
        f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message></Error>'
    ).encode()
    start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
    return [body]


def _header(environ: dict, name: str) -> str:
    key = {"content-type": "CONTENT_TYPE", "content-length": "CONTENT_LENGTH"}.get(name)
    value = environ.get(key or "HTTP_" + name.upper().replace("-", "_"), "")
    return " ".join(str(value).split())  # trimmed, inner runs of spaces as one (SigV4's canonical form)


def _canonical_query(raw: str) -> str:
    pairs = []
    for part in raw.split("&") if raw else []:
        name, _, value = part.partition("=")
        pairs.append((quote(unquote(name), safe="-_.~"), quote(unquote(value), safe="-_.~")))
    return "&".join(f"{name}={value}" for name, value in sorted(pairs))


def signature_error(environ: dict, access_key: str, secret_key: str) -> tuple[str, str] | None:
    """Why the request's SigV4 signature is not one made with (access_key, secret_key), or None when it is."""
    auth = environ.get("HTTP_AUTHORIZATION", "")
    if not auth:
        return "AccessDenied", "Access Denied."
    match = _AUTH.match(auth)
    if not match:
        return "AccessDenied", "Unsupported Authorization header (only AWS Signature Version 4 is)."
    if not hmac.compare_digest(match["key"], access_key):
        return "InvalidAccessKeyId", "The Access Key Id you provided does not exist in our records."
    day, region, service, terminator = (match["scope"].split("/") + ["", "", "", ""])[:4]
    amz_date = environ.get("HTTP_X_AMZ_DATE", "")
    if terminator != "aws4_request" or not amz_date.startswith(day):
        return "AuthorizationHeaderMalformed", "The credential scope does not match the request date."
    raw_uri = environ.get("RAW_URI") or environ.get("REQUEST_URI") or quote(environ.get("PATH_INFO", "/"))
    path, _, query = raw_uri.partition("?")
    signed = match["signed"].split(";")
    canonical = "\n".join(
        [
            environ["REQUEST_METHOD"],
            path or "/",
            _canonical_query(query),
            "".join(f"{name}:{_header(environ, name)}\n" for name in signed),
            match["signed"],
            environ.get("HTTP_X_AMZ_CONTENT_SHA256", "UNSIGNED-PAYLOAD"),
        ]
    )
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, match["scope"], hashlib.sha256(canonical.encode()).hexdigest()])
    key = f"AWS4{secret_key}".encode()
    for part in (day, region, service, terminator):
        key = hmac.new(key, part.encode(), hashlib.sha256).digest()
    expected = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, match["sig"]):
        return "SignatureDoesNotMatch", "The request signature we calculated does not match the signature you provided."
    return None


def minio_contract(app, access_key: str, secret_key: str):
    """WSGI middleware: MinIO's health endpoints, and only correctly signed requests reach ``app`` (moto)."""

    def wrapped(environ, start_response):
        if environ.get("PATH_INFO") in _HEALTH and environ["REQUEST_METHOD"] in ("GET", "HEAD"):
            start_response("200 OK", [("Content-Length", "0")])
            return [b""]
        problem = signature_error(environ, access_key, secret_key)
        if problem is not None:
            return _error(start_response, "403 Forbidden", *problem)
        return app(environ, start_response)

    return wrapped


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "server":
        print("usage: minio server DIR [--address :9000] [--console-address :9001] (stand-in)", file=sys.stderr)
        return 2
    address = ":9000"
    args = iter(argv[1:])
    for arg in args:
        if arg in ("--address", "--console-address"):
            value = next(args, "")
            address = value if arg == "--address" else address
        elif arg.startswith("--address="):
            address = arg.split("=", 1)[1]
    host, _, port = address.rpartition(":")
    access_key = os.environ.get("MINIO_ROOT_USER") or os.environ.get("MINIO_ACCESS_KEY") or "minioadmin"
    secret_key = os.environ.get("MINIO_ROOT_PASSWORD") or os.environ.get("MINIO_SECRET_KEY") or "minioadmin"
    os.environ.setdefault("MOTO_PORT", port)
    app = minio_contract(DomainDispatcherApplication(create_backend_app), access_key, secret_key)
    print(f"minio stand-in (moto S3) on {host or '0.0.0.0'}:{port}", flush=True)
    run_simple(host or "0.0.0.0", int(port), app, threaded=True, request_handler=_Handler)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
