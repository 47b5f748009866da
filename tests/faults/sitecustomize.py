"""The fault of tests/fault_runner.py in every Python process started with this folder first on PYTHONPATH and NLI_FAULT
set: the stage, and every rank that torchrun starts for it (`pipeline.fault_env` sets both). Python imports this file
at startup; without NLI_FAULT it does nothing."""
import os
import sys

if os.environ.get("NLI_FAULT"):
    tests = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    sys.path.insert(0, tests)
    import fault_runner  # noqa: F401,E402  (patches the OS calls as it is imported)
    sys.path.remove(tests)
