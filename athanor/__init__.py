"""athanor: raw web crawl to a trained language model on Ray, tracked in MLflow."""

import importlib.util as _util
import os as _os
import sys as _sys

__version__ = "0.1.0"

# In a source tree (a Ray job's working_dir, a checkout on PYTHONPATH) pipelines/, model/ and cluster/ sit beside
# this folder; there they are this package's subpackages, as setuptools' package-dir maps them when installed. Only
# those three: the tree's tests/, bench/ and scripts/ are not athanor's.
_root = _os.path.dirname(_os.path.dirname(_os.path.abspath(__file__)))
if _os.path.isfile(_os.path.join(_root, "cluster", "cli.py")):
    for _name in ("pipelines", "model", "cluster"):
        _dir = _os.path.join(_root, _name)
        if f"{__name__}.{_name}" not in _sys.modules:
            _spec = _util.spec_from_file_location(f"{__name__}.{_name}", _os.path.join(_dir, "__init__.py"),
                                                  submodule_search_locations=[_dir])
            _sys.modules[_spec.name] = _module = _util.module_from_spec(_spec)
            _spec.loader.exec_module(_module)
            globals()[_name] = _module
