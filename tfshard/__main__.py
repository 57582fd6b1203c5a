"""`python -m tfshard`: the `tfshard` command."""

from tfshard.cli import main

raise SystemExit(main())
