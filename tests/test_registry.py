"""The encoder registry with real processes: a real MLflow server, training, publishing, pulling elsewhere, tampering."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from mlflow_server import mlflow_server
from sample_data import training_dataset

from medssl_scale.models import build_encoder
from medssl_scale.registry import EncoderLoadError, load_encoder
from medssl_scale.registry import format as fmt

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "dae" / "tiny.yaml"

_PULL = """
import json, sys, torch
import medssl_scale
enc = medssl_scale.load_encoder(sys.argv[1])
x = torch.linspace(-1, 1, 32 ** 3).reshape(1, 1, 32, 32, 32)
enc4 = medssl_scale.load_encoder(sys.argv[1], in_channels=4)
with torch.no_grad():
    same = all(torch.allclose(a, b, atol=1e-5) for a, b in zip(enc(x), enc4(x.repeat(1, 4, 1, 1, 1))))
torch.save({k: v for k, v in enc.state_dict().items()}, sys.argv[2])
print(json.dumps({"type": type(enc).__name__, "training": enc.training, "four_channels_agree": same,
                  "in4": list(enc4.patch_embed.weight.shape)}))
"""


class _Planted:
    """Unpickling this writes a marker file: proof that a pickle was loaded."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "unpickled!"))


def _env(uri: str) -> dict[str, str]:
    return {**os.environ, "MLFLOW_TRACKING_URI": uri, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _medssl(uri: str, *args: str, cwd: Path) -> str:
    p = subprocess.run([sys.executable, "-m", "medssl_scale.cli", *args], cwd=cwd, env=_env(uri), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stdout + p.stderr
    return p.stdout


def test_train_publish_pull_elsewhere_and_refuse_tampering(tmp_path):
    from medssl_scale.train.checkpoint import fp32_state_dict

    dataset = training_dataset(tmp_path / "data")
    with mlflow_server(tmp_path) as uri:
        _medssl(uri, "pretrain", "--config", str(TINY), "--no-progress", f"data.dataset={dataset}", "steps=3", cwd=tmp_path)
        run_id = (tmp_path / "runs" / "dae-tiny" / "mlflow_run_id").read_text().strip()
        out = _medssl(uri, "registry", "publish", "--run", run_id, "--name", "tiny-encoder", cwd=tmp_path)
        assert "version 1" in out
        _medssl(uri, "registry", "alias", "--name", "tiny-encoder", "--version", "1", "--alias", "champion", cwd=tmp_path)
        listing = _medssl(uri, "registry", "list", cwd=tmp_path)
        assert "tiny-encoder" in listing and "champion" in listing and "conv_ae" in listing

        # Pulled by alias in a separate process: the trained weights, in eval mode; 4 input channels adapted.
        script = tmp_path / "pull.py"
        script.write_text(_PULL)
        p = subprocess.run([sys.executable, str(script), "models:/tiny-encoder@champion", str(tmp_path / "pulled.pt")],
                           env=_env(uri), capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        got = json.loads(p.stdout.strip().splitlines()[-1])
        assert got == {"type": "ConvEncoder", "training": False, "four_channels_agree": True, "in4": [8, 4, 2, 2, 2]}
        trained = fp32_state_dict(tmp_path / "runs" / "dae-tiny" / "checkpoints" / "step-00000003")
        pulled = torch.load(tmp_path / "pulled.pt")
        assert set(pulled) == {k.removeprefix("net.") for k in trained if k.startswith(("net.patch_embed", "net.encoder"))}
        for k, v in pulled.items():
            torch.testing.assert_close(v, trained["net." + k], rtol=0, atol=0)

        import mlflow

        client = mlflow.tracking.MlflowClient(uri)
        mv = client.get_model_version("tiny-encoder", "1")
        assert mv.tags["medssl.objective"] == "dae" and mv.tags["medssl.source_run"] == run_id
        assert len(mv.tags["medssl.dataset_manifest_sha256"]) == 64
        assert set(mv.tags) >= {"medssl.sha256.encoder.safetensors", "medssl.sha256.encoder.json"}

        # A copy for a machine without registry access loads as a directory.
        _medssl(uri, "registry", "pull", "models:/tiny-encoder@champion", "--out", str(tmp_path / "copy"), cwd=tmp_path)
        copy = load_encoder(tmp_path / "copy")
        for k, v in copy.state_dict().items():
            torch.testing.assert_close(v, pulled[k], rtol=0, atol=0)

        # Wrong names say what is wrong.
        with pytest.raises(EncoderLoadError, match="no registered model 'nope'.*registered: tiny-encoder"):
            load_encoder("models:/nope@champion", tracking_uri=uri)
        with pytest.raises(EncoderLoadError, match=r"no alias 'staging' \(aliases: champion -> 1\)"):
            load_encoder("models:/tiny-encoder@staging", tracking_uri=uri)
        with pytest.raises(EncoderLoadError, match="no version 7"):
            load_encoder("models:/tiny-encoder/7", tracking_uri=uri)

        # A pickle planted beside the published files is never opened.
        (stored,) = (tmp_path / "server-artifacts").rglob("encoder/encoder.safetensors")
        marker = tmp_path / "unpickled.txt"
        for name in ("model.pkl", "encoder.pt", "pytorch_model.bin"):
            (stored.parent / name).write_bytes(pickle.dumps(_Planted(marker)))
        assert load_encoder("models:/tiny-encoder/1", tracking_uri=uri) is not None
        assert not marker.exists()

        # Bytes changed after publishing are refused, a pickle in place of the weights included.
        original = stored.read_bytes()
        stored.write_bytes(pickle.dumps(_Planted(marker)))
        # (its header is read first: a pickle is no safetensors file, and is refused before the rest is read)
        with pytest.raises(EncoderLoadError, match="encoder.safetensors is not a safetensors file"):
            load_encoder("models:/tiny-encoder@champion", tracking_uri=uri)
        assert not marker.exists()
        stored.write_bytes(original[:-1] + bytes([original[-1] ^ 1]))
        with pytest.raises(EncoderLoadError, match="does not match its recorded sha256"):
            load_encoder("models:/tiny-encoder@champion", tracking_uri=uri)
        stored.unlink()
        with pytest.raises(EncoderLoadError, match="artifact encoder.safetensors is missing"):
            load_encoder("models:/tiny-encoder@champion", tracking_uri=uri)


def test_local_directory_and_strict_key_errors(tmp_path):
    from safetensors.torch import load_file, save_file

    enc = build_encoder("conv_ae", channels=[4, 8])
    fmt.write(enc, tmp_path / "enc")
    back = load_encoder(tmp_path / "enc")
    for (k, a), (_, b) in zip(enc.state_dict().items(), back.state_dict().items()):
        assert torch.equal(a, b), k

    # Weights saved with a DDP prefix and a renamed block: every wrong key is named.
    state = {("module." + k if k.startswith("patch_embed") else k.replace("encoder.0", "blocks.0")): v
             for k, v in load_file(str(tmp_path / "enc" / fmt.WEIGHTS)).items()}
    save_file(state, str(tmp_path / "enc" / fmt.WEIGHTS))
    (tmp_path / "enc" / fmt.HASHES).write_text(json.dumps({n: fmt.sha256(tmp_path / "enc" / n) for n in fmt.FILES}))
    with pytest.raises(EncoderLoadError) as e:
        load_encoder(tmp_path / "enc")
    msg = str(e.value)
    assert "missing keys (6): encoder.0.0.bias, encoder.0.0.weight" in msg and "patch_embed.bias" in msg
    assert "unexpected keys (6): blocks.0.0.bias" in msg and "module.patch_embed.weight" in msg

    with pytest.raises(EncoderLoadError, match="neither models:/NAME@ALIAS"):
        load_encoder(tmp_path / "missing")


def test_input_channel_adaptation_keeps_the_response():
    enc = build_encoder("swin_unetr", feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3)).eval()
    fresh = build_encoder("swin_unetr", in_channels=3, feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3)).eval()
    state = fmt.adapt_input_channels(enc.state_dict(), fresh.state_dict(), 1, 3)
    fmt.load_strict(fresh, state, "test")
    changed = sorted(k for k in state if state[k].shape != enc.state_dict()[k].shape)
    assert changed == ["encoder1.layer.conv1.conv.weight", "encoder1.layer.conv3.conv.weight", "swinViT.patch_embed.proj.weight"]
    x = torch.randn(1, 1, 64, 64, 64)
    with torch.no_grad():
        for a, b in zip(enc(x), fresh(x.repeat(1, 3, 1, 1, 1))):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4)


