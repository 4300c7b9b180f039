"""``dinoreg eval knn`` and ``dinoreg eval linear``: frozen-backbone evaluations."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Callable

from dinoreg.argtypes import int_at_least, non_negative_float, output_folder, positive_float, positive_int
from dinoreg.distributed import shutdown_distributed
from dinoreg.errors import InputError
from dinoreg.run_dir import FEATURES_FILES, RunDir

_OFFICIAL_LRS = "1e-5 2e-5 5e-5 1e-4 2e-4 5e-4 1e-3 2e-3 5e-3 1e-2 2e-2 5e-2 0.1"
_EXIT_CODES = ("exit codes: 0 done, 1 error (e.g. an incomplete torchrun/SLURM environment), 2 bad arguments or "
               "inputs (weights missing or not a ViT backbone, data not laid out as train/ and val/ class "
               "sub-folders, an image size the patches do not tile).")
_DISTRIBUTED = ("Runs as one process, or one per GPU/CPU share under torchrun or srun: every rank extracts "
                "its share of the features and rank 0 gathers them (same results as one process) and "
                "writes the outputs.")


_SYNTHETIC = ("the embedded synthetic dataset with its train/val splits (synthetic, or "
              "synthetic:size=N,image_size=S,seed=K,objects=A-B where N is the train size and val has N/5)")


def _fraction(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {text!r}") from None
    if not 0.0 < value < 1.0:
        raise argparse.ArgumentTypeError(f"expected a fraction in (0, 1), got {value}")
    return value


def _add_common_arguments(parser: argparse.ArgumentParser, protocol: str, *, data: bool = True) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--weights", type=Path, metavar="PATH",
                        help="a backbone dinoreg.load_backbone reads: any `dinoreg export` output (safetensors, "
                             ".pth, Hugging Face directory, timm file) or an official DINOv2 hub checkpoint; the "
                             "architecture comes from the file")
    source.add_argument("--run", type=Path, metavar="DIR",
                        help="a `dinoreg train` output folder: evaluates its teacher_backbone.safetensors")
    parser.add_argument("--random-init", action="store_true",
                        help="evaluate the architecture of --weights/--run freshly initialised (seed 0) instead of "
                             "its weights: the baseline a trained backbone must beat")
    if data:
        parser.add_argument("--data", default="synthetic", metavar="SPEC|DIR",
                            help=f"{_SYNTHETIC}, or a folder with train/<class>/ and val/<class>/ image sub-folders "
                                 "(the ImageNet layout) (default: %(default)s)")
    parser.add_argument("--output-dir", type=output_folder, metavar="DIR",
                        help=f"where results.json and TensorBoard events (DIR/tensorboard) go; default "
                             f"RUN/eval_{protocol} (RUN/eval_{protocol}_random_init) with --run, required with "
                             "--weights")
    parser.add_argument("--img-size", type=positive_int, metavar="PIXELS",
                        help="centre-crop size fed to the backbone, a multiple of its patch size (default: 224 as the "
                             "official evaluations, or the backbone's training size when smaller)")
    parser.add_argument("--resize-size", type=positive_int, metavar="PIXELS",
                        help="the shorter side is first resized (bicubic) to this, then centre-cropped to "
                             "--img-size (default: " + ("img-size * 256 / 224, the official 256 -> 224)" if data else
                                                        "img-size: a square image is kept whole)"))
    parser.add_argument("--batch-size", type=positive_int, default=64,
                        help="images per forward pass of the backbone, per process (default: %(default)s)")
    parser.add_argument("--num-workers", type=int_at_least(0, "a number of workers >= 0"), default=2,
                        help="DataLoader worker processes per process decoding images (default: %(default)s)")
    parser.add_argument("--max-train-images", type=positive_int, metavar="N",
                        help="use N train images drawn by a fixed-seed permutation: the same N every time, and a random "
                             "draw keeps the classes of a folder dataset (sorted by class) roughly in proportion; "
                             "default: all")
    parser.add_argument("--max-val-images", type=positive_int, metavar="N",
                        help="the same for the val split; default: all")


def add_eval_parser(commands: Any) -> None:
    evaluate = commands.add_parser("eval", help="evaluate a frozen backbone: kNN, linear probe or linear segmentation",
                                   description="Evaluate a frozen backbone on labelled data (features from the "
                                               "official evaluation preprocessing: resize, centre crop, ImageNet "
                                               "normalisation).")
    protocols = evaluate.add_subparsers(dest="protocol", metavar="<protocol>", required=True)
    knn = protocols.add_parser(
        "knn", help="weighted k-nearest-neighbour classification (DINO's protocol)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Weighted kNN on L2-normalised cls tokens (DINO): each val image's k most similar train "
                    "images vote for their class with weight exp(cosine / T); top-1 and top-5 for every k "
                    "(k larger than the train set is clipped to it).",
        epilog=f"Writes DIR/results.json and TensorBoard scalars knn/top1_k<k>, knn/top5_k<k>. {_DISTRIBUTED}\n\n"
               f"{_EXIT_CODES}\n\nexamples:\n"
               "  dinoreg eval knn --run runs/tiny                      # synthetic data, results in runs/tiny/eval_knn\n"
               "  torchrun --nproc_per_node=8 -m dinoreg eval knn --weights dinov2_vits14_reg4_pretrain.pth \\\n"
               "      --data /data/imagenet --img-size 224 --output-dir eval/vits14_knn")
    _add_common_arguments(knn, "knn")
    knn.add_argument("--ks", type=positive_int, nargs="+", default=[10, 20, 100, 200], metavar="K",
                     help="numbers of neighbours (default: 10 20 100 200)")
    knn.add_argument("--temperature", type=positive_float, default=0.07,
                     help="T of the vote weights exp(cosine / T) (default: %(default)s)")
    knn.add_argument("--avgpool", action="store_true",
                     help="features = cls token concatenated with the mean patch token (registers excluded), "
                          "then L2-normalised; default: the cls token alone")
    knn.add_argument("--save-features", action="store_true",
                     help="also write DIR/knn_features.pt: {train, val} -> {features, labels, indices}")
    knn.set_defaults(handler=_knn, parser=knn)

    linear = protocols.add_parser(
        "linear", help="linear probes over a learning-rate grid (DINOv2's protocol)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="DINOv2's linear evaluation: one linear classifier per (last 1 or 4 blocks' cls tokens, with "
                    "or without the mean patch token, learning rate), trained jointly with SGD (momentum 0.9) "
                    "and a cosine schedule on features computed once. The configuration with the best top-1 on "
                    "a split held out from train (--val-fraction) is chosen, and its val top-1 reported.",
        epilog="Writes DIR/results.json (every configuration's held-out accuracy, the chosen one's val accuracy), "
               "TensorBoard scalars (linear/mean_loss per iteration, linear_heldout_top1/<config>, linear/val_top1) "
               "and the feature cache DIR/linear_features.pt, reused by the next run with the same weights, data, "
               f"sizes and images. {_DISTRIBUTED} The classifiers train on rank 0.\n\n{_EXIT_CODES}\n\nexamples:\n"
               "  dinoreg eval linear --run runs/tiny --epochs 20\n"
               "  dinoreg eval linear --weights backbone.safetensors --data /data/imagenet --output-dir eval/lin")
    _add_common_arguments(linear, "linear")
    linear.add_argument("--epochs", type=positive_int, default=10,
                        help="passes over the train features (default: %(default)s)")
    linear.add_argument("--classifier-batch-size", type=positive_int, default=128,
                        help="features per SGD step; the learning rates are scaled by it / 256 as in the "
                             "official code (default: %(default)s)")
    linear.add_argument("--learning-rates", type=positive_float, nargs="+", metavar="LR",
                        help=f"base learning rates of the grid (default: the official {_OFFICIAL_LRS})")
    linear.add_argument("--val-fraction", type=_fraction, default=0.1,
                        help="fraction of every train class held out (fixed seed) to choose the configuration "
                             "(default: %(default)s)")
    linear.add_argument("--seed", type=int, default=0,
                        help="seed of the held-out split, the classifiers' init and the batch order "
                             "(default: %(default)s)")
    linear.add_argument("--no-cache", action="store_true",
                        help="neither read nor write DIR/linear_features.pt")
    linear.set_defaults(handler=_linear, parser=linear)
    _add_segmentation_parser(protocols)


def _add_segmentation_parser(protocols: Any) -> None:
    segmentation = protocols.add_parser(
        "segmentation", help="linear semantic-segmentation probe: mIoU (DINOv2's protocol)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="DINOv2's linear segmentation evaluation: on the frozen backbone's normed patch tokens (the last "
                    "block's, or the last 4 concatenated), BatchNorm and a 1x1 convolution to the classes; logits "
                    "upsampled bilinearly to the label map, cross-entropy over the pixels not ignored, AdamW (lr "
                    "1e-3, weight decay 1e-4, linear warm-up then linear decay). Features are computed once on "
                    "resized, centre-cropped images (no random crops or sliding window: a deliberate departure that "
                    "makes it minutes instead of hours). Reports mIoU, pixel accuracy and per-class IoU on the val "
                    "split.",
        epilog="Label maps: single-channel PNGs (8- or 16-bit, or palette) of the image's size, whose values are "
               "classes, --ignore-value meaning ignore (ADE20k: 0 is ignored and 1..150 are the classes 0..149; values "
               "above the ignore value move down by one, so the classes are contiguous). images/a/x.jpg pairs with "
               "masks/a/x.png.\n\n"
               "Writes DIR/results.json (mIoU, pixel accuracy, per-class IoU, accuracy and pixels, the confusion "
               f"matrix), TensorBoard scalars segmentation/* and DIR/segmentation_overlays.png. {_DISTRIBUTED} The "
               f"head trains on rank 0.\n\n{_EXIT_CODES}\n\nexamples:\n"
               "  dinoreg eval segmentation --run runs/tiny                # synthetic shapes and their label maps\n"
               "  dinoreg data export-synthetic data/shapes && dinoreg eval segmentation --run runs/tiny \\\n"
               "      --images data/shapes/images/train --masks data/shapes/masks/train \\\n"
               "      --val-images data/shapes/images/val --val-masks data/shapes/masks/val --classes data/shapes/classes.txt\n"
               "  dinoreg eval segmentation --weights vitl14_reg4.pth --images ADE/images/training \\\n"
               "      --masks ADE/annotations/training --val-images ADE/images/validation \\\n"
               "      --val-masks ADE/annotations/validation --img-size 518 --blocks 4 --output-dir eval/ade")
    _add_common_arguments(segmentation, "segmentation", data=False)
    data = segmentation.add_argument_group("data")
    data.add_argument("--images", default="synthetic", metavar="SPEC|DIR",
                      help=f"{_SYNTHETIC}, whose label maps are the background and one class per shape; or a folder "
                           "of images (searched recursively) (default: %(default)s)")
    data.add_argument("--masks", type=Path, metavar="DIR", help="the label maps of --images (a folder)")
    data.add_argument("--val-images", type=Path, metavar="DIR",
                      help="val images; without them (and --val-masks) a fixed tenth of --images is held out")
    data.add_argument("--val-masks", type=Path, metavar="DIR", help="the label maps of --val-images")
    data.add_argument("--ignore-value", type=int_at_least(0, "a pixel value >= 0"), default=0,
                      help="the label-map value of pixels to ignore (ADE20k: 0; 255 for maps whose values are the class "
                           "indices) (default: %(default)s)")
    data.add_argument("--classes", type=Path, metavar="FILE",
                      help="class names, one per line in index order (default: class_0, class_1, ... as many as the "
                           "largest class in the label maps)")
    probe = segmentation.add_argument_group("probe")
    probe.add_argument("--blocks", type=int, choices=(1, 4), default=1,
                       help="patch tokens of the last block (DINOv2's 'linear') or the last 4 concatenated "
                            "(default: %(default)s)")
    probe.add_argument("--no-batch-norm", action="store_true",
                       help="a plain 1x1 convolution, without the official head's BatchNorm")
    probe.add_argument("--iterations", type=positive_int, default=2000,
                       help="AdamW steps of the head (official: 40000 with augmentation) (default: %(default)s)")
    probe.add_argument("--head-batch-size", type=positive_int, default=16,
                       help="label maps per step (official: 16) (default: %(default)s)")
    probe.add_argument("--lr", type=positive_float, default=1e-3, help="peak learning rate (default: %(default)s)")
    probe.add_argument("--weight-decay", type=non_negative_float, default=1e-4, help="AdamW weight decay (default: %(default)s)")
    probe.add_argument("--seed", type=int, default=0, help="seed of the head's init and batch order (default: %(default)s)")
    probe.add_argument("--overlays", type=int_at_least(0, "a number of images >= 0"), default=8,
                       help="val images drawn in DIR/segmentation_overlays.png, 0 for none (default: %(default)s)")
    segmentation.set_defaults(handler=_segmentation, parser=segmentation)


def _run_protocol(args: argparse.Namespace, evaluate: Callable[..., Any], report: Callable[[dict], str],
                  data: Callable[[], dict[str, Any]] | None = None) -> int:
    """``data()``: open_eval's data arguments (default: ``--data``), built inside its error handling."""
    from dinoreg.eval.context import ResultsWriter, open_eval, resolve_weights  # noqa: PLC0415 (start-up: kornia)
    from dinoreg.eval.features import EvalInputError  # noqa: PLC0415 (start-up: kornia)

    command = f"dinoreg eval {args.protocol}"
    try:
        weights = resolve_weights(weights=args.weights, run=args.run)
        output_dir = args.output_dir or (RunDir(args.run).evaluation(args.protocol, random_init=args.random_init)
                                         if args.run else None)
        if output_dir is None:
            raise EvalInputError("--output-dir DIR is required with --weights (with --run it defaults to "
                                 f"RUN/eval_{args.protocol})")
    except EvalInputError as error:
        print(f"{command}: error: {error}", file=sys.stderr)
        return 2
    try:
        context = open_eval(weights=weights, image_size=args.img_size, resize_size=args.resize_size,
                            batch_size=args.batch_size, num_workers=args.num_workers,
                            max_train_images=args.max_train_images, max_val_images=args.max_val_images,
                            random_init=args.random_init, **(data or (lambda: {"data": args.data}))())
        writer = ResultsWriter(output_dir, enabled=context.is_main)
        try:
            results = evaluate(context, output_dir=output_dir, writer=writer)
            if results is not None:
                print(report(results))
                print(f"wrote {writer.write_results(results)}")
        finally:
            writer.close()
    except EvalInputError as error:
        print(f"{command}: error: {error}", file=sys.stderr)
        return 2
    except (InputError, OSError) as error:
        print(f"{command}: {error}", file=sys.stderr)
        return 1
    finally:
        shutdown_distributed()
    return 0


