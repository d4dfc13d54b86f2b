"""cli: the `hetsched` command-line application (click)."""