def _rehash(d: Path) -> None:
    (d / fmt.HASHES).write_text(json.dumps({n: fmt.sha256(d / n) for n in fmt.FILES}))


@pytest.mark.parametrize("doc, why", [
    (b"{\"format\": ", "encoder.json is not valid JSON"),
    (b"[1, 2]", "encoder.json must hold a JSON object, found list"),
    (b"{\"format\": \"medssl-encoder/1\"}", "encoder.json does not match its schema: architecture: Field required"),
    (None, "encoder.json does not match its schema: extra: Extra inputs are not permitted"),
    (b"{\"format\": \"medssl-encoder/1\", \"architecture\": {\"name\": \"conv_ae\"}, \"feature_channels\": \"8\", "
     b"\"feature_strides\": []}", "encoder.json does not match its schema: feature_channels: Input should be a valid list"),
    (b" " * (2 << 20), "encoder.json is over the 1,048,576 bytes a registry file may have"),
    (b"{\"format\": NaN}", "encoder.json is not valid JSON: _NotJSON: NaN is not a JSON value"),
])
def test_malformed_encoder_json_is_refused_naming_the_file(tmp_path, doc, why):
    enc = build_encoder("conv_ae", channels=[4, 8])
    d = tmp_path / "enc"
    fmt.write(enc, d)
    if doc is None:  # a well-formed document with one field too many
        doc = json.dumps({**json.loads((d / fmt.ARCH).read_text()), "extra": 1}).encode()
    (d / fmt.ARCH).write_bytes(doc)
    _rehash(d)
    with pytest.raises(fmt.RegistryFormatError) as e:
        load_encoder(d)
    assert str(e.value).startswith(f"{d}: {why}"), str(e.value)


