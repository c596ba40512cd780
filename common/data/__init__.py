"""Images and their sources: the image container, datasets, site files, DICOM, transforms."""
