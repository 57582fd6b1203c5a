"""`python -m tfshard.cli.bench SUITE ...`: how the suites start their measuring jobs."""

from tfshard.cli.bench import main

raise SystemExit(main(prog="python -m tfshard.cli.bench"))
