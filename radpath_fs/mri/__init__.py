"""The MRI branch: cached MONAI preprocessing (mri.zarr), a 3D DenseNet on the four modalities,
and its logits in the prediction table (modality "mri", no magnification)."""

from radpath_fs.mri.predict import predict_mri
from radpath_fs.mri.preprocess import is_cached, preprocess_case, preprocess_cases, read_cached
from radpath_fs.mri.train import build_network, train_mri

__all__ = [
    "build_network",
    "is_cached",
    "predict_mri",
    "preprocess_case",
    "preprocess_cases",
    "read_cached",
    "train_mri",
]
