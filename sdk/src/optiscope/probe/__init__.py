"""What is measured inside training. Importing this package imports torch."""
from .optimizer import OptimizerProbe, total_norm

__all__ = ["OptimizerProbe", "total_norm"]
