"""Data: datasets (synthetic, folder, file list, compact index, tar shards), multi-crop augmentation, sampling and
loaders.

Per training step: ``InfiniteShardedSampler`` -> ``MultiCropDataset`` (decode + geometric crops, in
workers) -> ``collate_multicrop`` (a uint8 ``TrainingBatch``) -> on the device, ``Photometric`` (colour, blur,
solarisation, normalisation).
"""

from dinoreg.data.augment import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    MultiCropGeometric,
    Photometric,
    RandomColorJitter,
    sample_resized_crop_params,
)
from dinoreg.data.batch import MASK_FIELDS, TrainingBatch, UnfilledBatch
from dinoreg.data.datasets import (
    IMAGE_EXTENSIONS,
    BadFileLog,
    DatasetError,
    FileList,
    ImageFolder,
    IndexedDataset,
    IndexedView,
    build_dataset,
    load_image,
    to_rgb,
)
from dinoreg.data.loader import (
    BadSample,
    EvalTransform,
    InfiniteShardedSampler,
    MultiCropDataset,
    build_eval_loader,
    build_loader,
    collate_multicrop,
    normalise_uint8,
)
from dinoreg.data.segmentation import (
    IGNORE_LABEL,
    SegmentationFolder,
    SyntheticSegmentation,
    build_segmentation_loader,
    decode_label_map,
    encode_label_map,
)
from dinoreg.data.synthetic import SEGMENTATION_CLASSES, SyntheticShapes

__all__ = [
    "IGNORE_LABEL", "IMAGENET_MEAN", "IMAGENET_STD", "IMAGE_EXTENSIONS", "SEGMENTATION_CLASSES",
    "SegmentationFolder", "SyntheticSegmentation", "build_segmentation_loader", "decode_label_map",
    "encode_label_map", "normalise_uint8",
    "BadFileLog", "BadSample", "DatasetError", "EvalTransform", "FileList", "ImageFolder", "IndexedDataset", "IndexedView", "InfiniteShardedSampler",
    "MultiCropDataset", "MultiCropGeometric", "Photometric", "RandomColorJitter", "SyntheticShapes",
    "build_dataset", "build_eval_loader", "build_loader", "collate_multicrop", "load_image",
    "sample_resized_crop_params", "to_rgb", "MASK_FIELDS", "TrainingBatch", "UnfilledBatch",
]
