"""Sphinx configuration of the adabatch documentation site.

Build (offline; warnings are errors): ``python -m sphinx -W --keep-going -b html docs docs/_build/html``.
The Markdown pages are read by MyST-Parser; the API reference (``docs/api/``) is generated from the docstrings by
autodoc (Google-style sections through napoleon) and the ``adabatch-api`` directive of ``docs/_ext/adabatch_api.py``.
"""

from __future__ import annotations

import os
import sys
from importlib import metadata

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "_ext"))
os.environ.setdefault("MPLBACKEND", "Agg")

project = "adabatch"
author = "adabatch contributors"
copyright = "adabatch contributors"
try:
    release = metadata.version("adabatch")
except metadata.PackageNotFoundError:  # building from a source tree that is not installed
    release = "0+unknown"
version = release

extensions = [
    "myst_parser",
    "sphinx.ext.autodoc",
    "sphinx.ext.napoleon",
    "sphinx.ext.mathjax",
    "adabatch_api",
]

source_suffix = {".rst": "restructuredtext", ".md": "markdown"}
root_doc = "index"
exclude_patterns = ["_build", "Thumbs.db", ".DS_Store"]

# --- Markdown pages -----------------------------------------------------------------------------------------------
myst_enable_extensions = ["dollarmath", "amsmath"]
myst_heading_anchors = 3  # links such as benchmarks.md#training-step

# --- API reference ------------------------------------------------------------------------------------------------
autodoc_member_order = "bysource"
autodoc_typehints = "signature"
autodoc_preserve_defaults = True
autodoc_inherit_docstrings = False
napoleon_google_docstring = True
napoleon_numpy_docstring = False
napoleon_use_rtype = False

# --- Broken references fail the build -----------------------------------------------------------------------------
# Every reference to an adabatch object must resolve. There is no intersphinx (the build runs offline), so the
# names of other packages that appear in signatures and docstrings (jax.Array, optax.GradientTransformation,
# flax, orbax, numpy, the standard library; their short forms jnp/nn/np and optax's ArrayTree alias) cannot
# resolve: they, and only they, are ignored here. MathJax is loaded by the reader's browser, not at build time.
nitpicky = True
nitpick_ignore_regex = [
    (r"py:class", r"adabatch(\.\w+)*\._\w+\..*"),  # types of private modules (not part of the API reference)
    (
        r"py:.*",
        r"(jax|jaxlib|jnp|optax|chex|flax|nnx|linen|nn|orbax|numpy|np|argparse|collections"
        r"|contextlib|dataclasses|typing|types|os|pathlib)(\..*)?",
    ),
    (
        r"py:.*",
        r"(Any|Callable|Iterable|Iterator|Mapping|Sequence|NamedTuple|ArrayLike|PyTree|ArrayTree|Path|PathLike)",
    ),
    (
        r"py:(class|obj|exc)",
        r"(int|float|bool|str|bytes|tuple|list|dict|set|type|object|None|Ellipsis|ValueError"
        r"|TypeError|KeyError|RuntimeError|NotImplementedError|DeprecationWarning|Exception|BaseException)",
    ),
]

# --- HTML ---------------------------------------------------------------------------------------------------------
html_theme = "furo"
html_title = f"adabatch {release}"
html_static_path: list[str] = []
