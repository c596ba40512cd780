"""Model files: ``.safetensors`` round trips, and refusals of altered, foreign or pickle files."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from consilia.common.config import ModelConfig, RunConfig, TaskSpec
from consilia.common.model_files import (
    HEADER_KEY,
    ModelFileError,
    PickleModelFileError,
    load_model_file,
    read_model_header,
    save_model_file,
)
from consilia.common.rundir.layout import RunDir
from consilia.common.serde import layout_digest, model_from_run_config


def _run(width: int = 4) -> RunConfig:
    return RunConfig(name="files", model=ModelConfig(name="cnn", kwargs={"width": width}),
                     task=TaskSpec(class_names=["a", "b", "c"], in_channels=1, image_size=16))


def _saved(tmp_path: Path, width: int = 4) -> tuple[Path, torch.nn.Module]:
    torch.manual_seed(0)
    model = model_from_run_config(_run(width))
    path = save_model_file(tmp_path / "global_model.safetensors", model, _run(width), 7,
                           {"baseline": "centralized"})
    return path, model


def _contents(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    with safe_open(str(path), framework="pt") as handle:
        return {k: handle.get_tensor(k) for k in handle.keys()}, dict(handle.metadata())


def _rewrite(path: Path, tensors: dict[str, torch.Tensor], header: dict) -> None:
    save_file(tensors, str(path), metadata={"format": "pt", HEADER_KEY: json.dumps(header)})


def test_round_trip_restores_weights_config_round_and_extra(tmp_path):
    path, model = _saved(tmp_path)
    loaded, run, meta = load_model_file(path)
    assert run == _run() and meta == {"round": 7, "extra": {"baseline": "centralized"}}
    assert not loaded.training
    original, restored = model.state_dict(), loaded.state_dict()
    assert list(original) == list(restored)
    for name in original:
        assert torch.equal(original[name], restored[name]), name
        assert original[name].dtype == restored[name].dtype
    assert not list(tmp_path.glob("*.tmp"))


def test_the_file_is_plain_safetensors_with_the_description_in_its_header(tmp_path):
    path, model = _saved(tmp_path)
    raw = path.read_bytes()
    header_len = int.from_bytes(raw[:8], "little")
    assert raw[8:9] == b"{" and json.loads(raw[8:8 + header_len])  # JSON header, no pickle
    _, metadata = _contents(path)
    header = json.loads(metadata[HEADER_KEY])
    assert header["format"] == "consilia-model-v2" and header["round"] == 7
    assert header["run_config"]["task"]["class_names"] == ["a", "b", "c"]
    assert header["layout"] == layout_digest(model.state_dict())
    assert read_model_header(path).run_config.model.kwargs == {"width": 4}


def test_an_opacus_wrapped_model_is_stored_unwrapped(tmp_path):
    torch.manual_seed(0)
    inner = model_from_run_config(_run())

    class Wrapper(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self._module = inner

    path = save_model_file(tmp_path / "m.safetensors", Wrapper(), _run(), 1)
    tensors, _ = _contents(path)
    assert set(tensors) == set(inner.state_dict())
    loaded, _, _ = load_model_file(path)
    assert all(torch.equal(v, loaded.state_dict()[k]) for k, v in inner.state_dict().items())


def test_a_header_describing_another_model_is_refused(tmp_path):
    path, _ = _saved(tmp_path)
    tensors, metadata = _contents(path)
    header = json.loads(metadata[HEADER_KEY])
    header["run_config"]["model"]["kwargs"]["width"] = 8  # the description no longer fits
    _rewrite(path, tensors, header)
    with pytest.raises(ModelFileError, match="layout fingerprint .* does not match"):
        load_model_file(path)


def test_a_tampered_fingerprint_is_refused(tmp_path):
    path, _ = _saved(tmp_path)
    tensors, metadata = _contents(path)
    header = json.loads(metadata[HEADER_KEY])
    header["layout"] = "0" * 12
    _rewrite(path, tensors, header)
    with pytest.raises(ModelFileError, match=r"global_model.safetensors: layout fingerprint"):
        load_model_file(path)


def test_tensors_of_another_shape_under_a_consistent_header_are_refused(tmp_path):
    path, _ = _saved(tmp_path)
    other, _ = _saved(tmp_path / "wide", width=8)
    _, metadata = _contents(path)
    wide_tensors, _ = _contents(other)
    _rewrite(path, wide_tensors, json.loads(metadata[HEADER_KEY]))
    with pytest.raises(ModelFileError, match="has shape .* the model needs"):
        load_model_file(path)


def test_missing_or_unexpected_tensors_are_refused(tmp_path):
    path, _ = _saved(tmp_path)
    tensors, metadata = _contents(path)
    first = next(iter(tensors))
    tensors["smuggled"] = tensors.pop(first)
    _rewrite(path, tensors, json.loads(metadata[HEADER_KEY]))
    with pytest.raises(ModelFileError, match=rf"missing \['{first}'\], unexpected \['smuggled'\]"):
        load_model_file(path)


def test_a_weight_of_another_dtype_is_refused(tmp_path):
    path, _ = _saved(tmp_path)
    tensors, metadata = _contents(path)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name] = tensors[name].double()
    _rewrite(path, tensors, json.loads(metadata[HEADER_KEY]))
    with pytest.raises(ModelFileError, match=rf"tensor '{name}' is torch.float64"):
        load_model_file(path)


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(tmp_path, bad):
    path, _ = _saved(tmp_path)
    tensors, metadata = _contents(path)
    name = next(k for k, v in tensors.items() if v.is_floating_point())
    tensors[name].view(-1)[0] = bad
    _rewrite(path, tensors, json.loads(metadata[HEADER_KEY]))
    with pytest.raises(ModelFileError, match=rf"tensor '{name}' holds NaN or infinite"):
        load_model_file(path)


def test_a_safetensors_file_without_a_consilia_header_is_refused(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ModelFileError, match="no Consilia description"):
        load_model_file(path)


def test_an_invalid_header_names_the_field(tmp_path):
    path, _ = _saved(tmp_path)
    tensors, metadata = _contents(path)
    header = json.loads(metadata[HEADER_KEY])
    header["run_config"]["model"]["name"] = "not-a-model"
    _rewrite(path, tensors, header)
    with pytest.raises(ModelFileError, match="invalid Consilia description at 'run_config.model"):
        load_model_file(path)


@pytest.mark.parametrize("writer", ["torch-zip", "torch-legacy", "pickle"])
def test_pickle_files_are_refused_before_anything_unpickles_them(tmp_path, writer):
    path = tmp_path / "global_model.pt"
    payload = {"state_dict": {"w": torch.zeros(2)}}
    if writer == "torch-zip":
        torch.save(payload, path)
    elif writer == "torch-legacy":
        torch.save(payload, path, _use_new_zipfile_serialization=False)
    else:
        path.write_bytes(pickle.dumps(payload, protocol=4))
    with pytest.raises(PickleModelFileError, match="is a pickle-based .pt file; Consilia model "
                       "files are .safetensors"):
        load_model_file(path)


def test_a_file_that_is_not_safetensors_is_refused(tmp_path):
    path = tmp_path / "notes.safetensors"
    path.write_text("hello, not a model")
    with pytest.raises(ModelFileError, match="is not a .safetensors model file"):
        load_model_file(path)
    with pytest.raises(FileNotFoundError, match="model file not found"):
        load_model_file(tmp_path / "missing.safetensors")


def test_model_files_must_be_named_safetensors(tmp_path):
    with pytest.raises(ValueError, match="model files end in .safetensors"):
        save_model_file(tmp_path / "model.pt", model_from_run_config(_run()), _run(), 1)


def test_a_run_directory_of_pickle_era_models_is_named_not_loaded(tmp_path):
    layout = RunDir(tmp_path)
    for path in (tmp_path / "global_model.pt", tmp_path / "models" / "centralized.pt",
                 tmp_path / "checkpoints" / "round-001.pt"):
        path.parent.mkdir(exist_ok=True)
        torch.save({"state_dict": {}}, path)
    assert layout.legacy_model_files() == [tmp_path / "global_model.pt",
                                           tmp_path / "checkpoints" / "round-001.pt",
                                           tmp_path / "models" / "centralized.pt"]
    assert layout.round_checkpoints() == [] and layout.local_model_files() == []
    with pytest.raises(PickleModelFileError, match=r"global_model.pt is a pickle-based .pt"):
        layout.load_global_model()
    save_model_file(layout.global_model_path, model_from_run_config(_run()), _run(), 2)
    assert layout.load_global_model()[2]["round"] == 2
