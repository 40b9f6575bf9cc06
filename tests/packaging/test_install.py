"""Installed without the repository: ``python -m build`` makes an sdist and a wheel
that hold everything wstunnel needs at run time, and the wheel, installed in a
fresh venv, runs ``wstunnel demo`` and prints the shipped systemd unit.

Built from a copy of the source tree (no build/, egg-info or in-place C module of
the shared checkout leaks in) with ``--no-isolation``: the build backend comes
from this venv (the ``test`` extra), not from the network. The fresh venv gets
the wheel with ``--no-deps``; its dependencies (trio, cryptography, ...) are made
importable by a .pth line naming this venv's site-packages. A .pth file in a
directory added that way is not run, so this venv's editable wstunnel stays out,
and a test checks that ``import wstunnel`` finds the new venv's copy.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
import tarfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "build", "dist", "*.egg-info", "__pycache__",
                                    "*.so", ".*_cache", ".hypothesis", "reports", "*.whl")


def _missing_build_tools() -> str | None:
    if importlib.util.find_spec("build") is None:
        return "the `build` package is not installed: pip install -e '.[test]'"
    setuptools = importlib.metadata.version("setuptools")
    if int(setuptools.split(".")[0]) < 77:
        return f"setuptools {setuptools} is too old to build wstunnel: pip install -e '.[test]'"
    return None


def _environment() -> dict[str, str]:
    """Ours, without what would point the child at the checkout or at this venv."""
    env = {key: value for key, value in os.environ.items()
           if key not in ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP")}
    return env | {"PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1"}


def _run(argv: list[str | Path], cwd: Path, timeout: float) -> str:
    result = subprocess.run([str(a) for a in argv], cwd=cwd, env=_environment(),
                            capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{argv} exited {result.returncode}:\n{result.stderr}"
    return result.stdout


@dataclass(frozen=True)
class Built:
    source: Path  # the copy built from; the shared checkout may change meanwhile
    sdist: Path
    wheel: Path

    def shipped(self) -> list[str]:
        return sorted(p.relative_to(self.source).as_posix()
                      for folder in ("systemd", "configs")
                      for p in (self.source / folder).iterdir())

    def package_files(self) -> list[str]:
        """Every file of the package the wheel needs: modules, and data such as
        stubs and anything a module reads at run time (not the C source)."""
        return sorted(p.relative_to(self.source).as_posix()
                      for p in (self.source / "wstunnel").rglob("*")
                      if p.is_file() and "__pycache__" not in p.parts
                      and p.suffix not in (".so", ".c", ".pyc"))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    missing = _missing_build_tools()
    if missing:
        pytest.skip(missing)
    work = tmp_path_factory.mktemp("build")
    shutil.copytree(ROOT, work / "src", ignore=NOT_COPIED)
    _run([sys.executable, "-m", "build", "--no-isolation", "--outdir", work / "dist",
          work / "src"], cwd=work, timeout=120)
    (sdist,) = (work / "dist").glob("wstunnel-*.tar.gz")
    (wheel,) = (work / "dist").glob("wstunnel-*.whl")
    return Built(work / "src", sdist, wheel)


def _c_compiler() -> str | None:
    compiler = (sysconfig.get_config_var("CC") or "cc").split()[0]
    return shutil.which(compiler)


def test_the_sdist_holds_the_sources_units_and_configs(built: Built) -> None:
    """Everything the wheel is built from: package, C source and stub, units, configs."""
    with tarfile.open(built.sdist) as sdist:
        names = {name.split("/", 1)[1] for name in sdist.getnames() if "/" in name}
    wanted = {"setup.py", "pyproject.toml", "README.md", "wstunnel/ws/_speedups.c",
              *built.package_files(), *built.shipped()}
    assert sorted(wanted - names) == []
    assert [n for n in names if n.endswith((".so", ".pyc"))] == []


def test_the_wheel_holds_units_configs_and_the_c_module(built: Built) -> None:
    """The units and configs as wstunnel/share/, and the compiled masking module
    where a C compiler exists (without one it is left out and masking is pure Python)."""
    names = set(zipfile.ZipFile(built.wheel).namelist())
    assert sorted({f"wstunnel/share/{path}" for path in built.shipped()} - names) == []
    assert sorted(set(built.package_files()) - names) == []
    assert "wstunnel/ws/_speedups.pyi" in names
    if _c_compiler() is not None:
        assert any(n.startswith("wstunnel/ws/_speedups.") and n.endswith(".so") for n in names)


@pytest.fixture(scope="module")
def venv(built: Built, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv with only the wheel installed, its dependencies borrowed (see top)."""
    home = tmp_path_factory.mktemp("venv") / "venv"
    _run([sys.executable, "-m", "venv", "--without-pip", home], cwd=home.parent, timeout=60)
    python = home / "bin" / "python"
    _run([sys.executable, "-m", "pip", "--python", python, "install", "--quiet", "--no-deps",
          "--no-index", built.wheel], cwd=home.parent, timeout=120)
    site = Path(_run([python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))"],
                     cwd=home.parent, timeout=30).strip())
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    (site / "_borrowed_dependencies.pth").write_text("".join(f"{p}\n" for p in sorted(ours)))
    return home


def test_the_installed_wstunnel_is_the_wheel(venv: Path) -> None:
    """The venv imports wstunnel from its own site-packages, not from the checkout,
    with the wheel's C masking module where one was built."""
    code = ("import wstunnel; from wstunnel.ws import masking; "
            "print(wstunnel.__file__); print(masking.ACCELERATED)")
    where, accelerated = _run([venv / "bin" / "python", "-c", code], cwd=venv.parent,
                              timeout=30).split()
    assert Path(where).is_relative_to(venv), where
    assert accelerated == str(_c_compiler() is not None)


def test_print_unit_prints_the_shipped_unit(built: Built, venv: Path) -> None:
    """`wstunnel service print-unit relay` from the installed package is the unit file."""
    out = _run([venv / "bin" / "wstunnel", "service", "print-unit", "relay"],
               cwd=venv.parent, timeout=30)
    assert out == (built.source / "systemd" / "wstunnel-relay.service").read_text()
    config = _run([venv / "bin" / "wstunnel", "service", "print-config", "agent-token"],
                  cwd=venv.parent, timeout=30)
    assert config == (built.source / "configs" / "example-agent.token").read_text()


def test_demo_runs_from_the_installed_wheel(venv: Path) -> None:
    """`wstunnel demo`, the README's first command, from the venv's console script."""
    out = _run([venv / "bin" / "wstunnel", "demo", "--size", "1MiB"], cwd=venv.parent,
               timeout=60)
    assert "sha256 matches" in out, out
