import math
import os

import pytest
from omegaconf import DictConfig, OmegaConf

from dinoreg.config import (
    ConfigError,
    apply_scaling_rule,
    build_backbone_from_config,
    available_configs,
    load_config,
    save_config,
)

RECIPES = ["tiny_cpu", "vits14_reg4", "vitb14_reg4", "vitl14_reg4", "vitg14_reg4"]


def config_error(*overrides: str, config=None) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(config, overrides)
    return str(info.value)


# --- recipes and precedence -----------------------------------------------------------------


def test_available_configs_lists_recipes():
    assert set(RECIPES) <= set(available_configs())


@pytest.mark.parametrize("name", RECIPES)
def test_recipe_loads_and_validates(name):
    cfg = load_config(name)
    assert isinstance(cfg, DictConfig)
    assert cfg.student.num_register_tokens == 4
    assert cfg.crops.global_crops_size % cfg.student.patch_size == 0
    assert cfg.crops.local_crops_size % cfg.student.patch_size == 0
    assert cfg.optim.lr > 0  # derived


def test_default_is_tiny_cpu():
    assert load_config() == load_config("tiny_cpu")


def test_large_recipes_follow_official_vitl14():
    cfg = load_config("vitl14_reg4")
    assert cfg.student.arch == "vit_large" and cfg.student.ffn_layer == "mlp"
    assert cfg.train.centering == "sinkhorn_knopp" and cfg.ibot.separate_head
    assert cfg.dino.head_n_prototypes == 131072 and cfg.optim.base_lr == pytest.approx(2e-4)
    assert load_config("vitg14_reg4").student.ffn_layer == "swiglufused"


def test_precedence_defaults_yaml_overrides():
    cfg = load_config("tiny_cpu", ["optim.epochs=3"])
    assert cfg.teacher.teacher_temp == pytest.approx(0.07)  # schema default, not in the YAML
    assert cfg.student.arch == "vit_tiny"  # from the YAML (default is vit_large)
    assert cfg.optim.epochs == 3  # override beats the YAML's 6
    assert load_config("tiny_cpu").optim.epochs == 6


def test_overrides_parse_lists_null_and_later_wins():
    cfg = load_config(
        None,
        ["crops.global_crops_scale=[0.4,1.0]", "student.depth=null", "optim.epochs=2", "optim.epochs=4"],
    )
    assert list(cfg.crops.global_crops_scale) == [0.4, 1.0]
    assert cfg.student.depth is None
    assert cfg.optim.epochs == 4


def test_load_from_path(tmp_path):
    path = tmp_path / "mine.yaml"
    path.write_text("student:\n  arch: vit_small\n  patch_size: 14\ncrops:\n  local_crops_size: 98\n")
    cfg = load_config(path)
    assert cfg.student.arch == "vit_small"
    assert cfg.crops.global_crops_size == 224  # schema default
    assert load_config(str(path)).student.arch == "vit_small"


def test_interpolations_are_resolved():
    cfg = load_config(None, ["train.output_dir=/runs/seed_${train.seed}"])
    assert cfg.train.output_dir == "/runs/seed_0"


# --- errors ---------------------------------------------------------------------------------


def test_unknown_key_suggests_close_match():
    message = config_error("student.num_registers=4")
    assert "student.num_registers" in message
    assert "did you mean student.num_register_tokens" in message


def test_unknown_key_suggests_by_leaf_name():
    assert "did you mean student.arch" in config_error("arch=vit_small")


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "typo.yaml"
    path.write_text("optim:\n  base_lrr: 0.1\n")
    message = config_error(config=path)
    assert "optim.base_lrr" in message and str(path) in message and "optim.base_lr" in message


def test_renamed_official_key():
    message = config_error("train.OFFICIAL_EPOCH_LENGTH=10")
    assert "train.OFFICIAL_EPOCH_LENGTH" in message and "train.epoch_length" in message


