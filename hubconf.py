"""torch.hub entry points: the architectures of the released DINOv2 models, with weights from a file.

    model = torch.hub.load("path/to/dinoreg", "dinoreg_vitl14_reg4", weights="vitl14.safetensors", source="local")

``weights`` is anything :func:`dinoreg.load_backbone` reads (our exports in every format, the official
``.pth`` files); it must fit the entry's architecture (strict loading; ``pos_embed`` is resampled to
``img_size``). Without ``weights`` the backbone is randomly initialised. Models are returned in eval mode.
The ``*_reg4`` entries use the registers models' antialiased positional-embedding interpolation; the
others use DINOv2's original one (bicubic with a 0.1 offset), as the official hub does.
"""

dependencies = ["torch", "safetensors"]

# name -> (arch, ffn_layer, registers)
_ENTRIES = {
    "vits14": ("vit_small", "mlp", 0), "vitb14": ("vit_base", "mlp", 0), "vitl14": ("vit_large", "mlp", 0),
    "vitg14": ("vit_giant2", "swiglufused", 0),
    "vits14_reg4": ("vit_small", "mlp", 4), "vitb14_reg4": ("vit_base", "mlp", 4),
    "vitl14_reg4": ("vit_large", "mlp", 4), "vitg14_reg4": ("vit_giant2", "swiglufused", 4),
}


# What must agree between an entry and the weights given to it (interpolation may differ: the file's wins).
_SHAPE_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "num_register_tokens", "ffn_layer")


def _make(name: str):
    arch, ffn_layer, registers = _ENTRIES[name]

    def entry(*, weights=None, img_size: int = 518, **kwargs):
        from dinoreg.models import build_backbone
        from dinoreg.models.weights import CheckpointMismatchError, load_backbone

        import torch

        def build():
            return build_backbone(arch, patch_size=14, img_size=img_size, init_values=1.0, ffn_layer=ffn_layer,
                                  num_register_tokens=registers, interpolate_antialias=registers > 0,
                                  interpolate_offset=0.0 if registers else 0.1, **kwargs)

        if weights is None:
            return build().eval()
        with torch.device("meta"):  # only to compare settings: no memory, no initialisation
            model = build()
        loaded = load_backbone(weights, img_size=img_size, **kwargs)
        wanted = {key: model.arch_kwargs[key] for key in _SHAPE_KEYS}
        found = {key: loaded.arch_kwargs[key] for key in _SHAPE_KEYS}
        if found != wanted:
            raise CheckpointMismatchError(
                f"{weights} holds {found}, not dinoreg_{name} {wanted}; use the matching entry point, or "
                "dinoreg.load_backbone(path), which builds whatever the file holds")
        return loaded

    entry.__name__ = f"dinoreg_{name}"
    entry.__doc__ = (f"{arch}/14 with {registers} registers (ffn {ffn_layer}); weights=PATH loads a backbone "
                     "file strictly, img_size resamples pos_embed (default 518, as the released models).")
    return entry


for _name in _ENTRIES:
    globals()[f"dinoreg_{_name}"] = _make(_name)
