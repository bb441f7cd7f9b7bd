"""Benchmarks behind ``tree-pruned bench``. They print numbers; no test times anything."""
