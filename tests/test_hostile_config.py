"""Configs and command lines as hostile input: they may not run code, and bad values are refused before anything is written."""

from __future__ import annotations

import inspect
import sys
import time
from pathlib import Path

import pytest

from medssl_scale.config import MAX_BYTES, load_yaml
from medssl_scale.data import augments
from medssl_scale.data.config import Augment, DataConfig
from medssl_scale.train.config import load_run_config

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "dae" / "tiny.yaml"

# A module that leaves a marker when imported and when its "reader" is called: MONAI's dotted-path
# resolution (LoadImaged(reader="mod.Reader")) would do both.
MARKER_MODULE = """
from pathlib import Path
HERE = Path(__file__).parent
(HERE / "imported.marker").write_text("imported")

def Reader(*args, **kwargs):
    (HERE / "called.marker").write_text("called")
    raise SystemExit("a config ran code")
"""


@pytest.fixture
def marker_module(tmp_path, monkeypatch):
    mod = tmp_path / "mod"
    mod.mkdir()
    (mod / "medssl_marker_mod.py").write_text(MARKER_MODULE)
    monkeypatch.syspath_prepend(str(mod))
    yield mod
    sys.modules.pop("medssl_marker_mod", None)


def _run_config(tmp_path: Path, augment: str) -> Path:
    text = TINY.read_text().replace("data:\n", f"data:\n  augment: {augment}\n", 1)
    assert "augment:" in text
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("augment", [
    "[{name: LoadImaged, args: {keys: [image], reader: medssl_marker_mod.Reader}}]",  # the example
    "[{name: RandGaussianNoised, args: {std: medssl_marker_mod.Reader}}]",  # an allowed transform, a string where a number goes
    "[{name: RandAffined, args: {mode: medssl_marker_mod.Reader}}]",  # a string outside its fixed choices
    "[{name: RandGaussianNoised, args: {dtype: medssl_marker_mod.Reader}}]",  # an argument not listed (MONAI resolves dtypes)
    "[{name: RandAffined, args: {device: medssl_marker_mod.Reader}}]",
    "[{name: RandGaussianNoised, args: {keys: [medssl_marker_mod.Reader]}}]",
    "[{name: RandGaussianNoised, args: {std: [medssl_marker_mod.Reader]}}]",
    "[{name: RandGaussianNoised, args: {std: {a: medssl_marker_mod.Reader}}}]",
    "[{name: Compose, args: {transforms: [medssl_marker_mod.Reader]}}]",
    "[{name: Lambdad, args: {keys: [image], func: medssl_marker_mod.Reader}}]",
])
def test_augment_strings_never_reach_monai(tmp_path, marker_module, augment):
    with pytest.raises(ValueError, match=r"data\.augment\.0") as e:
        load_run_config(_run_config(tmp_path, augment), ["data.dataset=unused"])
    assert any(w in str(e.value) for w in ("refused", "may name", "not an argument"))
    assert not list(marker_module.glob("*.marker")) and "medssl_marker_mod" not in sys.modules


def test_build_augment_rechecks_what_skipped_validation(marker_module):
    from medssl_scale.data.transforms import build_augment

    unchecked = Augment.model_construct(name="LoadImaged", args={"keys": ["image"], "reader": "medssl_marker_mod.Reader"})
    with pytest.raises(ValueError, match="LoadImaged.*may name"):
        build_augment([unchecked], ["image"])
    sneaky = Augment.model_construct(name="RandGaussianNoised", args={"std": "medssl_marker_mod.Reader"})
    with pytest.raises(ValueError, match="RandGaussianNoised.std.*never a string"):
        build_augment([sneaky], ["image"])
    assert not list(marker_module.glob("*.marker")) and "medssl_marker_mod" not in sys.modules


REQUIRED = {"RandScaleIntensityd": {"factors": 0.1}, "RandShiftIntensityd": {"offsets": [-0.1, 0.1]},
            "RandStdShiftIntensityd": {"factors": 0.1}, "RandCoarseDropoutd": {"holes": 2, "spatial_size": [4, 4, -1]},
            "RandCoarseShuffled": {"holes": 2, "spatial_size": 4}, "Rand3DElasticd": {"sigma_range": [1, 2], "magnitude_range": [1, 2]}}