def test_a_retired_key_is_refused_in_a_users_config_and_dropped_from_a_saved_one(tmp_path):
    """train.saveckp_freq was in the schema and never read: setting it did nothing. Now a user's config that sets it
    is told what to use; a config.yaml an older dinoreg wrote (it held every key) still loads."""
    message = config_error("train.saveckp_freq=5")
    assert "train.saveckp_freq" in message and "no longer a dinoreg key" in message and "checkpoint.period" in message
    saved = tmp_path / "config.yaml"
    saved.write_text("train:\n  saveckp_freq: 20\n  seed: 3\n")
    assert load_config(saved, saved=True).train.seed == 3
    with pytest.raises(ConfigError, match="train.saveckp_freq"):
        load_config(saved)


@pytest.mark.parametrize("key", ["MODEL.WEIGHTS=''", "compute_precision.grad_scaler=true", "train.cache_dataset=true"])
def test_dropped_official_keys(key):
    message = config_error(key)
    assert key.split(".")[0] in message and "not used by dinoreg" in message and "delete" in message


def test_official_default_config_reports_its_extras(tmp_path):
    path = tmp_path / "official.yaml"
    path.write_text(
        "MODEL:\n  WEIGHTS: ''\ncompute_precision:\n  grad_scaler: true\n"
        "train:\n  OFFICIAL_EPOCH_LENGTH: 1250\n  cache_dataset: true\n"
    )
    message = config_error(config=path)
    assert message.count("not used by dinoreg") == 3 and "train.epoch_length" in message


@pytest.mark.parametrize(
    "override, expected",
    [
        ("train.batch_size_per_gpu=abc", "an integer"),
        ("optim.base_lr=fast", "a number"),
        ("ibot.separate_head=maybe", "true or false"),
        ("crops.global_crops_scale=0.5", "a list of numbers"),
        ("student.patch_size=null", "an integer"),
    ],
)
def test_wrong_type(override, expected):
    message = config_error(override)
    assert override.split("=")[0] in message and expected in message


def test_section_given_a_value():
    assert "student" in config_error("student=3") and "section" in config_error("student=3")


@pytest.mark.parametrize(
    "overrides, key, hint",
    [
        (["student.arch=vit_huge"], "student.arch", "vit_giant2"),
        (["student.ffn_layer=gelu"], "student.ffn_layer", "swiglufused"),
        (["student.attention_backend=flash"], "student.attention_backend", "xformers"),
        (["train.centering=none"], "train.centering", "sinkhorn_knopp"),
        (["optim.scaling_rule=cube"], "optim.scaling_rule", "linear_wrt_1024"),
        (["student.num_register_tokens=-1"], "student.num_register_tokens", ">= 0"),
        (["crops.global_crops_size=50"], "crops.global_crops_size", "48 or 56"),
        (["crops.local_crops_size=30"], "crops.local_crops_size", "24 or 32"),
        (["train.batch_size_per_gpu=1"], "train.batch_size_per_gpu", "KoLeo"),
        (["crops.blur_prob_local=1.5"], "crops.blur_prob_local", "[0, 1]"),
        (["crops.color_jitter=[0.4,0.4,0.2,0.6]"], "crops.color_jitter", "hue <= 0.5"),
        (["crops.color_jitter=[0.4,0.4]"], "crops.color_jitter", "4 strengths"),
        (["ibot.mask_sample_probability=-0.1"], "ibot.mask_sample_probability", "[0, 1]"),
        (["crops.local_crops_scale=[0.5,0.1]"], "crops.local_crops_scale", "0 < lo <= hi <= 1"),
        (["crops.global_crops_scale=[0.0,1.0]"], "crops.global_crops_scale", "0 < lo <= hi <= 1"),
        (["ibot.mask_ratio_min_max=[0.6,0.5]"], "ibot.mask_ratio_min_max", "0 <= lo <= hi <= 1"),
        (["teacher.teacher_temp=0"], "teacher.teacher_temp", "> 0"),
        (["teacher.warmup_teacher_temp=-1"], "teacher.warmup_teacher_temp", "> 0"),
        (["teacher.momentum_teacher=1.2"], "teacher.momentum_teacher", "[0, 1]"),
        (["optim.epochs=0", "optim.warmup_epochs=0"], "optim.epochs", "> 0"),
        (["train.epoch_length=0"], "train.epoch_length", "> 0"),
        (["optim.warmup_epochs=7"], "optim.warmup_epochs", "optim.epochs=6"),
        (["student.embed_dim=100"], "student.embed_dim", "num_heads=3"),
        (["crops.local_crops_number=-1"], "crops.local_crops_number", ">= 0"),
        (["student.drop_path_rate=1.0"], "student.drop_path_rate", "[0, 1)"),
    ],
)
def test_invalid_values(overrides, key, hint):
    message = config_error(*overrides)
    assert key in message and hint in message


