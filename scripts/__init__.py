"""Setup and check scripts; the Python ones run from the repository root as `python -m scripts.NAME`."""
