"""A real, local Rucio for the tests: PostgreSQL, the Rucio server, its daemons, a file-copy tool.

Test-only: nothing in the ``multisite`` package imports it. `local_rucio.LocalRucio`
starts and stops everything by process id; the other modules run inside the
server's own virtual environment.
"""
