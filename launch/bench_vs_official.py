#!/usr/bin/env python3
"""dinoreg's backbone against the official DINOv2 backbone: forward + backward on the same weights and crops.

    git clone https://github.com/facebookresearch/dinov2 /tmp/dinov2    # the official code, not ours to ship
    python launch/bench_vs_official.py --official /tmp/dinov2 --arch vit_small --batch 2

Both backbones get the same state dict (dinoreg's keys are the official ones) and the training crops of one
device: 2 x batch global crops and 8 x batch local crops (224 and 98 px at patch 14). The official model runs
each crop size separately, as it does without xformers (its packed list forward needs xformers' kernels);
dinoreg runs its packed list forward, eager and with ``train.compile=blocks`` (``compile_blocks``). The outputs
are checked to agree first; then the three are timed in interleaved rounds (one step of each per round, so
that machine noise falls on all of them alike) and the medians and ratios printed, and written with --json.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

from dinoreg.models import build_backbone


def _arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--official", type=Path, required=True, metavar="DIR",
                        help="a checkout of facebookresearch/dinov2 (the folder that holds dinov2/)")
    parser.add_argument("--arch", default="vit_small", help="vit_small, vit_base, vit_large or vit_giant2 "
                                                            "(default: %(default)s)")
    parser.add_argument("--registers", type=int, default=4, help="register tokens (default: %(default)s)")
    parser.add_argument("--batch", type=int, default=2, help="images per device (default: %(default)s)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds after one warm-up (default: %(default)s)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the results as JSON to PATH")
    return parser.parse_args()


def _official_backbone(checkout: Path, arch: str, registers: int) -> torch.nn.Module:
    if not (checkout / "dinov2" / "models" / "vision_transformer.py").is_file():
        sys.exit(f"--official {checkout}: no dinov2/models/vision_transformer.py there; clone "
                 "https://github.com/facebookresearch/dinov2 and pass the clone's folder")
    os.environ["XFORMERS_DISABLED"] = "1"  # the official plain-PyTorch path (no xformers kernels on a CPU)
    sys.path.insert(0, str(checkout))
    from dinov2.models import vision_transformer  # noqa: PLC0415 (the user's checkout)

    return getattr(vision_transformer, arch)(patch_size=14, img_size=518, num_register_tokens=registers,
                                             init_values=1e-5, block_chunks=0, interpolate_antialias=True,
                                             interpolate_offset=0.0)


def main() -> int:
    args = _arguments()
    torch.manual_seed(0)
    theirs = _official_backbone(args.official, args.arch, args.registers).train()
    ours = build_backbone(args.arch, patch_size=14, img_size=518, num_register_tokens=args.registers,
                          init_values=1e-5, interpolate_antialias=True, interpolate_offset=0.0).train()
    theirs.load_state_dict(ours.state_dict(), strict=True)
    compiled = build_backbone(args.arch, patch_size=14, img_size=518, num_register_tokens=args.registers,
                              init_values=1e-5, interpolate_antialias=True, interpolate_offset=0.0).train()
    compiled.load_state_dict(ours.state_dict(), strict=True)
    compiled.compile_blocks()
    crops = [torch.randn(2 * args.batch, 3, 224, 224), torch.randn(8 * args.batch, 3, 98, 98)]

    def official_step() -> list[torch.Tensor]:
        outputs = [theirs.forward_features(x)["x_norm_patchtokens"] for x in crops]
        sum(o.square().mean() for o in outputs).backward()
        return outputs

    def our_step(model: torch.nn.Module) -> list[torch.Tensor]:
        outputs = [o["x_norm_patchtokens"] for o in model.forward_features(crops)]
        sum(o.square().mean() for o in outputs).backward()
        return outputs

    steps = {"official": official_step, "dinoreg_eager": lambda: our_step(ours),
             "dinoreg_compiled": lambda: our_step(compiled)}
    reference = [o.detach() for o in official_step()]  # the warm-up round, and the outputs to agree with
    for name in ("dinoreg_eager", "dinoreg_compiled"):
        for got, want in zip(steps[name](), reference):
            torch.testing.assert_close(got.detach(), want, rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}")
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.rounds):
        for name, step in steps.items():
            for model in (theirs, ours, compiled):
                model.zero_grad(set_to_none=True)
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    medians = {name: statistics.median(values) for name, values in times.items()}
    result = {"arch": args.arch, "registers": args.registers, "batch": args.batch, "rounds": args.rounds,
              "torch": torch.__version__, "threads": torch.get_num_threads(), "seconds": times,
              "median_s": medians,
              "eager_over_official": medians["dinoreg_eager"] / medians["official"],
              "compiled_over_official": medians["dinoreg_compiled"] / medians["official"]}
    print(f"{args.arch}/14 with {args.registers} registers, batch {args.batch} (2x224 + 8x98 px crops per image), "
          f"forward + backward, medians of {args.rounds} interleaved rounds on {torch.get_num_threads()} threads:")
    for name, median in medians.items():
        print(f"  {name:17s} {median:.3f} s  ({', '.join(f'{t:.3f}' for t in times[name])})")
    print(f"  dinoreg eager / official {result['eager_over_official']:.2f}x, "
          f"compiled / official {result['compiled_over_official']:.2f}x")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
