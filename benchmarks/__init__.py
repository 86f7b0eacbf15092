"""saga-outbox benchmark suite: ``python -m benchmarks {outbox,saga,peers,all} [--quick]``.

Measures our outbox relay and saga engine against limits measured in the same run (the raw
broker client and the raw database driver doing the same work) and against peers (sagaz, DBOS),
prints the tables and writes the results as JSON; ``python -m benchmarks.report FILE`` prints a
saved run again. Programmatic use: ``benchmarks.runner.run_suite(SuiteConfig(...))``. See
docs/benchmarks.md.
"""
