"""Loads the extension named by $SAGE_TEST_CORE in place of the installed one.

tests/test_sanitizers.py sets it to an ASan/UBSan build; conftest.py and the
spawned workers import this module first, so every process of that run uses
the instrumented ring.
"""

import importlib.util
import os
import sys

if os.environ.get("SAGE_TEST_CORE") and "sage_ray_comm._core" not in sys.modules:
    _spec = importlib.util.spec_from_file_location("sage_ray_comm._core", os.environ["SAGE_TEST_CORE"])
    _mod = importlib.util.module_from_spec(_spec)
    sys.modules["sage_ray_comm._core"] = _mod
    _spec.loader.exec_module(_mod)
