"""radpath_fs: brain tumour classification (A/O/G) from whole slide images and MRI, as a feature store."""

__version__ = "0.1.0"

# Class order is part of the prediction-table contract (logit_A, logit_O, logit_G).
CLASSES: tuple[str, ...] = ("A", "O", "G")
MODALITIES: tuple[str, ...] = ("t1", "t1ce", "t2", "flair")
