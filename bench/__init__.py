"""Benchmarks and measurement scripts. Each is a module run from the repository root, e.g.
`.venv/bin/python -m bench.quality` or `.venv/bin/python -m bench.decode OUT1 OUT2`; the tests import them the same
way (`from bench import decode`). Their results go to bench/results/."""
