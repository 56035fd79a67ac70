"""Data-free model extraction of black-box classifiers (CaBaGe)."""
