"""The closed-loop shopper simulator (livecopy simulate / livecopy demo / benchmarks/closed_loop.py)."""