def test_malformed_override():
    message = config_error("train.batch_size_per_gpu")
    assert "train.batch_size_per_gpu" in message and "key=value" in message


def test_unknown_config_name_lists_available():
    message = config_error(config="tiny_gpu")
    assert "tiny_gpu" in message and "tiny_cpu" in message and "vitl14_reg4" in message


def test_missing_config_file(tmp_path):
    assert "does not exist" in config_error(config=tmp_path / "nope.yaml")


def test_a_config_folder_is_named_as_a_folder_with_what_to_give(tmp_path, monkeypatch):
    message = config_error(config=str(tmp_path))
    assert f"config '{tmp_path}' is a folder, not a YAML file; give a YAML file such as configs/tiny_cpu.yaml" in message
    assert "does not exist" not in message and len(message.splitlines()) == 1
    (tmp_path / "config.yaml").write_text("optim:\n  epochs: 2\n")  # a run folder: its resolved config
    assert f"such as {tmp_path / 'config.yaml'}" in config_error(config=tmp_path)
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs").mkdir()
    assert "'runs' is a folder" in config_error(config="runs")  # a bare name that is no recipe but a folder
    (tmp_path / "tiny_cpu").mkdir()
    assert load_config("tiny_cpu").student.arch == "vit_tiny"  # a recipe's name still means the recipe


def test_a_config_file_that_is_not_text_is_a_config_error(tmp_path):
    path = tmp_path / "binary.yaml"
    path.write_bytes(bytes(range(128, 256)))
    assert f"config file '{path}' cannot be read (not UTF-8 text)" in config_error(config=path)


@pytest.mark.parametrize("text, problem", [
    ("optim: [1, 2\n", "could not parse YAML at line 2, column 1: did not find expected ',' or ']'"),
    ("optim:\n\tepochs: 2\n", "could not parse YAML at line 2, column 1: found character that cannot start any token"),
])
def test_a_yaml_error_is_one_line_with_its_place(text, problem, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text(text)
    assert config_error(config=path) == f"{path}: {problem}"


@pytest.mark.parametrize("source", ["recipe", "override"])
def test_an_interpolation_of_a_missing_key_is_a_config_error(source, tmp_path):
    path = tmp_path / "recipe.yaml"
    path.write_text("optim:\n  lr: ${nope}\n" if source == "recipe" else "{}\n")
    message = config_error(*(["optim.lr=${nope}"] if source == "override" else []), config=path)
    assert "optim.lr: Interpolation key 'nope' not found" in message


def test_each_problem_is_one_line_of_the_error():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["student.arch=vit_huge", "train.batch_size_per_gpu=1"])
    assert [problem.split(":")[0] for problem in info.value.problems] == ["student.arch", "train.batch_size_per_gpu"]
    assert all("\n" not in problem and problem in str(info.value) for problem in info.value.problems)
    with pytest.raises(ConfigError) as info:
        load_config(None, ["optim.epochs=x"])
    assert info.value.problems == ["optim.epochs (override 'optim.epochs=x'): expected an integer, got 'x'"]
    assert "values are checked once" in str(info.value)  # the note is no problem of its own
    with pytest.raises(ConfigError) as info:
        load_config("no_such_recipe")
    assert info.value.problems == [str(info.value)]


