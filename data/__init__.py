"""Data sets and image conversions that training, evaluation and the app share (nothing here depends on them)."""

from .images import enlarge, make_grid, to_model_range, to_pil, to_uint8, to_unit_float, uint8_to_model
from .sources import DataError, ImageData, load_mnist_5k, load_training_data, mnist_digits

__all__ = [
    "DataError", "ImageData", "enlarge", "load_mnist_5k", "load_training_data", "make_grid", "mnist_digits",
    "to_model_range", "to_pil", "to_uint8", "to_unit_float", "uint8_to_model",
]
