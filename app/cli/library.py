"""Manage photo libraries indexed in place through the running service's REST API (``/libraries``).

    image-search-library add photos /mnt/nas/photos --exclude '**/@eaDir/**'   # create; wait for the first scan
    image-search-library scan photos                     # scan again, with progress; then what it found and did
    photos: 1204 files scanned in 3.1 s: 1190 unchanged, 12 new, 2 changed; 13 indexed (model calls), 1 linked
    (known bytes at a new path), 0 back online, 1 offline, 1 moved away, 0 purged, 0 failed, 0 deferred, 0
    skipped.
    image-search-library list                            # every library: roots, state, counts, last scan
    name    roots            state  online  offline  failed  images  last scan
    photos  /mnt/nas/photos  idle     1203        1       0    1190  2026-12-07 09:00:41Z
    image-search-library purge photos                    # forget the offline files now
    image-search-library remove photos                   # forget the library (its files are never touched)

Roots are absolute folders **as the service sees them** (in Docker: where they are mounted in the container).
``add`` and ``scan`` wait for the scan and show its progress on standard error (one bar per phase: walk, hash,
index, offline, purge), polling ``GET /libraries/{name}`` every ``--poll`` seconds; ``--no-wait`` returns once the
scan has started. A scan that is already running is followed rather than started twice. Stopping the wait (Ctrl-C)
leaves the scan running in the service.

Writes (add, scan, purge, remove) need the server's API key when it sets one (``--api-key`` or
``$IMAGE_SEARCH_API_KEY``). Exit status: 0 on success; 1 when the scan failed, was interrupted or ended with a
mount-safety warning (nothing was marked offline), or the server refused the request (e.g. the name is taken, a
root is not a folder it can see, a scan is running); 2 for usage errors, an unreachable API or a refused key; 3 for
an unknown library; 130 when the wait was interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from collections.abc import Callable
from typing import TextIO

import httpx
from tqdm import tqdm

from app.cli.client import add_api_arguments, error_detail, make_client, request

PROG = "image-search-library"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_UNKNOWN, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
RUNNING = frozenset({"scanning", "waiting"})
"""States of a library whose scan is still going on (``waiting``: the database is down and the scan retries)."""
MAX_REASONS = 5  # failed files' reasons shown after a scan (the server keeps the first 20)
WIDTH = 110  # the summary paragraph's line width


class CliError(Exception):
    """A request that cannot succeed; ``code`` is the exit status (1, 2 or 3), the message says why."""

    def __init__(self, message: str, code: int = EXIT_FAILED) -> None:
        super().__init__(message)
        self.code = code


# --- HTTP --------------------------------------------------------------------------------------------------
def check(response: httpx.Response, what: str, name: str | None = None) -> dict | list:
    """The JSON body of a successful answer to ``what`` (e.g. ``"POST /libraries"``).

    Raises :class:`CliError`: code 2 when the key is missing or refused (401/403), 3 when library ``name`` does not
    exist (404), 1 for any other error the server reports (with its ``detail``).
    """
    status = response.status_code
    if status < 400:
        return response.json()
    detail = error_detail(response)
    if status in (401, 403):
        raise CliError(
            f"{what} answered {status} {detail} (pass the server's key with --api-key or IMAGE_SEARCH_API_KEY)",
            EXIT_USAGE,
        )
    if status == 404 and name is not None and "library" in detail.lower():
        raise CliError(f"{detail} ({PROG} list shows the libraries)", EXIT_UNKNOWN)
    if status == 404:
        raise CliError(f"{what} answered 404 {detail}: does this service have photo libraries (a newer version)?")
    raise CliError(f"{what} answered {status} {detail}")


def get_library(client: httpx.Client, name: str) -> dict:
    """``GET /libraries/{name}``: the library's status (see :func:`check` for the errors raised)."""
    status = check(request(client, "GET", f"/libraries/{name}", retries=3), f"GET /libraries/{name}", name)
    assert isinstance(status, dict)
    return status