def _knn(args: argparse.Namespace) -> int:
    from dinoreg.eval.knn import evaluate_knn, format_knn_table  # noqa: PLC0415 (start-up: kornia)

    def evaluate(context: Any, *, output_dir: Path, writer: Any) -> Any:
        features = output_dir / FEATURES_FILES["knn"] if args.save_features else None
        return evaluate_knn(context, ks=args.ks, temperature=args.temperature, avgpool=args.avgpool, writer=writer,
                            save_features=features)

    return _run_protocol(args, evaluate, format_knn_table)


def _linear(args: argparse.Namespace) -> int:
    from dinoreg.eval.linear import LEARNING_RATES, evaluate_linear, format_linear_table  # noqa: PLC0415 (start-up: kornia)

    def evaluate(context: Any, *, output_dir: Path, writer: Any) -> Any:
        return evaluate_linear(context, epochs=args.epochs, batch_size=args.classifier_batch_size,
                               learning_rates=args.learning_rates or LEARNING_RATES, val_fraction=args.val_fraction,
                               seed=args.seed, cache_path=None if args.no_cache else output_dir / FEATURES_FILES["linear"],
                               writer=writer)

    return _run_protocol(args, evaluate, format_linear_table)


def _segmentation(args: argparse.Namespace) -> int:
    from dinoreg.eval.segmentation import (  # noqa: PLC0415 (start-up: matplotlib)
        evaluate_segmentation,
        format_segmentation_table,
        segmentation_splits,
    )

    def data() -> dict[str, Any]:
        splits = segmentation_splits(args.images, args.masks, args.val_images, args.val_masks,
                                     ignore_value=args.ignore_value, classes_file=args.classes)
        return {"data": args.images, "splits": splits, "resize_ratio": 1.0}

    def evaluate(context: Any, *, output_dir: Path, writer: Any) -> Any:
        return evaluate_segmentation(context, n_last_blocks=args.blocks, batch_norm=not args.no_batch_norm,
                                     iterations=args.iterations, batch_size=args.head_batch_size, lr=args.lr,
                                     weight_decay=args.weight_decay, seed=args.seed, overlays=args.overlays,
                                     output_dir=output_dir, writer=writer)

    return _run_protocol(args, evaluate, format_segmentation_table, data)
