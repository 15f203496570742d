"""config.py and the config resolution of `facegan train` (train/preflight.py `resolve_config`):
the merge order (dataclass default < preset < --config file < explicit flag, and a resumed run's
saved config as the base), the coercion of values read from a file, validation errors that name
the flag, frozen configs. No torch model, no training: configs, small files, one fake checkpoint.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from facegan_dist.config import (
    AUGMENT_CHOICES,
    DEFAULT_PRESET,
    PRESETS,
    ShardConfig,
    SynthConfig,
    TrainConfig,
    dumps,
    load_config_file,
    merge_train_config,
    parse_policy,
    to_jsonable,
    train_config_from_json,
)
from facegan_dist.errors import CheckpointError, ConfigError
from facegan_dist.train.preflight import resolve_config

DEFAULTS = {f.name: f.default for f in dataclasses.fields(TrainConfig)}


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def merged(tmp_path: Path | None = None, file: str | None = None, name: str = "c.toml",
           preset: str | None = None, **flags) -> TrainConfig:  # fmt: skip
    """merge_train_config with an optional config file holding `file`; --data defaults to x."""
    path = write(tmp_path, name, file) if file is not None else None
    return merge_train_config(preset, path, {"data": "x", **flags})


# ---- merge order ----


def test_each_layer_beats_the_one_below(tmp_path):
    """lr_g: default 2e-4, paper-dcgan preset 1e-4, file 3e-4, flag 5e-4; each layer shows
    through exactly when nothing above it sets the value."""
    assert DEFAULTS["lr_g"] == 2e-4 and PRESETS["paper-dcgan"]["lr_g"] == 1e-4
    assert merged(preset="tutorial").lr_g == 2e-4
    assert merged(preset="paper-dcgan").lr_g == 1e-4
    assert merged(tmp_path, "lr_g = 3e-4\n", preset="paper-dcgan").lr_g == 3e-4
    assert merged(tmp_path, "lr_g = 3e-4\n", preset="paper-dcgan", lr_g=5e-4).lr_g == 5e-4
    # a field no preset sets: default < file < flag
    assert not any("seed" in p for p in PRESETS.values())
    assert merged().seed == 0
    assert merged(tmp_path, "seed = 7\n").seed == 7
    assert merged(tmp_path, "seed = 7\n", seed=9).seed == 9


def test_an_omitted_flag_never_clobbers_the_file_or_the_preset(tmp_path):
    """`flags` holds what the command line states; a None value counts as not given."""
    cfg = merged(tmp_path, "batch = 32\n", preset="paper-dcgan", batch=None, lr_d=None)
    assert cfg.batch == 32 and cfg.lr_d == 1e-4


def test_the_default_preset_applies_when_none_is_named():
    cfg = merged()
    assert cfg.preset == DEFAULT_PRESET
    for k, v in PRESETS[DEFAULT_PRESET].items():
        assert getattr(cfg, k) == v, k


def test_a_preset_named_in_the_file_applies_and_a_preset_flag_beats_it(tmp_path):
    text = 'preset = "paper-mlp-leaky"\n'
    cfg = merged(tmp_path, text)
    assert (cfg.preset, cfg.arch, cfg.act, cfg.epochs) == ("paper-mlp-leaky", "mlp", "leaky", 50)
    # as cli/train.py calls it: a typed --preset is the preset argument and one of the flags
    path = write(tmp_path, "c.toml", text)
    cfg = merge_train_config("wgan-gp", path, {"data": "x", "preset": "wgan-gp"})
    assert (cfg.preset, cfg.arch, cfg.loss, cfg.d_steps) == ("wgan-gp", "dcgan", "wgan-gp", 5)
    assert cfg.run_dir == Path("runs/wgan-gp")


def test_the_preset_argument_counts_as_a_typed_preset(tmp_path):
    """merge_train_config(preset, ...) without "preset" in `flags` (core callers: tests, bench)
    applies the argument's preset but labels the config with the file's preset, and over a
    resumed run's saved config it does not apply the preset at all but says it did."""
    cfg = merged(tmp_path, 'preset = "paper-mlp-leaky"\n', preset="wgan-gp")
    assert cfg.loss == "wgan-gp"  # the argument's preset was applied...
    saved = {"data": "x", "preset": "paper-dcgan", "lr_g": 3e-3}
    resumed = merge_train_config("tutorial", None, {}, base=saved)
    assert resumed.preset == "tutorial"  # ...and named, but not applied over the base:
    assert (cfg.preset, resumed.lr_g) == ("wgan-gp", 2e-4)  # paper-mlp-leaky, 3e-3


