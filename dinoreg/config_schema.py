"""The configuration schema: one dataclass per section, whose defaults *are* the official DINOv2 defaults
(``ssl_default_config.yaml``) plus dinoreg's own keys, and the allowed values of the string keys.
Loading, merging and validation live in :mod:`dinoreg.config`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from dinoreg.data.loader import SAMPLER_ORDERS
from dinoreg.models import ARCH_DIMS, ATTENTION_BACKENDS, CHECKPOINTING_MODES, FFN_LAYERS, ROPE_FFN_LAYERS, ROPE_PRESETS
from dinoreg.models.layers import NORM_LAYERS
from dinoreg.models.rope import ROPE_DTYPES, ROPE_NORMALIZATIONS
from dinoreg.ssl.meta_arch import CENTERINGS

# (embed_dim, depth, num_heads) per architecture, as the model factories define them: DINOv2's learned-position
# ViTs (vit_small ...) and DINOv3's RoPE presets (vits16 ...).
ARCHITECTURES = {**ARCH_DIMS, **{name: (p["embed_dim"], p["depth"], p["num_heads"]) for name, p in ROPE_PRESETS.items()}}
# torch's AdamW kernels (see dinoreg.train.optim.build_optimizer)
ADAMW_IMPLEMENTATIONS = ("auto", "fused", "foreach", "for_loop")


# --- schema (official defaults) -------------------------------------------------------------


@dataclass
class StudentConfig:
    arch: str = "vit_large"
    patch_size: int = 16
    drop_path_rate: float = 0.3
    layerscale: float = 1.0e-5
    drop_path_uniform: bool = True
    pretrained_weights: str = ""
    ffn_layer: str = "mlp"
    block_chunks: int = 0
    qkv_bias: bool = True
    proj_bias: bool = True
    ffn_bias: bool = True
    num_register_tokens: int = 0
    interpolate_antialias: bool = False
    interpolate_offset: float = 0.1
    attention_backend: str = "sdpa"
    # If true, a missing backend (e.g. xformers not installed) is an error instead of a fallback.
    attention_backend_required: bool = False
    # Override the architecture's width / depth / heads; None keeps the value in ARCHITECTURES.
    embed_dim: Optional[int] = None
    depth: Optional[int] = None
    num_heads: Optional[int] = None
    # --- DINOv3's backbone family (its key names). pos_embed_type: "learned" (DINOv2's absolute embeddings) or
    # "rope"; null: the arch's (rope for the presets vits16 ... vit7b16, learned for vit_*). A RoPE backbone's
    # storage tokens are student.num_register_tokens (4 in the released models).
    pos_embed_type: Optional[str] = None
    ffn_ratio: Optional[float] = None  # the MLP width over embed_dim; null: the arch's (4, or the preset's)
    norm_layer: str = "layernorm"  # layernorm (eps 1e-6), layernormbf16 (eps 1e-5, the released models), rmsnorm
    mask_k_bias: bool = False  # no bias on the keys (the released models: true)
    untie_cls_and_patch_norms: bool = False  # a norm of their own for the cls and storage tokens
    untie_global_and_local_cls_norm: bool = False  # ... and in training another for the local crops' (vit7b16)
    pos_embed_rope_base: Optional[float] = 100.0  # periods base ** (4 i / head_dim); or null with min/max periods
    pos_embed_rope_min_period: Optional[float] = None
    pos_embed_rope_max_period: Optional[float] = None
    pos_embed_rope_normalize_coords: str = "separate"  # separate, max or min
    # training-only augmentations of the patch coordinates, drawn per block (null: off)
    pos_embed_rope_shift_coords: Optional[float] = None
    pos_embed_rope_jitter_coords: Optional[float] = None
    pos_embed_rope_rescale_coords: Optional[float] = None  # the released models: 2
    pos_embed_rope_dtype: str = "bf16"  # the dtype of the sines and of the rotation (DINOv3's training default)


@dataclass
class TeacherConfig:
    momentum_teacher: float = 0.992
    final_momentum_teacher: float = 1.0
    warmup_teacher_temp: float = 0.04
    teacher_temp: float = 0.07
    warmup_teacher_temp_epochs: int = 30


@dataclass
class HeadConfig:
    """The keys a projection head's section shares (``dino`` and ``ibot``)."""
    loss_weight: float = 1.0
    head_n_prototypes: int = 65536
    head_bottleneck_dim: int = 256
    head_nlayers: int = 3
    head_hidden_dim: int = 2048
    # the last layer onto the prototypes: weight-normalised (DINOv2's layout, last_layer.weight_g / weight_v in
    # official files) or, false, a plain linear layer (DINOv3's, last_layer.weight; its head_norm_last_layer: false)
    head_weight_norm: bool = True