def test_every_allowed_transform_builds_with_the_listed_arguments():
    import monai.transforms as mt

    from medssl_scale.data.transforms import build_augment

    for name in augments.ALLOWED:
        params = inspect.signature(getattr(mt, name)).parameters
        missing = set(augments.arguments(name)) - set(params)
        assert not missing, f"{name} takes no {missing} in this MONAI"
        aug = Augment(name=name, args={"prob": 1.0, **REQUIRED.get(name, {})})
        assert build_augment([aug], ["image"]) is not None
    # Intensity transforms for views, and spatial ones refused there.
    assert build_augment([Augment(name="RandGaussianNoised", args={"prob": 1.0, "std": 0.1})], ["image"], geometric_ok=False)
    with pytest.raises(ValueError, match="overlap boxes"):
        build_augment([Augment(name="RandAffined", args={"rotate_range": [0.1, 0.1, 0.1]})], ["image"], geometric_ok=False)


@pytest.mark.parametrize("args, key", [
    ({"prob": float("nan")}, "prob"), ({"prob": 1.5}, "prob"), ({"std": float("inf")}, "std"), ({"std": -1}, "std"),
    ({"std": True and "0.1"}, "std"), ({"sample_std": "yes"}, "sample_std"),
])
def test_augment_numbers_are_finite_and_typed(args, key):
    with pytest.raises(ValueError, match=rf"RandGaussianNoised\.{key}"):
        DataConfig(dataset="unused", augment=[{"name": "RandGaussianNoised", "args": args}])


@pytest.mark.parametrize("override, key", [
    ("optim.lr=.nan", "optim.lr"), ("optim.lr=.inf", "optim.lr"), ("optim.min_lr=nan", "optim.min_lr"),
    ("optim.weight_decay=.inf", "optim.weight_decay"), ("optim.betas=[0.9, .nan]", "optim.betas"),
    ("optim.betas=[0.9, 1.0]", "optim.betas"), ("optim.clip_grad=.inf", "optim.clip_grad"),
    ("objectives.dae=.nan", "objectives.dae"), ("objectives.dae=.inf", "objectives.dae"),
    ("objectives.dae={weight: .nan}", "objectives"), ("objectives.dae={weight: 0}", "objectives"),
    ("objectives.dae={noise_variance: .nan}", "objectives.dae.noise_variance"),
    ("objectives.dae={model: {name: swin_unetr, feature_size: .nan}}", "objectives.dae.model.feature_size"),
    ("data.crop=0", "data.crop"), ("data.crop=[16, -1, 16]", "data.crop"), ("data.crop=[16, 16]", "data.crop"),
    ("data.normalize.ct_window=[100, 100]", "data.normalize.ct_window"),
    ("data.normalize.ct_window=[200, -100]", "data.normalize.ct_window"),
    ("data.normalize.ct_window=[-1000, .inf]", "data.normalize.ct_window"),
    ("data.normalize.ct_range=[0, .nan]", "data.normalize.ct_range"),
    ("data.modality_weights={CT: .nan, MR: 1}", "data.modality_weights.CT"),
    ("data.modality_weights={CT: -1, MR: 1}", "data.modality_weights.CT"),
    ("data.batch_size=0", "data.batch_size"), ("data.crops_per_visit=0", "data.crops_per_visit"),
    ("data.interleave=0", "data.interleave"), ("data.samples_per_epoch=0", "data.samples_per_epoch"),
    ("data.prefetch=0", "data.prefetch"), ("data.shuffle_buffer=0", "data.shuffle_buffer"),
    ("data.views.global_sizes=[]", "data.views.global_sizes"), ("data.views.local_out=0", "data.views.local_out"),
    ("data.views.region_scale=.nan", "data.views.region_scale"), ("data.min_foreground=.nan", "data.min_foreground"),
    ("steps=0", "steps"), ("checkpoint.every=0", "checkpoint.every"), ("checkpoint.keep=0", "checkpoint.keep"),
    ("tracking.log_every=0", "tracking.log_every"), ("deepspeed.grad_accum=0", "deepspeed.grad_accum"),
    ("name=../../elsewhere", "name"), ("name=.hidden", "name"),
])
def test_bad_run_config_values_name_the_key(override, key):
    with pytest.raises(ValueError) as e:
        load_run_config(TINY, ["data.dataset=unused", override])
    assert f"  {key}" in str(e.value), str(e.value)


