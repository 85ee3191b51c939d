"""The benchmark suite (``pyvirtio bench``): levels of figures, each with a baseline
measured in the same run."""

from pyvirtio.bench.figures import Figure, measure, render
from pyvirtio.bench.suite import LEVELS, Settings, environment, run

__all__ = ["Figure", "measure", "render", "LEVELS", "Settings", "environment", "run"]
