"""Architecture registry, checkpoint loading and export."""
from .registry import ARCHITECTURES, build_model, classifier_of, forward_features, register_architecture

__all__ = ["ARCHITECTURES", "build_model", "classifier_of", "forward_features", "register_architecture"]
