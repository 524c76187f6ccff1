"""Only a build step; everything else is in pyproject.toml.

The presets and sample datasets live at the top of the checkout (presets/, sample_datasets/); a wheel carries
them inside the package, where trainer/resources.py looks first: trainer/presets and
trainer/assets/sample_datasets."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

HERE = Path(__file__).resolve().parent
SHIPPED = {"presets": ("trainer", "presets"), "sample_datasets": ("trainer", "assets", "sample_datasets")}


class BuildWithData(build_py):
    def run(self):
        super().run()
        for source, target in SHIPPED.items():
            dest = Path(self.build_lib).joinpath(*target)
            if dest.exists():
                shutil.rmtree(dest)
            shutil.copytree(HERE / source, dest)


setup(cmdclass={"build_py": BuildWithData})
