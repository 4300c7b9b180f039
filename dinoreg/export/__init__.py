"""Export of trained backbones: read one backbone straight from a sharded training checkpoint
(:mod:`dinoreg.export.source`) and write it in the official, safetensors, Hugging Face or timm layout
(:mod:`dinoreg.export.writers`). The layout conversions themselves live in :mod:`dinoreg.models.formats`,
beside :mod:`dinoreg.models.weights`, which reads every one of them back."""