@dataclass
class DinoConfig(HeadConfig):
    koleo_loss_weight: float = 0.1


@dataclass
class IbotConfig(HeadConfig):
    mask_sample_probability: float = 0.5
    mask_ratio_min_max: List[float] = field(default_factory=lambda: [0.1, 0.5])
    separate_head: bool = False


@dataclass
class TrainConfig:
    batch_size_per_gpu: int = 64
    # "synthetic" (the embedded procedural dataset), a folder of images, or a .txt file of paths.
    dataset_path: str = "synthetic"
    output_dir: str = "."
    seed: int = 0
    # each epoch's shuffled order of the dataset: "randperm" (torch.randperm, an int64 array of the dataset's length
    # per rank: 1.1 GB at 142M images) or "bijection" (a seeded Feistel permutation computed per position, in
    # constant memory); another order, so a run resumes with the value it started with
    sampler_order: str = "randperm"
    num_workers: int = 10
    epoch_length: int = 1250  # official OFFICIAL_EPOCH_LENGTH: iterations per "epoch"
    centering: str = "centering"
    # "auto": bf16 autocast with fp32 master weights and fp32 losses on CUDA, fp32 elsewhere.
    precision: str = "auto"
    # iterations between reads of the steps' figures from the device (one host synchronisation each, none in
    # between) and between plain progress lines when not on a terminal
    log_every: int = 10
    # FSDP2 sharding of student and teacher when several processes train: full_shard | shard_grad_op |
    # no_shard (official: SHARD_GRAD_OP); see dinoreg/train/parallel.py.
    sharding: str = "shard_grad_op"
    # FSDP2 itself: "auto" shards when several processes train; "always" also in one process (a process group of
    # one: DTensor parameters, the optimizer on them and, on GPU, the bf16 MixedPrecisionPolicy instead of autocast),
    # to check or measure the sharded path on one GPU before a cluster run.
    fsdp: str = "auto"
    # where the first weights are drawn: "cpu" (the official initialisation by the CPU generator: the same start
    # on any device and any number of processes) or "device" (built and drawn on the training device by its own
    # generator: seconds instead of a minute for ViT-g, but the start depends on the device; what
    # `dinoreg bench train` uses). Weights loaded from files are the same either way.
    initialisation: str = "cpu"
    log_all_ranks: bool = False  # when several processes train, print warnings of every rank, not just rank 0's
    # torch.compile of each block's attention and FFN branches (static shapes, a graph per crop size), student
    # and teacher: "auto" compiles on CUDA and runs eager elsewhere; "blocks" always; "none" never.
    compile: str = "auto"
    # activation checkpointing of the student's blocks: "none", "selective" (keep matmul and attention outputs,
    # recompute the rest) or "full" (recompute each block in the backward pass); gradients are unchanged
    activation_checkpointing: str = "none"
    # the student sees the global and local crops in one packed pass through the blocks' linear layers (attention
    # per crop group); false: one backbone pass per crop group (the naive way, the same values)
    pack_crops: bool = True
    # the prototype losses (cross-entropies, teacher softmax) work on chunks of rows of at most this many
    # [rows, prototypes] values (64 MiB in fp32: 128 rows of 131,072 prototypes); the small recipes fit in one
    loss_chunk_elements: int = 16777216
    # start student and teacher from a backbone *with its DINO and iBOT heads* (continued pretraining): a dinoreg
    # run or checkpoint (its teacher), a `dinoreg export --with-heads` file, or an official teacher_checkpoint.pth;
    # a backbone alone goes in student.pretrained_weights (then the heads start fresh: see
    # optim.head_warmup_iterations)
    init_from: str = ""


