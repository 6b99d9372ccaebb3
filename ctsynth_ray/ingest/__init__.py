"""Ingest of real CT (LIDC-IDRI DICOM + reader XML, NIfTI pairs) into the dataset layout."""
