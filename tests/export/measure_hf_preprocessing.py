"""How far transformers' image processor for a `dinoreg export --format hf` folder is from `dinoreg eval`'s
preprocessing: per backend (PIL; torchvision where it imports) and per image of test_hf_preprocessing.py, the
largest pixel difference (normalised units) and the largest and mean token difference (transformers' model on
the processor's pixels against dinoreg's backbone on `EvalTransform` + `normalise_uint8` pixels).

usage: python tests/export/measure_hf_preprocessing.py HF_FOLDER ['{"size": {"shortest_edge": 55}}']
The optional JSON overrides preprocessor_config.json entries (to measure another setting than the exported one).
"""

import json
import sys
import tempfile
from pathlib import Path

import torch
import transformers

sys.path.insert(0, str(Path(__file__).parent))
from test_hf_preprocessing import SHAPES, dinoreg_pixels, image, tokens  # noqa: E402

from dinoreg import load_backbone  # noqa: E402

folder = Path(sys.argv[1])
config = {**json.loads((folder / "preprocessor_config.json").read_text()), **json.loads(sys.argv[2] if
                                                                                       len(sys.argv) > 2 else "{}")}
transformers.logging.set_verbosity_error()
backbone, model = load_backbone(folder), transformers.AutoModel.from_pretrained(folder).eval()
size = config["crop_size"]["height"]
print(f"transformers {transformers.__version__}, torch {torch.__version__}; size {config['size']}, crop {size}")
with tempfile.TemporaryDirectory() as settings:
    (Path(settings) / "preprocessor_config.json").write_text(json.dumps(config))
    for backend in ("pil", "torchvision"):
        processor = transformers.AutoImageProcessor.from_pretrained(settings, backend=backend)
        if processor.backend != backend:
            print(f"{backend}: not available here (transformers built {type(processor).__name__})")
            continue
        for shape in SHAPES:
            for content in ("noise", "gradient"):
                picture = image(shape, content)
                theirs, ours = processor(picture, return_tensors="pt")["pixel_values"], dinoreg_pixels(picture, size)
                with torch.no_grad():
                    gap = (model(pixel_values=theirs).last_hidden_state - tokens(backbone, ours)).abs()
                print(f"{type(processor).__name__:21} {shape:12} {content:8} pixels {(theirs - ours).abs().max():.3f}"
                      f"  tokens max {gap.max():.3f} mean {gap.mean():.4f}")
