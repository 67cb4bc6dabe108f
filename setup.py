"""setup.cfg holds the whole configuration; this adds the one thing a static file cannot say: the phone page's
runtime (edge_runtime/webapp/vendor/, built from npm by `make webapp`, not tracked) is package data when it has
been built, and a checkout without node still installs (edge-serve then says the runtime is missing)."""
import configparser
from pathlib import Path

from setuptools import setup

ROOT = Path(__file__).resolve().parent
VENDOR = {"malaria_edge.edge_runtime.webapp.vendor": "edge_runtime/webapp/vendor",
          "malaria_edge.edge_runtime.webapp.vendor.litert": "edge_runtime/webapp/vendor/litert",
          "malaria_edge.edge_runtime.webapp.vendor.litert.wasm": "edge_runtime/webapp/vendor/litert/wasm"}

config = configparser.ConfigParser()
config.read(ROOT / "setup.cfg", encoding="utf-8")
packages = config["options"]["packages"].split()
setup(packages=packages + [name for name, folder in VENDOR.items() if (ROOT / folder).is_dir()])
