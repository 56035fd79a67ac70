"""Self-supervised learning: evaluation monitors shared by the SSL methods."""

from lit_methods.ssl.monitors import OnlineLinearProbe, WeightedKNNClassifier

__all__ = ["OnlineLinearProbe", "WeightedKNNClassifier"]
