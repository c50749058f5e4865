"""athanor: raw web crawl to a trained language model on Ray, tracked in MLflow."""

import os as _os

__version__ = "0.1.0"

# In a source tree (a Ray job's working_dir, a checkout on PYTHONPATH) pipelines/, model/ and cluster/ sit beside
# this folder; there they are this package's subpackages, as setuptools' package-dir maps them when installed.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "cluster", "cli.py")):
    __path__.append(_root)
