"""Test-session set-up shared by tests/ and the doctests in adabatch/ (loaded before either is collected).

The suite compiles hundreds of small XLA programs and runs each for milliseconds, so compilation dominates its
time. XLA's CPU backend optimisation level 0 compiles about a third faster; it skips LLVM optimisation passes only
(the computation and its floating-point semantics are those of the default level). Set before JAX starts its
backend; an XLA_FLAGS the caller already set is kept and extended.
"""

import os

_FLAG = "--xla_backend_optimization_level=0"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}".strip()
