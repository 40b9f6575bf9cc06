"""The two build steps pyproject.toml cannot declare; everything else is there.

The optional C masking module: ``optional=True``, so without a C compiler the
install still succeeds and wstunnel masks in pure Python (wstunnel/ws/masking.py).

The systemd units (systemd/) and example configs (configs/): the repository,
its docs and its tests use them where they are, so they stay there, one copy;
the build copies them into the package as ``wstunnel/share/{systemd,configs}``
so that an installed wstunnel prints them (``wstunnel service print-unit``).
MANIFEST.in puts them in the sdist, from which the wheel is built.
"""

from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
SHARED_FOLDERS = ("systemd", "configs")


class BuildPyWithSharedFiles(build_py):
    """build_py, then the shared folders into <build>/wstunnel/share/."""

    def run(self) -> None:
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install reads them from the checkout (wstunnel/cli/shipped.py)
        for folder in SHARED_FOLDERS:
            target = Path(self.build_lib, "wstunnel", "share", folder)
            self.mkpath(str(target))
            for source in sorted((HERE / folder).iterdir()):
                if source.is_file():
                    self.copy_file(str(source), str(target / source.name))


setup(
    ext_modules=[
        Extension("wstunnel.ws._speedups", ["wstunnel/ws/_speedups.c"], optional=True),
    ],
    cmdclass={"build_py": BuildPyWithSharedFiles},
)
