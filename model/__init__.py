"""The decoder-only Transformer; knows nothing of the cluster."""