@dataclass
class OptimConfig:
    epochs: int = 100
    weight_decay: float = 0.04
    weight_decay_end: float = 0.4
    base_lr: float = 0.004  # for a total batch size of 1024
    lr: float = 0.0  # derived from base_lr by apply_scaling_rule
    warmup_epochs: int = 10
    min_lr: float = 1.0e-6
    clip_grad: float = 3.0
    freeze_last_layer_epochs: int = 1
    scaling_rule: str = "sqrt_wrt_1024"
    patch_embed_lr_mult: float = 0.2
    layerwise_decay: float = 0.9
    adamw_beta1: float = 0.9
    adamw_beta2: float = 0.999
    # torch's AdamW kernels: "auto" is fused on CUDA (one kernel for all parameters) and foreach (multi-tensor)
    # elsewhere; "foreach" and "for_loop" (the official single-tensor loop) give identical values on CPU.
    adamw_implementation: str = "auto"
    # the first iterations train the heads only: student and teacher backbones stay frozen (no gradient, no
    # update, no EMA), then training goes on with the normal schedules (for a start from a backbone alone)
    head_warmup_iterations: int = 0
    # continued pretraining: parts of the student backbone that never train (patch_embed, cls_token, pos_embed
    # (learned-position backbones only), register_tokens (storage_tokens names the same: a RoPE backbone's),
    # mask_token); their EMA teacher copies stay as loaded
    freeze: List[str] = field(default_factory=list)
    # train only the last N blocks of the student backbone (with its final norm); null: every block
    train_last_blocks: Optional[int] = None
    # when the backbone starts training (after optim.head_warmup_iterations), its learning rate ramps linearly
    # from 0 to the schedule's over this many iterations (the heads keep theirs); 0: no ramp
    unfreeze_ramp_iterations: int = 0


@dataclass
class CropsConfig:
    global_crops_scale: List[float] = field(default_factory=lambda: [0.32, 1.0])
    local_crops_number: int = 8
    local_crops_scale: List[float] = field(default_factory=lambda: [0.05, 0.32])
    global_crops_size: int = 224
    local_crops_size: int = 96
    # Gram anchoring with its own Gram teacher (gram.use_loss, not gram.ema_teacher): the size of the global crops
    # it sees (null: the global crop size; larger: its patch features are resized down to the student's grid).
    # Its crops are the global crops' boxes and flips cut from the image at that size; with
    # gram_teacher_no_distortions without colour, blur or solarisation, else (DINOv3's default) with the global
    # crops' own distortions, applied at that size before the student's crops are resized down (bicubic), as DINOv3.
    gram_teacher_crops_size: Optional[int] = None
    gram_teacher_no_distortions: bool = False
    # The official augmentation hard-codes these; they are keys here so small runs can tune them.
    blur_prob_global1: float = 1.0
    blur_prob_global2: float = 0.1
    blur_prob_local: float = 0.5
    solarization_prob_global2: float = 0.2
    # ColorJitter strengths (brightness, contrast, saturation, hue), applied with p 0.8; official 0.4/0.4/0.2/0.1.
    color_jitter: List[float] = field(default_factory=lambda: [0.4, 0.4, 0.2, 0.1])


@dataclass
class EvaluationConfig:
    eval_period_iterations: int = 12500
    knn_k: int = 20
    knn_temperature: float = 0.07
    knn_enabled: bool = True
    # kNN of the teacher on the synthetic dataset: memory bank from its train split, queries from
    # its held-out split, images resized to crops.global_crops_size.
    knn_train_images: int = 2000
    knn_eval_images: int = 1000
    # The teacher's linear segmentation probe (DINOv2's "linear" head on the last block's patch tokens) on the
    # synthetic label maps, at the same periods as kNN: fitted on segmentation_train_images images of the
    # train split for segmentation_iterations AdamW steps of 16, mIoU on segmentation_eval_images held-out ones.
    segmentation_enabled: bool = False
    segmentation_train_images: int = 1000
    segmentation_eval_images: int = 500
    segmentation_iterations: int = 500


