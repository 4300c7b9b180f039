"""RopeVisionTransformer: the DINOv3 backbone family (2-D RoPE, storage tokens), written for dinoreg.

Parameter and buffer names, keyword arguments, token order ``[cls, storage tokens, patches]``, outputs and
initialisation are DINOv3's, so the official hub files (``dinov3_vits16_pretrain_lvd1689m-*.pth``) load with
``strict=True`` and ours load into the official class. Storage tokens are registers under another name:
``num_register_tokens`` is ``n_storage_tokens``, and the outputs carry them as ``x_storage_tokens`` (DINOv3's key)
and ``x_norm_regtokens`` (the key of the rest of dinoreg).

What differs from the learned-position family (``DinoVisionTransformer``):
* no ``pos_embed``: RoPE rotates the patches' queries and keys in every block, so any image whose sides are
  multiples of the patch size runs without resampling anything (``img_size`` only documents the training size);
* stochastic depth: one rate for every block, and in training the batch-subset form always (DINOv3's);
* ``mask_k_bias``, the norm (``layernorm`` eps 1e-6, ``layernormbf16`` eps 1e-5, ``rmsnorm``), the split SwiGLU
  (``swiglu`` / ``swiglu32`` / ``swiglu64`` / ``swiglu128``: 2/3 of the MLP width aligned to 8/32/64/128);
* ``untie_cls_and_patch_norms``: a separate ``cls_norm`` for the class and storage tokens;
  ``untie_global_and_local_cls_norm``: in training, the second crop group of a list (the local crops) uses
  ``local_cls_norm`` for them instead; never at evaluation.
"""

from __future__ import annotations

import math
from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from dinoreg.models.initialisation import InitStep, constructor_steps, post_order
from dinoreg.models.layers import Block, LayerScale, PatchEmbed, RMSNorm, make_norm
from dinoreg.models.rope import Rope, RopePositionEmbedding
from dinoreg.models.vit import VisionTransformer

# DINOv3's FFN names -> the SwiGLU alignment (None: the GELU MLP)
ROPE_FFN_LAYERS: dict[str, int | None] = {"mlp": None, "swiglu": 8, "swiglu32": 32, "swiglu64": 64, "swiglu128": 128}

# The released DINOv3 ViTs (facebookresearch/dinov3 hub/backbones.py), by their hub names without "dinov3_":
# the architecture's own arguments; every one also has patch 16, 4 storage tokens, mask_k_bias, LayerScale 1e-5,
# layernormbf16 and RoPE base 100 with "separate" coordinates, rescale_coords 2 and fp32 sines (ROPE_RELEASED), and
# biases everywhere but in vit7b16's qkv projection.
ROPE_PRESETS: dict[str, dict[str, Any]] = {
    "vits16": dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=4.0, ffn_layer="mlp"),
    "vits16plus": dict(embed_dim=384, depth=12, num_heads=6, ffn_ratio=6.0, ffn_layer="swiglu"),
    "vitb16": dict(embed_dim=768, depth=12, num_heads=12, ffn_ratio=4.0, ffn_layer="mlp"),
    "vitl16": dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=4.0, ffn_layer="mlp"),
    "vitl16plus": dict(embed_dim=1024, depth=24, num_heads=16, ffn_ratio=6.0, ffn_layer="swiglu"),
    "vith16plus": dict(embed_dim=1280, depth=32, num_heads=20, ffn_ratio=6.0, ffn_layer="swiglu"),
    "vit7b16": dict(embed_dim=4096, depth=40, num_heads=32, ffn_ratio=3.0, ffn_layer="swiglu64", qkv_bias=False,
                    untie_global_and_local_cls_norm=True),
}
ROPE_RELEASED: dict[str, Any] = dict(
    patch_size=16, n_storage_tokens=4, mask_k_bias=True, layerscale_init=1e-5, norm_layer="layernormbf16",
    pos_embed_rope_base=100.0, pos_embed_rope_min_period=None, pos_embed_rope_max_period=None,
    pos_embed_rope_normalize_coords="separate", pos_embed_rope_shift_coords=None, pos_embed_rope_jitter_coords=None,
    pos_embed_rope_rescale_coords=2.0, pos_embed_rope_dtype="fp32", qkv_bias=True, ffn_bias=True, proj_bias=True,
)


