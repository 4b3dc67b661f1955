#!/usr/bin/env python
"""Server footprint: start-up time and resident memory (RSS) of ``python -m app``, as one JSON line.

Runs the real server as a child process (the settings' defaults otherwise) on a data folder of its own, with the
Gradio UI on and off (``--ui both``, the default: both variants in one run, since the machine is shared and noisy):

1. a first start creates the embedded database and the model's ONNX export (not measured: a one-time cost);
2. a warm start: seconds from process start to the first ``200`` of ``/health`` (``start_to_healthy_s``), and the
   server's RSS 2 s later (``rss_after_start_mb``); with the UI and ``--start-only``, also to the first ``200`` of
   ``/ui/config`` asked right after (``start_to_ui_s``: the UI is built once the API is healthy), and how long
   the first answered ``/health`` request itself took (``first_health_request_ms``); with ``--start-only --ui
   both`` the two variants' warm starts take turns (on, off, on...);
3. indexes ``caltech101_subset`` and ``instance_small`` through the API with ``scripts/bulk_index.py``
   (``rss_after_index_mb``);
4. a second pass of the same uploads (every file again to ``POST /index_images``, answered ``exists``, and 200
   ``POST /search_image``): ``rss_after_second_pass_mb``, which must not grow over step 3.

RSS is VmRSS of the server process from ``/proc`` (Linux), in MB (10^6 bytes); the embedded PostgreSQL runs in
processes of its own and is reported apart (``postgres_rss_mb``, all its processes). ``libtorch_mapped`` says whether
the server process has torch's shared library mapped at the end (the goal: it never loads torch).

With ``--ui both`` the JSON line holds one object per variant (``ui_on``, ``ui_off``); with ``on`` or ``off`` the
variant's figures are the line itself, as before.

Usage: python bench/footprint.py [--embedder efficientnet|auto] [--ui both|on|off] [--data-dir DIR] [--port 18765]
       [--start-only [--starts N]]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def rss_mb(pid: int) -> float:
    """VmRSS of ``pid`` in MB (10^6 bytes), from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) * 1024 / 1e6, 1)
    return 0.0


def postgres_rss_mb(data_dir: Path) -> float:
    """Summed VmRSS of the processes whose command line names this data folder's PostgreSQL, in MB."""
    total = 0.0
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            cmd = (proc / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
            exe = os.readlink(proc / "exe")
        except OSError:
            continue
        if "postgres" in exe and (str(data_dir) in cmd or _is_child_of_postmaster(proc, data_dir)):
            total += rss_mb(int(proc.name))
    return round(total, 1)


def _is_child_of_postmaster(proc: Path, data_dir: Path) -> bool:
    try:
        ppid = int((proc / "stat").read_text().split(") ")[1].split()[1])
        parent_cmd = Path(f"/proc/{ppid}/cmdline").read_bytes().decode(errors="replace")
    except (OSError, IndexError, ValueError):
        return False
    return str(data_dir) in parent_cmd


def libtorch_mapped(pid: int) -> bool:
    """Whether torch's shared library is mapped into ``pid`` (torch was imported)."""
    return "libtorch" in Path(f"/proc/{pid}/maps").read_text()


def start_server(env: dict[str, str], port: int) -> tuple[subprocess.Popen, float, float]:
    """Start ``python -m app``; return it, the seconds until ``/health`` first answered 200, and how long that
    first answered request took, seconds (the server listens only once its lifespan has started the service, so
    this is the first request's own time: what anything the process does beside it, such as importing Gradio,
    adds to it)."""
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "app"], cwd=ROOT, env=env, stderr=subprocess.DEVNULL)
    deadline = start + 900
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with status {proc.returncode}")
        sent = time.monotonic()
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                now = time.monotonic()
                return proc, now - start, now - sent
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    raise RuntimeError("the server did not become healthy")


