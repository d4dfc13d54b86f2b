"""`python -m cli` runs the hetsched CLI (used to start agents inside lab namespaces)."""

from cli.main import main

main()
