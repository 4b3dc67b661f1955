"""Create the bucket of IMAGE_STORE_URL=s3://bucket/prefix if it does not exist yet; idempotent.

The service itself never creates buckets (docs/object-storage.md: "The bucket must exist"). The Compose `scale`
profile runs this before each app replica starts, so that a fresh MinIO needs no `mc` and no extra image: it is
one signed `PUT /bucket` (AWS Signature Version 4, path-style, as MinIO expects) with the standard library only.
An answer of 200 (created) or 409 BucketAlreadyOwnedByYou (both replicas race; a restart) is success.

Settings: IMAGE_STORE_URL, AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_REGION (default
us-east-1). The endpoint is retried for up to ENSURE_BUCKET_WAIT_S seconds (default 60). Exit code 0: the bucket
exists; 1: the store refused (the reason, never the credentials, is printed); 2: bad settings or no answer.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import hmac
import os
import sys
import time
import urllib.error
import urllib.request
from urllib.parse import quote, urlsplit

EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def signed_put_bucket(
    endpoint: str, bucket: str, region: str, access_key: str, secret_key: str, now: _dt.datetime
) -> urllib.request.Request:
    """A SigV4-signed path-style `PUT /<bucket>` (CreateBucket) request."""
    body = b""
    if region != "us-east-1":
        body = (
            '<CreateBucketConfiguration xmlns="http://s3.amazonaws.com/doc/2006-03-01/">'
            f"<LocationConstraint>{region}</LocationConstraint></CreateBucketConfiguration>"
        ).encode()
    parts = urlsplit(endpoint.rstrip("/"))
    path = f"{parts.path}/{quote(bucket, safe='')}"
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    day = amz_date[:8]
    payload_hash = hashlib.sha256(body).hexdigest()
    headers = {"host": parts.netloc, "x-amz-content-sha256": payload_hash, "x-amz-date": amz_date}
    signed_headers = ";".join(sorted(headers))
    canonical_headers = "".join(f"{name}:{headers[name]}\n" for name in sorted(headers))
    canonical = "\n".join(["PUT", path, "", canonical_headers, signed_headers, payload_hash])
    scope = f"{day}/{region}/s3/aws4_request"
    to_sign = "\n".join(["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()])
    key = _hmac(_hmac(_hmac(_hmac(f"AWS4{secret_key}".encode(), day), region), "s3"), "aws4_request")
    signature = hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()
    request = urllib.request.Request(f"{parts.scheme}://{parts.netloc}{path}", data=body, method="PUT")
    request.add_header("x-amz-content-sha256", payload_hash)
    request.add_header("x-amz-date", amz_date)
    if access_key:
        request.add_header(
            "Authorization",
            f"AWS4-HMAC-SHA256 Credential={access_key}/{scope}, SignedHeaders={signed_headers}, Signature={signature}",
        )
    return request


def main() -> int:
    url = urlsplit(os.environ.get("IMAGE_STORE_URL", ""))
    endpoint = os.environ.get("AWS_ENDPOINT_URL", "")
    if url.scheme != "s3" or not url.netloc or not endpoint:
        print("ensure_bucket: needs IMAGE_STORE_URL=s3://bucket/prefix and AWS_ENDPOINT_URL", file=sys.stderr)
        return 2
    bucket = url.netloc
    region = os.environ.get("AWS_REGION") or "us-east-1"
    access_key = os.environ.get("AWS_ACCESS_KEY_ID", "")
    secret_key = os.environ.get("AWS_SECRET_ACCESS_KEY", "")
    deadline = time.monotonic() + float(os.environ.get("ENSURE_BUCKET_WAIT_S", "60"))
    while True:
        request = signed_put_bucket(endpoint, bucket, region, access_key, secret_key, _dt.datetime.now(_dt.UTC))
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                print(f"ensure_bucket: created bucket {bucket} (HTTP {response.status})")
                return 0
        except urllib.error.HTTPError as exc:
            text = exc.read(2000).decode("utf-8", "replace")
            if exc.code == 409 and "BucketAlreadyOwnedByYou" in text:
                print(f"ensure_bucket: bucket {bucket} exists")
                return 0
            if exc.code < 500:
                code = text.split("<Code>", 1)[-1].split("</Code>", 1)[0] if "<Code>" in text else ""
                print(f"ensure_bucket: the store refused bucket {bucket}: HTTP {exc.code} {code}", file=sys.stderr)
                return 1
            reason = f"HTTP {exc.code}"
        except (OSError, urllib.error.URLError) as exc:
            reason = type(exc).__name__
        if time.monotonic() >= deadline:
            print(f"ensure_bucket: no answer from the store ({reason})", file=sys.stderr)
            return 2
        time.sleep(1)


if __name__ == "__main__":
    sys.exit(main())
