"""medssl-scale: self-supervised pre-training of 3D CT/MR foundation encoders."""

__version__ = "0.1.0"
