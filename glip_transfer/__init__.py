"""glip-transfer: GLIP in pure PyTorch, and its transfer to new detection datasets.

    from glip_transfer import load
    detector = load("glip-t")
    detector.predict("photo.jpg", classes=["person", "dog"])

``load`` and ``Detector`` (:mod:`glip_transfer.api`) are imported on first use: importing the
package itself stays light (no torch).
"""

__version__ = "0.1.0"

__all__ = ["Detector", "load", "__version__"]


def __getattr__(name: str):
    if name in ("load", "Detector"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'glip_transfer' has no attribute {name!r}")
