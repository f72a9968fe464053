"""The ``elbolab`` command layer: one module per command, on top of the :mod:`inference` library.

Each module has ``add_parser(subparsers)`` and the functions its command
runs (``<name>_run`` writes the run's JSON report and figures, ``format_*``
turns the report into the printed table); :mod:`.cli` assembles them.
Shared pieces: :mod:`.flags` (argparse: one-line errors, list types, the
common flags) and :mod:`.report` (the table writer). Commands may print and
parse arguments; the library below them does neither.
"""