@dataclass
class CheckpointConfig:
    # Iterations between checkpoints (official: every 3 epochs of 1250); 0: none on the way, only at the end
    # (see save_final) and on signals.
    period: int = 3750
    # the checkpoint after the last iteration (with period 0 and this false, only a signal saves one)
    save_final: bool = True
    # the teacher's backbone file (teacher_backbone.safetensors) after the last iteration
    export_teacher: bool = True
    keep_last: int = 3  # newest checkpoints kept (official max_to_keep 3)
    keep_every: int = 0  # also keep every checkpoint whose iteration is a multiple of this (0: none)
    # Signals that make every rank finish its step, save a checkpoint and exit with code 75.
    save_on_signals: List[str] = field(default_factory=lambda: ["SIGUSR1", "SIGUSR2", "SIGTERM"])


@dataclass
class MonitorConfig:
    # The live artifact monitor: every `period` iterations, on a fixed probe batch of `images` images, the
    # teacher's high-norm patch-token fraction per block (relative: above relative_threshold x that block's
    # median norm; absolute: above absolute_threshold, the paper's 150 for ViT-L/g), its norm quantiles per
    # block, and the last block's cls -> register attention mass. 0 turns it off.
    period: int = 1250
    images: int = 16
    relative_threshold: float = 4.0  # as analyze norms, which needs its two modes 4x apart
    absolute_threshold: float = 150.0


@dataclass
class DistillationConfig:
    """DINOv2's distillation: a frozen teacher's DINO and iBOT targets train the student (``student.*``); the
    EMA of the student (``teacher`` in checkpoints) is what the run evaluates and exports."""
    enabled: bool = False
    # the frozen teacher: a dinoreg run or checkpoint (its teacher), a `dinoreg export --with-heads` file, or an
    # official teacher_checkpoint.pth; its architecture comes from the file, its heads must be there
    teacher: str = ""
    # false (DINOv2's distillation): no iBOT masking, the student sees every patch and the iBOT loss scores all
    # patches of the global crops; true: masking as in self-supervised training
    mask_student: bool = False
    # a teacher whose patch size differs from the student's (16 vs 14) sees each crop resized by this method to
    # (student grid) x (teacher patch), so both give the same patch grid and the iBOT targets align patch for patch
    teacher_resize_method: str = "bicubic"
    teacher_resize_antialias: bool = True


@dataclass
class GramConfig:
    """DINOv3's Gram anchoring (its ``gram.*`` keys and defaults, ``dinov3/configs/ssl_default_config.yaml``): the
    MSE between the Gram matrices (patch-to-patch similarities) of the student's global-crop patch tokens and of a
    frozen Gram teacher's, on the same views. Registers and the cls token never enter it."""
    use_loss: bool = False
    compute_stats: bool = False  # also log the loss on the masked and the unmasked tokens (no gradient)
    loss_weight: float = 1.0  # constant weight, unless loss_weight_schedule is set
    # the EMA teacher itself is the Gram teacher (no copy, no refresh, no crops of its own)
    ema_teacher: bool = False
    # a backbone file or run whose (teacher) backbone starts the Gram teacher: anything load_backbone reads
    ckpt: Optional[str] = None
    # at the start of this iteration the EMA teacher's backbone is copied into the Gram teacher (-1: never);
    # until then (without ckpt) there is no Gram teacher and the loss is off
    it_load_ema_teacher: int = -1
    rep_update: bool = True  # refresh the Gram teacher from the EMA teacher ...
    update_frequency: int = 50000  # ... after every iteration i with (i + 1) % update_frequency == 0 ...
    it_first_update: int = 0  # ... and i + 1 >= it_first_update ...
    max_updates: Optional[int] = None  # ... at most this many times (null: no limit)
    normalized: bool = True  # cosine similarities (L2-normalised tokens)
    img_level: bool = False  # one Gram matrix per image; false: one over all tokens of the local batch
    remove_neg: bool = False  # zero the negative similarities of both matrices
    remove_only_teacher_neg: bool = False  # ... of the teacher's only
    tokens_used: str = "all"  # all, masked or unmasked (by the student's iBOT masks; batch-level only)
    global_teacher_resize_method: str = "bicubic"
    global_teacher_resize_antialias: bool = False
    # {start, peak, end, warmup_epochs, cosine_epochs (optional)}: linear warm-up then cosine, epochs of
    # train.epoch_length iterations (DINOv3's linear_warmup_cosine_decay); replaces loss_weight
    loss_weight_schedule: Optional[Dict[str, Any]] = None


