"""Package discovery for the folders our user asked for at the top level (patches/, runtime/,
validation/, recipes/), which install under the fluxc. namespace. Every package below each
folder is found, none is listed by hand; pyproject.toml holds everything else."""
from pathlib import Path

from setuptools import find_packages, setup

# import name -> folder in the source tree
ROOTS = {"fluxc": "fluxc", "fluxc.patches": "patches", "fluxc.runtime": "runtime",
         "fluxc.validation": "validation", "fluxc.recipes": "recipes"}

packages, package_dir = [], {}
for name, folder in ROOTS.items():
    if not (Path(folder) / "__init__.py").is_file():
        raise SystemExit(f"{folder}/ has no __init__.py: every package folder needs one")
    package_dir[name] = folder
    packages.append(name)
    packages += [f"{name}.{sub}" for sub in find_packages(folder)]

setup(packages=packages, package_dir=package_dir)
