"""Imports every component module, each of which registers itself in `spec.REGISTRY`.

Importing this pulls in torch and transformers; the pipeline and `graph.get_component` do.
"""

from . import llm, mask_decoder, sam_encoder, vision  # noqa: F401
