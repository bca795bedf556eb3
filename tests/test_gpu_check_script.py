"""scripts/gpu_check.sh without a GPU: its section choice (SECTIONS), with PYTHON=false making
every section fail at once, so only which sections ran, and what the summary says, is tested;
the info section's versions, without CuPy and with a stand-in; and its steps section's Python,
run in the host emulation of the GPU tests (emulate_gpu)."""
import json
import os
import re
import subprocess
import sys
import tarfile
import time
import types
from pathlib import Path

import pytest
import yaml

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def run_script(tmp_path: Path, sections: str | None, python: str = "false",
               **more_env: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON=python,
               GPUMLP_CACHE_DIR=str(tmp_path / "cache"), **more_env)
    env.pop("SECTIONS", None)
    if sections is not None:
        env["SECTIONS"] = sections
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True,
                          timeout=60, check=False)


def test_sections_runs_only_the_named_ones(tmp_path):
    result = run_script(tmp_path, "steps train")
    logs = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert logs == ["steps.log", "train-h256.log"]
    summary = result.stdout.split("=== summary ===")[1].split()
    assert summary[:4] == ["steps", "failed", "(1)", "train"]
    assert "tests" not in summary and "bench" not in summary


def test_sections_defaults_to_all_five(tmp_path):
    result = run_script(tmp_path, None)
    summary = result.stdout.split("=== summary ===")[1]
    names = [line.split()[0] for line in summary.splitlines() if "failed" in line]
    assert names == ["info", "tests", "steps", "bench", "train"]
    assert result.returncode == 1


def test_the_exit_status_is_0_only_when_every_section_ended_ok(tmp_path):
    """PYTHON=true: the steps section's Python "succeeds" (prints nothing), so the summary
    shows its log's last line; PYTHON=false: it fails."""
    ok = run_script(tmp_path / "ok", "steps", python="true")
    assert ok.returncode == 0, ok.stdout
    assert ok.stdout.split("=== summary ===")[1].split("\n")[1:3] == [
        "steps  ok", "=== steps (at most 40s) ==="]
    one_failed = run_script(tmp_path / "one", "steps tests", python="true")  # pytest "ran"
    assert "tests  failed: no test passed" in one_failed.stdout              # no test
    assert one_failed.returncode == 1, one_failed.stdout


FAKE_PYTHON = r"""#!/usr/bin/env bash
# A stand-in interpreter: pytest that reports only when interrupted, a train that fails midway
echo "kernel cache: $CUPY_CACHE_DIR"
if [ "$1" = "-" ]; then  # a section's Python: the kernels it finds, and one it "compiles"
  echo "kernels: $(ls "$CUPY_CACHE_DIR" | tr '\n' ' ')"
  [ -n "${FAKE_KERNEL:-}" ] && touch "$CUPY_CACHE_DIR/$FAKE_KERNEL.cubin"
fi
if [ "$1 $2" = "-m pytest" ]; then
  echo "pytest args: $*"
  echo "deadline in $(( ${GPUMLP_TESTS_DEADLINE:-0} - $(date +%s) ))s"
  if [ -n "${FAKE_SESSION_TIMEOUT:-}" ]; then  # conftest's stop between two tests
    echo "!!!!!! Interrupted: GPUMLP_TESTS_DEADLINE passed: stopped between two tests !!!!!!"
    echo "7 passed in 121.20s"
    exit 2
  fi
  trap 'kill $!; echo "FAILED tests/test_gpu_x.py::test_fails"; echo "1 failed, 1 passed"
        exit 2' INT
  echo "tests/test_gpu_x.py::test_passes PASSED"
  sleep 60 & wait  # (a background sleep ignores SIGINT: the trap ends it)
fi
if [ "$1 $2 $3" = "-m gpumlp train" ]; then
  while [ "$1" != "--out" ]; do shift; done
  mkdir -p "$2" && echo '{"epoch": 1}' > "$2/metrics.jsonl"
  [ -n "${FAKE_CRASH:-}" ] && { echo "Traceback (most recent call last):"
                                echo "RuntimeError: cudaErrorIllegalAddress (test)"; exit 1; }
  echo "Error: the run stopped (test)"
  exit 1
fi
"""


