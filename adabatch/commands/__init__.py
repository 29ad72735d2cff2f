"""Sub-commands of the ``adabatch`` command line (see :mod:`adabatch.cli`)."""
