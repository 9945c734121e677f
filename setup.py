"""setuptools hook: a built wheel (``pip install .``, not ``-e``) carries ``csrc/`` (the native ops'
sources, compiled on first use) and ``patches/`` (the Megatron-LM source patch) inside the package,
as ``fastmoe_megatron/csrc`` and ``fastmoe_megatron/patches``: ``_native.csrc_dir()`` looks there
when the package does not sit in a checkout. Everything else is in pyproject.toml."""
import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent
SHIPPED = ("csrc", "patches")


class BuildPyWithSources(build_py):
    def run(self):
        super().run()
        if getattr(self, "editable_mode", False):
            return  # an editable install finds them beside the package
        for name in SHIPPED:
            src = ROOT / name
            if not src.is_dir():
                raise FileNotFoundError(f"{src} is missing: build from a checkout or from the "
                                        "sdist, which carries it")
            dst = Path(self.build_lib) / "fastmoe_megatron" / name
            if dst.exists():
                shutil.rmtree(dst)
            shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))


setup(cmdclass={"build_py": BuildPyWithSources})
