"""Downloading the raw SST files (NOAA OI SST V2 weekly means and the land-sea mask) over HTTP.

:func:`download_file` fetches one URL into a local file, safely:

- streamed to disk in chunks (never the whole file in memory), with a progress bar on a terminal
  and a log line every ~10 % otherwise (the pipeline's logs are files);
- written to ``<dest>.part`` and renamed to ``<dest>`` only when it is complete, has the pinned
  checksum (when one is given) and passes the caller's validation, so an interrupted or failed
  download never leaves a file that looks whole;
- transient errors (HTTP 5xx and 429, a refused or reset connection, a timeout, a body shorter
  than its ``Content-Length``) are retried with exponential backoff; the retry resumes the
  partial file with an HTTP ``Range`` request when the server supports it and starts again from
  zero when it does not;
- its SHA-256 (computed while streaming) is written beside it as ``<dest>.sha256`` in the format
  of ``sha256sum``; a later call finds the sidecar and skips the download.

:func:`download_sst` downloads both files of the SST experiment with the settings of
``sst.download`` and validates them as the NOAA files (180 x 360 grid, weekly time axis).
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import sys
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

import requests

from smnn.config import Config
from smnn.errors import UserError
from smnn.io import atomic_write_text, fsync_dir

__all__ = [
    "DownloadError",
    "HostUnreachableError",
    "DownloadResult",
    "download_file",
    "download_sst",
    "DownloadTarget",
    "sst_download_targets",
    "read_sidecar",
    "sidecar_path",
    "part_path",
    "NOAA_GRID",
    "CHUNK_BYTES",
]

log = logging.getLogger(__name__)

# the grid of the real NOAA files (lat x lon, 1 degree)
NOAA_GRID: tuple[int, int] = (180, 360)

# bytes read from the socket and written per step; when a transfer breaks off, the bytes of the
# unfinished chunk are fetched again by the resumed request
CHUNK_BYTES = 1 << 16
_MAX_SLEEP = 60.0  # the longest wait between two attempts, seconds
_TRANSIENT_STATUS = frozenset({408, 425, 429, 500, 502, 503, 504})
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_CONTENT_RANGE = re.compile(r"^bytes\s+(\d+)-(\d+)/(\d+|\*)$")
_UNSATISFIED_RANGE = re.compile(r"^bytes\s+\*/(\d+)$")


class DownloadError(UserError, RuntimeError):
    """A file could not be downloaded (HTTP error, corrupt or truncated file, wrong checksum);
    the message names the URL, the problem and what to do."""


class HostUnreachableError(DownloadError):
    """The server could not be reached at all (name resolution, refused connection, timeout)."""


@dataclass(frozen=True)
class DownloadResult:
    """One file in place: where, how large, its SHA-256, and what it took.

    ``skipped`` is true when the file was already there, complete and verified (no transfer);
    ``attempts`` counts the HTTP requests made (0 when skipped).
    """

    url: str
    path: Path
    size: int
    sha256: str
    seconds: float
    skipped: bool
    attempts: int

    def summary(self) -> str:
        """One line for the command's output."""
        what = "already downloaded" if self.skipped else "downloaded"
        return (
            f"{what} {self.path}: {_human(self.size)} ({self.size} bytes), "
            f"sha256 {self.sha256}, {self.seconds:.1f} s"
        )


def part_path(dest: str | Path) -> Path:
    """The temporary name of ``dest`` while it is being downloaded (``<dest>.part``)."""
    dest = Path(dest)
    return dest.parent / (dest.name + ".part")


def sidecar_path(dest: str | Path) -> Path:
    """The checksum file written beside ``dest`` (``<dest>.sha256``)."""
    dest = Path(dest)
    return dest.parent / (dest.name + ".sha256")


def read_sidecar(dest: str | Path) -> str | None:
    """The SHA-256 (lower-case hex) recorded beside ``dest``, or None when there is no valid
    sidecar naming this file (``"<hex>  <name>"``, as written by :func:`download_file` and
    ``sha256sum``)."""
    dest = Path(dest)
    try:
        text = sidecar_path(dest).read_text()
    except (OSError, UnicodeDecodeError):
        return None
    fields = text.strip().split(maxsplit=1)
    if len(fields) != 2:
        return None
    digest, name = fields[0].lower(), fields[1].lstrip("*")
    if not _HEX64.match(digest) or name != dest.name:
        return None
    return digest


