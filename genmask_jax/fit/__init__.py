"""Will it fit? Every step compiled for a real TPU slice on any host (libtpu's compile-only
devices), with its per-chip memory, collectives and FLOPs (launch/compile.py)."""