@pytest.mark.parametrize("doc, why", [
    (b"not json", "sha256.json is not valid JSON"),
    (b"\"abc\"", "sha256.json must hold a JSON object, found str"),
    (b"{\"encoder.json\": 5}", "sha256.json does not match its schema: encoder.safetensors: Field required; encoder.json: Input should be a valid string"),
    (None, "sha256.json does not match its schema: model.pkl: Extra inputs are not permitted"),
    (b"{" + b" " * (2 << 20) + b"}", "sha256.json is over the 1,048,576 bytes a registry file may have"),
    (b"{\"encoder.json\": Infinity}", "sha256.json is not valid JSON: _NotJSON: Infinity is not a JSON value"),
    (b"{\"encoder.json\": -Infinity}", "sha256.json is not valid JSON: _NotJSON: -Infinity is not a JSON value"),
])
def test_malformed_sha256_json_is_refused_naming_the_file(tmp_path, doc, why):
    d = tmp_path / "enc"
    fmt.write(build_encoder("conv_ae", channels=[4, 8]), d)
    if doc is None:
        doc = json.dumps({**json.loads((d / fmt.HASHES).read_text()), "model.pkl": "0" * 64}).encode()
    (d / fmt.HASHES).write_bytes(doc)
    with pytest.raises(fmt.RegistryFormatError) as e:
        load_encoder(d)
    assert str(e.value).startswith(f"{d}: {why}"), str(e.value)


def test_weights_are_checked_against_the_declared_architecture_before_building(tmp_path):
    from safetensors.torch import load_file, save_file

    d = tmp_path / "enc"
    fmt.write(build_encoder("conv_ae", channels=[4, 8]), d)
    # The declared architecture says 8 -> 16 channels; the weights are of 4 -> 8: shapes named.
    arch = json.loads((d / fmt.ARCH).read_text())
    arch["architecture"]["channels"] = [8, 16]
    (d / fmt.ARCH).write_text(json.dumps(arch))
    _rehash(d)
    with pytest.raises(EncoderLoadError, match=r"do not fit the architecture in encoder.json\n  shape mismatches \(6\): "
                                               r"encoder.0.0.bias: saved \(8,\), model \(16,\)"):
        load_encoder(d)
    # Same shapes, another dtype (fp16 where fp32 was published).
    fmt.write(build_encoder("conv_ae", channels=[4, 8]), d)
    state = {k: v.half() for k, v in load_file(str(d / fmt.WEIGHTS)).items()}
    save_file(state, str(d / fmt.WEIGHTS))
    _rehash(d)
    with pytest.raises(EncoderLoadError, match=r"dtype mismatches \(6\): encoder.0.0.bias: saved F16, model F32"):
        load_encoder(d)
    # A header that lies about its length.
    (d / fmt.WEIGHTS).write_bytes((10**12).to_bytes(8, "little") + b"{}")
    _rehash(d)
    with pytest.raises(fmt.RegistryFormatError, match="encoder.safetensors is not a safetensors file: its header claims"):
        load_encoder(d)


