"""Ships the repository's ``conf/`` inside the wheel as ``sparse3d/conf`` (see ``sparse3d.cli``).

An editable install (``make install``) reads ``conf/`` in place instead.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py


class BuildPyWithConf(build_py):
    def run(self) -> None:
        super().run()
        if not getattr(self, "editable_mode", False):
            target = Path(self.build_lib) / "sparse3d" / "conf"
            shutil.copytree(Path(__file__).resolve().parent / "conf", target, dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildPyWithConf})
