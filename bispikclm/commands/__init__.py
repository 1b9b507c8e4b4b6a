"""One module per ``bispikclm`` command; see :mod:`bispikclm.cli`."""
