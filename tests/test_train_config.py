"""Training configs: defaults are the published settings, JSON + --key=value overrides, errors name the key."""

import json
from pathlib import Path

import pytest

import train_stage1
import train_stage2
import train_stage3
from afine import config
from afine.checkpoint import RANDOM_TINY
from afine.errors import AfineError

ROOT = Path(__file__).resolve().parents[1]
STAGES = {1: train_stage1.Stage1Config, 2: train_stage2.Stage2Config, 3: train_stage3.Stage3Config}


def test_defaults_are_the_published_settings():
    s1, s2, s3 = (cls(out_dir="x") for cls in STAGES.values())
    for cfg in (s1, s2, s3):
        assert cfg.total_iter == 40000
        assert cfg.optim.weight_decay == 1e-3 and cfg.optim.betas == [0.9, 0.99]
        assert cfg.schedule.periods == [10000] * 4 and cfg.schedule.restart_weights == [1, 0.5, 0.5, 0.5]
        assert cfg.schedule.eta_min == 1e-8
    assert (s1.batch_size, s2.batch_size, s3.batch_size) == (32, 128, 128)
    assert (s1.val_every, s2.val_every, s3.val_every) == (1000, 500, 500)
    assert (s1.lr.clip, s1.lr.natural, s2.lr.fidelity) == (5e-6, 5e-6, 5e-4)
    assert (s3.lr.natural_scale, s3.lr.fidelity_scale, s3.lr.adapter) == (1e-3, 1e-3, 1e-3)
    assert (s3.nr_yita3, s3.nr_yita4) == (4.9592, 21.5968)
    assert s2.train_datasets == ["KADID10K", "PIPAL", "TID2013"]
    assert s1.train_datasets == s3.train_datasets == ["DiffIQA", "KADID10K", "PIPAL", "TID2013"]


@pytest.mark.parametrize("stage", [1, 2, 3])
def test_shipped_configs_load_and_carry_the_published_settings(stage):
    cls = STAGES[stage]
    published = config.parse_args(cls, ["--config", str(ROOT / "configs" / f"s{stage}.json")])
    defaults = cls(**{k: getattr(published, k) for k in ("out_dir", "data_root")},
                   **({"clip": published.clip} if stage == 1 else {"stage1_dir": published.stage1_dir}),
                   **({"stage2_dir": published.stage2_dir} if stage == 3 else {}))
    differ = config.differences(config.to_dict(published), config.to_dict(defaults))
    assert set(differ) <= {"workers", "save_every", "cache"}  # cache: the same result, computed faster
    assert stage == 1 or published.cache
    assert published.amp == "off"  # the published training runs in float32 throughout
    demo = config.parse_args(cls, ["--config", str(ROOT / "configs" / f"demo_s{stage}.json")])
    assert demo.device == "cpu" and demo.total_iter <= 400 and demo.schedule.periods == [demo.total_iter]
    if stage == 1:
        assert demo.clip == RANDOM_TINY


def test_json_then_command_line_overrides(tmp_path):
    file = tmp_path / "c.json"
    file.write_text(json.dumps({"out_dir": "runs/a", "batch_size": 8, "schedule": {"periods": [5, 5],
                                                                                  "restart_weights": [1, 0.5]}}))
    cfg = config.parse_args(train_stage1.Stage1Config, ["--config", str(file), "--batch_size=4", "--lr.clip=1e-4",
                                                  "--schedule.eta_min=0", "--train_datasets=KADID10K,PIPAL",
                                                  "--amp=bf16", "--resume=false", "--out_dir=123"])
    assert cfg.batch_size == 4 and cfg.lr.clip == 1e-4 and cfg.lr.natural == 5e-6
    assert cfg.schedule.periods == [5, 5] and cfg.schedule.restart_weights == [1.0, 0.5]
    assert cfg.schedule.eta_min == 0.0 and isinstance(cfg.schedule.eta_min, float)
    assert cfg.train_datasets == ["KADID10K", "PIPAL"] and cfg.amp == "bf16" and cfg.resume is False
    assert cfg.out_dir == "123"  # strings stay strings


@pytest.mark.parametrize("args, words", [
    (["--batchsize=4"], ["--batchsize", "unknown", "batchsize"]),
    (["--lr.text=1"], ["--lr.text", "unknown"]),
    (["--batch_size=four"], ["--batch_size", "int"]),
    (["--resume=maybe"], ["--resume", "true or false"]),
    (["--amp=fp8"], ["amp", "bf16"]),
    (["--optim.eps=-1e-8"], ["optim.eps", ">= 0"]),
    (["--optim.weight_decay=-0.1"], ["optim.weight_decay"]),
    (["--lr.clip=Infinity"], ["lr.clip", "finite"]),
    (["--lr.natural=NaN"], ["lr.natural", "finite"]),
    (["--micro_batch=-3"], ["micro_batch", ">= 0"]),
    (["--grad_accum=0"], ["grad_accum", ">= 1"]),
    (["--total_iter"], ["--total_iter", "value"]),
    (["--schedule.restart_weights=[1]"], ["schedule.restart_weights", "one weight per period"]),
    (["--out_dir="], ["out_dir"]),
    (["--lr=1"], ["--lr", "group"]),
    (["stray"], ["stray"]),
])
def test_command_line_mistakes_name_the_key(args, words):
    with pytest.raises(AfineError) as e:
        config.parse_args(train_stage1.Stage1Config, ["--out_dir=x", *args])
    assert all(w in str(e.value) for w in words), str(e.value)


def test_file_mistakes_name_the_file_and_key(tmp_path):
    file = tmp_path / "bad.json"
    file.write_text(json.dumps({"out_dir": "x", "optim": {"beta": [0.9, 0.99]}}))
    with pytest.raises(AfineError, match=r"bad\.json.*unknown key 'beta'"):
        config.parse_args(train_stage2.Stage2Config, ["--config", str(file), "--stage1_dir=s1"])
    file.write_text(json.dumps({"out_dir": "x", "total_iter": 1.5}))
    with pytest.raises(AfineError, match=r"bad\.json.*total_iter.*int"):
        config.parse_args(train_stage2.Stage2Config, ["--config", str(file), "--stage1_dir=s1"])
    with pytest.raises(AfineError, match="stage2_dir"):
        config.parse_args(train_stage3.Stage3Config, ["--out_dir=x", "--stage2_dir="])


def test_one_spelling_of_options_everywhere():
    # training accepts the spelling of evaluate.py and fit_gamma.py too: --key value, hyphens for underscores
    cfg = config.parse_args(train_stage1.Stage1Config, ["--data-root", "d", "--out_dir", "o", "--lr.clip", "1e-4"])
    assert (cfg.data_root, cfg.out_dir, cfg.lr.clip) == ("d", "o", 1e-4)


def test_help_lists_every_key(capsys):
    import train_stage3

    assert train_stage3.main(["--help"]) == 0
    out = capsys.readouterr().out
    for key in ("--stage2_dir=", "--nr_init_file=", "--lr.adapter=", "--schedule.periods=", "--optim.betas="):
        assert key in out