def run_short_copy(tmp_path: Path, sections: str, limit: int = 2, **env: str):
    """The script copied into a checkout of its own, each section's limit cut to `limit`
    seconds, run with FAKE_PYTHON."""
    root = tmp_path / "checkout"
    (root / "scripts").mkdir(parents=True, exist_ok=True)
    short = re.sub(r"^(wanted \w+ && section \w+ |  .*?section tests )\d+",
                   rf"\g<1>{limit}", SCRIPT.read_text(), flags=re.M)
    assert set(re.findall(r"section \w+ (\d+) \S+\.log", short)) == {str(limit)}  # all cut
    (root / "scripts" / SCRIPT.name).write_text(short)
    fake = tmp_path / "fake-python"
    fake.write_text(FAKE_PYTHON)
    fake.chmod(0o755)
    inherited = {k: v for k, v in os.environ.items()
                 if k not in ("GPUMLP_DATA_DIR", "CUPY_CACHE_DIR")}
    env = {**inherited, "OUT": str(tmp_path / "out"), "PYTHON": str(fake),
           "SECTIONS": sections, "GPUMLP_CACHE_DIR": str(tmp_path / "cache"), **env}
    return subprocess.run(["bash", str(root / "scripts" / SCRIPT.name)], env=env,
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.mark.parametrize("tests", [None, "tests/test_gpu_run.py::test_one[a b] tests/x.py"])
def test_tests_chooses_what_the_tests_section_gives_pytest(tmp_path, tests):
    """A rerun after a fix on a lent GPU, with minutes left, runs only what failed."""
    python = tmp_path / "python"
    python.write_text('#!/bin/sh\necho "ARGS: $*"\n')
    python.chmod(0o755)
    env = {} if tests is None else {"TESTS": tests}
    run_script(tmp_path, "tests", python=str(python), **env)
    args = (tmp_path / "out" / "pytest-gpu.log").read_text().split("ARGS: ")[-1].splitlines()[0]
    args = args.split()
    assert args[:3] == ["-m", "pytest", "-m"] and "--timeout=45" in args
    given = args[args.index("--timeout=45") + 1:]
    if tests is None:
        assert given == sorted(str(p.relative_to(SCRIPT.parents[1]))
                               for p in SCRIPT.parents[1].glob("tests/test_gpu_*.py"))
    else:
        assert given == ["tests/test_gpu_run.py::test_one[a", "b]", "tests/x.py"]


def test_a_section_at_its_limit_is_interrupted_so_pytest_still_reports(tmp_path):
    result = run_short_copy(tmp_path, "tests")
    log = (tmp_path / "out" / "pytest-gpu.log").read_text()
    assert "test_passes PASSED" in log                     # -v: each result as it ends
    assert "FAILED tests/test_gpu_x.py::test_fails" in log  # SIGINT, not SIGTERM: it reported
    assert "tests  TIMED OUT" in result.stdout and result.stdout.rstrip().endswith(
        "1 failed, 1 passed")
    assert result.returncode == 1


def test_the_train_section_without_mnist_fails_at_once_and_logs_a_failed_runs_files(tmp_path):
    result = run_short_copy(tmp_path, "train", limit=30)
    log = (tmp_path / "out" / "train-h256.log").read_text()
    assert "no MNIST: set GPUMLP_DATA_DIR or copy the four files into shared/data/mnist" in log
    assert "train  failed (1)" in result.stdout and "kernel cache" not in log  # not started
    mnist = tmp_path / "mnist"
    mnist.mkdir()
    result = run_short_copy(tmp_path, "train", limit=30, GPUMLP_DATA_DIR=str(mnist))
    log = (tmp_path / "out" / "train-h256.log").read_text()
    assert log.split("Error: the run stopped (test)\n")[1].startswith(
        '--- metrics.jsonl\n{"epoch": 1}\n--- summary.json\n(none)\n(train took ')
    assert "train  failed (1)" in result.stdout
    assert result.stdout.rstrip().endswith("Error: the run stopped (test)")
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["train-h256.log"]
    crashed = run_short_copy(tmp_path, "train", limit=30, GPUMLP_DATA_DIR=str(mnist),
                             FAKE_CRASH="1")                    # the summary: its last word
    assert crashed.stdout.rstrip().endswith("RuntimeError: cudaErrorIllegalAddress (test)")


def test_the_tests_stop_between_two_tests_at_120_s_and_say_so(tmp_path):
    """pytest is given a deadline 120 s on (conftest stops it between two tests), before the
    section's SIGINT, which a test's `gpumlp` command would take as its own Ctrl-C (a
    failure, exit 130, and pytest going on)."""
    result = run_short_copy(tmp_path, "tests", limit=30, FAKE_SESSION_TIMEOUT="1")
    log = (tmp_path / "out" / "pytest-gpu.log").read_text()
    assert "--timeout=45" in log and re.search(r"deadline in 1(19|20)s", log), log
    summary = result.stdout.split("=== summary ===")[1].strip().splitlines()
    assert summary == ["tests  TIMED OUT (stopped between tests after 120s)", "7 passed in 121.20s"]
    assert result.returncode == 1


def test_a_rerun_elsewhere_starts_from_the_kernels_the_first_run_compiled(tmp_path):
    """The first run's new kernels go to $OUT/cupy-kernels.tar, and each section's log says how
    many it compiled; a rerun given that file (CUPY_CACHE_TAR) in an empty kernel cache finds
    them there before its first section, compiles none and writes no tar."""
    first = tmp_path / "first"
    (tmp_path / "k1").mkdir()  # (CuPy makes it)
    run_short_copy(first, "steps", limit=30, CUPY_CACHE_DIR=str(tmp_path / "k1"),
                   FAKE_KERNEL="abc123")
    log = (first / "out" / "steps.log").read_text()
    assert re.search(r"^\(steps took \d+s; CuPy compiled 1 kernels in it\)$", log, re.M), log
    tar = first / "out" / "cupy-kernels.tar"
    assert tarfile.open(tar).getnames() == [".", "./abc123.cubin"]
    again = tmp_path / "again"
    (tmp_path / "k2").mkdir()
    result = run_short_copy(again, "steps", limit=30, CUPY_CACHE_DIR=str(tmp_path / "k2"),
                            CUPY_CACHE_TAR=str(tar))
    log = (again / "out" / "steps.log").read_text()
    assert "kernels: abc123.cubin" in log and "CuPy compiled 0 kernels" in log
    assert f"kernel cache: 1 kernels in {tmp_path / 'k2'} after {tar} (tar exited 0)" in \
        result.stdout
    garbage = tmp_path / "garbage.tar"                          # cut short, or not a tar
    garbage.write_text("not a tar archive at all")
    (tmp_path / "k4").mkdir()
    broken = run_short_copy(tmp_path / "broken", "steps", limit=30,
                            CUPY_CACHE_DIR=str(tmp_path / "k4"), CUPY_CACHE_TAR=str(garbage))
    assert re.search(r"kernel cache: 0 kernels in .* \(tar exited [12]\)", broken.stdout), \
        broken.stdout
    assert sorted(p.name for p in (again / "out").iterdir()) == ["steps.log"]
    missing = run_short_copy(tmp_path / "missing", "steps", limit=30,
                             CUPY_CACHE_DIR=str(tmp_path / "k3"),
                             CUPY_CACHE_TAR=str(tmp_path / "no-such.tar"))
    assert missing.stderr.strip() == (f"gpu_check.sh: cannot read CUPY_CACHE_TAR "
                                      f"'{tmp_path / 'no-such.tar'}'; every kernel is compiled")
    assert "steps  ok" in missing.stdout


def test_cupys_kernel_cache_is_the_same_folder_for_every_run(tmp_path):
    caches = set()
    for attempt in range(2):
        run_short_copy(tmp_path / str(attempt), "steps", limit=30)
        log = (tmp_path / str(attempt) / "out" / "steps.log").read_text()
        caches.add(log.split("kernel cache: ")[1].split("\n")[0])
    cache = caches.pop()
    assert not caches and cache.endswith(f"/gpumlp-cupy-kernels-{os.getuid()}")
    assert os.stat(cache).st_mode & 0o777 == 0o700                    # the user's alone


def test_a_kernel_cache_folder_that_is_not_the_users_alone_is_not_used(tmp_path):
    """Another user's folder at the shared name (CuPy could not write there, and would load
    kernels planted there): a fresh folder instead."""
    shared = tmp_path / "tmp"
    (shared / f"gpumlp-cupy-kernels-{os.getuid()}").mkdir(parents=True)
    os.symlink(tmp_path, shared / "elsewhere")
    (shared / f"gpumlp-cupy-kernels-{os.getuid()}").rmdir()
    os.symlink(shared / "elsewhere", shared / f"gpumlp-cupy-kernels-{os.getuid()}")
    run_short_copy(tmp_path, "steps", limit=30, TMPDIR=str(shared))
    log = (tmp_path / "out" / "steps.log").read_text()
    used = log.split("kernel cache: ")[1].split("\n")[0]
    assert "gpumlp-cupy-kernels" not in used and Path(used).is_dir()


def test_unknown_section_is_one_line_and_writes_nothing(tmp_path):
    result = run_script(tmp_path, "tests bogus")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [(
        "gpu_check.sh: no section 'bogus' in SECTIONS; the sections are: info tests steps bench "
        "train sanitize")]
    assert not (tmp_path / "out").exists()


def test_sanitize_runs_only_when_named_and_says_when_the_sanitizer_is_missing(tmp_path):
    result = run_script(tmp_path, "sanitize", SANITIZER=str(tmp_path / "no-such-sanitizer"))
    assert result.returncode == 1
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["sanitize.log"]
    summary = result.stdout.split("=== summary ===")[1].strip().splitlines()
    assert summary == ["sanitize failed (1)", "compute-sanitizer not found at "
                       f"'{tmp_path / 'no-such-sanitizer'}'; set SANITIZER to its path"]
    by_default = run_script(tmp_path / "default", None)
    assert "sanitize" not in by_default.stdout.split("=== summary ===")[1]


def section_python(name: str) -> str:
    """The Python a section of the script feeds to "$PY" - <<'EOF' ... EOF."""
    lines = SCRIPT.read_text().splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"{name}() {{"))
    begin = next(i for i in range(start, len(lines)) if "<<'EOF'" in lines[i]) + 1
    end = lines.index("EOF", begin)
    return "\n".join(lines[begin:end])


