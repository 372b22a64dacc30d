"""``smnn download-sst`` and :mod:`smnn.data.sst.download` against a real HTTP server on
127.0.0.1 (tests/http_server.py): retries, resume with Range, checksums, validation, clean
errors, and nothing left behind that looks like a valid file."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import pytest
import yaml
from http_server import FileServer, free_port
from pipeline_support import merge, run_smnn, smnn_env, write_config

from smnn.config import Config
from smnn.data.sst.download import (
    CHUNK_BYTES,
    DownloadError,
    HostUnreachableError,
    download_file,
    download_sst,
    part_path,
    read_sidecar,
    sidecar_path,
)
from smnn.data.sst.layout import MASK_FILE, SST_FILE, check_mask_file, check_sst_file
from smnn.data.sst.synthetic import write_synthetic_mask, write_synthetic_sst

FAST = {"retries": 5, "timeout": 5, "backoff": 0.01, "progress": False}
SMALL_GRID = (18, 36)
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The served directory: a small SST and mask file in NOAA layout, and raw bytes."""
    root = tmp_path_factory.mktemp("served")
    write_synthetic_sst(
        root / SST_FILE,
        n_weeks=20,
        n_lat=SMALL_GRID[0],
        n_lon=SMALL_GRID[1],
        seed=0,
        encoding="netcdf4",
    )
    write_synthetic_mask(root / MASK_FILE, n_lat=SMALL_GRID[0], n_lon=SMALL_GRID[1])
    (root / "blob.bin").write_bytes(os.urandom(300_000))
    (root / "garbage.nc").write_bytes(b"CDF\x01" + os.urandom(5000))
    return root


@pytest.fixture
def server(files):
    with FileServer(files) as srv:
        yield srv


def check_small_sst(path):
    return check_sst_file(path, grid=SMALL_GRID)


def nothing_left(dest):
    """No file at dest, no partial file, no checksum sidecar."""
    return not dest.exists() and not part_path(dest).exists() and not sidecar_path(dest).exists()


def test_download_validates_and_records_checksum(server, files, tmp_path):
    dest = tmp_path / "raw" / SST_FILE
    result = download_file(server.url(SST_FILE), dest, validate=check_small_sst, **FAST)
    source = (files / SST_FILE).read_bytes()
    digest = hashlib.sha256(source).hexdigest()
    assert dest.read_bytes() == source
    assert result.sha256 == digest and result.size == len(source)
    assert not result.skipped and result.attempts == 1
    assert sidecar_path(dest).read_text() == f"{digest}  {SST_FILE}\n"
    assert read_sidecar(dest) == digest
    assert not part_path(dest).exists()
    assert str(dest) in result.summary() and digest in result.summary()


def test_pinned_checksum_accepted(server, files, tmp_path):
    digest = hashlib.sha256((files / MASK_FILE).read_bytes()).hexdigest()
    dest = tmp_path / MASK_FILE
    result = download_file(
        server.url(MASK_FILE),
        dest,
        sha256=digest.upper(),
        validate=lambda p: check_mask_file(p, grid=SMALL_GRID),
        **FAST,
    )
    assert result.sha256 == digest and read_sidecar(dest) == digest


def test_retries_after_server_errors(server, files, tmp_path):
    server.behave("blob.bin", fail_times=2, fail_status=503)
    dest = tmp_path / "blob.bin"
    result = download_file(server.url("blob.bin"), dest, **FAST)
    assert len(server.requests_for("blob.bin")) == 3 and result.attempts == 3
    assert dest.read_bytes() == (files / "blob.bin").read_bytes()


def test_dropped_connection_resumes_with_range(server, files, tmp_path):
    k = 2 * CHUNK_BYTES  # whole chunks: the bytes of an unfinished chunk would be fetched again
    server.behave("blob.bin", drop_after=k)
    dest = tmp_path / "blob.bin"
    download_file(server.url("blob.bin"), dest, **FAST)
    first, second = server.requests_for("blob.bin")
    assert "range" not in first.headers
    assert second.headers["range"] == f"bytes={k}-"
    assert dest.read_bytes() == (files / "blob.bin").read_bytes()
    assert read_sidecar(dest) == hashlib.sha256(dest.read_bytes()).hexdigest()


def test_server_ignoring_range_restarts_from_zero(server, files, tmp_path):
    k = CHUNK_BYTES
    server.behave("blob.bin", drop_after=k + 100, ignore_range=True)
    dest = tmp_path / "blob.bin"
    download_file(server.url("blob.bin"), dest, **FAST)
    reqs = server.requests_for("blob.bin")
    assert len(reqs) == 2 and reqs[1].headers["range"] == f"bytes={k}-"
    assert dest.read_bytes() == (files / "blob.bin").read_bytes()
    assert read_sidecar(dest) == hashlib.sha256(dest.read_bytes()).hexdigest()


