"""Safe checkpoint loading: weights_only=True always, one-line errors, no code execution."""
import hashlib
import os
import pickle
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from checkpoints_convert.errors import CheckpointError
from checkpoints_convert.safe_load import (load_payload, load_state_dict, sha256_file, sniff_format,
                                           unwrap_state_dict)

FIXTURES = Path(__file__).parent / "fixtures" / "official"


def small_state():
    return OrderedDict([("time_embed.0.weight", torch.arange(6.0).reshape(3, 2)), ("out.2.bias", torch.ones(3))])


def assert_same(a, b):
    assert list(a) == list(b)
    for key in a:
        assert torch.equal(a[key], b[key])


def one_line_error(path, match):
    with pytest.raises(CheckpointError, match=match) as info:
        load_state_dict(path)
    assert "\n" not in str(info.value)
    return str(info.value)


def test_missing_file(tmp_path):
    one_line_error(tmp_path / "nope.pt", "no such checkpoint file: .*nope.pt")


def test_directory(tmp_path):
    one_line_error(tmp_path, "is a directory")


def test_empty_file(tmp_path):
    path = tmp_path / "empty.pt"
    path.write_bytes(b"")
    one_line_error(path, "is empty")


def test_text_file(tmp_path):
    path = tmp_path / "model.pt"
    path.write_text("<html>\n<body>404 Not Found</body></html>\n")
    message = one_line_error(path, "is not a PyTorch checkpoint")
    assert "<html>" in message


def test_binary_junk(tmp_path):
    path = tmp_path / "model.pt"
    path.write_bytes(bytes(range(200, 256)))
    one_line_error(path, "is not a PyTorch checkpoint")


class _Exploit:
    """Pickles to ``os.system("touch <marker>")``: plain pickle.load would run it."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("protocol", [2, 4])
def test_pickled_code_is_refused_and_not_run(tmp_path, protocol):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    with open(path, "wb") as handle:
        pickle.dump({"weight": _Exploit(marker)}, handle, protocol=protocol)
    assert sniff_format(path) == "legacy"
    message = one_line_error(path, "refused: .* contains pickled code")
    assert "re-save it as a state dict" in message
    assert not marker.exists()


def test_pickled_code_in_zip_is_refused_and_not_run(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil_zip.pt"
    torch.save({"weight": _Exploit(marker)}, path)          # torch.save pickles without running reduce
    assert sniff_format(path) == "zip"
    one_line_error(path, "refused")
    assert not marker.exists()


def test_optimizer_state(tmp_path):
    path = tmp_path / "opt000100.pt"
    model = torch.nn.Linear(2, 2)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    optimizer.step()
    torch.save(optimizer.state_dict(), path)
    one_line_error(path, r"looks like optimizer state \(opt\*.pt")


@pytest.mark.parametrize("legacy", [False, True])
def test_plain_state_dict_both_formats(tmp_path, legacy):
    path = tmp_path / "model.pt"
    torch.save(small_state(), path, _use_new_zipfile_serialization=not legacy)
    assert sniff_format(path) == ("legacy" if legacy else "zip")
    assert_same(load_state_dict(path), small_state())


@pytest.mark.parametrize("key", ["ema", "state_dict", "model_state_dict", "model"])
def test_wrapped_state_dict_is_unwrapped(tmp_path, key):
    path = tmp_path / "wrapped.pt"
    torch.save({key: small_state(), "step": 100, "args": {"lr": 1e-4}}, path)
    assert_same(load_state_dict(path), small_state())


def test_ema_is_preferred_over_model():
    ema = small_state()
    model = {k: v + 1 for k, v in small_state().items()}
    state, wrapper = unwrap_state_dict({"model": model, "ema": ema, "step": 3})
    assert wrapper == "ema"
    assert_same(state, ema)


def test_module_prefix_is_stripped(tmp_path):
    path = tmp_path / "ddp.pt"
    torch.save({f"module.{k}": v for k, v in small_state().items()}, path)
    assert_same(load_state_dict(path), small_state())
    # a prefix on only some keys is left alone
    mixed, _ = unwrap_state_dict({"module.a": torch.zeros(1), "b": torch.zeros(1)})
    assert list(mixed) == ["module.a", "b"]


def test_non_tensor_values(tmp_path):
    path = tmp_path / "odd.pt"
    torch.save({"weight": torch.zeros(2), "note": "hello"}, path)
    one_line_error(path, "entry 'note' is a str, not a tensor")


def test_not_a_dict(tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    one_line_error(path, "holds a Tensor, not a state dict")


def test_truncated_file(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(small_state(), path)
    path.write_bytes(path.read_bytes()[:200])
    message = one_line_error(path, "truncated or corrupt")
    assert "pickled code" not in message


def test_truncated_legacy_file(tmp_path):
    path = tmp_path / "model.pt"
    torch.save(small_state(), path, _use_new_zipfile_serialization=False)
    path.write_bytes(path.read_bytes()[:60])
    one_line_error(path, "truncated or corrupt")


def test_fixture_checkpoint_loads():
    state = load_state_dict(FIXTURES / "adm_uncond" / "model.pt")
    assert "time_embed.0.weight" in state and all(v.device.type == "cpu" for v in state.values())


def test_load_payload_keeps_non_tensor_data(tmp_path):
    path = tmp_path / "ours.pt"
    torch.save({"format": "x", "version": 1, "state_dict": small_state()}, path)
    payload = load_payload(path)
    assert payload["format"] == "x" and payload["version"] == 1


def test_sha256_file(tmp_path):
    path = tmp_path / "blob.bin"
    data = os.urandom(3_000_000)
    path.write_bytes(data)
    assert sha256_file(path) == hashlib.sha256(data).hexdigest()
    assert sha256_file(path, chunk_size=4096) == hashlib.sha256(data).hexdigest()
    with pytest.raises(CheckpointError, match="no such checkpoint file"):
        sha256_file(tmp_path / "missing")
