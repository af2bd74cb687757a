"""Latent (contemplation) decoding, the feature: what a request's dense latent phase looks
like, how it binds to a model, and the loaders of latent-reasoning checkpoints.

- ``spec``: :class:`Latent` (the user's model-free spec) and :class:`BoundLatent`;
- ``bind``: ``Latent.bind``'s checks, :func:`decoder_layers`, :class:`EndHead`;
- ``coconut``: :func:`load_coconut` (Coconut checkpoints);
- ``bundle``: :func:`save_ccot_bundle` / :func:`load_ccot_bundle` (CCoT-style bundles);
- ``run``: :class:`LatentRun`, a request's latent phase as the engine runs it.

The op that builds a latent step's inputs is ``cotrt.ops.contemplate`` ("contemplate" names the op, "latent"
the feature).
"""
from .bind import EndHead, decoder_layers
from .bundle import BUNDLE_FILE, BUNDLE_FORMAT, load_ccot_bundle, save_ccot_bundle
from .coconut import COCONUT_PREFIX, COCONUT_TOKENS, load_coconut
from .spec import DEFAULT_BEGIN, DEFAULT_END, DEFAULT_LATENT, BoundLatent, Latent

__all__ = ["BUNDLE_FILE", "BUNDLE_FORMAT", "COCONUT_PREFIX", "COCONUT_TOKENS", "DEFAULT_BEGIN", "DEFAULT_END",
           "DEFAULT_LATENT", "BoundLatent", "EndHead", "Latent", "decoder_layers", "load_ccot_bundle",
           "load_coconut", "save_ccot_bundle"]