def test_partial_file_of_an_earlier_run_is_resumed(server, files, tmp_path):
    source = (files / SST_FILE).read_bytes()
    dest = tmp_path / SST_FILE
    part_path(dest).write_bytes(source[:1000])
    download_file(server.url(SST_FILE), dest, validate=check_small_sst, **FAST)
    (req,) = server.requests_for(SST_FILE)
    assert req.headers["range"] == "bytes=1000-"
    assert dest.read_bytes() == source
    assert read_sidecar(dest) == hashlib.sha256(source).hexdigest()


def test_complete_part_answered_416_is_finished(server, files, tmp_path):
    source = (files / SST_FILE).read_bytes()
    dest = tmp_path / SST_FILE
    part_path(dest).write_bytes(source)
    download_file(server.url(SST_FILE), dest, validate=check_small_sst, **FAST)
    assert len(server.requests_for(SST_FILE)) == 1
    assert dest.read_bytes() == source and not part_path(dest).exists()


def test_not_found_fails_at_once(server, tmp_path):
    server.behave("missing.nc", status=404)
    dest = tmp_path / "missing.nc"
    url = server.url("missing.nc")
    with pytest.raises(DownloadError, match="404") as info:
        download_file(url, dest, **FAST)
    assert url in str(info.value)
    assert len(server.requests_for("missing.nc")) == 1  # no retries
    assert nothing_left(dest)


def test_forbidden_on_resume_removes_the_part(server, tmp_path):
    server.behave("blob.bin", status=403)
    dest = tmp_path / "blob.bin"
    part_path(dest).write_bytes(b"x" * 10)
    with pytest.raises(DownloadError, match="403"):
        download_file(server.url("blob.bin"), dest, **FAST)
    assert nothing_left(dest)


def test_refused_connection_says_how_to_place_the_file(tmp_path):
    url = f"http://127.0.0.1:{free_port()}/{SST_FILE}"
    dest = tmp_path / SST_FILE
    with pytest.raises(HostUnreachableError) as info:
        download_file(url, dest, retries=2, timeout=2, backoff=0.01, progress=False)
    text = str(info.value)
    assert "cannot reach 127.0.0.1" in text and "by hand" in text
    assert url in text and str(dest) in text and "sst.source: file" in text
    assert nothing_left(dest)


