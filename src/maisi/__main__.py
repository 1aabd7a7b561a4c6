"""`python -m maisi` runs the command line."""

from maisi.cli import main

raise SystemExit(main())