def test_unknown_preset_names_the_flag(tmp_path):
    with pytest.raises(ConfigError, match=r"^--preset 'nope' must be one of .*quality"):
        merged(preset="nope")
    with pytest.raises(ConfigError, match=r"^--preset 'nope'"):
        merged(tmp_path, 'preset = "nope"\n')


def test_d_steps_follows_the_loss_unless_given(tmp_path):
    assert merged(loss="ns").d_steps == 1
    assert merged(loss="wgan").d_steps == 5 and merged(loss="wgan-gp").d_steps == 5
    assert merged(tmp_path, 'loss = "wgan"\n').d_steps == 5
    assert merged(loss="wgan", d_steps=2).d_steps == 2
    assert merged(tmp_path, "d_steps = 3\n", loss="wgan").d_steps == 3


def test_an_explicit_epochs_beats_a_presets_max_steps(tmp_path):
    assert PRESETS["demo"]["max_steps"] == 3000
    assert merged(preset="demo").max_steps == 3000
    assert merged(preset="demo", epochs=2).max_steps is None
    assert merged(tmp_path, "epochs = 2\n", preset="demo").max_steps is None
    both = merged(preset="demo", epochs=2, max_steps=10)
    assert (both.epochs, both.max_steps) == (2.0, 10)


def test_a_saved_base_is_kept_unless_a_preset_is_named_again(tmp_path):
    """Resume: the saved config is the base; the preset is not re-applied over it unless the
    command line (or its file) names one; explicit flags still win."""
    saved = {"data": "x", "preset": "paper-dcgan", "lr_g": 3e-3, "batch": 48, "loss": "minimax"}
    cfg = merge_train_config(None, None, {"max_steps": 9}, base=saved)
    assert (cfg.preset, cfg.lr_g, cfg.batch, cfg.max_steps) == ("paper-dcgan", 3e-3, 48, 9)
    assert cfg.betas_g == DEFAULTS["betas_g"]  # not in the base, no preset re-applied: default
    again = merge_train_config("paper-dcgan", None, {"preset": "paper-dcgan"}, base=saved)
    assert again.lr_g == 1e-4 and again.betas_g == (0.5, 0.999) and again.batch == 128
    file = merge_train_config(None, write(tmp_path, "c.toml", 'preset = "tutorial"\n'), {},
                              base=saved)  # fmt: skip
    assert (file.preset, file.lr_g, file.loss) == ("tutorial", 2e-4, "ns")
    flag = merge_train_config(None, None, {"lr_g": 7e-4}, base=saved)
    assert flag.lr_g == 7e-4 and flag.batch == 48


def test_a_saved_config_round_trips_to_the_same_config(tmp_path):
    """What resume relies on: config.json (dumps) read back as the base rebuilds the config."""
    cfg = merged(tmp_path, 'betas_g = [0.1, 0.2]\nout = "runs/r"\naugment = "color"\n',
                 preset="demo", data=tmp_path / "shards", ema_rampup=None)  # fmt: skip
    saved = json.loads(dumps(cfg))
    assert saved["betas_g"] == [0.1, 0.2] and saved["out"] == "runs/r"  # plain JSON types
    assert to_jsonable(cfg) == saved
    back = merge_train_config(None, None, {}, base=train_config_from_json(saved))
    assert back == cfg
    # keys written by a newer version are dropped, not refused
    assert "future_knob" not in train_config_from_json({**saved, "future_knob": 1})