@pytest.mark.gpu
def test_the_steps_sections_python_runs_and_prints_its_timings(gpu, monkeypatch, capsys):
    """A dry run of the steps section's own code (in the host emulation: its numbers mean
    nothing), so that a slip in it is found before device time is spent on it."""
    if "emulation" not in gpu.description:
        pytest.skip("on a GPU, the script's steps section runs this itself")
    monkeypatch.chdir(SCRIPT.parents[1])                    # it reads configs/h256.yaml
    exec(compile(section_python("steps"), f"{SCRIPT.name}:steps", "exec"), {"__name__": "steps"})
    out = capsys.readouterr().out
    for name in ("generic", "fused"):
        assert re.search(rf"^{name} +h256 batch 128: [0-9.]+ ms/step .* host issue [0-9.]+ "
                         "ms/step$", out, re.M), out
    assert re.search(r"^graph +(h256 batch 128: [0-9.]+ ms/step|probe failed: )", out, re.M)


STUB_CUPY = '__version__ = "0.0-stub"\n'


@pytest.mark.parametrize("cupy", ["absent", "stub"])
def test_the_info_sections_versions_print_each_and_name_what_is_missing(tmp_path, cupy):
    """The versions (python, numpy, cupy, click, pytest, torch) each on a line: one that cannot
    be read says so there, the others still print, and the block fails naming what is missing,
    with no traceback. Here without CuPy (CI has none), then with a stand-in CuPy."""
    env = dict(os.environ, PYTHONPATH=str(tmp_path))
    if cupy == "stub":
        (tmp_path / "cupy.py").write_text(STUB_CUPY)
    else:
        (tmp_path / "cupy.py").write_text("raise ImportError('no CuPy here (test)')")
    result = subprocess.run([sys.executable, "-"], input=section_python("info"), env=env,
                            capture_output=True, text=True, timeout=60, check=False)
    assert "Traceback" not in result.stderr, result.stderr
    names = [line.split()[0] for line in result.stdout.splitlines()]
    assert names == ["python", "numpy", "cupy", "click", "pytest", "torch"], result.stdout
    lines = dict(line.split(None, 1) for line in result.stdout.splitlines())
    assert lines["pytest"] == pytest.__version__
    if cupy == "stub":
        assert lines["cupy"] == "0.0-stub"
        assert result.returncode == 0, result.stderr
    else:
        assert lines["cupy"] == "MISSING (ImportError: no CuPy here (test))"
        assert result.returncode == 1
        assert result.stderr.strip() == "missing: cupy"


