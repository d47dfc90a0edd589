"""Pipeline stages: file in, file out, one function per Snakemake rule."""

from .core import *  # noqa: F401,F403
from .core import logged  # noqa: F401