# ---- config files: formats, coercion, errors ----


@pytest.mark.parametrize(
    "name, text",
    [
        ("c.toml", 'lr-g = 3e-4\nbetas_g = "0.1,0.2"\nhflip = true\nz_dim = 64\n'),
        ("c.yaml", "lr-g: 3.0e-4\nbetas_g: [0.1, 0.2]\nhflip: yes\nz_dim: 64\n"),
        ("c.yml", "lr_g: 0.0003\nbetas_g: 0.1, 0.2\nhflip: 'on'\nz_dim: 64.0\n"),
        ("c.json", '{"lr_g": 0.0003, "betas-g": [0.1, 0.2], "hflip": "true", "z_dim": "64"}'),
    ],
)
def test_each_format_gives_the_same_typed_values(tmp_path, name, text):
    """TOML, YAML and JSON; flag names with - or _; tuples from strings or lists; numbers
    from strings or floats that are whole; booleans from words."""
    cfg = merged(tmp_path, text, name=name)
    assert cfg.lr_g == 3e-4 and type(cfg.lr_g) is float
    assert cfg.betas_g == (0.1, 0.2) and type(cfg.betas_g) is tuple
    assert cfg.hflip is True
    assert cfg.z_dim == 64 and type(cfg.z_dim) is int


def test_file_values_are_coerced_to_the_field_types(tmp_path):
    text = ("data: shards/a\nout: runs/b\ninception_weights: w.pth\ndata_timeout: 5\n"
            "epochs: 2\nmax_steps: '10'\nema_rampup: 1\nchannels_last: 'no'\nmbstd: 0\n"
            "seed: '3'\n")  # fmt: skip
    cfg = merge_train_config(None, write(tmp_path, "c.yaml", text), {})
    assert cfg.data == Path("shards/a") and isinstance(cfg.data, Path)
    assert cfg.out == Path("runs/b") and cfg.inception_weights == Path("w.pth")
    assert cfg.data_timeout == 5.0 and type(cfg.data_timeout) is float
    assert cfg.epochs == 2.0 and type(cfg.epochs) is float  # float | None
    assert cfg.max_steps == 10 and type(cfg.max_steps) is int  # int | None
    assert cfg.ema_rampup == 1.0 and type(cfg.ema_rampup) is float
    assert cfg.channels_last is False and cfg.mbstd is False  # bool | None, bool
    assert cfg.seed == 3 and type(cfg.seed) is int


def test_a_url_data_stays_the_string_it_is(tmp_path):
    """`Path | str`: Path("https://host/x") would fold the // into one slash."""
    cfg = merge_train_config(None, write(tmp_path, "c.toml", 'data = "https://host/s"\n'), {})
    assert cfg.data == "https://host/s" and isinstance(cfg.data, str)
    flag = merge_train_config(None, None, {"data": "pipe:cat {name}"})
    assert flag.data == "pipe:cat {name}"


@pytest.mark.parametrize(
    "text, needle",
    [
        ("z_dim = 64.5\n", "--z-dim 64.5 is not a valid int"),
        ('batch = "many"\n', "--batch 'many' is not a valid int"),
        ('lr_d = "fast"\n', "--lr-d 'fast' is not a valid float"),
        ('betas_g = "a,b"\n', "--betas-g 'a,b' is not a valid tuple"),
        ("betas_d = 0.5\n", "--betas-d 0.5 is not a valid tuple"),
        ("data = 5\n", "--data 5 is not a valid Path"),
    ],
)
def test_a_file_value_of_the_wrong_type_names_the_flag(tmp_path, text, needle):
    with pytest.raises(ConfigError) as exc:
        merge_train_config(None, write(tmp_path, "c.toml", text), {})
    assert str(exc.value).startswith(needle), str(exc.value)