def test_shipped_values_still_load():
    cfg = load_run_config(TINY, ["data.dataset=unused", "data.normalize.ct_window=[-175, 250]", "optim.betas=[0.9, 0.95]",
                                 "data.modality_weights={CT: 0, MR: 1}"])
    assert cfg.data.normalize.ct_window == (-175, 250)


@pytest.mark.parametrize("extra, key", [
    ("{torch_autocast: {enabled: true, lower_precision_safe_modules: [medssl_marker_mod.Reader]}}", "torch_autocast"),
    ("{csv_monitor: {enabled: true, output_path: /tmp/elsewhere}}", "csv_monitor"),
    ("{zero_optimization: {offload_param: {device: nvme, nvme_path: /tmp/elsewhere}}}", "zero_optimization.offload_param.device"),
    ("{flops_profiler: {enabled: true, output_file: /tmp/elsewhere}}", "flops_profiler"),
    ("{gradient_predivide_factor: .nan}", "gradient_predivide_factor"),
])
def test_deepspeed_extra_takes_listed_settings_only(extra, key):
    with pytest.raises(ValueError, match=rf"deepspeed\.extra\.{key}"):
        load_run_config(TINY, ["data.dataset=unused", f"deepspeed.extra={extra}"])


def test_deepspeed_extra_listed_settings_pass():
    cfg = load_run_config(TINY, ["data.dataset=unused",
                                 "deepspeed.extra={zero_optimization: {overlap_comm: true, offload_optimizer: {device: cpu}}}"])
    assert cfg.deepspeed.extra == {"zero_optimization": {"overlap_comm": True, "offload_optimizer": {"device": "cpu"}}}


def test_alias_bomb_is_refused_quickly(tmp_path):
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    lines += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 9)}]" for i in range(1, 12)]  # 9^12 values once expanded
    p = tmp_path / "bomb.yaml"
    p.write_text("\n".join(lines) + "\ndata: {dataset: x}\n")
    t0 = time.perf_counter()
    with pytest.raises(ValueError, match="bomb.yaml: refused: more than .* aliases are expanded"):
        load_run_config(p)
    assert time.perf_counter() - t0 < 2.0
    # An override is YAML too.
    with pytest.raises(ValueError, match="aliases are expanded"):
        load_run_config(TINY, ["data.dataset=unused", "tracking.run_name=" + "{" + ", ".join(lines) + "}"])