class RopeVisionTransformer(VisionTransformer):
    pos_embed_type = "rope"

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        pos_embed_rope_base: float | None = 100.0,
        pos_embed_rope_min_period: float | None = None,
        pos_embed_rope_max_period: float | None = None,
        pos_embed_rope_normalize_coords: str = "separate",
        pos_embed_rope_shift_coords: float | None = None,
        pos_embed_rope_jitter_coords: float | None = None,
        pos_embed_rope_rescale_coords: float | None = None,
        pos_embed_rope_dtype: str = "bf16",
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        ffn_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_path_rate: float = 0.0,
        layerscale_init: float | None = None,
        norm_layer: str = "layernorm",
        ffn_layer: str = "mlp",
        ffn_bias: bool = True,
        proj_bias: bool = True,
        n_storage_tokens: int = 0,
        mask_k_bias: bool = False,
        untie_cls_and_patch_norms: bool = False,
        untie_global_and_local_cls_norm: bool = False,
        attn_backend: str = "sdpa",
        attn_backend_required: bool = False,
    ) -> None:
        """The official keyword names and defaults (``DinoVisionTransformer`` of dinov3), plus dinoreg's attention
        backend. ``pos_embed_rope_min_period``/``max_period`` given together replace ``base`` (pass
        ``pos_embed_rope_base=None``)."""
        super().__init__()
        if ffn_layer not in ROPE_FFN_LAYERS:
            raise ValueError(f"unknown ffn_layer {ffn_layer!r} for a RoPE backbone; choose one of {tuple(ROPE_FFN_LAYERS)}")
        if n_storage_tokens < 0:
            raise ValueError(f"n_storage_tokens must be >= 0, got {n_storage_tokens}")
        if pos_embed_rope_min_period is not None and pos_embed_rope_max_period is not None:
            pos_embed_rope_base = None  # the official hub passes base=100 beside periods only when they are None
        self.arch_kwargs: dict[str, Any] = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, pos_embed_rope_base=pos_embed_rope_base,
            pos_embed_rope_min_period=pos_embed_rope_min_period, pos_embed_rope_max_period=pos_embed_rope_max_period,
            pos_embed_rope_normalize_coords=pos_embed_rope_normalize_coords,
            pos_embed_rope_shift_coords=pos_embed_rope_shift_coords,
            pos_embed_rope_jitter_coords=pos_embed_rope_jitter_coords,
            pos_embed_rope_rescale_coords=pos_embed_rope_rescale_coords, pos_embed_rope_dtype=pos_embed_rope_dtype,
            embed_dim=embed_dim, depth=depth, num_heads=num_heads, ffn_ratio=ffn_ratio, qkv_bias=qkv_bias,
            layerscale_init=layerscale_init, norm_layer=norm_layer, ffn_layer=ffn_layer, ffn_bias=ffn_bias,
            proj_bias=proj_bias, n_storage_tokens=n_storage_tokens, mask_k_bias=mask_k_bias,
            untie_cls_and_patch_norms=untie_cls_and_patch_norms,
            untie_global_and_local_cls_norm=untie_global_and_local_cls_norm,
        )
        self.num_features = self.embed_dim = embed_dim
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.n_storage_tokens = self.num_register_tokens = n_storage_tokens
        self.untie_cls_and_patch_norms = untie_cls_and_patch_norms
        self.untie_global_and_local_cls_norm = untie_global_and_local_cls_norm

        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        if n_storage_tokens:
            self.storage_tokens = nn.Parameter(torch.zeros(1, n_storage_tokens, embed_dim))
        self.rope_embed = RopePositionEmbedding(
            embed_dim, num_heads=num_heads, base=pos_embed_rope_base, min_period=pos_embed_rope_min_period,
            max_period=pos_embed_rope_max_period, normalize_coords=pos_embed_rope_normalize_coords,
            shift_coords=pos_embed_rope_shift_coords, jitter_coords=pos_embed_rope_jitter_coords,
            rescale_coords=pos_embed_rope_rescale_coords, dtype=pos_embed_rope_dtype)
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=ffn_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias,
                  ffn_bias=ffn_bias, drop_path=drop_path_rate, init_values=layerscale_init,
                  ffn_layer="mlp" if ROPE_FFN_LAYERS[ffn_layer] is None else "swiglu",
                  swiglu_align=ROPE_FFN_LAYERS[ffn_layer], norm_layer=norm_layer, mask_k_bias=mask_k_bias,
                  attn_backend=attn_backend, attn_backend_required=attn_backend_required)
            for _ in range(depth)
        )
        for block in self.blocks:
            block.always_batch_subset = True  # DINOv3's stochastic depth: the batch subset whenever it is on
        self.norm = make_norm(norm_layer, embed_dim)  # everything, or with untied norms the patches
        self.cls_norm = make_norm(norm_layer, embed_dim) if untie_cls_and_patch_norms else None
        self.local_cls_norm = make_norm(norm_layer, embed_dim) if untie_global_and_local_cls_norm else None
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    @property
    def register_tokens(self) -> nn.Parameter | None:
        """The storage tokens under the registers' name (None without any)."""
        return self.storage_tokens if self.n_storage_tokens else None

    # --- initialisation -------------------------------------------------------------------------------------

    def init_weights(self) -> None:
        """DINOv3's ``init_weights``: the periods, the tokens (normal, std 0.02), then every linear layer (truncated
        normal 0.02, zero bias), norm, LayerScale and patch embedding (uniform), children before parents."""
        for module, initialise in self._weight_steps():
            initialise(module)

    def _weight_steps(self) -> list[InitStep]:
        # a step sets its module's own tensors: the patch embedding's are its convolution's (drawn at the patch
        # embedding's place in the official post-order, which is the same: nothing between them draws)
        reset = (nn.Linear, nn.LayerNorm, RMSNorm, LayerScale)
        return [(self.rope_embed, RopePositionEmbedding.reset_parameters), (self, _init_tokens),
                *((m.proj, _init_patch_projection) if isinstance(m, PatchEmbed) else (m, _init_module)
                  for m in post_order(self) if m is not self and isinstance(m, (*reset, PatchEmbed)))]

    def initialisation_steps(self) -> list[InitStep]:
        """Everything construction sets and draws, as steps (see :mod:`dinoreg.models.initialisation`): the
        constructors of the submodules, then :meth:`init_weights`."""
        return [*constructor_steps(self), *self._weight_steps()]

    # --- the family's hooks ---------------------------------------------------------------------------------

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """``[B, C, H, W]`` (and ``masks`` ``[B, HW]`` bool) -> tokens ``[B, 1 + S + HW, D]``: no position is added
        here (RoPE acts in attention). The official method also returns the grid; :meth:`grid_of` gives it."""
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        prefix = [self.cls_token.expand(x.shape[0], -1, -1)]
        if self.n_storage_tokens:
            prefix.append(self.storage_tokens.expand(x.shape[0], -1, -1))
        return torch.cat((*prefix, x), dim=1)

    def block_ropes(self, grids: Sequence[tuple[int, int]]) -> Iterator[list[Rope] | None]:
        """Each block's RoPE per crop group. With coordinate augmentations in training, drawn anew for every block
        and group, just before the block runs (the official order of random draws); otherwise computed once."""
        if self.training and self.rope_embed.augments:
            for _ in self.blocks:
                yield [self.rope_embed(height=h, width=w) for h, w in grids]
            return
        ropes = [self.rope_embed(height=h, width=w) for h, w in grids]
        for _ in self.blocks:
            yield ropes

    def final_norm(self, x: Tensor) -> Tensor:
        if self.cls_norm is None:
            return self.norm(x)
        prefix = self.num_prefix_tokens
        return torch.cat((self.cls_norm(x[:, :prefix]), self.norm(x[:, prefix:])), dim=1)

    def _outputs(self, x: Tensor, masks: Tensor | None, index: int = 0) -> dict[str, Tensor | None]:
        prefix = self.num_prefix_tokens
        if self.local_cls_norm is not None and self.training and index == 1:  # the local crops, in training
            cls_and_storage, patches = self.local_cls_norm(x[:, :prefix]), self.norm(x[:, prefix:])
        elif self.cls_norm is not None or self.local_cls_norm is not None:
            cls_and_storage = (self.cls_norm or self.norm)(x[:, :prefix])
            patches = self.norm(x[:, prefix:])
        else:
            x_norm = self.norm(x)
            cls_and_storage, patches = x_norm[:, :prefix], x_norm[:, prefix:]
        return {
            "x_norm_clstoken": cls_and_storage[:, 0],  # [B, D]
            "x_storage_tokens": cls_and_storage[:, 1:],  # [B, S, D]
            "x_norm_regtokens": cls_and_storage[:, 1:],  # the same, under the name the rest of dinoreg reads
            "x_norm_patchtokens": patches,  # [B, HW, D]
            "x_prenorm": x,  # [B, 1 + S + HW, D]
            "masks": masks,
        }


