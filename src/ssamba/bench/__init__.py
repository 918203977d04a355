"""Benchmarks behind ``ssamba bench ...``: library functions that measure and return plain dicts; the CLI prints
them and ``benchmarks/RESULTS.md`` records them with the command, machine and date."""