def test_yaml_bounds(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_bytes(b"a: " + b"x" * MAX_BYTES + b"\n")
    with pytest.raises(ValueError, match="c.yaml: larger than"):
        load_yaml(p)
    p.write_text("data: {dataset: x}\nsteps: 10\nsteps: 20\n")
    with pytest.raises(ValueError, match="duplicate key 'steps'"):
        load_yaml(p)
    p.write_text("a: &x [1, *x]\n")
    with pytest.raises(ValueError, match="contains it"):
        load_yaml(p)
    p.write_text("a: " + "[" * 200 + "]" * 200 + "\n")
    with pytest.raises(ValueError, match="c.yaml: refused: nested"):
        load_yaml(p)
    p.write_text("!!python/object/apply:os.system [echo hi]\n")
    with pytest.raises(ValueError, match="not valid YAML"):
        load_yaml(p)
    p.write_text("just a string\n")
    with pytest.raises(ValueError, match="mapping of sections"):
        load_yaml(p)
    p.write_bytes(b"a: \xff\xfe\n")
    with pytest.raises(ValueError, match="not UTF-8"):
        load_yaml(p)
    p.write_text("d: &d {k: 1, j: 2}\ne:\n  <<: *d\n  k: 3\n")  # merge keys overriding merged values are fine
    assert load_yaml(p)["e"] == {"k": 3, "j": 2}


# -- the ingest command line ----------------------------------------------------------------------

BAD_OPTIONS = [
    (["--chunk", "0"], "--chunk"), (["--chunk", "-4"], "--chunk"), (["--chunk", "4096"], "--chunk"),
    (["--spacing", "nan"], "--spacing"), (["--spacing", "1,inf,1"], "--spacing"), (["--spacing", "1,0,1"], "--spacing"),
    (["--spacing", "1,2"], "--spacing"), (["--spacing", "a,b,c"], "--spacing"),
    (["--max-voxels", "0"], "--max-voxels"), (["--workers", "0"], "--workers"), (["--workers", "2.5"], "--workers"),
    (["--subject-pattern", "sub-(["], "--subject-pattern"), (["--subject-pattern", "(.*)"], "--subject-pattern"),
    (["--subject-pattern", "x?"], "--subject-pattern"),
    (["--shard-shape", "100"], "--shard-shape"), (["--shard-shape", "-1"], "--shard-shape"),
    (["--shard-size", "0"], "--shard-size"), (["--shard-size", "1.2.3GB"], "--shard-size"),
    (["--codec", "gzip"], "--codec"), (["--shard-codec", "pickle"], "--shard-codec"),
    (["--partition", "3/2"], "--partition"), (["--partition", "0/100000"], "--partition"),
    (["--modality", "PET"], "--modality"), (["--max-worker-memory", "0"], "--max-worker-memory"),
]


@pytest.mark.parametrize("bad, option", BAD_OPTIONS, ids=[" ".join(b) for b, _ in BAD_OPTIONS])
def test_ingest_refuses_bad_options_before_writing(tmp_path, capsys, monkeypatch, bad, option):
    from medssl_scale.cli import main

    monkeypatch.setenv("COLUMNS", "400")
    src = tmp_path / "src"
    src.mkdir()
    (src / "scan.nii.gz").write_bytes(b"not really a scan")
    out = tmp_path / "ds"
    try:
        rc = main(["ingest", str(src), "--out", str(out), "--no-progress", "--secret-file", str(_secret(tmp_path)), *bad])
    except SystemExit as e:  # argparse's refusal
        rc = e.code
    assert rc == 2
    assert option in capsys.readouterr().err
    assert not out.exists() and not list(tmp_path.rglob("ingest.json"))


def test_ingest_refuses_a_missing_source_before_writing(tmp_path, capsys):
    from medssl_scale.cli import main

    out = tmp_path / "ds"
    rc = main(["ingest", str(tmp_path / "nope"), "--out", str(out), "--no-progress", "--secret-file", str(_secret(tmp_path))])
    assert rc == 2 and "does not" in capsys.readouterr().err and not out.exists()


@pytest.mark.parametrize("field, value", [("chunk", 0), ("workers", 0), ("max_voxels", 0), ("spacing", (1.0, float("nan"), 1.0)),
                                          ("subject_pattern", "(["), ("shard", 96), ("shard_size", 0), ("codec", "gzip")])
def test_run_ingest_checks_its_settings_too(tmp_path, field, value):
    from ingest.options import OptionError
    from ingest.runner import IngestConfig, run_ingest

    src = tmp_path / "src"
    src.mkdir()
    out = tmp_path / "ds"
    cfg = IngestConfig(sources=[src], out=out, secret_file=_secret(tmp_path), **{field: value})
    with pytest.raises(OptionError):
        run_ingest(cfg)
    assert not out.exists()


def test_good_options_pass():
    from ingest import options
    from ingest.runner import IngestConfig

    options.check(IngestConfig(sources=[], out=Path("x"), chunk=32, shard=128, spacing=(1.0, 1.0, 2.5),
                               subject_pattern=r"p(\d+)_", partition=(1, 4)))
    options.check(IngestConfig(sources=[], out=Path("x"), shard=0, subject_pattern="sub-[^/]+"))


def _secret(tmp_path: Path) -> Path:
    p = tmp_path / "secret"
    if not p.exists():
        p.write_text("s" * 64)
        p.chmod(0o600)
    return p


@pytest.mark.parametrize("settings, key", [
    ({"lr": float("nan")}, "lr"), ({"label_fraction": float("inf")}, "label_fraction"), ({"crop": 0}, "crop"),
    ({"normalize": {"ct_window": [1, 1]}}, "normalize.ct_window"),
    ({"architecture": {"name": "swin_unetr", "feature_size": "medssl_marker_mod.Reader"}}, "architecture"),
    ({"architecture": {"name": "swin_unetr", "no_such_setting": 1}}, "architecture"),
])
def test_finetune_config_refuses_bad_values(settings, key):
    from pydantic import ValidationError

    from medssl_scale.downstream.finetune import FinetuneConfig

    with pytest.raises(ValidationError) as e:
        FinetuneConfig(**{"dataset": "unused", "encoder": "models:/x@y", **settings})
    assert any(".".join(map(str, err["loc"])).startswith(key) for err in e.value.errors()), e.value
