"""Preprocessing: source cases → one Zarr store (conversion, patient-level split, QA pictures)."""