# --- progress and summaries ---------------------------------------------------------------------------------
class ScanProgress:
    """Progress bars on ``out`` (standard error) for one scan: one bar per phase, closed full when the next begins."""

    def __init__(self, name: str, enabled: bool, out: TextIO | None = None) -> None:
        self.name = name
        self.enabled = enabled
        self.out = out or sys.stderr
        self.phase: str | None = None
        self.bar: tqdm | None = None

    def show(self, status: dict) -> None:
        """Update the bars from a ``GET /libraries/{name}`` answer (``state``, ``phase``, ``done``, ``total``)."""
        phase = "waiting (the database does not answer)" if status["state"] == "waiting" else status["phase"]
        if not phase:
            return
        total = status["total"] or None  # the walk counts files without knowing how many there are
        if phase != self.phase:
            self._close(complete=True)
            self.phase = phase
            self.bar = tqdm(
                total=total,
                desc=f"{self.name}: {phase}",
                unit="file",
                file=self.out,
                dynamic_ncols=True,
                disable=not self.enabled,
                # No rate: the bar jumps to what the server says at each poll, which no rate can be computed from.
                bar_format="{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}]" if total else "{desc}: {n_fmt} files",
            )
        assert self.bar is not None
        if total is not None and self.bar.total != total:
            self.bar.total = total
        self.bar.n = status["done"]
        self.bar.refresh()

    def _close(self, complete: bool) -> None:
        if self.bar is not None:
            if complete and self.bar.total:
                self.bar.n = self.bar.total  # the phase ended between two polls
            self.bar.close()
            self.bar = None

    def close(self, complete: bool = True) -> None:
        """Close the last bar: full when ``complete`` (the scan ended), else as far as it got."""
        self._close(complete)


def wait_for_scan(
    client: httpx.Client,
    name: str,
    poll_s: float,
    progress: ScanProgress,
    sleep: Callable[[float], None] = time.sleep,
) -> dict:
    """Poll ``GET /libraries/{name}`` every ``poll_s`` seconds until its scan ends; returns the last status
    (state ``idle``, ``failed`` or ``interrupted``).

    A 502/503/504 answer (the database or a proxy is briefly down) is waited out like a scan in state ``waiting``.
    Raises :class:`CliError` for other errors, and with code 2 when the API stops answering.
    """
    warned = False
    try:
        while True:
            try:
                response = request(client, "GET", f"/libraries/{name}", retries=3)
            except httpx.TransportError as exc:
                raise CliError(
                    f"lost the API while waiting ({type(exc).__name__}: {exc}); the scan goes on in the service "
                    f"(`{PROG} list` shows it)",
                    EXIT_USAGE,
                ) from exc
            if response.status_code in (502, 503, 504):
                if not warned:
                    tqdm.write(
                        f"{name}: GET /libraries/{name} answered {response.status_code} "
                        f"{error_detail(response)}; still waiting",
                        file=sys.stderr,
                    )
                    warned = True
            else:
                status = check(response, f"GET /libraries/{name}", name)
                assert isinstance(status, dict)
                if status["state"] not in RUNNING:
                    progress.close()
                    return status
                progress.show(status)
            sleep(poll_s)
    except BaseException:
        progress.close(complete=False)  # as far as it got (Ctrl-C, a lost API)
        raise


def _n(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def format_scan(name: str, last: dict) -> str:
    """One paragraph (wrapped at 110 columns) of what a completed scan found and did, from ``last_scan``: files,
    unchanged, new, changed, indexed (model calls), linked, back online, offline, moved away, purged, failed,
    deferred, skipped and its seconds; then the first reasons of failed files, the folders that could not be listed
    and the mount-safety warning, each on lines of their own."""
    g = last.get
    text = (
        f"{name}: {_n(g('files', 0), 'file')} scanned in {g('seconds', 0.0):.1f} s: {g('unchanged', 0)} unchanged, "
        f"{g('new', 0)} new, {g('changed', 0)} changed; {g('indexed', 0)} indexed (model calls), {g('linked', 0)} "
        f"linked (known bytes at a new path), {g('back_online', 0)} back online, {g('offline', 0)} offline, "
        f"{g('moved_away', 0)} moved away, {g('purged', 0)} purged, {g('failed', 0)} failed, {g('deferred', 0)} "
        f"deferred, {g('skipped', 0)} skipped."
    )
    lines = [textwrap.fill(text, WIDTH, break_long_words=False, break_on_hyphens=False)]
    errors = g("errors") or []
    if errors:
        more = g("failed", 0) - min(len(errors), MAX_REASONS)
        lines.append("failed files (first reasons):")
        lines += [f"  {reason}" for reason in errors[:MAX_REASONS]]
        if more > 0:
            lines.append(f"  ... and {more} more (fixed files are read again by the next scan)")
    if g("unreadable_dirs"):
        lines.append("folders that could not be listed (their files were left as they were): ")
        lines[-1] += ", ".join(g("unreadable_dirs"))
    if g("deferred", 0):
        lines.append(f"{_n(g('deferred'), 'file')} changed while being read: the next scan reads them.")
    if g("warning"):
        lines.append(textwrap.fill(f"warning: {g('warning')}", WIDTH, break_long_words=False, subsequent_indent="  "))
    return "\n".join(lines)


def format_counts(status: dict) -> str:
    """The library's counts now: ``files, online, offline, failed, images``."""
    c = status["counts"]
    return (
        f"{status['name']} now holds {_n(c['files'], 'file')}: {c['online']} online, {c['offline']} offline, "
        f"{c['failed']} failed; {_n(c['images'], 'image')}."
    )


def _when(value: str | None) -> str:
    return "never" if not value else value.replace("T", " ").replace("+00:00", "Z")


def _state(status: dict) -> str:
    if status["state"] == "scanning" and status["phase"]:
        progress = f" {status['progress']:.0%}" if status["total"] else ""
        return f"scanning ({status['phase']}{progress})"
    return status["state"]


def format_table(libraries: list[dict]) -> str:
    """Plain-text table: name, roots (comma-separated), state (with the phase while scanning), online, offline,
    failed, images, and when the last scan finished (UTC); then a line per failed scan or warning."""
    header = ["name", "roots", "state", "online", "offline", "failed", "images", "last scan"]
    rows = [
        [
            s["name"],
            ",".join(s["roots"]),
            _state(s),
            *(str(s["counts"][k]) for k in ("online", "offline", "failed", "images")),
            _when(s["scan_finished_at"]),
        ]
        for s in libraries
    ]
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    numeric = range(3, 7)
    lines = [
        "  ".join(
            c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True))
        ).rstrip()
        for r in [header, *rows]
    ]
    for s in libraries:
        if s["state"] == "failed" and s["error"]:
            lines.append(f"{s['name']}: the last scan failed: {s['error']}")
        elif s["state"] == "interrupted":
            lines.append(f"{s['name']}: the scan was interrupted; `{PROG} scan {s['name']}` resumes it")
        if s["warning"]:
            lines.append(f"{s['name']}: warning: {s['warning']}")
    return "\n".join(lines)


