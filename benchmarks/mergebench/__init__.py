"""MergeBench: continual merging of published LLM domain experts (see ``benchmark.py``)."""
