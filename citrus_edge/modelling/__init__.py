"""The modelling: everything that imports torch (the model, its checkpoints, the PyTorch
reference, training, random-weights slices). Nothing outside this package imports torch or
transformers at module level (tests/test_import_rules.py)."""
