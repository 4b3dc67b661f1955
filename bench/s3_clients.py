#!/usr/bin/env python
"""Which S3 client the object store uses: boto3 vs obstore on the same moto server, as ONE JSON line.

    .venv/bin/python bench/s3_clients.py --dataset ../shared/datasets/caltech101_subset --n 200

Starts moto's standalone S3 server (``moto_server``) on a free loopback port as its own process, then, per client,
on the same real JPEGs: import time (s, in a fresh interpreter), PUT then GET (whole) and a 64 KiB ranged GET of
every file with 8 threads (objects/s), and the resident memory growth of the process after the run (MB). The moto
server's own cost is in every figure alike: compare the clients with each other, not with a real S3.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _import_s(module: str) -> float:
    code = f"import time; t = time.perf_counter(); import {module}; print(time.perf_counter() - t)"
    return float(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout)


def _boto3(endpoint: str, bucket: str):
    import boto3
    from botocore.config import Config

    client = boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="bench",
        aws_secret_access_key="bench-secret",
        region_name="us-east-1",
        config=Config(s3={"addressing_style": "path"}, max_pool_connections=16),
    )
    client.create_bucket(Bucket=bucket)

    def put(key, data):
        client.put_object(Bucket=bucket, Key=key, Body=data)

    def get(key):
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()

    def get_range(key):
        return client.get_object(Bucket=bucket, Key=key, Range="bytes=0-65535")["Body"].read()

    return put, get, get_range


def _obstore(endpoint: str, bucket: str):
    import obstore
    from obstore.store import S3Store

    store = S3Store(
        bucket,
        endpoint=endpoint,
        access_key_id="bench",
        secret_access_key="bench-secret",
        region="us-east-1",
        virtual_hosted_style_request=False,
        client_options={"allow_http": True},
    )

    def put(key, data):
        obstore.put(store, key, data)

    def get(key):
        return obstore.get(store, key).bytes().to_bytes()

    def get_range(key):
        return obstore.get_range(store, key, start=0, length=65536).to_bytes()

    return put, get, get_range


def _run(name: str, make, endpoint: str, files: list[bytes]) -> dict:
    import boto3

    boto3.client(
        "s3", endpoint_url=endpoint, aws_access_key_id="x", aws_secret_access_key="x", region_name="us-east-1"
    ).create_bucket(Bucket=f"b-{name}")
    before = _rss_mb()
    put, get, get_range = make(endpoint, f"b-{name}")
    keys = [f"k/{i:06d}.jpg" for i in range(len(files))]
    out: dict[str, float] = {}
    with ThreadPoolExecutor(8) as pool:
        t = time.perf_counter()
        list(pool.map(put, keys, files))
        out["put_ops"] = len(files) / (time.perf_counter() - t)
        t = time.perf_counter()
        got = list(pool.map(get, keys))
        out["get_ops"] = len(files) / (time.perf_counter() - t)
        assert got == files
        t = time.perf_counter()
        list(pool.map(get_range, keys))
        out["range_get_ops"] = len(files) / (time.perf_counter() - t)
    out["rss_growth_mb"] = _rss_mb() - before
    return {k: round(v, 2) for k, v in out.items()}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--dataset", type=Path, required=True)
    parser.add_argument("--n", type=int, default=200)
    args = parser.parse_args()
    files = [p.read_bytes() for p in sorted(args.dataset.rglob("*.jpg"))[: args.n]]
    port = _free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        endpoint = f"http://127.0.0.1:{port}"
        result = {
            "files": len(files),
            "mean_bytes": round(sum(map(len, files)) / len(files)),
            "boto3_import_s": round(_import_s("boto3"), 3),
            "obstore_import_s": round(_import_s("obstore.store"), 3),
        }
        # obstore first: its RSS growth is then not hidden by boto3's (ru_maxrss only grows)
        result["obstore"] = _run("obstore", _obstore, endpoint, files)
        result["boto3"] = _run("boto3", _boto3, endpoint, files)
        result["machine"] = f"{os.cpu_count()} cores"
        print(json.dumps(result))
    finally:
        server.terminate()
        server.wait(10)


if __name__ == "__main__":
    main()
