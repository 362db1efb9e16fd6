"""The four exportable components, registered in `spec.REGISTRY` on import.

Each pairs its graph spec (`citrus_edge.component_specs`, numpy) with its export-only wrapper
and stock PyTorch reference (`citrus_edge.modelling.export_wrappers`, `export_references`).
Importing this pulls in torch and transformers; the pipeline and `graph.get_component` do.
Registry order is export order: llm, sam_encoder, mask_decoder, vision (`export_run` frees each
part's weights once nothing later needs them).
"""

from __future__ import annotations

from citrus_edge.component_specs import (
    LLM,
    MASK_DECODER,
    SAM_ENCODER,
    VISION,
    llm_spec,
    mask_decoder_spec,
    sam_encoder_spec,
    vision_spec,
)
from citrus_edge.modelling.export_references import (
    llm_reference,
    mask_decoder_reference,
    sam_encoder_reference,
    vision_reference,
)
from citrus_edge.modelling.export_wrappers import (
    LlmStepExport,
    MaskDecoderExport,
    SamEncoderExport,
    VisionExport,
)

from .spec import Component, register

LLM_COMPONENT = register(
    Component(name=LLM, spec=llm_spec, wrapper=LlmStepExport, reference=llm_reference)
)
SAM_ENCODER_COMPONENT = register(
    Component(
        name=SAM_ENCODER,
        spec=sam_encoder_spec,
        wrapper=SamEncoderExport,
        reference=sam_encoder_reference,
    )
)
MASK_DECODER_COMPONENT = register(
    Component(
        name=MASK_DECODER,
        spec=mask_decoder_spec,
        wrapper=MaskDecoderExport,
        reference=mask_decoder_reference,
    )
)
VISION_COMPONENT = register(
    Component(name=VISION, spec=vision_spec, wrapper=VisionExport, reference=vision_reference)
)