def test_all_problems_reported_together():
    message = config_error("student.num_registers=4", "optim.base_lr=fast", "train.OFFICIAL_EPOCH_LENGTH=1")
    assert all(k in message for k in ("student.num_registers", "optim.base_lr", "train.epoch_length"))
    message = config_error("student.arch=vit_huge", "train.batch_size_per_gpu=1", "teacher.teacher_temp=0")
    assert len([line for line in message.splitlines() if ": got " in line]) == 3


# --- save, scaling --------------------------------------------------------------------------


def test_save_config_round_trip(tmp_path):
    cfg = load_config("vits14_reg4", ["train.seed=7", "train.output_dir=/out/${train.seed}"])
    apply_scaling_rule(cfg, world_size=4)
    path = tmp_path / "run" / "config.yaml"
    save_config(cfg, path)
    assert "${" not in path.read_text()
    assert load_config(path) == cfg
    assert os.listdir(path.parent) == ["config.yaml"]  # no temporary file left behind


def test_save_config_overwrites_atomically(tmp_path):
    path = tmp_path / "config.yaml"
    path.write_text("old")
    save_config(load_config(), path)
    assert OmegaConf.load(path).student.arch == "vit_tiny"
    assert os.listdir(tmp_path) == ["config.yaml"]


def test_apply_scaling_rule():
    cfg = load_config(None, ["optim.base_lr=0.004", "train.batch_size_per_gpu=64"])
    assert apply_scaling_rule(cfg, world_size=4) == pytest.approx(0.002)  # 0.004 * sqrt(256 / 1024)
    assert cfg.optim.lr == pytest.approx(0.002)
    cfg.optim.scaling_rule = "linear_wrt_1024"
    assert apply_scaling_rule(cfg, world_size=4) == pytest.approx(0.001)  # 0.004 * 256 / 1024
    cfg.optim.scaling_rule = "none"
    assert apply_scaling_rule(cfg, world_size=4) == pytest.approx(0.004)


def test_load_derives_single_process_lr():
    cfg = load_config()  # tiny_cpu: batch 32, base_lr 0.01
    assert cfg.optim.lr == pytest.approx(0.01 * math.sqrt(32 / 1024))


def test_the_backbone_family_keys_take_effect_or_are_refused():
    """student.ffn_ratio widens the MLP of either family; a key only RoPE backbones read is refused on a
    learned-position one, and a RoPE backbone refuses what it has no use for, each in one line."""
    learned = build_backbone_from_config(load_config("tiny_cpu", ["student.ffn_ratio=2.0"]), stochastic_depth=False)
    assert learned.blocks[0].mlp.fc1.out_features == 2 * learned.embed_dim
    rope = build_backbone_from_config(load_config("tiny_rope_cpu", ["student.ffn_ratio=2.0"]), stochastic_depth=False)
    assert rope.pos_embed_type == "rope" and rope.blocks[0].mlp.fc1.out_features == 2 * rope.embed_dim
    for config, override, key in (("tiny_cpu", "student.pos_embed_rope_dtype=fp32", "student.pos_embed_rope_dtype"),
                                  ("tiny_cpu", "student.pos_embed_rope_base=10.0", "student.pos_embed_rope_base"),
                                  ("tiny_rope_cpu", "student.drop_path_uniform=false", "student.drop_path_uniform")):
        with pytest.raises(ConfigError) as error:
            load_config(config, [override])
        assert key in str(error.value) and len(str(error.value).splitlines()) <= 2, str(error.value)