def test_truncated_file_is_rejected(server, files, tmp_path):
    server.behave(SST_FILE, truncate_to=(files / SST_FILE).stat().st_size // 2)
    dest = tmp_path / SST_FILE
    with pytest.raises(DownloadError, match="not valid") as info:
        download_file(server.url(SST_FILE), dest, validate=check_small_sst, **FAST)
    assert str(dest) in str(info.value)
    assert nothing_left(dest)


def test_corrupt_file_is_rejected(server, tmp_path):
    dest = tmp_path / SST_FILE
    with pytest.raises(DownloadError, match="not valid"):
        download_file(server.url("garbage.nc"), dest, validate=check_small_sst, **FAST)
    assert nothing_left(dest)


def test_body_always_cut_short_gives_up_keeping_only_the_part(server, tmp_path):
    server.behave("blob.bin", drop_after=1000, drop_times=100, ignore_range=True)
    dest = tmp_path / "blob.bin"
    with pytest.raises(DownloadError, match="failed 3 times") as info:
        download_file(
            server.url("blob.bin"), dest, retries=3, timeout=5, backoff=0.01, progress=False
        )
    assert "resumes it" in str(info.value)
    assert not dest.exists() and not sidecar_path(dest).exists()
    assert len(server.requests_for("blob.bin")) == 3


def test_wrong_pinned_checksum_is_rejected(server, files, tmp_path):
    dest = tmp_path / "blob.bin"
    wrong = "0" * 64
    actual = hashlib.sha256((files / "blob.bin").read_bytes()).hexdigest()
    with pytest.raises(DownloadError) as info:
        download_file(server.url("blob.bin"), dest, sha256=wrong, **FAST)
    text = str(info.value)
    assert server.url("blob.bin") in text and wrong in text and actual in text
    assert nothing_left(dest)


def test_malformed_pin_is_refused_before_any_request(server, tmp_path):
    with pytest.raises(DownloadError, match="64 hexadecimal"):
        download_file(server.url("blob.bin"), tmp_path / "b", sha256="abc", **FAST)
    assert server.requests == []


def test_already_downloaded_is_skipped_without_a_request(server, tmp_path):
    dest = tmp_path / SST_FILE
    first = download_file(server.url(SST_FILE), dest, validate=check_small_sst, **FAST)
    again = download_file(server.url(SST_FILE), dest, validate=check_small_sst, **FAST)
    assert len(server.requests_for(SST_FILE)) == 1
    assert again.skipped and again.attempts == 0 and again.sha256 == first.sha256


def test_existing_file_without_sidecar_is_verified(server, files, tmp_path):
    dest = tmp_path / SST_FILE
    dest.write_bytes((files / SST_FILE).read_bytes())
    result = download_file(server.url(SST_FILE), dest, validate=check_small_sst, **FAST)
    assert result.skipped and server.requests == []
    assert read_sidecar(dest) == hashlib.sha256(dest.read_bytes()).hexdigest()


def test_existing_invalid_file_is_downloaded_again(server, files, tmp_path):
    dest = tmp_path / SST_FILE
    dest.write_bytes(b"not a netcdf file")
    result = download_file(server.url(SST_FILE), dest, validate=check_small_sst, **FAST)
    assert not result.skipped and dest.read_bytes() == (files / SST_FILE).read_bytes()


def test_progress_is_logged_in_steps(server, tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="smnn.data.sst.download")
    download_file(
        server.url("blob.bin"), tmp_path / "blob.bin", retries=2, timeout=5, progress=True
    )
    steps = [r.getMessage() for r in caplog.records if "%" in r.getMessage()]
    assert 5 <= len(steps) <= 11 and steps[-1].startswith("blob.bin: 100 %")


# --------------------------------------------------------------------------- download_sst, CLI


def sst_section(server, data_dir, **download):
    return {
        "enabled": True,
        "source": "noaa",
        "files": {"sst": None, "mask": None},
        "download": {
            "sst_url": server.url(SST_FILE),
            "mask_url": server.url(MASK_FILE),
            "sst_sha256": None,
            "mask_sha256": None,
            "retries": 2,
            "timeout": 5,
            **download,
        },
    }


@pytest.fixture(scope="module")
def noaa_grid_files(tmp_path_factory):
    """A few weeks on the real 180 x 360 grid (download_sst checks the NOAA grid)."""
    root = tmp_path_factory.mktemp("noaa")
    write_synthetic_sst(
        root / SST_FILE, n_weeks=3, n_lat=180, n_lon=360, seed=1, encoding="netcdf4"
    )
    write_synthetic_mask(root / MASK_FILE, n_lat=180, n_lon=360)
    return root


def test_download_sst_checks_the_noaa_grid(server, tmp_path):
    config = Config(
        {"paths": {"data": str(tmp_path / "data")}, "sst": sst_section(server, tmp_path)}
    )
    with pytest.raises(DownloadError, match="not valid") as info:
        download_sst(config, only="sst", progress=False, backoff=0.01)
    dest = tmp_path / "data" / "raw" / "sst" / SST_FILE
    assert str(dest) in str(info.value) and nothing_left(dest)


def test_download_sst_to_configured_paths(noaa_grid_files, tmp_path):
    with FileServer(noaa_grid_files) as srv:
        section = sst_section(srv, tmp_path)
        section["files"] = {"sst": str(tmp_path / "a" / "w.nc"), "mask": None}
        config = Config({"paths": {"data": str(tmp_path / "data")}, "sst": section})
        results = download_sst(config, progress=False, backoff=0.01)
    assert [r.path for r in results] == [
        tmp_path / "a" / "w.nc",
        tmp_path / "data" / "raw" / "sst" / MASK_FILE,
    ]
    assert all(read_sidecar(r.path) == r.sha256 for r in results)


def cli_config(server, tmp_path):
    """A complete config file (the command validates the whole file): the test config, the
    ``sst`` section of config/config.yaml, the URLs of the local server."""
    base = yaml.safe_load((REPO / "config" / "config.yaml").read_text())
    section = merge(base.get("sst", {}), sst_section(server, tmp_path))
    return write_config(tmp_path, {"sst": section})


def test_cli_downloads_both_files(noaa_grid_files, tmp_path):
    with FileServer(noaa_grid_files) as srv:
        config = cli_config(srv, tmp_path)
        done = run_smnn("download-sst", "--config", config, env=smnn_env(), timeout=120)
        assert done.returncode == 0, done.stderr
        raw = tmp_path / "data" / "raw" / "sst"
        for name in (SST_FILE, MASK_FILE):
            assert str(raw / name) in done.stdout
            assert read_sidecar(raw / name) in done.stdout
        again = run_smnn("download-sst", "--config", config, "--only", "mask", timeout=120)
        assert again.returncode == 0 and "already downloaded" in again.stdout
        assert SST_FILE not in again.stdout


def test_cli_reports_errors_cleanly(server, tmp_path):
    server.behave(SST_FILE, status=404)
    config = cli_config(server, tmp_path)
    done = run_smnn("download-sst", "--config", config, "--only", "sst", timeout=120)
    assert done.returncode == 2
    assert done.stderr.startswith("error: ") or "\nerror: " in done.stderr
    assert "404" in done.stderr and "Traceback" not in done.stderr