def test_unknown_keys_are_refused_naming_the_key_and_the_file(tmp_path):
    path = write(tmp_path, "c.yaml", "lr_g: 0.001\nlearning_rate: 0.1\n")
    with pytest.raises(ConfigError) as exc:
        merge_train_config(None, path, {"data": "x"})
    assert str(exc.value) == f"--config {path}: unknown option 'learning_rate'"
    with pytest.raises(ConfigError, match=r"^flag: unknown option 'bogus'"):
        merge_train_config(None, None, {"data": "x", "bogus": 1})


@pytest.mark.parametrize(
    "name, text, needle",
    [
        ("c.toml", "batch = [\n", "cannot parse"),
        ("c.yaml", "a: [1\n", "cannot parse"),
        ("c.json", "{", "cannot parse"),
        ("c.json", "[1, 2]", "expected a table/mapping"),
        ("c.ini", "batch = 1\n", "use a .toml, .yaml/.yml or .json file"),
    ],
)
def test_bad_config_files_are_one_line_naming_the_file(tmp_path, name, text, needle):
    path = write(tmp_path, name, text)
    with pytest.raises(ConfigError) as exc:
        load_config_file(path)
    msg = str(exc.value)
    assert msg.startswith(f"--config {path}: ") and needle in msg and "\n" not in msg, msg


def test_a_missing_config_file_names_it(tmp_path):
    with pytest.raises(ConfigError, match=r"^--config .*nope\.toml: file not found$"):
        load_config_file(tmp_path / "nope.toml")


def test_an_empty_yaml_file_is_no_options(tmp_path):
    assert load_config_file(write(tmp_path, "c.yaml", "")) == {}


def test_a_boolean_that_is_not_a_boolean_word_is_refused(tmp_path):
    with pytest.raises(ConfigError, match=r"^--mbstd 'ture'"):
        merged(tmp_path, 'mbstd = "ture"\n')


def test_a_list_for_augment_is_read_as_its_policies(tmp_path):
    cfg = merged(tmp_path, "augment: [color, cutout]\n", name="c.yaml")
    assert cfg.augment == "color,cutout"
    cfg.validate()


def test_a_non_string_for_a_string_option_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match=r"^--condition 5 is not a valid str"):
        merged(tmp_path, "condition = 5\n")
    with pytest.raises(ConfigError, match=r"^--resume 5 is not a valid str"):
        merged(tmp_path, "resume = 5\n")


# ---- validation names the flag ----


def test_parse_policy():
    assert parse_policy(None) == parse_policy("") == parse_policy("none") == ()
    assert parse_policy("color, cutout,") == ("color", "cutout")
    assert parse_policy(",".join(AUGMENT_CHOICES)) == AUGMENT_CHOICES
    with pytest.raises(ConfigError, match=r"^--augment 'blur': each policy must be one of color"):
        parse_policy("color,blur")


