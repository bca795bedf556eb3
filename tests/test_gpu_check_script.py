"""scripts/gpu_check.sh's section choice (SECTIONS), checked without a GPU: PYTHON=false makes
every section fail at once, so only which sections ran, and what the summary says, is tested."""
import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"


def run_script(tmp_path: Path, sections: str | None) -> subprocess.CompletedProcess:
    env = dict(os.environ, OUT=str(tmp_path / "out"), PYTHON="false",
               GPUMLP_CACHE_DIR=str(tmp_path / "cache"))
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


def test_unknown_section_is_one_line_and_writes_nothing(tmp_path):
    result = run_script(tmp_path, "tests bogus")
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [(
        "gpu_check.sh: no section 'bogus' in SECTIONS; the sections are: info tests steps bench "
        "train")]
    assert not (tmp_path / "out").exists()
