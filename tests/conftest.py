"""Shared test set-up. Each area keeps its session fixtures in its own plugin module
(tests/fixtures_<area>.py) so that expensive artifacts (tiny models, exports, compiled
bmodels) are built once per session and shared by every test that needs them."""
import os

# Never reach for the network: everything is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

pytest_plugins = [
    "tests.fixtures_tiny",
    "tests.fixtures_export",
    "tests.fixtures_compile",
    "tests.fixtures_runtime",
]
