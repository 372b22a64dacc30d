"""CLI subcommands of ``smnn`` (one module per command family; see :mod:`smnn.cli`)."""
