"""Reading inputs: the CHAOS layout, DICOM series, ground-truth masks."""