@pytest.mark.parametrize(
    "flags, needle",
    [
        ({"data": None}, "--data is required"),
        ({"augment": "color,blur"}, "--augment 'blur': each policy must be one of"),
        ({"loss": "l2"}, "--loss 'l2' must be one of ns, minimax, wgan, wgan-gp, hinge"),
        ({"eval_features": "clip"}, "--eval-features 'clip' must be one of attributes, incep"),
        ({"wandb_mode": "loud"}, "--wandb-mode 'loud' must be one of"),
        ({"batch": 0}, "--batch 0 must be at least 1"),
        ({"keep": 0}, "--keep 0 must be at least 1"),
        ({"dropout": 1.0}, "--dropout 1.0 must be in [0, 1)"),
        ({"lr_d": 0.0}, "--lr-d 0.0 must be > 0"),
        ({"lr_decay": 1.5}, "--lr-decay 1.5 must be in [0, 1]"),
        ({"lr_decay": 0.5, "cuda_graphs": True}, "--cuda-graphs captures the learning rate"),
        ({"betas_g": (0.5, 1.0)}, "--betas-g (0.5, 1.0) must be two numbers in [0, 1)"),
        ({"betas_d": "0.1,0.2,0.3"}, "--betas-d (0.1, 0.2, 0.3) must be two numbers"),
        ({"d_steps": 33}, "--d-steps 33 must be at most 32"),
        ({"d_every": 2, "d_steps": 2}, "--d-steps must be 1 when --d-every > 1"),
        ({"r1": 1.0, "loss": "wgan"}, "--r1 is for the ns/minimax/hinge losses"),
        ({"mbstd": True, "arch": "mlp"}, "--mbstd is a DCGAN discriminator layer"),
        ({"epochs": 0, "max_steps": None}, "--epochs must be > 0 (or give --max-steps)"),
        ({"max_steps": 0}, "--max-steps 0 must be at least 1"),
        ({"eval_every": 5, "data": "https://h/s"}, "--eval-every needs a local --data"),
        ({"exact": True, "precision": "bf16"}, "--exact excludes"),
        ({"cuda_graphs": True, "augment": "color"}, "--cuda-graphs needs one D step"),
        ({"rollback_lr_factor": 0}, "--rollback-lr-factor 0.0 must be in (0, 1]"),
        ({"restart": True, "resume": "auto"}, "--restart starts the run over"),
    ],
)
def test_validation_errors_name_the_flag(flags, needle):
    cfg = merge_train_config(None, None, {"data": "x", **flags})
    with pytest.raises(ConfigError) as exc:
        cfg.validate()
    assert str(exc.value).startswith(needle), str(exc.value)


def test_the_default_config_is_valid_and_validate_returns_it():
    cfg = merged()
    assert cfg.validate() is cfg


@pytest.mark.parametrize(
    "make, needle",
    [
        (lambda: SynthConfig(out=Path("o"), count=0), "--count 0 must be at least 1"),
        (lambda: SynthConfig(out=Path("o"), layout="x"), "--layout 'x' must be one of kaggle"),
        (lambda: ShardConfig(Path("s"), Path("o"), size=48), "--size 48 must be one of"),
        (lambda: ShardConfig(Path("s"), Path("o"), crop="x"), "--crop 'x' must be one of"),
        (lambda: ShardConfig(Path("s"), Path("o"), quality=0), "--quality 0 must be in 1..100"),
        (lambda: ShardConfig(Path("s"), Path("o"), limit=0), "--limit 0 must be at least 1"),
    ],
)
def test_synth_and_shard_validation_name_the_flag(make, needle):
    with pytest.raises(ConfigError) as exc:
        make().validate()
    assert str(exc.value).startswith(needle), str(exc.value)


# ---- frozen, derived values ----


def test_a_config_is_frozen():
    cfg = merged()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.lr_g = 1.0  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        SynthConfig(out=Path("o")).count = 3  # type: ignore[misc]
    changed = dataclasses.replace(cfg, lr_g=1.0)
    assert changed.lr_g == 1.0 and cfg.lr_g == 2e-4  # a new object; the old one unchanged


def test_derived_values_are_computed_not_stored():
    cfg = merged(preset="tutorial")
    assert cfg.run_dir == Path("runs/tutorial") and merged(out=Path("r")).run_dir == Path("r")
    assert cfg.resolved_d_norm == "batch" and cfg.d_norm == "auto"
    assert merged(loss="wgan-gp").resolved_d_norm == "none"
    assert merged(spectral_norm="d").resolved_d_norm == "none"
    assert merged(spectral_norm="g").resolved_d_norm == "batch"
    assert merged(d_norm="batch", loss="wgan-gp").resolved_d_norm == "batch"
    cpu, cuda = cfg.fast_settings("cpu"), cfg.fast_settings("cuda")
    assert cpu["channels_last"] and not cpu["tf32"] and not cpu["fused_adam"]
    assert cuda["channels_last"] and cuda["tf32"] and cuda["fused_adam"]
    exact = merged(exact=True).fast_settings("cuda")
    assert exact["deterministic"] and not any(v for k, v in exact.items() if k != "deterministic")
    assert not merged(tf32=False).fast_settings("cuda")["tf32"]  # explicit beats auto


