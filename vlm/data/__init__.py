"""Training data: sources, mixtures, tokenised samples and batching (`datasets.py`)."""
