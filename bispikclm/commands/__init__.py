"""One module per ``bispikclm`` command; see :mod:`bispikclm.cli`. Each imports at its top only what its arguments
need, and what a run needs inside ``run``, so that ``--help`` and argument errors answer before torch loads."""
