"""Against the official DINOv3 code (kept outside the repository; not run by the suite): a tiny teacher_checkpoint.pth
written by the official classes starts a dinoreg run with ``train.init_from`` and gives the official outputs, and the
restatements of DINOv3's losses in tests/train/test_dinov3_objective.py equal the official loss classes.

usage (from the repository root): PYTHONPATH=.:/path/to/dinov3 python tests/train/check_official_dinov3_training.py
"""

import sys
import tempfile
from pathlib import Path

import torch
from dinov3.layers.dino_head import DINOHead
from dinov3.loss import DINOLoss, KoLeoLoss
from dinov3.models.vision_transformer import DinoVisionTransformer

sys.path[:0] = [str(Path(__file__).parent), str(Path(__file__).parents[1])]
import test_dinov3_objective as restated  # noqa: E402

from dinoreg.config import load_config  # noqa: E402
from dinoreg.distributed import DistributedEnvironment  # noqa: E402
from dinoreg.train.build import build_model_and_optimizer  # noqa: E402


def teacher_checkpoint(path: Path) -> None:
    torch.manual_seed(0)
    backbone = DinoVisionTransformer(img_size=32, patch_size=16, embed_dim=64, depth=2, num_heads=2, ffn_ratio=4.0,
                                     n_storage_tokens=4, mask_k_bias=True, layerscale_init=1e-5,
                                     norm_layer="layernormbf16", pos_embed_rope_dtype="fp32",
                                     pos_embed_rope_rescale_coords=2.0)
    backbone.init_weights()
    teacher = torch.nn.ModuleDict({"backbone": backbone,
                                   "dino_head": DINOHead(64, 128, hidden_dim=96, bottleneck_dim=32, nlayers=3),
                                   "ibot_head": DINOHead(64, 80, hidden_dim=96, bottleneck_dim=32, nlayers=3)})
    teacher.dino_head.init_weights()
    teacher.ibot_head.init_weights()
    torch.save({"teacher": teacher.state_dict()}, path)  # as dinov3/train/train.py do_test writes it
    images = torch.randn(3, 3, 32, 32)
    overrides = ["student.patch_size=16", "student.embed_dim=64", "student.depth=2", "student.num_heads=2",
                 "student.layerscale=1e-5", "crops.global_crops_size=32", "crops.local_crops_size=16",
                 "dino.head_n_prototypes=128", "dino.head_hidden_dim=96", "dino.head_bottleneck_dim=32",
                 "ibot.separate_head=true", "ibot.head_n_prototypes=80", "ibot.head_hidden_dim=96",
                 "ibot.head_bottleneck_dim=32", "dino.head_weight_norm=false", "ibot.head_weight_norm=false",
                 f"train.init_from={path}"]
    model, _ = build_model_and_optimizer(load_config("tiny_rope_cpu", overrides), DistributedEnvironment(),
                                         torch.device("cpu"))
    ours = model.teacher.eval()
    with torch.no_grad():
        official, mine = backbone.forward_features(images), ours["backbone"].forward_features(images)
        pairs = {"cls": (mine["x_norm_clstoken"], official["x_norm_clstoken"]),
                 "dino_head": (ours["dino_head"](mine["x_norm_clstoken"]), teacher.dino_head(official["x_norm_clstoken"])),
                 "ibot_head": (ours["ibot_head"](mine["x_norm_patchtokens"].flatten(0, 1)),
                               teacher.ibot_head(official["x_norm_patchtokens"].flatten(0, 1)))}
    for name, (got, expected) in pairs.items():
        difference = (got - expected).abs().max()
        print(f"init_from an official teacher_checkpoint.pth, {name}: max abs difference {difference:.2g}, "
              f"relative {difference / expected.abs().max():.2g}")


def losses() -> None:
    torch.manual_seed(0)
    prototypes, images, local_crops = 64, 4, 3
    global_logits, local_logits = torch.randn(2, images, prototypes), torch.randn(local_crops, images, prototypes)
    teacher_logits = torch.randn(2 * images, prototypes) * 0.3
    official = DINOLoss(prototypes)
    official.init_weights()
    probs = official.sinkhorn_knopp_teacher(teacher_logits, teacher_temp=0.06)
    views = probs.unflatten(0, (2, images))
    x = torch.randn(8, 16)
    for name, value, mine in (
            ("Sinkhorn-Knopp", probs, restated.sinkhorn_v3(teacher_logits, 0.06, 2 * images)),
            ("DINO local", official(local_logits, views), restated.dino_loss_v3(local_logits, views)),
            ("DINO global", official(global_logits, views, ignore_diagonal=True),
             restated.dino_loss_v3(global_logits, views, ignore_diagonal=True)),
            ("KoLeo", KoLeoLoss()(x), restated.koleo_v3(x))):
        print(f"restated {name}: max abs difference {(value - mine).abs().max():.2g} (value {value.abs().max():.3g})")


if __name__ == "__main__":
    with tempfile.TemporaryDirectory() as folder:
        teacher_checkpoint(Path(folder) / "teacher_checkpoint.pth")
    losses()
