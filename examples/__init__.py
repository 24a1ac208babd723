"""Runnable examples of kvmux; `python -m examples` runs them all (see __main__.py)."""