def _init_tokens(model: RopeVisionTransformer) -> None:
    nn.init.normal_(model.cls_token, std=0.02)
    if model.n_storage_tokens:
        nn.init.normal_(model.storage_tokens, std=0.02)
    nn.init.zeros_(model.mask_token)


def _init_module(module: nn.Module) -> None:
    """DINOv3's ``init_weights_vit`` for one module (the patch embedding: :func:`_init_patch_projection`)."""
    if isinstance(module, nn.Linear):
        nn.init.trunc_normal_(module.weight, std=0.02)
        if module.bias is not None:
            nn.init.zeros_(module.bias)
        if getattr(module, "bias_mask", None) is not None:
            module.reset_bias_mask()  # type: ignore[operator]
    else:  # LayerNorm, RMSNorm, LayerScale
        module.reset_parameters()  # type: ignore[operator]


def _init_patch_projection(proj: nn.Conv2d) -> None:
    """DINOv3's patch embedding: weight and bias uniform in +-sqrt(1 / (in_chans * patch_size ** 2))."""
    bound = math.sqrt(1 / (proj.in_channels * proj.kernel_size[0] ** 2))
    nn.init.uniform_(proj.weight, -bound, bound)
    if proj.bias is not None:
        nn.init.uniform_(proj.bias, -bound, bound)


