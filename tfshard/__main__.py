from tfshard.cli import main

raise SystemExit(main())
