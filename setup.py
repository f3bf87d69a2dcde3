"""Package discovery for the wheel (the rest of the metadata is in pyproject.toml).

The top-level folders our user asked for install under the fluxc. namespace; every package
below them (a folder with __init__.py) is found here, none is listed by hand.
tests/test_packaging.py builds the wheel and fails if any module is missing.
"""
from setuptools import find_packages, setup

ROOTS = {"fluxc": "fluxc", "fluxc.patches": "patches", "fluxc.runtime": "runtime",
         "fluxc.validation": "validation", "fluxc.recipes": "recipes"}

package_dir, packages = {}, []
for name, folder in ROOTS.items():
    package_dir[name] = folder
    packages.append(name)
    for sub in find_packages(folder):
        package_dir[f"{name}.{sub}"] = f"{folder}/{sub.replace('.', '/')}"
        packages.append(f"{name}.{sub}")

setup(package_dir=package_dir, packages=packages)
