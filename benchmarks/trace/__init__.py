"""TRACE continual instruction tuning on Hugging Face causal LMs (see benchmark.py and README.md)."""
