"""benchmarks/slide.py --install-tiatoolbox from a project installed in a venv, as users install
it: the throwaway venv for TIAToolbox must see that venv's packages, not only the base's."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def _python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if sys.platform == "win32" else "bin/python")


def _site_packages(python: Path) -> Path:
    return Path(subprocess.run([str(python), "-c", "import sysconfig; "
                                "print(sysconfig.get_path('purelib'))"],
                               check=True, capture_output=True, text=True).stdout.strip())


def _imports(python: Path, modules: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(python), "-c", f"import {modules}"], capture_output=True,
                          text=True)


@pytest.mark.slow
def test_the_tiatoolbox_venv_sees_the_packages_of_the_venv_the_project_lives_in(tmp_path):
    # The user's venv: sees the base interpreter's packages (torch here), and holds two of its
    # own: one installed into it, one installed editable (a .pth file naming a source folder).
    user = tmp_path / "user-venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip",
                    str(user)], check=True)
    site_packages = _site_packages(_python(user))
    (site_packages / "only_in_user_venv").mkdir()
    (site_packages / "only_in_user_venv" / "__init__.py").write_text("")
    source = tmp_path / "clone" / "src"
    source.mkdir(parents=True)
    (source / "editable_in_user_venv.py").write_text("")
    (site_packages / "__editable__.editable_in_user_venv.pth").write_text(f"{source}\n")
    mine = "only_in_user_venv, editable_in_user_venv"
    assert _imports(_python(user), mine).returncode == 0

    # What the benchmark did before: --system-site-packages from inside the user's venv gives
    # the base interpreter's packages only.
    before = tmp_path / "system-site"
    subprocess.run([str(_python(user)), "-m", "venv", "--system-site-packages", "--without-pip",
                    str(before)], check=True)
    assert "No module named 'only_in_user_venv'" in _imports(_python(before), mine).stderr

    made = tmp_path / "tiavenv"
    run = subprocess.run(
        [str(_python(user)), "-c", "import sys; from pathlib import Path; "
         f"sys.path.insert(0, {str(BENCHMARKS)!r}); import slide; "
         f"print(slide.throwaway_venv(Path({str(made)!r}), pip=False))"],
        capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    python = Path(run.stdout.strip().splitlines()[-1])
    assert python == _python(made)
    result = _imports(python, f"{mine}, torch")
    assert result.returncode == 0, result.stderr[-2000:]
    # Its own packages come first: what pip installs there shadows the user's copies.
    order = subprocess.run([str(python), "-c", "import sys, sysconfig; "
                            "p = [x.rstrip('/') for x in sys.path]; "
                            "print(p.index(sysconfig.get_path('purelib').rstrip('/')) < "
                            f"p.index({str(site_packages)!r}))"],
                           capture_output=True, text=True)
    assert order.stdout.strip() == "True", order.stderr