@dataclass
class PhaseConfig:
    """A training phase that continues another run, as DINOv2's high-resolution adaptation (its last iterations at
    518 px): this config's own schedules (``optim.*``, counted from 0) and crop sizes, everything else carried over."""
    # a dinoreg run (its newest intact checkpoint) or checkpoint directory: student, teacher, heads, centres and a
    # Gram teacher start as they are there, checked strictly against this config's model; the position embeddings are
    # resampled once to crops.global_crops_size with the student's interpolation (antialiased for *_reg4 recipes)
    start_from: str = ""
    # fresh: a new AdamW; carry: its moments too (a position embedding on a new grid starts fresh)
    optimizer: str = "fresh"


@dataclass
class DinoRegConfig:
    student: StudentConfig = field(default_factory=StudentConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    dino: DinoConfig = field(default_factory=DinoConfig)
    ibot: IbotConfig = field(default_factory=IbotConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    crops: CropsConfig = field(default_factory=CropsConfig)
    evaluation: EvaluationConfig = field(default_factory=EvaluationConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    distillation: DistillationConfig = field(default_factory=DistillationConfig)
    gram: GramConfig = field(default_factory=GramConfig)
    phase: PhaseConfig = field(default_factory=PhaseConfig)


CHOICES = {
    "student.arch": tuple(ARCHITECTURES),
    "student.ffn_layer": tuple(dict.fromkeys((*FFN_LAYERS, *ROPE_FFN_LAYERS))),
    "student.norm_layer": NORM_LAYERS,
    "student.pos_embed_rope_normalize_coords": ROPE_NORMALIZATIONS,
    "student.pos_embed_rope_dtype": tuple(ROPE_DTYPES),
    "student.attention_backend": ATTENTION_BACKENDS,
    "train.centering": CENTERINGS,
    "optim.scaling_rule": ("sqrt_wrt_1024", "linear_wrt_1024", "none"),
    "optim.adamw_implementation": ADAMW_IMPLEMENTATIONS,
    "train.precision": ("auto", "fp32", "bf16"),
    "train.sharding": ("full_shard", "shard_grad_op", "no_shard"),
    "train.compile": ("auto", "blocks", "none"),
    "train.fsdp": ("auto", "always"),
    "train.initialisation": ("cpu", "device"),
    "train.sampler_order": SAMPLER_ORDERS,
    "train.activation_checkpointing": CHECKPOINTING_MODES,
    "gram.tokens_used": ("all", "masked", "unmasked"),
    "phase.optimizer": ("fresh", "carry"),
    "gram.global_teacher_resize_method": ("bicubic", "bilinear", "nearest", "area"),
    "distillation.teacher_resize_method": ("bicubic", "bilinear", "nearest", "area"),
}

# Official keys that we renamed, and official keys we deliberately dropped (with why).
RENAMED_KEYS = {"train.OFFICIAL_EPOCH_LENGTH": "train.epoch_length"}
# Keys dinoreg itself once had and removed, with what to use instead. A user's config that sets one is refused
# with that advice; a config dinoreg saved (config.yaml of a run or checkpoint) holds them only because an older
# version wrote every key, and they are dropped when it is read (each never had an effect).
RETIRED_KEYS = {"train.saveckp_freq": "it never had an effect; checkpoints are saved every checkpoint.period "
                                      "iterations (the official saveckp_freq epochs x train.epoch_length)"}
UNUSED_KEYS = {
    "MODEL": "to start from weights use student.pretrained_weights",
    "compute_precision": "precision and sharding are chosen by dinoreg.train.parallel",
    "train.cache_dataset": "datasets are never cached in memory",
}
