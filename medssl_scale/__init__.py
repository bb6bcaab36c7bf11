"""medssl-scale: self-supervised pre-training of 3D CT/MR foundation encoders."""

__version__ = "0.1.0"

__all__ = ["load_encoder"]


def __getattr__(name: str):
    # Lazy: ``import medssl_scale`` stays cheap for the ingest and data paths.
    if name == "load_encoder":
        from medssl_scale.registry import load_encoder

        return load_encoder
    raise AttributeError(f"module 'medssl_scale' has no attribute {name!r}")