@pytest.mark.gpu
def test_the_sanitize_sections_python_trains_through_every_fused_kernel(gpu, monkeypatch,
                                                                        tmp_path):
    """A dry run of the sanitize section's code (the run compute-sanitizer watches), in the host
    emulation: the fused step takes every step of it, with its loader and tally, and the run
    has the two hidden layers, dropout, Adam and the shorter last batch it is meant to."""
    if "emulation" not in gpu.description:
        pytest.skip("on a GPU, the script's sanitize section runs this itself")
    from gpumlp import fast_cuda

    calls: dict = {}
    for name in ("__call__", "batch", "tally"):
        method = getattr(fast_cuda.FusedStep, name)

        def counted(self, *args, _name=name, _method=method, **kwargs):
            calls[_name] = calls.get(_name, 0) + 1
            return _method(self, *args, **kwargs)
        monkeypatch.setattr(fast_cuda.FusedStep, name, counted)
    allocators: list = []
    cuda = types.SimpleNamespace(set_allocator=allocators.append)
    monkeypatch.setitem(sys.modules, "cupy", types.SimpleNamespace(cuda=cuda))
    monkeypatch.chdir(SCRIPT.parents[1])                    # it reads configs/smoke.yaml
    monkeypatch.setattr(sys, "argv", ["-", str(tmp_path / "small")])
    with pytest.raises(SystemExit) as done:
        exec(compile(section_python("sanitize"), f"{SCRIPT.name}:sanitize", "exec"),
             {"__name__": "__main__"})
    assert done.value.code in (0, None)
    assert allocators == [None]                               # CuPy's pool off
    assert calls == {"__call__": 16, "batch": 16, "tally": 16}  # 15 batches of 100, one of 50
    saved = yaml.safe_load((tmp_path / "small" / "config.yaml").read_text())
    assert saved["model"]["hidden"] == [64, 32] and saved["model"]["dropout"] == 0.2
    assert (saved["optim"]["name"], saved["model"]["activation"]) == ("adam", "gelu")
    assert json.loads((tmp_path / "small" / "summary.json").read_text())["steps"] == 16


