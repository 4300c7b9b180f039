"""torch.hub entry points: the architectures of the released DINOv2 and DINOv3 models, with weights you give.

    model = torch.hub.load("path/to/dinoreg", "dinoreg_vitl14_reg4", weights="vitl14.safetensors", source="local")
    model = torch.hub.load("path/to/dinoreg", "dinov2_vitl14_reg", weights="vitl14.pth", source="local")
    model = torch.hub.load("path/to/dinoreg", "dinoreg_vits14_reg4", pretrained=False, source="local")
    model = torch.hub.load("path/to/dinoreg", "dinoreg_backbone", weights="any_export.safetensors", source="local")

Each entry speaks the official dialect: ``pretrained=False`` builds the architecture randomly initialised;
``weights=`` is anything :func:`dinoreg.load_backbone` reads (our exports in every format, the official
``.pth`` files), which must fit the entry's architecture (strict loading). These entries download nothing, so
``pretrained=True``, the official default, needs ``weights=PATH``: no argument at all is an error, never a
silently random model. The official names (``dinov2_vits14``, ``dinov2_vits14_reg``, ...)
are aliases of ours (``dinoreg_vits14``, ``dinoreg_vits14_reg4``, ...). ``img_size`` defaults to the file's
own (518 without a file, as the released models); given, ``pos_embed`` is resampled to it. Models are
returned in eval mode. The ``*_reg4`` entries use the registers models' antialiased positional-embedding
interpolation; the others use DINOv2's original one (bicubic with a 0.1 offset), as the official hub does.
``dinoreg_backbone(weights=PATH)`` builds whatever a file holds.

DINOv3's RoPE presets speak the official DINOv3 hub's dialect under its names, ``dinov3_vits16``,
``dinov3_vits16plus``, ``dinov3_vitb16``, ``dinov3_vitl16``, ``dinov3_vitl16plus``, ``dinov3_vith16plus`` and
``dinov3_vit7b16``::

    model = torch.hub.load("path/to/dinoreg", "dinov3_vitl16", weights="dinov3_vitl16_pretrain.pth", source="local")
    model = torch.hub.load("path/to/dinoreg", "dinov3_vits16", pretrained=False, source="local")  # DINOv3's init

``pretrained=False`` builds the architecture with DINOv3's initialisation; ``weights=`` a file (anything
:func:`dinoreg.load_backbone` reads: the official ``.pth``, our exports) or a URL you were given loads strictly into
the preset (a file of ours whose recorded architecture differs is refused). The released weights are Meta's, under
the DINOv3 License: dinoreg never fetches them on its own, so ``pretrained=True`` without ``weights`` (the official
default) and the official weights names (``"LVD1689M"``, ``"SAT493M"``) are errors that say where to request them.
Keyword arguments (``depth=2``, ``img_size=...``, any of ``RopeVisionTransformer``'s) override the preset's.
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


DINOV3_PRESETS = ("vits16", "vits16plus", "vitb16", "vitl16", "vitl16plus", "vith16plus", "vit7b16")
DINOV3_WEIGHTS_PAGE = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"
# what a file's recorded architecture may say differently from the entry's without changing the features
_DINOV3_FREE_KEYS = ("img_size", "layerscale_init", "pos_embed_rope_shift_coords", "pos_embed_rope_jitter_coords",
                     "pos_embed_rope_rescale_coords", "untie_global_and_local_cls_norm")


def _dinov3_weights(name: str, pretrained, weights):
    """The file or URL to load (None: DINOv3's initialisation), from the official ``pretrained`` / ``weights``; a
    :class:`dinoreg.models.weights.WeightsFileError` (an ``InputError``, one line) for what cannot be loaded."""
    from dinoreg.models.weights import WeightsFileError

    if weights is not None and pretrained is False:
        raise WeightsFileError(name, f"was given pretrained=False (DINOv3's initialisation) and weights={weights!r}",
                               "pass one or the other")
    if pretrained is False:
        return None
    named = weights is None or not isinstance(weights, str) and not hasattr(weights, "__fspath__")
    if named or str(weights).upper() in ("LVD1689M", "SAT493M"):  # the official Weights enum, or its value
        raise WeightsFileError(name, "ships no weights: the released DINOv3 weights are Meta's, under the DINOv3 "
                                     "License, and dinoreg does not download them",
                               f"request them at {DINOV3_WEIGHTS_PAGE} and pass weights=PATH (the .pth, or the URL "
                               "you are sent), or pretrained=False for DINOv3's initialisation")
    weights = str(weights)
    import os

    if "://" not in weights and not os.path.exists(weights):
        raise WeightsFileError(weights, f"(weights= of {name}) does not exist",
                               "pass the path of a DINOv3 backbone file (the official .pth or a dinoreg export) or its "
                               "URL")
    return weights


def _read_dinov3_weights(source: str, check_hash: bool):
    """``(state_dict, recorded architecture)`` of a file, or of a URL fetched to torch.hub's cache as the official
    hub does (``weights_only``: tensors only)."""
    from dinoreg.models.weights import read_checkpoint

    import torch

    if "://" in source:
        return read_checkpoint(torch.hub.load_state_dict_from_url(source, map_location="cpu", check_hash=check_hash,
                                                                  weights_only=True))
    return read_checkpoint(source)


def _make_dinov3(preset: str):
    name = f"dinov3_{preset}"

    def entry(*, pretrained=True, weights=None, check_hash=False, **kwargs):
        from dinoreg.models import build_backbone
        from dinoreg.models.weights import CheckpointMismatchError, load_state_dict_strict

        source = _dinov3_weights(name, pretrained, weights)
        model = build_backbone(preset, **kwargs)  # DINOv3's initialisation (init_weights), as the official hub
        if source is None:
            return model.eval()
        state_dict, recorded = _read_dinov3_weights(source, check_hash)
        differ = {key: value for key, value in recorded.items() if key not in _DINOV3_FREE_KEYS
                  and key in model.arch_kwargs and model.arch_kwargs[key] != value}
        if differ:
            raise CheckpointMismatchError(
                f"{source} was saved for another architecture than {name}: "
                + ", ".join(f"{key}={value!r} (the entry's {model.arch_kwargs[key]!r})" for key, value in differ.items())
                + f"; pass them as keyword arguments to {name}, or use dinoreg_backbone(weights=...), which builds "
                "what the file records")
        load_state_dict_strict(model, state_dict)
        return model.eval()

    entry.__name__ = name
    entry.__doc__ = (f"DINOv3's {preset} (RoPE, patch 16, 4 storage tokens). pretrained=False: DINOv3's "
                     "initialisation; weights=PATH or URL: loaded strictly (pretrained=True needs it: the released "
                     f"weights are Meta's, request them at {DINOV3_WEIGHTS_PAGE}). Keyword arguments override the "
                     "preset's.")
    return entry


for _preset in DINOV3_PRESETS:
    globals()[f"dinov3_{_preset}"] = _make_dinov3(_preset)

for _name in _ENTRIES:
    globals()[f"dinoreg_{_name}"] = _make(_name)
    # the official hub's names: dinov2_vits14, ..., and dinov2_vits14_reg for the 4-register models
    globals()[f"dinov2_{_name.replace('_reg4', '_reg')}"] = globals()[f"dinoreg_{_name}"]
