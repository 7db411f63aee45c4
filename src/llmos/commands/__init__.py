"""Sub-commands of `llmos` that belong to one subsystem each.

Each module here has `register(app, bench_app)`; cli.py calls them all, so a
subsystem adds its commands without touching the others'.
"""
