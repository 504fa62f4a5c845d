"""The development benchmark of densify (layer 3): ``python -m sparse3d.bench densify``.

:mod:`~sparse3d.bench.command` is the command line and the loop over runs, :mod:`~sparse3d.bench.runs`
one run (case file, child process, score, record), :mod:`~sparse3d.bench.table` the table.
"""
