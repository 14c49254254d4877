"""Build script. Metadata lives in pyproject.toml; this file exists for the compiled
extension in csrc/ (see README, "Building the extension")."""

from setuptools import setup

setup()
