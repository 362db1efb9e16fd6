"""citrus_edge.calib_data: images in, calibration and evaluation samples out.

- `load`: any DICOM or ordinary image -> RGB uint8 + pixel spacing (`load_image`, `iter_frames`);
  the only module the cart runtime needs (numpy, Pillow, pydicom).
- `phantom`, `dicom_writer`, `phantom_set`: procedural B-mode phantoms with exact lesion masks,
  written as US DICOM sets with masks, labels and a manifest.
- `tasks`: the exact prompt/answer texts of the segment, detect and report tasks, and parsers.
- `manifest`: the JSON-lines manifest (`Record`, `read_manifest`, `write_manifest`).
- `errors`: the typed errors.

Nothing is imported here, so `import citrus_edge.calib_data.load` stays light.
"""
