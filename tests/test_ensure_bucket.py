"""scripts/ensure_bucket.py: the Compose `scale` profile's bucket creation (SigV4-signed CreateBucket, stdlib)."""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

import ensure_bucket  # noqa: E402


@pytest.mark.parametrize("region", ["us-east-1", "eu-central-1"])
def test_signature_matches_botocore(region: str) -> None:
    botocore_auth = pytest.importorskip("botocore.auth")
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials

    # botocore signs at its own clock: sign ours at the same second, then compare the whole header.
    theirs = AWSRequest(method="PUT", url="http://minio:9000/originals", data=b"")
    botocore_auth.S3SigV4Auth(Credentials("AKID", "SECRET"), "s3", region).add_auth(theirs)
    now = dt.datetime.strptime(theirs.headers["X-Amz-Date"], "%Y%m%dT%H%M%SZ").replace(tzinfo=dt.UTC)
    ours = ensure_bucket.signed_put_bucket("http://minio:9000", "originals", region, "AKID", "SECRET", now)
    theirs = AWSRequest(method="PUT", url="http://minio:9000/originals", data=ours.data)
    theirs.headers["x-amz-content-sha256"] = ours.get_header("X-amz-content-sha256")
    theirs.context["timestamp"] = theirs_date = now.strftime("%Y%m%dT%H%M%SZ")
    botocore_auth.S3SigV4Auth(Credentials("AKID", "SECRET"), "s3", region).add_auth(theirs)
    if theirs.headers["X-Amz-Date"] != theirs_date:
        pytest.skip("the clock ticked between the two signatures")
    assert ours.get_header("Authorization") == theirs.headers["Authorization"]


def test_creates_the_bucket_once_then_reports_it_exists(moto_s3) -> None:  # noqa: ANN001
    env = {
        **os.environ,
        "IMAGE_STORE_URL": "s3://scale-originals/originals",
        "AWS_ENDPOINT_URL": moto_s3.endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_REGION": "us-east-1",
    }
    script = str(ROOT / "scripts" / "ensure_bucket.py")
    first = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=60)
    assert first.returncode == 0 and "created" in first.stdout, first
    again = subprocess.run([sys.executable, script], env=env, capture_output=True, text=True, timeout=60)
    # AWS (and moto) in us-east-1 answer 200 to a repeated CreateBucket by the owner; MinIO answers 409
    # BucketAlreadyOwnedByYou: both count as success.
    assert again.returncode == 0 and ("exists" in again.stdout or "created" in again.stdout), again
    assert "testing" not in first.stdout + first.stderr + again.stdout + again.stderr


def test_bad_settings_exit_2() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "IMAGE_STORE"))}
    result = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "ensure_bucket.py")], env=env, capture_output=True, text=True
    )
    assert result.returncode == 2
