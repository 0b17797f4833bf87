"""Side-by-side measurements of lazyfs against the usual ways to start an image.

Each benchmark is a module run as ``python -m benchmarks.NAME`` from the
repository root, and ``--write-results`` records its numbers in RESULTS.md.
"""