# ---- resolve_config (what `facegan train` calls) ----


def fake_checkpoint(run_dir: Path, step: int, config: dict) -> Path:
    """A checkpoint folder that `checkpoint.check_files` reads back as intact (tiny files)."""
    from safetensors.torch import save_file

    ckpt = run_dir / "checkpoints" / f"step-{step:09d}"
    ckpt.mkdir(parents=True)
    for name in ("model", "model_1"):
        save_file({"w": torch.zeros(2)}, str(ckpt / f"{name}.safetensors"))
    for name in ("optimizer", "optimizer_1"):
        torch.save({"state": {}, "param_groups": []}, ckpt / f"{name}.bin")
    state = {"step": step, "config": config, "tensor_files": []}
    (ckpt / "trainer_state.json").write_text(json.dumps(state))
    return ckpt


def test_resolve_config_for_a_fresh_run_validates(tmp_path):
    cfg, ckpt = resolve_config("demo", None, {"data": tmp_path, "out": tmp_path / "r"})
    assert ckpt is None and cfg.preset == "demo" and cfg.data == tmp_path
    with pytest.raises(ConfigError, match=r"^--batch 0"):
        resolve_config(None, None, {"data": tmp_path, "out": tmp_path / "r", "batch": 0})
    # --resume auto without a checkpoint is a fresh run
    cfg, ckpt = resolve_config(None, None, {"data": tmp_path, "out": tmp_path, "resume": "auto"})
    assert ckpt is None and cfg.resume == "auto"


def test_resolve_config_refuses_restart_with_resume_and_a_missing_checkpoint(tmp_path):
    # refused before any checkpoint is looked at (this damaged one would be another error)
    damaged = tmp_path / "checkpoints" / "step-000000001"
    damaged.mkdir(parents=True)
    (damaged / "trainer_state.json").write_text("{}")
    with pytest.raises(ConfigError, match=r"^--restart starts the run over"):
        resolve_config(None, None, {"data": "x", "out": tmp_path, "restart": True,
                                    "resume": "auto"})  # fmt: skip
    with pytest.raises(CheckpointError, match=r"^--resume auto: no intact checkpoint"):
        resolve_config(None, None, {"data": "x", "out": tmp_path, "resume": "auto"})
    with pytest.raises(CheckpointError, match=r"^--resume .*nope: not a complete checkpoint"):
        resolve_config(None, None, {"data": "x", "resume": str(tmp_path / "nope")})


def test_resolve_config_on_resume_starts_from_the_saved_config(tmp_path):
    """The checkpoint's config is the base: omitted flags keep its values (not the defaults or
    the preset's), explicit flags win, and the saved resume/restart are not inherited."""
    run = tmp_path / "run"
    given = {"data": tmp_path / "shards", "out": run, "lr_g": 3e-3, "batch": 48, "restart": True}
    first = merge_train_config("demo", None, given)
    saved = {**to_jsonable(first), "resume": "elsewhere"}
    ckpt = fake_checkpoint(run, 40, saved)
    cfg, found = resolve_config(None, None, {"out": run, "resume": "auto", "max_steps": 80})
    assert found == ckpt
    assert cfg.data == tmp_path / "shards" and isinstance(cfg.data, Path)  # from the checkpoint
    assert (cfg.preset, cfg.lr_g, cfg.batch, cfg.max_steps) == ("demo", 3e-3, 48, 80)
    assert cfg.resume == "auto" and cfg.restart is False
    # a typed --preset (cli/train.py passes it as the argument and as a flag) is re-applied
    flags = {"out": run, "resume": "auto", "max_steps": 80, "preset": "tutorial"}
    cfg, _ = resolve_config("tutorial", None, flags)
    assert (cfg.preset, cfg.lr_g, cfg.batch) == ("tutorial", 2e-4, 128)
