"""async_wf's benchmarks; ``python -m bench`` runs the suite against the peers (bench/suite.py)."""
