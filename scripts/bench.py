#!/usr/bin/env python
"""Benchmarks: sharded vs unsharded, measured side by side in one run.

    .venv/bin/python scripts/bench.py SUITE [ARGS...]     # the same as: tfshard bench SUITE ...

The suites live in the package, one module each, with their shared helpers
(tfshard/cli/bench/); `scripts/bench.py --help` lists them and the package's
docstring describes each.
"""

import sys
from pathlib import Path

# The repository's package, also when this interpreter has no tfshard installed.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tfshard.cli.bench import main  # noqa: E402

if __name__ == "__main__":
    raise SystemExit(main())
