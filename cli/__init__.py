"""The ``fedalign`` command, on top of everything else: ``cli.main`` reads the command line and
hands each subcommand to its module here, which calls ``server/`` and the core."""
