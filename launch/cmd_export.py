"""``silvertorch export``: placeholder until its issue lands (replaced by the owner of this command)."""

from __future__ import annotations

import argparse
import sys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("rest", nargs="*")


def run(args: argparse.Namespace) -> int:
    print("silvertorch export: not available yet", file=sys.stderr)
    return 2
