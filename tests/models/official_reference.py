"""A plain re-statement of the official DINOv2 backbone forward (eval mode, no xformers).

Written independently of dinoreg's code, one image batch at a time, with explicit attention math,
to check that dinoreg computes the same thing from the same state dict. It reads parameters out of
a state dict directly, so it also checks that our key names mean what the official names mean.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def official_interpolate_pos_encoding(pos_embed, npatch, w, h, patch_size, antialias, offset):
    # transcribed from dinov2/models/vision_transformer.py (registers version); w is dim 2, h is dim 3
    N = pos_embed.shape[1] - 1
    if npatch == N and w == h:
        return pos_embed
    pos_embed = pos_embed.float()
    class_pos_embed = pos_embed[:, 0]
    patch_pos_embed = pos_embed[:, 1:]
    dim = pos_embed.shape[-1]
    w0 = w // patch_size
    h0 = h // patch_size
    M = int(math.sqrt(N))
    kwargs = {}
    if offset:
        kwargs["scale_factor"] = (float(w0 + offset) / M, float(h0 + offset) / M)
    else:
        kwargs["size"] = (w0, h0)
    patch_pos_embed = F.interpolate(
        patch_pos_embed.reshape(1, M, M, dim).permute(0, 3, 1, 2), mode="bicubic", antialias=antialias, **kwargs
    )
    assert (w0, h0) == patch_pos_embed.shape[-2:]
    patch_pos_embed = patch_pos_embed.permute(0, 2, 3, 1).view(1, -1, dim)
    return torch.cat((class_pos_embed.unsqueeze(0), patch_pos_embed), dim=1)


def official_forward_features(sd, x, *, patch_size, num_heads, depth, num_register_tokens, antialias, offset,
                              masks=None, ffn="mlp"):
    B, nc, w, h = x.shape
    t = F.conv2d(x, sd["patch_embed.proj.weight"], sd["patch_embed.proj.bias"], stride=patch_size)
    t = t.flatten(2).transpose(1, 2)
    if masks is not None:
        t = torch.where(masks.unsqueeze(-1), sd["mask_token"].unsqueeze(0), t)
    t = torch.cat((sd["cls_token"].expand(B, -1, -1), t), dim=1)
    t = t + official_interpolate_pos_encoding(sd["pos_embed"], t.shape[1] - 1, w, h, patch_size, antialias, offset)
    if num_register_tokens:
        t = torch.cat((t[:, :1], sd["register_tokens"].expand(B, -1, -1), t[:, 1:]), dim=1)
    C = t.shape[-1]
    for i in range(depth):
        p = f"blocks.{i}."
        y = F.layer_norm(t, (C,), sd[p + "norm1.weight"], sd[p + "norm1.bias"], eps=1e-6)
        qkv = F.linear(y, sd[p + "attn.qkv.weight"], sd[p + "attn.qkv.bias"])
        qkv = qkv.reshape(B, -1, 3, num_heads, C // num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0] * (C // num_heads) ** -0.5, qkv[1], qkv[2]
        attn = (q @ k.transpose(-2, -1)).softmax(dim=-1)
        y = (attn @ v).transpose(1, 2).reshape(B, -1, C)
        y = F.linear(y, sd[p + "attn.proj.weight"], sd[p + "attn.proj.bias"])
        t = t + y * sd.get(p + "ls1.gamma", 1.0)
        y = F.layer_norm(t, (C,), sd[p + "norm2.weight"], sd[p + "norm2.bias"], eps=1e-6)
        if ffn == "mlp":
            y = F.linear(F.gelu(F.linear(y, sd[p + "mlp.fc1.weight"], sd[p + "mlp.fc1.bias"])),
                         sd[p + "mlp.fc2.weight"], sd[p + "mlp.fc2.bias"])
        else:
            x12 = F.linear(y, sd[p + "mlp.w12.weight"], sd[p + "mlp.w12.bias"])
            x1, x2 = x12.chunk(2, dim=-1)
            y = F.linear(F.silu(x1) * x2, sd[p + "mlp.w3.weight"], sd[p + "mlp.w3.bias"])
        t = t + y * sd.get(p + "ls2.gamma", 1.0)
    x_norm = F.layer_norm(t, (C,), sd["norm.weight"], sd["norm.bias"], eps=1e-6)
    return {
        "x_norm_clstoken": x_norm[:, 0],
        "x_norm_regtokens": x_norm[:, 1 : num_register_tokens + 1],
        "x_norm_patchtokens": x_norm[:, num_register_tokens + 1 :],
        "x_prenorm": t,
    }


def official_key_names(depth, *, registers, layerscale, ffn="mlp"):
    keys = {"cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight", "patch_embed.proj.bias",
            "norm.weight", "norm.bias"}
    if registers:
        keys.add("register_tokens")
    mlp = ("mlp.fc1", "mlp.fc2") if ffn == "mlp" else ("mlp.w12", "mlp.w3")
    for i in range(depth):
        for layer in ("norm1", "attn.qkv", "attn.proj", "norm2", *mlp):
            keys |= {f"blocks.{i}.{layer}.weight", f"blocks.{i}.{layer}.bias"}
        if layerscale:
            keys |= {f"blocks.{i}.ls1.gamma", f"blocks.{i}.ls2.gamma"}
    return keys
