"""The loaders of latent-reasoning checkpoints, under the name README.md and users import
(``from cotrt.loaders import load_coconut``); the code lives in cotrt.latent
(``coconut.py``, ``bundle.py``), with the rest of the latent feature."""
from .latent.bundle import BUNDLE_FILE, BUNDLE_FORMAT, load_ccot_bundle, save_ccot_bundle
from .latent.coconut import COCONUT_PREFIX, COCONUT_TOKENS, load_coconut

__all__ = ["BUNDLE_FILE", "BUNDLE_FORMAT", "COCONUT_PREFIX", "COCONUT_TOKENS", "load_ccot_bundle", "load_coconut",
           "save_ccot_bundle"]
