"""What is measured inside training. Importing this package imports torch."""
from .optimizer import OptimizerProbe

__all__ = ["OptimizerProbe"]