TWO_TESTS = """
import time

def test_first():
    time.sleep(0.2)

def test_second():
    pass
"""


@pytest.mark.parametrize("deadline, ran, stopped", [(-100, 1, True), (100, 2, False)])
def test_conftest_starts_no_test_past_the_deadline_and_never_stops_after_the_last(
        tmp_path, deadline, ran, stopped):
    """GPUMLP_TESTS_DEADLINE in the past: the first test runs, the second never starts, and
    the summary says why; in the future: both run. A run whose last test ends past the
    deadline is complete, not stopped (pytest-timeout's session timeout called it failed)."""
    (tmp_path / "test_two.py").write_text(TWO_TESTS)
    env = {**os.environ, "PYTHONPATH": str(SCRIPT.parents[1] / "tests"),
           "GPUMLP_TESTS_DEADLINE": str(time.time() + deadline)}
    result = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-q",
                             "-p", "no:cacheprovider", "-c", os.devnull, str(tmp_path)],
                            env=env, capture_output=True, text=True, timeout=120)
    assert f"{ran} passed" in result.stdout, result.stdout
    assert ("GPUMLP_TESTS_DEADLINE passed: stopped between two tests" in result.stdout) is stopped
    one = tmp_path / "one"
    one.mkdir()
    (one / "test_one.py").write_text("def test_only():\n    pass\n")
    env["GPUMLP_TESTS_DEADLINE"] = str(time.time() - 100)
    alone = subprocess.run([sys.executable, "-m", "pytest", "-p", "conftest", "-q",
                            "-p", "no:cacheprovider", "-c", os.devnull, str(one)],
                           env=env, capture_output=True, text=True, timeout=120)
    assert alone.returncode == 0 and "Interrupted" not in alone.stdout, alone.stdout