# --- commands ------------------------------------------------------------------------------------------------
def finish_scan(client: httpx.Client, args: argparse.Namespace, status: dict) -> int:
    """Wait for the scan that ``status`` shows running (unless ``--no-wait``), then print its summary to standard
    output. Returns the exit status: 0, or 1 when the scan failed, was interrupted or has a warning."""
    name = status["name"]
    if args.no_wait:
        if status["state"] in RUNNING:
            print(f"{name}: scan running; `{PROG} scan {name}` follows it, `{PROG} list` shows its progress")
        return EXIT_OK
    if status["state"] in RUNNING:
        status = wait_for_scan(client, name, args.poll, ScanProgress(name, enabled=not args.no_progress))
    if status["state"] == "failed":
        print(f"error: the scan of {name} failed: {status['error']}", file=sys.stderr)
        return EXIT_FAILED
    if status["state"] == "interrupted":
        print(
            f"error: the scan of {name} was interrupted (the process running it stopped); "
            f"`{PROG} scan {name}` resumes it",
            file=sys.stderr,
        )
        return EXIT_FAILED
    if status["last_scan"] is None:
        print(f"{name}: not scanned yet")
        return EXIT_OK
    print(format_scan(name, status["last_scan"]))
    print(format_counts(status))
    return EXIT_FAILED if status["warning"] or status["last_scan"].get("warning") else EXIT_OK


def cmd_add(client: httpx.Client, args: argparse.Namespace) -> int:
    """``POST /libraries``, then :func:`finish_scan` of the first scan."""
    body = {"name": args.name, "roots": args.roots, "exclude": args.exclude}
    status = check(request(client, "POST", "/libraries", json=body), "POST /libraries")
    assert isinstance(status, dict)
    excludes = f" (excluding {', '.join(status['exclude'])})" if status["exclude"] else ""
    print(f"{args.name}: library created on {', '.join(status['roots'])}{excludes}; its first scan started")
    return finish_scan(client, args, status)


def cmd_scan(client: httpx.Client, args: argparse.Namespace) -> int:
    """``POST /libraries/{name}/scan[?force=true]`` (202: started, 200: one was running), then
    :func:`finish_scan`."""
    name = args.name
    params = {"force": "true"} if args.force else {}
    response = request(client, "POST", f"/libraries/{name}/scan", retries=3, params=params)
    status = check(response, f"POST /libraries/{name}/scan", name)
    assert isinstance(status, dict)
    if response.status_code == 200:
        following = "" if args.no_wait else ": following it"
        note = "; --force only applies to a scan it starts: run it again once this one ends" if args.force else ""
        print(f"{name}: a scan was already running{following}{note}", file=sys.stderr)
    return finish_scan(client, args, status)


def cmd_list(client: httpx.Client, args: argparse.Namespace) -> int:
    """``GET /libraries`` as a table (:func:`format_table`) or, with ``--json``, as the API returns it."""
    libraries = check(request(client, "GET", "/libraries", retries=3), "GET /libraries")
    assert isinstance(libraries, list)
    if args.json:
        print(json.dumps(libraries, indent=2))
    elif libraries:
        print(format_table(libraries))
    else:
        print(f"no libraries yet: `{PROG} add NAME /folder` creates one", file=sys.stderr)
    return EXIT_OK


