"""A plain re-statement of the DINOv3 backbone's forward pass (the RoPE ViT with storage tokens).

Written for the tests from the DINOv3 paper's description and the official parameter names, independently of
dinoreg's code: one crop group at a time, RoPE as an explicit rotation of channel pairs ``(j, j + head_dim/2)``,
attention as an explicit softmax, every parameter read straight out of a state dict (official key names), so it
also checks that our names mean what the official ones mean.

``reference_blocks`` runs the blocks on a list of crop groups; in training it draws its random numbers in the
official order, from the global generator: for each block, the RoPE coordinate augmentations of each group in
turn (shift: 2 uniform draws, jitter: 2, rescale: 1), then the batch subset of each group for the attention
residual (``randperm``), then those for the FFN residual.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor


@dataclass
class RopeArch:
    patch_size: int
    num_heads: int
    depth: int
    n_storage_tokens: int = 0
    norm: str = "layernorm"  # layernorm (eps 1e-6), layernormbf16 (eps 1e-5), rmsnorm (eps 1e-5)
    ffn: str = "mlp"  # mlp or swiglu (w1, w2, w3)
    normalize_coords: str = "separate"
    shift: float | None = None
    jitter: float | None = None
    rescale: float | None = None
    drop_path: float = 0.0


def norm(sd: dict[str, Tensor], name: str, x: Tensor, arch: RopeArch) -> Tensor:
    weight = sd[name + ".weight"]
    if arch.norm == "rmsnorm":
        return x / torch.sqrt((x * x).mean(dim=-1, keepdim=True) + 1e-5) * weight
    eps = 1e-6 if arch.norm == "layernorm" else 1e-5
    return F.layer_norm(x, (x.shape[-1],), weight, sd[name + ".bias"], eps=eps)


def patch_coordinates(rows: int, cols: int, arch: RopeArch) -> Tensor:
    """Patch centres ``[rows * cols, 2]`` (row, column), rows first, in [-1, 1] before augmentation."""
    if arch.normalize_coords == "separate":
        row_side, col_side = rows, cols
    else:
        row_side = col_side = (max if arch.normalize_coords == "max" else min)(rows, cols)
    ys = [2 * (r + 0.5) / row_side - 1 for r in range(rows)]
    xs = [2 * (c + 0.5) / col_side - 1 for c in range(cols)]
    return torch.tensor([[y, x] for y in ys for x in xs], dtype=torch.float32)


def augment_coordinates(coords: Tensor, arch: RopeArch) -> Tensor:
    """The training-time augmentations, drawn from the global generator in the official order."""
    if arch.shift is not None:
        coords = coords + torch.empty(2).uniform_(-arch.shift, arch.shift)
    if arch.jitter is not None:
        coords = coords * torch.empty(2).uniform_(-math.log(arch.jitter), math.log(arch.jitter)).exp()
    if arch.rescale is not None:
        coords = coords * torch.empty(1).uniform_(-math.log(arch.rescale), math.log(arch.rescale)).exp()
    return coords


def rope_angles(coords: Tensor, periods: Tensor) -> Tensor:
    """``[HW, head_dim / 2]`` angles: the first half of the frequencies follow the row, the second the column."""
    return torch.cat([2 * math.pi * coords[:, :1] / periods, 2 * math.pi * coords[:, 1:] / periods], dim=1)


def rotate_pairs(t: Tensor, angles: Tensor, prefix: int) -> Tensor:
    """Rotate the patches of ``t`` ``[B, heads, N, head_dim]`` (tokens after ``prefix``): channel ``j`` and
    ``j + head_dim/2`` form a 2-D vector turned by ``angles[:, j]``."""
    half = t.shape[-1] // 2
    a, b = t[..., prefix:, :half], t[..., prefix:, half:]
    cos, sin = torch.cos(angles), torch.sin(angles)
    rotated = torch.cat([a * cos - b * sin, b * cos + a * sin], dim=-1)
    return torch.cat([t[..., :prefix, :], rotated], dim=-2)


def attention(sd: dict[str, Tensor], p: str, y: Tensor, angles: Tensor, arch: RopeArch) -> Tensor:
    batch, tokens, width = y.shape
    bias = sd.get(p + "attn.qkv.bias")
    if bias is not None and p + "attn.qkv.bias_mask" in sd:
        bias = bias * sd[p + "attn.qkv.bias_mask"]
    qkv = F.linear(y, sd[p + "attn.qkv.weight"], bias)
    head_dim = width // arch.num_heads
    q, k, v = qkv.reshape(batch, tokens, 3, arch.num_heads, head_dim).permute(2, 0, 3, 1, 4)
    prefix = tokens - angles.shape[0]
    q, k = rotate_pairs(q, angles, prefix), rotate_pairs(k, angles, prefix)
    weights = torch.softmax((q @ k.transpose(-2, -1)) / math.sqrt(head_dim), dim=-1)
    out = (weights @ v).transpose(1, 2).reshape(batch, tokens, width)
    return F.linear(out, sd[p + "attn.proj.weight"], sd.get(p + "attn.proj.bias"))


def ffn(sd: dict[str, Tensor], p: str, y: Tensor, arch: RopeArch) -> Tensor:
    if arch.ffn == "mlp":
        hidden = F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd.get(p + "mlp.fc1.bias")))
        return F.linear(hidden, sd[p + "mlp.fc2.weight"], sd.get(p + "mlp.fc2.bias"))
    gate = F.linear(y, sd[p + "mlp.w1.weight"], sd.get(p + "mlp.w1.bias"))
    value = F.linear(y, sd[p + "mlp.w2.weight"], sd.get(p + "mlp.w2.bias"))
    return F.linear(gate * torch.sigmoid(gate) * value, sd[p + "mlp.w3.weight"], sd.get(p + "mlp.w3.bias"))


def tokens_of(sd: dict[str, Tensor], x: Tensor, arch: RopeArch, masks: Tensor | None = None) -> Tensor:
    """``[cls, storage tokens, patches]`` ``[B, 1 + S + HW, D]``; no position added."""
    patches = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=arch.patch_size)
    patches = patches.flatten(2).transpose(1, 2)
    if masks is not None:
        patches = torch.where(masks[..., None], sd["mask_token"][None], patches)
    prefix = [sd["cls_token"].expand(x.shape[0], -1, -1)]
    if arch.n_storage_tokens:
        prefix.append(sd["storage_tokens"].expand(x.shape[0], -1, -1))
    return torch.cat([*prefix, patches], dim=1)


def reference_blocks(sd: dict[str, Tensor], xs: list[Tensor], arch: RopeArch, *, training: bool = False,
                     masks: list[Tensor | None] | None = None) -> list[list[Tensor]]:
    """For each crop group of ``xs``, its tokens after every block (``[B, 1 + S + HW, D]`` each)."""
    masks = masks or [None] * len(xs)
    states = [tokens_of(sd, x, arch, m) for x, m in zip(xs, masks)]
    grids = [(x.shape[-2] // arch.patch_size, x.shape[-1] // arch.patch_size) for x in xs]
    outputs: list[list[Tensor]] = [[] for _ in xs]
    for i in range(arch.depth):
        p = f"blocks.{i}."
        angles = []
        for rows, cols in grids:
            coords = patch_coordinates(rows, cols, arch)
            if training:
                coords = augment_coordinates(coords, arch)
            angles.append(rope_angles(coords, sd["rope_embed.periods"].float()))

        def attn_branch(t: Tensor, g: int) -> Tensor:
            return attention(sd, p, norm(sd, p + "norm1", t, arch), angles[g], arch)

        def ffn_branch(t: Tensor, g: int) -> Tensor:
            return ffn(sd, p, norm(sd, p + "norm2", t, arch), arch)

        for branch, gamma in ((attn_branch, sd.get(p + "ls1.gamma")), (ffn_branch, sd.get(p + "ls2.gamma"))):
            scale = 1.0 if gamma is None else gamma
            if training and arch.drop_path > 0:
                subsets = [torch.randperm(t.shape[0])[:max(int(t.shape[0] * (1 - arch.drop_path)), 1)] for t in states]
                new_states = []
                for g, (t, subset) in enumerate(zip(states, subsets)):
                    update = torch.zeros_like(t)
                    update[subset] = branch(t[subset], g) * scale * (t.shape[0] / len(subset))
                    new_states.append(t + update)
                states = new_states
            else:
                states = [t + branch(t, g) * scale for g, t in enumerate(states)]
        for g, t in enumerate(states):
            outputs[g].append(t)
    return outputs


def final_norm(sd: dict[str, Tensor], t: Tensor, arch: RopeArch, prefix_norm: str = "norm") -> Tensor:
    """The final norm: ``prefix_norm`` (``norm``, ``cls_norm`` or ``local_cls_norm``) for the class and storage
    tokens, ``norm`` for the patches."""
    prefix = 1 + arch.n_storage_tokens
    return torch.cat([norm(sd, prefix_norm, t[:, :prefix], arch), norm(sd, "norm", t[:, prefix:], arch)], dim=1)


def reference_forward_features(sd: dict[str, Tensor], x: Tensor, arch: RopeArch, *, prefix_norm: str = "norm",
                               masks: Tensor | None = None) -> dict[str, Tensor]:
    """``forward_features`` of one image batch in eval mode."""
    t = reference_blocks(sd, [x], arch, masks=[masks])[0][-1]
    return outputs_of(sd, t, arch, prefix_norm)


def outputs_of(sd: dict[str, Tensor], t: Tensor, arch: RopeArch, prefix_norm: str = "norm") -> dict[str, Tensor]:
    normed = final_norm(sd, t, arch, prefix_norm)
    prefix = 1 + arch.n_storage_tokens
    return {"x_norm_clstoken": normed[:, 0], "x_storage_tokens": normed[:, 1:prefix],
            "x_norm_patchtokens": normed[:, prefix:], "x_prenorm": t}


def official_rope_key_names(depth: int, *, storage: bool, mask_k_bias: bool = True, qkv_bias: bool = True,
                            layerscale: bool = True, ffn: str = "mlp", untie_cls: bool = False,
                            untie_local: bool = False) -> set[str]:
    """The keys of the official DINOv3 ``DinoVisionTransformer`` state dict (LayerNorm norms)."""
    keys = {"cls_token", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias", "rope_embed.periods",
            "norm.weight", "norm.bias"}
    keys |= {"storage_tokens"} if storage else set()
    for norm_name, wanted in (("cls_norm", untie_cls), ("local_cls_norm", untie_local)):
        keys |= {f"{norm_name}.weight", f"{norm_name}.bias"} if wanted else set()
    mlp = ("mlp.fc1", "mlp.fc2") if ffn == "mlp" else ("mlp.w1", "mlp.w2", "mlp.w3")
    for i in range(depth):
        for layer in ("norm1", "attn.proj", "norm2", *mlp):
            keys |= {f"blocks.{i}.{layer}.weight", f"blocks.{i}.{layer}.bias"}
        keys.add(f"blocks.{i}.attn.qkv.weight")
        keys |= {f"blocks.{i}.attn.qkv.bias"} if qkv_bias else set()
        keys |= {f"blocks.{i}.attn.qkv.bias_mask"} if qkv_bias and mask_k_bias else set()
        keys |= {f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"} if layerscale else set()
    return keys
