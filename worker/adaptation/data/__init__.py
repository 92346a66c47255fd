"""Dataset readers and preprocessing. Every reader yields uint8 NHWC batches; preprocessing
(resize, channels, normalisation) runs batched on the device."""
from .images import ImageSet, open_image_set
from .preprocess import Preprocess

__all__ = ["ImageSet", "Preprocess", "open_image_set"]
