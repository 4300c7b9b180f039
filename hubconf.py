"""torch.hub entry points: the architectures of the released DINOv2 models, with weights from a file.

    model = torch.hub.load("path/to/dinoreg", "dinoreg_vitl14_reg4", weights="vitl14.safetensors", source="local")
    model = torch.hub.load("path/to/dinoreg", "dinov2_vitl14_reg", weights="vitl14.pth", source="local")
    model = torch.hub.load("path/to/dinoreg", "dinoreg_vits14_reg4", pretrained=False, source="local")
    model = torch.hub.load("path/to/dinoreg", "dinoreg_backbone", weights="any_export.safetensors", source="local")

Each entry speaks the official dialect: ``pretrained=False`` builds the architecture randomly initialised;
``weights=`` is anything :func:`dinoreg.load_backbone` reads (our exports in every format, the official
``.pth`` files), which must fit the entry's architecture (strict loading). dinoreg downloads nothing, so
``pretrained=True``, the official default, needs ``weights=PATH``: no argument at all is an error, never a
silently random model. The official names (``dinov2_vits14``, ``dinov2_vits14_reg``, ...)
are aliases of ours (``dinoreg_vits14``, ``dinoreg_vits14_reg4``, ...). ``img_size`` defaults to the file's
own (518 without a file, as the released models); given, ``pos_embed`` is resampled to it. Models are
returned in eval mode. The ``*_reg4`` entries use the registers models' antialiased positional-embedding
interpolation; the others use DINOv2's original one (bicubic with a 0.1 offset), as the official hub does.
``dinoreg_backbone(weights=PATH)`` builds whatever a file holds.
"""

dependencies = ["torch", "safetensors"]

# name -> (arch, ffn_layer, registers)
_ENTRIES = {
    "vits14": ("vit_small", "mlp", 0), "vitb14": ("vit_base", "mlp", 0), "vitl14": ("vit_large", "mlp", 0),
    "vitg14": ("vit_giant2", "swiglufused", 0),
    "vits14_reg4": ("vit_small", "mlp", 4), "vitb14_reg4": ("vit_base", "mlp", 4),
    "vitl14_reg4": ("vit_large", "mlp", 4), "vitg14_reg4": ("vit_giant2", "swiglufused", 4),
}
RELEASED_IMG_SIZE = 518  # the released models' positional-embedding grid: 37 x 37 patches of 14 px

# What must agree between an entry and the weights given to it (interpolation may differ: the file's wins).
_SHAPE_KEYS = ("patch_size", "embed_dim", "depth", "num_heads", "num_register_tokens", "ffn_layer")


def _weights_file(name: str, pretrained, weights):
    """The file to load (None: random initialisation), from the official ``pretrained`` / ``weights`` pair."""
    if weights is not None and not isinstance(weights, str) and not hasattr(weights, "__fspath__"):
        weights = getattr(weights, "value", weights)  # an official Weights enum member, e.g. Weights.LVD142M
    if weights is not None and pretrained is False:
        raise ValueError(f"{name}: pretrained=False builds random weights, but weights={weights!r} was given; "
                         "pass one or the other")
    if pretrained is False:
        return None
    if weights is None:  # pretrained=True, or nothing: the official entries' default is pretrained=True
        raise ValueError(f"{name}: dinoreg ships no weights and downloads nothing (the official hub's default, "
                         "pretrained=True, downloads); pass weights=PATH (a dinoreg export or an official DINOv2 "
                         ".pth), or pretrained=False for random weights")
    import os

    if not os.path.exists(weights):
        raise FileNotFoundError(f"{name}: weights={weights!r} is no file here (the official names of weights, "
                                "such as 'LVD142M', are downloads dinoreg does not make); pass a path to a backbone "
                                "file: a dinoreg export or an official DINOv2 .pth")
    return weights


def _make(name: str):
    arch, ffn_layer, registers = _ENTRIES[name]

    def entry(*, pretrained=None, weights=None, img_size=None, **kwargs):
        from dinoreg.models import build_backbone
        from dinoreg.models.weights import CheckpointMismatchError, load_backbone

        import torch

        def build(size):
            return build_backbone(arch, patch_size=14, img_size=size, init_values=1.0, ffn_layer=ffn_layer,
                                  num_register_tokens=registers, interpolate_antialias=registers > 0,
                                  interpolate_offset=0.0 if registers else 0.1, **kwargs)

        path = _weights_file(f"dinoreg_{name}", pretrained, weights)
        if path is None:
            return build(img_size or RELEASED_IMG_SIZE).eval()
        with torch.device("meta"):  # only to compare settings: no memory, no initialisation
            model = build(img_size or RELEASED_IMG_SIZE)
        loaded = load_backbone(path, **({"img_size": img_size} if img_size else {}), **kwargs)
        wanted = {key: model.arch_kwargs[key] for key in _SHAPE_KEYS}
        found = {key: loaded.arch_kwargs[key] for key in _SHAPE_KEYS}
        if found != wanted:
            raise CheckpointMismatchError(
                f"{path} holds {found}, not dinoreg_{name} {wanted}; use the matching entry point, or "
                "dinoreg_backbone / dinoreg.load_backbone(path), which build whatever the file holds")
        return loaded

    entry.__name__ = f"dinoreg_{name}"
    entry.__doc__ = (f"{arch}/14 with {registers} registers (ffn {ffn_layer}). weights=PATH loads a backbone file "
                     "strictly (pretrained=True needs it; pretrained=False: random weights); img_size resamples "
                     f"pos_embed (default: the file's, else {RELEASED_IMG_SIZE} as the released models).")
    return entry


def dinoreg_backbone(*, weights, **overrides):
    """Any backbone file dinoreg reads (every export format, official .pth files), with the architecture the
    file holds; ``overrides`` (e.g. ``img_size=224``) as :func:`dinoreg.load_backbone` takes them."""
    from dinoreg.models.weights import load_backbone

    return load_backbone(_weights_file("dinoreg_backbone", True, weights), **overrides)


for _name in _ENTRIES:
    globals()[f"dinoreg_{_name}"] = _make(_name)
    # the official hub's names: dinov2_vits14, ..., and dinov2_vits14_reg for the 4-register models
    globals()[f"dinov2_{_name.replace('_reg4', '_reg')}"] = globals()[f"dinoreg_{_name}"]
