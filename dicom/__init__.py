"""DICOM side of FractureNode: network listener and sender, dataset to image, SC and SR builders."""