def cmd_purge(client: httpx.Client, args: argparse.Namespace) -> int:
    """``POST /libraries/{name}/purge``: forget the offline files now; prints how many files and images went."""
    name = args.name
    done = check(request(client, "POST", f"/libraries/{name}/purge", retries=3), f"POST /libraries/{name}/purge", name)
    assert isinstance(done, dict)
    if done["files"]:
        held = " (the others' bytes are held by another file or an upload)" if done["images"] < done["files"] else ""
        print(
            f"{name}: forgot {_n(done['files'], 'offline file')}; {_n(done['images'], 'image')} left the "
            f"collection{held}. No file was touched."
        )
    else:
        print(f"{name}: no offline files to forget")
    return EXIT_OK


def cmd_remove(client: httpx.Client, args: argparse.Namespace) -> int:
    """``DELETE /libraries/{name}`` (no confirmation); prints the roots, the files the library knew and the images
    that left the collection, and that the files themselves were not touched."""
    name = args.name
    status = get_library(client, name)
    done = check(request(client, "DELETE", f"/libraries/{name}"), f"DELETE /libraries/{name}", name)
    assert isinstance(done, dict)
    print(
        f"{name}: library removed ({', '.join(status['roots'])}; {_n(status['counts']['files'], 'file')} known); "
        f"{_n(done['images_removed'], 'image')} left the collection (those no other library or upload holds). "
        "The files themselves were not touched."
    )
    return EXIT_OK


COMMANDS = {"add": cmd_add, "scan": cmd_scan, "list": cmd_list, "purge": cmd_purge, "remove": cmd_remove}


# --- arguments ------------------------------------------------------------------------------------------------
def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """The command line; exits with status 2 (argparse) on a usage error."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Manage photo libraries indexed in place (the service's /libraries API).",
        epilog="Exit status: 0 ok; 1 the scan failed or warned, or the server refused; 2 usage error, API "
        "unreachable or key refused; 3 unknown library; 130 interrupted (a scan goes on in the service).",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        key_help = "needed for writes when the server sets API_KEY" if name != "list" else "needed with API_KEY_READS"
        add_api_arguments(p, key_help=key_help)
        return p

    def waiting(p: argparse.ArgumentParser) -> None:
        p.add_argument("--no-wait", action="store_true", help="return once the scan has started")
        p.add_argument("--no-progress", action="store_true", help="no progress bars while waiting")
        p.add_argument("--poll", type=float, default=0.5, help="seconds between progress checks (default: 0.5)")

    p = command("add", "create a library and wait for its first scan")
    p.add_argument("name", metavar="NAME", help="1-48 lower-case letters, digits, '_' or '-'")
    p.add_argument("roots", metavar="ROOT", nargs="+", help="absolute folder as the service sees it (repeatable)")
    p.add_argument(
        "--exclude",
        action="append",
        default=[],
        metavar="GLOB",
        help="files or folders to leave out, e.g. '**/@eaDir/**' (** spans folders; repeatable)",
    )
    waiting(p)
    p = command("scan", "scan a library (or follow the scan running) and say what it found and did")
    p.add_argument("name", metavar="NAME")
    p.add_argument(
        "--force", action="store_true", help="mark missing files offline even when more than half are missing"
    )
    waiting(p)
    p = command("list", "the libraries with their roots, state, counts and last scan")
    p.add_argument("--json", action="store_true", help="print the server's JSON")
    p = command("purge", "forget a library's offline files now (their images too, unless held elsewhere)")
    p.add_argument("name", metavar="NAME")
    p = command("remove", "forget a library and the images only it held; its files are never touched")
    p.add_argument("name", metavar="NAME")

    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error("--timeout must be > 0")
    if getattr(args, "poll", 1.0) <= 0:
        parser.error("--poll must be > 0")
    for root in getattr(args, "roots", []):
        if not os.path.isabs(root):
            parser.error(
                f"ROOT must be an absolute path as the service sees it (in Docker: where it is mounted), got {root!r}"
                + (f"; here that is {os.path.abspath(root)}" if os.path.isdir(root) else "")
            )
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``); returns the exit status (see the module
    docstring)."""
    args = parse_args(argv)
    api = args.api.rstrip("/")
    try:
        with make_client(args) as client:
            return COMMANDS[args.command](client, args)
    except httpx.TransportError as exc:
        print(f"error: cannot reach the API at {api} ({type(exc).__name__}: {exc})", file=sys.stderr)
        return EXIT_USAGE
    except CliError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return exc.code
    except KeyboardInterrupt:
        print(f"\nstopped waiting: the scan goes on in the service (`{PROG} list` shows it)", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
