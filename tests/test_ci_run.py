"""``.ci/run``: the README's test command decides CI's verdict; a run that collects no tests is a failure."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

CI_RUN = Path(__file__).resolve().parents[1] / ".ci" / "run"


def _ci(tmp_path: Path, test_command: str, test_file: str | None = None) -> subprocess.CompletedProcess:
    """Run a copy of .ci/run in ``tmp_path`` with pip and the browser install stubbed out."""
    (tmp_path / ".ci").mkdir(parents=True)
    shutil.copy(CI_RUN, tmp_path / ".ci" / "run")
    (tmp_path / "README.rst").write_text(f"Tests\n\n.. code-block:: bash\n\n    {test_command}\n")
    (tmp_path / "t").mkdir()
    if test_file:
        (tmp_path / "t" / "test_x.py").write_text(test_file)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stubs = {"python": f'#!/bin/sh\n[ "$1 $2" = "-m pip" ] && exit 0\nexec {sys.executable} "$@"\n',
             "chromium": "#!/bin/sh\nexit 0\n", "chromedriver": "#!/bin/sh\nexit 0\n"}
    for name, text in stubs.items():
        (bin_dir / name).write_text(text)
        (bin_dir / name).chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}", "VLMTTA_ARTIFACTS": str(tmp_path / "a")}
    return subprocess.run(["bash", str(tmp_path / ".ci" / "run")], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=300)


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_no_tests_collected_fails(tmp_path):
    run = _ci(tmp_path, "python -m pytest -q -p no:cacheprovider t")
    assert run.returncode == 5 and "collected no tests" in run.stderr


@pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")
def test_passing_and_failing_tests_decide(tmp_path):
    passing = _ci(tmp_path / "ok", "python -m pytest -q -p no:cacheprovider t", "def test_ok():\n    assert True\n")
    failing = _ci(tmp_path / "bad", "python -m pytest -q -p no:cacheprovider t", "def test_bad():\n    assert False\n")
    assert passing.returncode == 0 and failing.returncode == 1
