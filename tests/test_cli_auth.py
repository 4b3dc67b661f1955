"""``--api-key`` of the command-line tools against a real uvicorn server that requires a key for everything."""

from __future__ import annotations

import httpx

from app.main import create_app
from tests.conftest import make_settings, run_live_server
from tests.test_cli import SUMMARY, run_cli

KEY = "cli-key-3c9d"
GROUP = "instance_small/images/ukbench00120"


def test_cli_send_the_api_key(tmp_path, database_url, offline_embedder, datasets):
    folder = tmp_path / "photos"
    folder.mkdir()
    sources = sorted((datasets / GROUP).iterdir())
    for src in sources:
        (folder / src.name).symlink_to(src)
    settings = make_settings(tmp_path / "data", database_url, api_key=f"other-key,{KEY}", api_key_reads=True)
    with run_live_server(create_app(settings, embedder=offline_embedder)) as url:
        # Without a key: refused at the first request that needs one, with a hint, exit status 2.
        proc = run_cli("bulk_index.py", folder, "--api", url, "--no-progress", cwd=tmp_path, check_rc=2)
        assert "401" in proc.stderr and "--api-key" in proc.stderr
        proc = run_cli("find_similar.py", sources[0], "--api", url, check_rc=1)
        assert "401" in proc.stderr
        proc = run_cli(
            "bulk_index.py", folder, "--api", url, "--api-key", "wrong", "--no-progress", cwd=tmp_path, check_rc=2
        )
        assert "401" in proc.stderr

        # --api-key, then the environment variable.
        proc = run_cli("bulk_index.py", folder, "--api", url, "--api-key", KEY, "--no-progress", cwd=tmp_path)
        assert proc.returncode == 0, proc.stderr
        assert SUMMARY.search(proc.stdout).group(3) == str(len(sources))
        assert KEY not in proc.stdout + proc.stderr
        proc = run_cli("find_similar.py", sources[0], "--api", url, "--json", env={"IMAGE_SEARCH_API_KEY": KEY})
        assert proc.returncode == 0, proc.stderr
        assert '"results"' in proc.stdout
        assert httpx.get(f"{url}/stats", headers={"X-API-Key": KEY}).json()["count"] == len(sources)


def test_bulk_index_stops_at_403_on_non_loopback_host(tmp_path, database_url, offline_embedder, datasets):
    folder = tmp_path / "photos"
    folder.mkdir()
    for src in sorted((datasets / GROUP).iterdir()):
        (folder / src.name).symlink_to(src)
    settings = make_settings(tmp_path / "data", database_url, host="0.0.0.0")  # served on loopback by the fixture
    with run_live_server(create_app(settings, embedder=offline_embedder)) as url:
        proc = run_cli("bulk_index.py", folder, "--api", url, "--no-progress", "--batch-size", "1", cwd=tmp_path)
        assert proc.returncode == 2, (proc.stdout, proc.stderr)
        assert "403" in proc.stderr and "API_KEY" in proc.stderr
