"""glip-transfer: GLIP in pure PyTorch, and its transfer to new detection datasets."""

__version__ = "0.1.0"