def stop_server(proc: subprocess.Popen) -> None:
    proc.send_signal(signal.SIGINT)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def second_pass(api: str, folders: list[Path]) -> None:
    """Every file again through ``POST /index_images`` (32 per request), then 200 searches by example."""
    files = sorted(p for folder in folders for p in folder.rglob("*") if p.is_file())
    with httpx.Client(base_url=api, timeout=300) as client:
        for i in range(0, len(files), 32):
            parts = [("files", (p.name, p.read_bytes())) for p in files[i : i + 32]]
            client.post("/index_images", files=parts).raise_for_status()
        for p in files[:: max(1, len(files) // 200)][:200]:
            client.post("/search_image", files={"file": (p.name, p.read_bytes())}, data={"top_k": "10"})


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--embedder", default="efficientnet", choices=["efficientnet", "auto"])
    parser.add_argument("--ui", default="both", choices=["both", "on", "off"], help="UI_ENABLED of the server")
    parser.add_argument("--data-dir", type=Path, help="the server's DATA_DIR (default: a new temporary folder)")
    parser.add_argument("--datasets", type=Path, default=ROOT.parent / "shared" / "datasets")
    parser.add_argument("--port", type=int, default=18765)
    parser.add_argument(
        "--start-only", action="store_true", help="only the warm start (time to healthy, RSS): no indexing"
    )
    parser.add_argument("--starts", type=int, default=1, help="warm starts to time; the median is reported")
    args = parser.parse_args()
    variants = ["on", "off"] if args.ui == "both" else [args.ui]
    data_dirs = {
        ui: args.data_dir / f"ui-{ui}" if args.data_dir and len(variants) > 1 else args.data_dir for ui in variants
    }
    if args.start_only:
        results = warm_starts(args, {f"ui_{ui}": (ui == "on", data_dirs[ui]) for ui in variants})
    else:
        results = {f"ui_{ui}": measure(args, ui == "on", data_dirs[ui]) for ui in variants}
    line = {"bench": "footprint", "embedder": args.embedder}
    if len(variants) == 1:
        line.update(next(iter(results.values())))
    else:
        line.update(results)
    line["load_avg_1m"] = round(os.getloadavg()[0], 2)
    print(json.dumps(line))
    return 0


def server_env(args: argparse.Namespace, ui: bool, data_dir: Path | None) -> dict[str, str]:
    """The server's environment for one variant: its own data folder (a new temporary one by default)."""
    data_dir = (data_dir or Path(tempfile.mkdtemp(prefix="footprint-"))).resolve()
    env = {
        **os.environ,
        "DATA_DIR": str(data_dir),
        "PORT": str(args.port),
        "HOST": "127.0.0.1",
        "EMBEDDER": args.embedder,
        "UI_ENABLED": "true" if ui else "false",
        "LOG_LEVEL": "WARNING",
        "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1"),
    }
    env.pop("DATABASE_URL", None)
    env.pop("CACHE_REDIS_URL", None)
    return env


def warm_starts(args: argparse.Namespace, variants: dict[str, tuple[bool, Path | None]]) -> dict[str, dict]:
    """``--start-only``: each variant's first start (not timed), then ``--starts`` warm starts of each, the variants
    taking turns (on, off, on, off...) so that a load that changes over the minutes of a run on a shared machine
    weighs on both alike. Per variant: the median and every figure."""
    api = f"http://127.0.0.1:{args.port}"
    envs = {name: server_env(args, ui, data_dir) for name, (ui, data_dir) in variants.items()}
    for env in envs.values():
        first, _, _ = start_server(env, args.port)  # creates the database and the model export
        stop_server(first)
    times: dict[str, list[float]] = {name: [] for name in variants}
    ui_times: dict[str, list[float]] = {name: [] for name in variants}
    request_times: dict[str, list[float]] = {name: [] for name in variants}
    rss: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.starts):
        for name, (ui, _) in variants.items():
            start = time.monotonic()
            server, healthy_s, request_s = start_server(envs[name], args.port)
            request_times[name].append(request_s)
            if ui:  # the page itself: /ui/config answers once the UI is built (a request meanwhile waits for it)
                assert httpx.get(f"{api}/ui/config", timeout=120).status_code == 200
                ui_times[name].append(time.monotonic() - start)
            time.sleep(2)
            times[name].append(healthy_s)
            rss[name].append(rss_mb(server.pid))
            stop_server(server)
    results = {}
    for name in variants:
        figures = {
            "start_to_healthy_s": round(sorted(times[name])[len(times[name]) // 2], 2),
            "start_to_healthy_all_s": [round(t, 2) for t in times[name]],
            "first_health_request_ms": round(1000 * sorted(request_times[name])[len(request_times[name]) // 2]),
            "first_health_request_all_ms": [round(1000 * t) for t in request_times[name]],
            "rss_after_start_mb": sorted(rss[name])[len(rss[name]) // 2],
        }
        if ui_times[name]:
            figures["start_to_ui_s"] = round(sorted(ui_times[name])[len(ui_times[name]) // 2], 2)
            figures["start_to_ui_all_s"] = [round(t, 2) for t in ui_times[name]]
        results[name] = figures
    return results


def measure(args: argparse.Namespace, ui: bool, data_dir: Path | None) -> dict:
    """One variant's figures with indexing (see the module docstring)."""
    env = server_env(args, ui, data_dir)
    data_dir = Path(env["DATA_DIR"])
    api = f"http://127.0.0.1:{args.port}"

    first, first_s, _ = start_server(env, args.port)  # creates the database and the model export
    stop_server(first)

    server, healthy_s, _ = start_server(env, args.port)
    try:
        time.sleep(2)
        after_start = rss_mb(server.pid)
        ui_answers = httpx.get(f"{api}/ui/config", timeout=30).status_code == 200
        folders = [args.datasets / "caltech101_subset" / "images", args.datasets / "instance_small" / "images"]
        for folder in folders:
            proc = subprocess.run(
                [sys.executable, "scripts/bulk_index.py", str(folder), "--api", api],
                cwd=ROOT,
                capture_output=True,
                text=True,
                check=False,
            )
            if proc.returncode != 0:
                raise RuntimeError(f"bulk_index.py failed ({proc.returncode}): {proc.stderr[-2000:]}")
        time.sleep(2)
        after_index = rss_mb(server.pid)
        second_pass(api, folders)
        time.sleep(2)
        after_second = rss_mb(server.pid)
        count = httpx.get(f"{api}/stats", timeout=30).json()["count"]
        return {
            "ui_answers": ui_answers,
            "first_start_s": round(first_s, 2),
            "start_to_healthy_s": round(healthy_s, 2),
            "rss_after_start_mb": after_start,
            "rss_after_index_mb": after_index,
            "rss_after_second_pass_mb": after_second,
            "indexed": count,
            "postgres_rss_mb": postgres_rss_mb(data_dir),
            "libtorch_mapped": libtorch_mapped(server.pid),
        }
    finally:
        stop_server(server)


if __name__ == "__main__":
    sys.exit(main())
