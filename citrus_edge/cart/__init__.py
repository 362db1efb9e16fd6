"""citrus_edge.cart: what a cart's software and its PACS talk to.

- `service`: `citrus-edge serve BUNDLE`, the local HTTP service (ASGI on uvicorn) in front of one
  loaded runtime pipeline;
- `dicom_out`: DICOM Segmentation and TID 1500 Structured Report from a grounding result
  (highdicom);
- `scp`: the DICOM C-STORE receiver (pynetdicom) that grounds what it is sent and forwards
  SEG + SR to a destination AE.

Its third-party dependencies are the `serve` extra: importing this package imports none of them;
each module imports what it needs. It uses the runtime only through its public API.
"""
