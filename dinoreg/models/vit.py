"""DinoVisionTransformer: the official DINOv2 backbone, optionally with register tokens.

Parameter names, token order ``[cls, registers, patches]``, initialisation and outputs are the
official ones, so official hub state dicts load with ``strict=True`` and ours load into theirs.
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import torch
from torch import Tensor, nn

from dinoreg.models.initialisation import InitStep, constructor_steps, post_order
from dinoreg.models.layers import Block, PatchEmbed, init_weights_vit_timm, pack, unpack
from dinoreg.models.pos_embed import resample_pos_embed
from dinoreg.models.rope import Rope

# arch -> (embed_dim, depth, num_heads); head dim 64 everywhere except vit_tiny (timm's)
ARCH_DIMS: dict[str, tuple[int, int, int]] = {
    "vit_tiny": (192, 12, 3),
    "vit_small": (384, 12, 6),
    "vit_base": (768, 12, 12),
    "vit_large": (1024, 24, 16),
    "vit_giant2": (1536, 40, 24),
}
ARCHS = tuple(ARCH_DIMS)


class VisionTransformer(nn.Module):
    """What both backbone families share: tokens ``[cls, registers, patches]``, blocks run on packed crop groups,
    the official outputs and feature accessors. A family says how tokens are made (:meth:`prepare_tokens_with_masks`),
    which RoPE each block applies to each group (:meth:`block_ropes`), how the final norm applies (:meth:`_outputs`,
    :meth:`final_norm`); its blocks say when stochastic depth uses a batch subset (``Block.uses_batch_subset``).

    Attributes every family sets: ``arch_kwargs`` (everything needed to rebuild it), ``embed_dim``,
    ``num_features``, ``n_blocks``, ``num_heads``, ``patch_size``, ``num_register_tokens`` (DINOv3's storage tokens
    count as registers), ``patch_embed``, ``cls_token``, ``blocks``, ``norm``, ``head``, ``mask_token``.
    """

    arch_kwargs: dict[str, Any]
    num_register_tokens: int
    patch_size: int
    blocks: nn.ModuleList
    #: the family's name: "learned" (DINOv2, learned absolute position embeddings) or "rope" (DINOv3)
    pos_embed_type: str = "learned"

    @property
    def num_prefix_tokens(self) -> int:
        """The class token and the registers, before the patches."""
        return 1 + self.num_register_tokens

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """``[B, C, H, W]`` (and ``masks`` ``[B, HW]`` bool) -> tokens ``[B, 1 + R + HW, D]``."""
        raise NotImplementedError

    def block_ropes(self, grids: Sequence[tuple[int, int]]) -> Iterator[list[Rope] | None]:
        """For each block in turn, the RoPE of each crop group of patch grids ``grids`` (None: no RoPE)."""
        return iter([None] * len(self.blocks))

    def positions(self, x: Tensor) -> list[Rope | None]:
        """The RoPE each block applies to the images ``x`` ``[B, C, H, W]`` (Nones for the learned family), for code
        that runs the blocks itself: ``for block, rope in zip(blocks, positions(x)): tokens = block(tokens, rope)``."""
        return [None if ropes is None else ropes[0] for ropes in self.block_ropes([self.grid_of(x)])]

    def grid_of(self, x: Tensor) -> tuple[int, int]:
        """The patch grid ``(rows, columns)`` of images ``x`` ``[B, C, H, W]``."""
        return x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size

    def final_norm(self, x: Tensor) -> Tensor:
        """The final norm of all tokens ``[B, 1 + R + HW, D]``, as ``get_intermediate_layers(norm=True)`` applies it."""
        return self.norm(x)

    def _outputs(self, x: Tensor, masks: Tensor | None, index: int = 0) -> dict[str, Tensor | None]:
        x_norm = self.final_norm(x)
        first_patch = self.num_prefix_tokens
        return {
            "x_norm_clstoken": x_norm[:, 0],  # [B, D]
            "x_norm_regtokens": x_norm[:, 1:first_patch],  # [B, R, D]
            "x_norm_patchtokens": x_norm[:, first_patch:],  # [B, HW, D]
            "x_prenorm": x,  # [B, 1 + R + HW, D]
            "masks": masks,
        }

    def set_checkpointing(self, mode: str) -> None:
        """Activation checkpointing of every block in training: ``none``, ``selective`` or ``full`` (see
        :data:`dinoreg.models.layers.CHECKPOINTING_MODES`); gradients are unchanged."""
        for block in self.blocks:
            block.set_checkpointing(mode)

    def compile_blocks(self) -> None:
        """``torch.compile`` each block's attention and FFN branches (see ``Block.compile_residuals``)."""
        for block in self.blocks:
            block.compile_residuals()

    def _run_blocks(self, tokens: list[Tensor], grids: Sequence[tuple[int, int]], batch_subset: bool) -> list[Tensor]:
        packed, shapes = pack(tokens)
        for block, ropes in zip(self.blocks, self.block_ropes(grids)):
            packed = block.forward_packed(packed, shapes, batch_subset=block.uses_batch_subset(batch_subset),
                                          rope=ropes)
        return unpack(packed, shapes)

    def forward_features(self, x: Tensor | Sequence[Tensor], masks: Any = None, *, first_group: int = 0
                         ) -> dict | list[dict]:
        """One image batch -> dict; a list of batches (e.g. global and local crops, any sizes)
        -> list of dicts, computed in one pass with shared linear layers. ``first_group``: the place of the list's
        first batch among the crop groups of a step (1 for the local crops passed alone), for a family whose outputs
        depend on it (DINOv3's ``local_cls_norm`` serves the second group in training)."""
        if isinstance(x, Tensor):
            tokens = self._run_blocks([self.prepare_tokens_with_masks(x, masks)], [self.grid_of(x)], False)
            return self._outputs(tokens[0], masks)
        masks_list = list(masks) if masks is not None else [None] * len(x)
        if len(masks_list) != len(x):
            raise ValueError(f"got {len(x)} image batches but {len(masks_list)} masks")
        tokens = [self.prepare_tokens_with_masks(xi, mi) for xi, mi in zip(x, masks_list)]
        outputs = self._run_blocks(tokens, [self.grid_of(xi) for xi in x], True)
        return [self._outputs(t, m, first_group + i) for i, (t, m) in enumerate(zip(outputs, masks_list))]

    def forward(self, x: Tensor | Sequence[Tensor], masks: Any = None, is_training: bool = False, *,
                first_group: int = 0):
        out = self.forward_features(x, masks, first_group=first_group)
        if is_training:
            return out
        if isinstance(out, list):
            return [self.head(o["x_norm_clstoken"]) for o in out]
        return self.head(out["x_norm_clstoken"])

    def block_outputs(self, x: Tensor, *, attention_of: Sequence[int] = (), num_queries: int | None = None
                      ) -> tuple[list[Tensor], dict[int, Tensor]]:
        """The tokens after every block, ``[B, 1 + R + HW, D]`` each (residual stream, before the final norm),
        and the attention probabilities ``[B, heads, Q, N]`` of the blocks listed in ``attention_of`` for the
        first ``num_queries`` tokens as queries (all when None), for analysis and the training monitor."""
        return self._block_outputs(x, attention_of=attention_of, num_queries=num_queries)

    def _block_outputs(self, x: Tensor, *, attention_of: Sequence[int] = (), num_queries: int | None = None
                       ) -> tuple[list[Tensor], dict[int, Tensor]]:
        # Not block_outputs itself from the other methods: under FSDP2 each public method is an FSDP forward method
        # (train/parallel.py), whose return reshards the root's parameters the caller still needs (the final norm).
        tokens = self.prepare_tokens_with_masks(x)
        packed, shapes = pack([tokens])
        outputs, attention = [], {}
        # each block's RoPE drawn just before it runs, and the family's stochastic depth: in training, the random
        # draws of forward_features on one batch, in the official order
        for index, (block, ropes) in enumerate(zip(self.blocks, self.block_ropes([self.grid_of(x)]))):
            if index in attention_of:
                attention[index] = block.attention_probs(unpack(packed, shapes)[0], num_queries=num_queries,
                                                         rope=None if ropes is None else ropes[0])
            packed = block.forward_packed(packed, shapes, batch_subset=block.uses_batch_subset(False), rope=ropes)
            outputs.append(unpack(packed, shapes)[0])
        return outputs, attention

    def get_intermediate_layers(
        self,
        x: Tensor,
        n: int | Sequence[int] = 1,
        reshape: bool = False,
        return_class_token: bool = False,
        norm: bool = True,
        return_extra_tokens: bool = False,
    ) -> tuple:
        """Outputs of the last ``n`` blocks (or of the blocks indexed by ``n``), registers removed; with
        ``return_class_token`` / ``return_extra_tokens`` (DINOv3's) tuples ``(patches, cls, registers)`` of those
        asked for."""
        wanted = range(len(self.blocks) - n, len(self.blocks)) if isinstance(n, int) else n
        outputs = [out for i, out in enumerate(self._block_outputs(x)[0]) if i in wanted]
        if len(outputs) != len(wanted):
            raise ValueError(f"only {len(outputs)} of {len(wanted)} requested blocks exist (depth {len(self.blocks)})")
        if norm:
            outputs = [self.final_norm(out) for out in outputs]
        class_tokens = [out[:, 0] for out in outputs]
        extra_tokens = [out[:, 1:self.num_prefix_tokens] for out in outputs]
        outputs = [out[:, self.num_prefix_tokens:] for out in outputs]
        if reshape:
            batch = x.shape[0]
            outputs = [out.reshape(batch, *self.grid_of(x), -1).permute(0, 3, 1, 2).contiguous() for out in outputs]
        extras = [tokens for tokens, wanted_too in ((class_tokens, return_class_token), (extra_tokens, return_extra_tokens))
                  if wanted_too]
        return tuple(zip(outputs, *extras)) if extras else tuple(outputs)

    @torch.no_grad()
    def get_self_attention(self, x: Tensor, block_index: int = -1) -> Tensor:
        """Attention probabilities ``[B, heads, N, N]`` of one block, tokens ordered
        ``[cls, registers, patches]`` (computed with explicit softmax, whatever the backend)."""
        block_index = block_index % len(self.blocks)
        tokens = self.prepare_tokens_with_masks(x)
        for index, (block, rope) in enumerate(zip(self.blocks, self.positions(x))):
            if index == block_index:  # the blocks after it are not run
                return block.attention_probs(tokens, rope=rope)
            tokens = block(tokens, rope)
        raise AssertionError("unreachable: block_index is within the blocks")


