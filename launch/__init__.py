"""Entry points a user runs: `python -m launch.<script>`."""
