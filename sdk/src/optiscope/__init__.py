"""optiscope: observability for the optimizer state of deep-learning training.

run = optiscope.init(project="my-project")
run.watch(optimizer, model)
...
run.log({"loss": loss})
run.finish()
"""

from .__about__ import __version__
from .run import Run, init
from .wire import CATALOG

__all__ = ["CATALOG", "Run", "init", "__version__"]
