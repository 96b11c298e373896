"""optiscope: observability for the optimizer state of deep-learning training.

    run = optiscope.init(project="my-project")
    run.watch(optimizer, model)
    ...
    run.log({"loss": loss})
    run.finish()
"""
from .run import Run, init
from .wire import CATALOG

__version__ = "0.1.0"
__all__ = ["CATALOG", "Run", "init", "__version__"]
