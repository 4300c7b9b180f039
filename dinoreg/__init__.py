"""dinoreg: DINOv2-style self-supervised Vision Transformers with register tokens."""

__version__ = "0.1.0"

from dinoreg.models import build_backbone, load_backbone  # noqa: E402

__all__ = ["build_backbone", "load_backbone", "__version__"]