class DinoVisionTransformer(VisionTransformer):
    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        ffn_bias: bool = True,
        proj_bias: bool = True,
        drop_path_rate: float = 0.0,
        drop_path_uniform: bool = False,
        init_values: float | None = None,
        ffn_layer: str = "mlp",
        block_chunks: int = 1,
        num_register_tokens: int = 0,
        interpolate_antialias: bool = False,
        interpolate_offset: float = 0.1,
        attn_backend: str = "sdpa",
        attn_backend_required: bool = False,
    ) -> None:
        """Keyword names and defaults follow the official class. ``block_chunks`` is accepted for
        compatibility only: blocks are never chunked, so keys are always ``blocks.{i}.``."""
        super().__init__()
        if num_register_tokens < 0:
            raise ValueError(f"num_register_tokens must be >= 0, got {num_register_tokens}")
        # Everything needed to rebuild this module; stored in exported checkpoints.
        self.arch_kwargs: dict[str, Any] = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, ffn_bias=ffn_bias,
            proj_bias=proj_bias, init_values=init_values, ffn_layer=ffn_layer,
            num_register_tokens=num_register_tokens, interpolate_antialias=interpolate_antialias,
            interpolate_offset=interpolate_offset,
        )
        self.num_features = self.embed_dim = embed_dim
        self.num_tokens = 1
        self.n_blocks = depth
        self.num_heads = num_heads
        self.patch_size = patch_size
        self.num_register_tokens = num_register_tokens
        self.interpolate_antialias = interpolate_antialias
        self.interpolate_offset = interpolate_offset

        self.patch_embed = PatchEmbed(patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim)
        grid = img_size // patch_size
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, grid * grid + self.num_tokens, embed_dim))
        self.register_tokens = (
            nn.Parameter(torch.zeros(1, num_register_tokens, embed_dim)) if num_register_tokens else None
        )
        if drop_path_uniform:
            rates = [drop_path_rate] * depth
        else:
            rates = torch.linspace(0, drop_path_rate, depth, device="cpu").tolist()  # cpu: also under a meta device
        self.blocks = nn.ModuleList(
            Block(embed_dim, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, proj_bias=proj_bias,
                  ffn_bias=ffn_bias, drop_path=rates[i], init_values=init_values, ffn_layer=ffn_layer,
                  attn_backend=attn_backend, attn_backend_required=attn_backend_required)
            for i in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=1e-6)
        self.head = nn.Identity()
        self.mask_token = nn.Parameter(torch.zeros(1, embed_dim))
        self.init_weights()

    def init_weights(self) -> None:
        """The official initialisation, run by the constructor."""
        for module, initialise in self._weight_steps():
            initialise(module)

    def _weight_steps(self) -> list[InitStep]:
        # the tokens, then every linear layer in the order of Module.apply (children first)
        return [(self, _init_tokens), *((m, init_weights_vit_timm) for m in post_order(self) if isinstance(m, nn.Linear))]

    def initialisation_steps(self) -> list[InitStep]:
        """Everything construction sets and draws, as steps (see :mod:`dinoreg.models.initialisation`): the
        constructors of the submodules, then :meth:`init_weights`."""
        return [*constructor_steps(self), *self._weight_steps()]

    def interpolate_pos_encoding(self, x: Tensor, height: int, width: int) -> Tensor:
        """Positional embedding for an image of ``height x width`` pixels, in ``x``'s dtype."""
        grid = (height // self.patch_size, width // self.patch_size)
        pos = resample_pos_embed(self.pos_embed, grid, antialias=self.interpolate_antialias,
                                 offset=self.interpolate_offset)
        return pos.to(x.dtype)

    def prepare_tokens_with_masks(self, x: Tensor, masks: Tensor | None = None) -> Tensor:
        """``[B, C, H, W]`` (and ``masks`` ``[B, HW]`` bool) -> tokens ``[B, 1 + R + HW, D]``."""
        _, _, height, width = x.shape
        x = self.patch_embed(x)
        if masks is not None:
            x = torch.where(masks.unsqueeze(-1), self.mask_token.to(x.dtype).unsqueeze(0), x)
        x = torch.cat((self.cls_token.expand(x.shape[0], -1, -1), x), dim=1)
        x = x + self.interpolate_pos_encoding(x, height, width)
        if self.register_tokens is not None:
            x = torch.cat((x[:, :1], self.register_tokens.expand(x.shape[0], -1, -1), x[:, 1:]), dim=1)
        return x


def _init_tokens(model: DinoVisionTransformer) -> None:
    nn.init.trunc_normal_(model.pos_embed, std=0.02)
    nn.init.normal_(model.cls_token, std=1e-6)
    if model.register_tokens is not None:
        nn.init.normal_(model.register_tokens, std=1e-6)
    nn.init.zeros_(model.mask_token)  # as constructed


def _factory(arch: str):
    embed_dim, depth, num_heads = ARCH_DIMS[arch]

    def build(patch_size: int = 16, num_register_tokens: int = 0, **kwargs: Any) -> DinoVisionTransformer:
        return DinoVisionTransformer(patch_size=patch_size, embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                                     mlp_ratio=4, num_register_tokens=num_register_tokens, **kwargs)

    build.__name__ = arch
    build.__doc__ = f"{arch}: width {embed_dim}, depth {depth}, {num_heads} heads (official keyword names)."
    return build


vit_tiny = _factory("vit_tiny")
vit_small = _factory("vit_small")
vit_base = _factory("vit_base")
vit_large = _factory("vit_large")
vit_giant2 = _factory("vit_giant2")


def build_backbone(arch: str = "vit_small", **kwargs: Any) -> DinoVisionTransformer:
    """Build ``arch`` with official keyword arguments; ``embed_dim``/``depth``/``num_heads`` given in
    ``kwargs`` override the arch's (handy for tiny test models)."""
    if arch not in ARCH_DIMS:
        raise ValueError(f"unknown arch {arch!r}; choose one of {', '.join(ARCHS)}")
    embed_dim, depth, num_heads = ARCH_DIMS[arch]
    dims = {"embed_dim": embed_dim, "depth": depth, "num_heads": num_heads, "mlp_ratio": 4.0}
    for key in list(dims):
        if kwargs.get(key) is not None:
            dims[key] = kwargs.pop(key)
        kwargs.pop(key, None)
    return DinoVisionTransformer(**dims, **kwargs)
