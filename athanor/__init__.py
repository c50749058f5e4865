"""athanor: raw web crawl to a trained language model on Ray, tracked in MLflow."""

__version__ = "0.1.0"
