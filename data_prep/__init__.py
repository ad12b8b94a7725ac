"""Offline conversion of the raw public datasets to TFDS ArrayRecord (see docs/DATA.md)."""

# Recorded in every converted set's provenance (builder.info.metadata['provenance']); an output
# built by another version is not reused by data_prep.build (pass --overwrite to rebuild).
# 2: images as tfds.features.Image (the original encoded bytes), provenance metadata.
__version__ = '2.0'
