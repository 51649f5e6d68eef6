"""The ``wsurgery`` command line: a thin typer shell over the :mod:`wsurgery` library."""