def test_a_huge_declared_network_is_refused_without_allocating(tmp_path):
    import resource

    d = tmp_path / "enc"
    fmt.write(build_encoder("conv_ae", channels=[4, 8]), d)
    arch = json.loads((d / fmt.ARCH).read_text())
    arch["architecture"]["channels"] = [8192] * 8  # each setting within its bounds, ~1.3e10 parameters: 50 GB of fp32
    (d / fmt.ARCH).write_text(json.dumps(arch))
    _rehash(d)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(EncoderLoadError, match="declares a conv_ae too large to load"):
        load_encoder(d)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # kB: nothing of the declared size


def test_architecture_settings_are_bounded_and_built_on_meta(tmp_path):
    import resource
    import time

    d = tmp_path / "enc"
    fmt.write(build_encoder("swin_unetr", feature_size=12, depths=(1, 1, 1, 1), num_heads=(3, 3, 3, 3)), d)
    doc = json.loads((d / fmt.ARCH).read_text())
    # window_size 32: MONAI's relative-position index alone is 32^6 int64 values (8.6 GB) if built for real.
    for setting, value, why in [("window_size", 32, "window_size=32 is out of range"), ("depths", [1] * 9, "depths has 9 entries"),
                                ("feature_size", "12", "feature_size must be whole numbers"), ("extra_int", 3, "settings it does not take")]:
        arch = {**doc, "architecture": {**doc["architecture"], setting: value}}
        (d / fmt.ARCH).write_text(json.dumps(arch))
        _rehash(d)
        t0 = time.monotonic()
        with pytest.raises(EncoderLoadError, match=why):
            load_encoder(d)
        assert time.monotonic() - t0 < 5
    # Within the bounds, the index tables too go to meta: window 16 (a 2.3 GB index built for real) costs nothing.
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    arch = {**doc, "architecture": {**doc["architecture"], "window_size": 16}}
    (d / fmt.ARCH).write_text(json.dumps(arch))
    _rehash(d)
    with pytest.raises(EncoderLoadError, match="do not fit the architecture"):
        load_encoder(d)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 300_000  # kB


def test_a_weights_header_that_disagrees_is_refused_before_the_body_is_read(tmp_path):
    import resource
    import struct

    from safetensors.torch import load_file

    d = tmp_path / "enc"
    fmt.write(build_encoder("conv_ae", channels=[4, 8]), d)
    state = load_file(str(d / fmt.WEIGHTS))
    # A header declaring one tensor of 2^30 floats (4 GB, under the old whole-file cap), its body a sparse hole:
    # reading the file would take 4 GB; the header is compared first and names the mismatch.
    key = sorted(state)[0]
    hdr = json.dumps({key: {"dtype": "F32", "shape": [1 << 30], "data_offsets": [0, 4 << 30]}}).encode()
    with open(d / fmt.WEIGHTS, "wb") as f:
        f.write(struct.pack("<Q", len(hdr)) + hdr)
        f.truncate(8 + len(hdr) + (4 << 30))
    # (the recorded weights hash is never reached: hashing 8 GB is what the header check spares)
    (d / fmt.HASHES).write_text(json.dumps({fmt.ARCH: fmt.sha256(d / fmt.ARCH), fmt.WEIGHTS: "0" * 64}))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(EncoderLoadError, match=r"do not fit the architecture in encoder.json\n  missing keys \(5\)"):
        load_encoder(d)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # kB
    # The right header followed by more bytes than its tensors take: refused by size, not read whole.
    fmt.write(build_encoder("conv_ae", channels=[4, 8]), d)
    with open(d / fmt.WEIGHTS, "r+b") as f:
        f.truncate((d / fmt.WEIGHTS).stat().st_size + (1 << 33))
    (d / fmt.HASHES).write_text(json.dumps({fmt.ARCH: fmt.sha256(d / fmt.ARCH), fmt.WEIGHTS: "0" * 64}))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    with pytest.raises(fmt.RegistryFormatError, match="encoder.safetensors is over the .* bytes a registry file may have"):
        load_encoder(d)
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 100_000  # kB
