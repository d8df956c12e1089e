"""`knots-serve` command line. Every command reads the method registry, so new methods appear here by
themselves; every expected failure (bad adapter, bad merge spec) ends in one `error:` line, exit 2.

One module per group of commands (merge.py, serve.py, data.py), each adding its commands to the one app."""

from . import data, merge, serve  # noqa: F401 (each adds its commands to `app`)
from .app import app


def main():
    app()