def _normalise_sha(sha256: str | None) -> str | None:
    if sha256 is None:
        return None
    value = sha256.strip().lower()
    if not _HEX64.match(value):
        raise DownloadError(
            f"the pinned sha256 {sha256!r} is not a SHA-256 checksum (64 hexadecimal digits)"
        )
    return value


def _human(n: int) -> str:
    size = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if size < 1024 or unit == "GB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"  # pragma: no cover


def _hash_file(path: Path) -> tuple[Any, int]:
    """A sha256 object fed with the whole file, and the file's size."""
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while block := f.read(CHUNK_BYTES):
            hasher.update(block)
            size += len(block)
    return hasher, size


def _manual_hint(url: str, dest: Path) -> str:
    """How to place the file by hand when the download cannot be made from this machine."""
    return (
        f"To place the file by hand: download {url} on a machine that can reach it, copy it to "
        f"{dest}, and set `sst.source: file` in the config (and `sst.files.sst` / "
        f"`sst.files.mask` when the files are elsewhere)."
    )


class _Progress:
    """Progress of one transfer: a tqdm bar on a terminal, else a log line every ~10 %."""

    def __init__(self, name: str, total: int | None, start: int, enabled: bool):
        self.name = name
        self.total = total
        self.done = start
        self.bar = None
        self.next_mark = 0
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(
                total=total,
                initial=start,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=name,
                file=sys.stderr,
                leave=False,
            )
        else:
            self._advance_mark()

    def _advance_mark(self) -> None:
        # next size at which a log line is written: each 10 % (or each 50 MB without a total)
        step = max(self.total // 10, 1) if self.total else 50 * (1 << 20)
        while self.next_mark <= self.done:
            self.next_mark += step

    def update(self, n: int) -> None:
        self.done += n
        if self.bar is not None:
            self.bar.update(n)
        elif self.enabled and self.done >= self.next_mark:
            if self.total:
                pct = 100.0 * self.done / self.total
                log.info(
                    "%s: %.0f %% (%s of %s)", self.name, pct, _human(self.done), _human(self.total)
                )
            else:
                log.info("%s: %s", self.name, _human(self.done))
            self._advance_mark()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


class _Transient(Exception):
    """An attempt failed in a way worth retrying; ``connect`` when no connection was made."""

    def __init__(self, message: str, *, connect: bool = False):
        super().__init__(message)
        self.connect = connect


def _expected_total(resp: requests.Response, offset: int) -> tuple[int | None, int]:
    """(total size of the file or None, byte offset the body starts at) of a 200 or 206."""
    if resp.headers.get("Content-Encoding", "identity").lower() not in ("identity", ""):
        return None, 0  # transformed body: its length says nothing about the file
    if resp.status_code == 206:
        match = _CONTENT_RANGE.match(resp.headers.get("Content-Range", "").strip())
        if not match:
            raise _Transient(
                f"a partial response (206) without a usable Content-Range "
                f"({resp.headers.get('Content-Range')!r})"
            )
        start = int(match.group(1))
        total = None if match.group(3) == "*" else int(match.group(3))
        return total, start
    length = resp.headers.get("Content-Length")
    return (int(length) if length and length.isdigit() else None), 0


def _attempt(
    session: requests.Session,
    url: str,
    part: Path,
    state: dict[str, Any],
    *,
    timeout: float,
    progress: bool,
    name: str,
) -> None:
    """One HTTP request appending to ``part``; returns when ``part`` holds the whole file.

    ``state`` carries, between attempts of one download, the running hash (``hasher``, covering
    ``hashed`` bytes of ``part``), the validator of the response (``if_range``) and the known
    total size. Raises :class:`_Transient` (retry) or :class:`DownloadError` (give up).
    """
    offset = part.stat().st_size if part.exists() else 0
    headers = {"Accept-Encoding": "identity"}
    if offset > 0:
        headers["Range"] = f"bytes={offset}-"
        if state.get("if_range"):
            headers["If-Range"] = state["if_range"]
    try:
        resp = session.get(url, headers=headers, stream=True, timeout=(timeout, timeout))
    except requests.exceptions.SSLError as exc:
        raise DownloadError(f"the TLS connection to {url} failed: {exc}") from exc
    except (requests.exceptions.ConnectionError, requests.exceptions.Timeout) as exc:
        # no response at all: the host is down, unknown, refusing or too slow to accept
        raise _Transient(f"no connection ({type(exc).__name__}: {exc})", connect=True) from exc
    except requests.exceptions.RequestException as exc:  # bad URL, too many redirects, ...
        raise DownloadError(f"cannot request {url}: {exc}") from exc

    with resp:
        status = resp.status_code
        if status == 416 and offset > 0:
            # the range starts at or beyond the end: the part may already be complete
            match = _UNSATISFIED_RANGE.match(resp.headers.get("Content-Range", "").strip())
            if match and int(match.group(1)) == offset:
                state["total"] = offset
                return
            part.unlink(missing_ok=True)
            state.update(hasher=None, hashed=0)
            raise _Transient(
                f"the partial file ({offset} bytes) does not fit the file on the "
                f"server (416); starting again from zero"
            )
        if status in _TRANSIENT_STATUS or status >= 500:
            raise _Transient(f"HTTP {status} {resp.reason}")
        if status not in (200, 206):
            raise DownloadError(
                f"{url} answered HTTP {status} {resp.reason}"
                + (
                    " (no such file on the server: check the URL in sst.download)"
                    if status in (404, 410)
                    else ""
                )
            )

        total, start = _expected_total(resp, offset)
        if status == 206 and start != offset:
            # another range than asked for: drop the part, ask for the whole file next time
            part.unlink(missing_ok=True)
            state.update(hasher=None, hashed=0)
            raise _Transient(
                f"the server sent bytes from {start}, not from {offset}; starting again from zero"
            )
        if status == 200:
            # the whole file (the server ignored the range, if one was asked for)
            if offset > 0:
                log.info(
                    "%s: the server does not resume (HTTP 200 to a Range request); "
                    "starting again from zero",
                    name,
                )
            offset = 0
            state.update(hasher=None, hashed=0)
            mode = "wb"
        else:
            mode = "ab"
        validator = resp.headers.get("ETag") or resp.headers.get("Last-Modified")
        if validator and not validator.startswith("W/"):
            state["if_range"] = validator
        state["total"] = total

        if state.get("hasher") is None or state.get("hashed") != offset:
            # hash what is already on disk (a part from an earlier attempt or run)
            if offset > 0:
                state["hasher"], state["hashed"] = _hash_file(part)
            else:
                state["hasher"], state["hashed"] = hashlib.sha256(), 0
        hasher = state["hasher"]

        bar = _Progress(name, total, offset, progress)
        try:
            with open(part, mode) as f:
                try:
                    for chunk in resp.iter_content(chunk_size=CHUNK_BYTES):
                        if not chunk:
                            continue
                        f.write(chunk)
                        hasher.update(chunk)
                        state["hashed"] += len(chunk)
                        bar.update(len(chunk))
                except requests.exceptions.RequestException as exc:
                    # reset, cut short (ChunkedEncodingError), read timeout, ...
                    raise _Transient(
                        f"the transfer broke off after {state['hashed']} bytes "
                        f"({type(exc).__name__}: {exc})"
                    ) from exc
                finally:
                    f.flush()
                    os.fsync(f.fileno())
        except OSError as exc:  # the local disk: full, read-only, ...
            raise DownloadError(f"cannot write {part} (downloading {url}): {exc}") from exc
        finally:
            bar.close()

    size = part.stat().st_size
    if total is not None and size < total:
        raise _Transient(f"the body ended after {size} of {total} bytes")
    if total is not None and size > total:
        part.unlink(missing_ok=True)
        state.update(hasher=None, hashed=0)
        raise _Transient(
            f"the partial file grew to {size} bytes, more than the {total} bytes "
            f"of the file; starting again from zero"
        )


def _verify_existing(
    url: str,
    dest: Path,
    sha256: str | None,
    validate: Callable[[Path], object] | None,
    started: float,
) -> DownloadResult | None:
    """The result for a ``dest`` that is already in place and verified, else None."""
    recorded = read_sidecar(dest)
    if recorded is not None and (sha256 is None or recorded == sha256):
        log.info(
            "%s is already downloaded (sha256 %s recorded in %s)",
            dest,
            recorded,
            sidecar_path(dest).name,
        )
        return DownloadResult(
            url, dest, dest.stat().st_size, recorded, time.perf_counter() - started, True, 0
        )
    # no (matching) sidecar: verify the file itself
    log.info("%s exists without a matching %s: verifying it", dest, sidecar_path(dest).name)
    hasher, size = _hash_file(dest)
    digest = hasher.hexdigest()
    if sha256 is not None and digest != sha256:
        log.warning(
            "%s has sha256 %s, not the pinned %s: downloading it again", dest, digest, sha256
        )
        return None
    if validate is not None:
        try:
            validate(dest)
        except Exception as exc:  # any failure to read it means: fetch it again
            log.warning("%s is not a valid file (%s): downloading it again", dest, exc)
            return None
    atomic_write_text(f"{digest}  {dest.name}\n", sidecar_path(dest))
    return DownloadResult(url, dest, size, digest, time.perf_counter() - started, True, 0)


def download_file(
    url: str,
    dest: str | Path,
    *,
    sha256: str | None = None,
    retries: int = 5,
    timeout: float = 60,
    backoff: float = 1.0,
    progress: bool = True,
    validate: Callable[[Path], object] | None = None,
    session: requests.Session | None = None,
) -> DownloadResult:
    """Download ``url`` to ``dest`` (see the module docstring for the guarantees).

    Args:
        url: the file's http(s) URL.
        dest: the local path; its directory is created when missing.
        sha256: the expected SHA-256 (hex); None records the checksum without checking it.
        retries: attempts on transient errors (>= 1); an attempt that brought bytes beyond what
            was on disk before does not count against it (a slow, flaky link still completes).
        timeout: seconds to wait for the connection and for each read.
        backoff: the wait after the n-th failed attempt is ``backoff * 2 ** (n - 1)`` seconds
            (at most 60).
        progress: show a progress bar (on a terminal) or log the progress (otherwise).
        validate: called with the complete temporary file before it is renamed; any exception
            rejects the file (e.g. ``check_sst_file`` with the expected grid).
        session: a ``requests.Session`` to use (default: one for this call).

    Returns:
        the :class:`DownloadResult`; ``skipped`` when ``dest`` was already there with a matching
        ``.sha256`` sidecar (or verified by hashing and ``validate`` when it had none).

    Raises:
        HostUnreachableError: no connection could be made in ``retries`` attempts (the message
            says how to place the file by hand).
        DownloadError: an HTTP error other than a transient one (404, 403, ...), a transfer that
            kept failing, a checksum that differs from ``sha256``, or a file ``validate``
            rejects. Nothing is left at ``dest`` then; a ``.part`` file is kept only after
            transient failures (a later call resumes it).
    """
    if retries < 1:
        raise ValueError(f"retries must be >= 1, got {retries}")
    started = time.perf_counter()
    dest = Path(dest)
    sha256 = _normalise_sha(sha256)
    if dest.is_file():
        done = _verify_existing(url, dest, sha256, validate, started)
        if done is not None:
            return done
    dest.parent.mkdir(parents=True, exist_ok=True)
    part = part_path(dest)
    name = dest.name

    own_session = session is None
    if session is None:
        from smnn import __version__

        session = requests.Session()
        session.headers["User-Agent"] = f"smnn/{__version__} python-requests/{requests.__version__}"
    state: dict[str, Any] = {"hasher": None, "hashed": 0}
    failures = 0
    requests_made = 0
    high_water = part.stat().st_size if part.exists() else 0
    if high_water:
        log.info("%s: resuming the partial download %s (%s)", name, part, _human(high_water))
    try:
        while True:
            requests_made += 1
            try:
                _attempt(session, url, part, state, timeout=timeout, progress=progress, name=name)
                break
            except _Transient as exc:
                size = part.stat().st_size if part.exists() else 0
                if size > high_water:
                    high_water, failures = size, 0  # progress: this attempt does not count
                failures += 1
                if failures >= retries:
                    _give_up(url, dest, part, exc, requests_made)
                wait = min(backoff * 2 ** (failures - 1), _MAX_SLEEP)
                log.warning(
                    "%s: attempt %d failed: %s; retrying in %.1f s", name, requests_made, exc, wait
                )
                time.sleep(wait)
            except DownloadError:
                part.unlink(missing_ok=True)  # a permanent error: the part is of no use
                raise
    finally:
        if own_session:
            session.close()

    hasher = state["hasher"]
    if hasher is None or state["hashed"] != part.stat().st_size:
        hasher, _ = _hash_file(part)  # a part completed by an earlier run (416 on resume)
    digest = hasher.hexdigest()
    size = part.stat().st_size
    if sha256 is not None and digest != sha256:
        part.unlink(missing_ok=True)
        raise DownloadError(
            f"the file downloaded from {url} has sha256 {digest}, not the pinned {sha256}: "
            f"deleted it. The file on the server has changed or the transfer was corrupted; "
            f"retry, or update the pinned checksum in sst.download when the new file is wanted."
        )
    if validate is not None:
        try:
            validate(part)
        except Exception as exc:
            part.unlink(missing_ok=True)
            raise DownloadError(
                f"the file downloaded from {url} (for {dest}) is not valid, deleted it: {exc}"
            ) from exc
    sidecar_path(dest).unlink(missing_ok=True)  # never a checksum of another file beside dest
    os.replace(part, dest)
    fsync_dir(dest.parent)
    atomic_write_text(f"{digest}  {dest.name}\n", sidecar_path(dest))
    seconds = time.perf_counter() - started
    log.info("%s: %s in %.1f s, sha256 %s", name, _human(size), seconds, digest)
    return DownloadResult(url, dest, size, digest, seconds, False, requests_made)


def _give_up(url: str, dest: Path, part: Path, exc: _Transient, attempts: int) -> NoReturn:
    """Raise the error for a download whose transient failures exhausted the attempts."""
    hint = _manual_hint(url, dest)
    if exc.connect:
        host = urllib.parse.urlsplit(url).netloc or url
        raise HostUnreachableError(
            f"cannot reach {host} to download {url} ({attempts} attempts; last: {exc}). "
            f"Check the network connection (and a proxy: HTTPS_PROXY). {hint}"
        ) from exc
    kept = (
        f" The partial download {part} is kept; running the command again resumes it."
        if part.exists()
        else ""
    )
    raise DownloadError(
        f"downloading {url} failed {attempts} times (last: {exc}).{kept} {hint}"
    ) from exc


# --------------------------------------------------------------------------- the SST files


@dataclass(frozen=True)
class DownloadTarget:
    """One file to download: which (``"sst"`` or ``"mask"``), from where, to where, and the
    pinned checksum (None: record it only)."""

    kind: str
    url: str
    dest: Path
    sha256: str | None


def sst_download_targets(config: Config) -> dict[str, DownloadTarget]:
    """The two files to download, ``{"sst": ..., "mask": ...}``: URLs and pins from
    ``sst.download``, destinations from ``sst.files`` (a null path =
    ``{paths.data}/raw/sst/<NOAA file name>``, see :func:`smnn.data.sst.layout.sst_raw_paths`)."""
    from smnn.data.sst.layout import sst_raw_paths

    dests = dict(zip(("sst", "mask"), sst_raw_paths(config), strict=True))
    return {
        kind: DownloadTarget(
            kind,
            config.get_str(f"sst.download.{kind}_url"),
            dest,
            config.get_str(f"sst.download.{kind}_sha256", allow_none=True),
        )
        for kind, dest in dests.items()
    }


def download_sst(
    config: Config, *, only: str | None = None, progress: bool = True, backoff: float = 1.0
) -> list[DownloadResult]:
    """Download the NOAA weekly SST file and the land-sea mask with the settings of
    ``sst.download`` (URLs, pinned checksums, retries, timeout), each validated as the real
    NOAA file (180 x 360 grid; the SST with a weekly time axis).

    Args:
        config: the pipeline's :class:`smnn.config.Config`.
        only: ``"sst"`` or ``"mask"`` to download one of the two (default both).
        progress: show or log the progress.
        backoff: the base wait between attempts, seconds.

    Returns:
        one :class:`DownloadResult` per file, in the order sst, mask.
    """
    from smnn.data.sst.layout import check_mask_file, check_sst_file

    if only not in (None, "sst", "mask"):
        raise ValueError(f"only must be 'sst', 'mask' or None, got {only!r}")
    retries = config.get_int("sst.download.retries", min_value=1)
    timeout = config.get_float("sst.download.timeout", positive=True)
    checks: dict[str, Callable[[Path], object]] = {
        "sst": lambda p: check_sst_file(p, grid=NOAA_GRID),
        "mask": lambda p: check_mask_file(p, grid=NOAA_GRID),
    }
    results = []
    for kind, target in sst_download_targets(config).items():
        if only is not None and kind != only:
            continue
        results.append(
            download_file(
                target.url,
                target.dest,
                sha256=target.sha256,
                retries=retries,
                timeout=timeout,
                backoff=backoff,
                progress=progress,
                validate=checks[kind],
            )
        )
    return results
