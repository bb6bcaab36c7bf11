"""Config files and command-line overrides."""

import pytest

from medssl_scale.config import apply_overrides, load_yaml


def test_overrides_parse_values_as_yaml():
    base = {"data": {"crop": [96, 96, 96], "views": {"kind": "none"}}}
    out = apply_overrides(base, ["data.crop=[64,96,96]", "data.views.kind=pair", "data.views.flip=false", "train.lr=1e-4", "x="])
    assert out["data"]["crop"] == [64, 96, 96] and out["data"]["views"] == {"kind": "pair", "flip": False}
    assert out["train"]["lr"] == 1e-4 and out["x"] is None
    assert base["data"]["views"]["kind"] == "none"  # the input is not modified
    with pytest.raises(ValueError, match="expected key=value"):
        apply_overrides(base, ["data.crop"])
    with pytest.raises(ValueError, match="crop is a value, not a section"):
        apply_overrides(base, ["data.crop.x=1"])


def test_bad_files_name_themselves(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("data: [unclosed")
    with pytest.raises(ValueError, match="c.yaml: not valid YAML"):
        load_yaml(p)
    p.write_text("- a list")
    with pytest.raises(ValueError, match="mapping of sections"):
        load_yaml(p)
    with pytest.raises(ValueError, match="cannot read"):
        load_yaml(tmp_path / "missing.yaml")