def build_rope_backbone(arch: str, **kwargs: Any) -> RopeVisionTransformer:
    """A DINOv3 preset (``vits16`` ... ``vit7b16``, see :data:`ROPE_PRESETS`) with the released models' settings
    (:data:`ROPE_RELEASED`), any of which ``kwargs`` (official keyword names) override; ``None`` values in
    ``kwargs`` keep the preset's."""
    if arch not in ROPE_PRESETS:
        raise ValueError(f"unknown RoPE arch {arch!r}; choose one of {', '.join(ROPE_PRESETS)}")
    given = {key: value for key, value in kwargs.items() if value is not None}
    return RopeVisionTransformer(**{**ROPE_RELEASED, **ROPE_PRESETS[arch], **given})


def is_rope_arch(arch_kwargs: Any) -> bool:
    """Whether backbone ``arch_kwargs`` (a mapping of argument names) are this family's (``n_storage_tokens``,
    ``pos_embed_rope_*``) rather than the learned-position family's."""
    return any(key == "n_storage_tokens" or key.startswith("pos_embed_rope_") for key in arch_kwargs)


__all__ = ["ROPE_FFN_LAYERS", "ROPE_PRESETS", "ROPE_RELEASED", "RopeVisionTransformer", "build_rope_backbone",
           "is_rope_arch"]
