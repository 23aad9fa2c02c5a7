"""Untrusted files: no code runs, nothing is allocated before the file is checked.

Weights are read from safetensors only; ``state.pt`` only through
``torch.load(..., weights_only=True)``. A malicious pickle (whose ``__reduce__`` would create a
marker directory) put where a checkpoint or weights file belongs is refused and the marker
never appears. A weights file is compared with the config (names, shapes, dtypes) through its
header before any tensor is read and before the real model is built, and a config.json with
absurd sizes is refused without trying to allocate them.
"""

from __future__ import annotations

import hashlib
import json
import os
import pickle
import re
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

import multihead
from multihead import cli
from multihead.models import LMConfig, TransformerLM, base
from multihead.training import CheckpointError, load_checkpoint, save_checkpoint

SRC = Path(multihead.__file__).parent
CONFIG = dict(vocab_size=11, d_model=8, num_heads=2, num_layers=2, dim_feedforward=8, max_len=8)


class Payload:
    """Unpickling this runs ``os.mkdir(marker)``: the proof that code was executed."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mkdir, (str(self.marker),))


def test_the_payload_is_live(tmp_path):
    """Sanity check: plain pickle really runs it (so the tests below are not vacuous)."""
    marker = tmp_path / "ran"
    pickle.loads(pickle.dumps(Payload(marker)))
    assert marker.is_dir()


def _malicious_state(kind: str, marker: Path, path: Path) -> None:
    if kind == "raw pickle":
        path.write_bytes(pickle.dumps({"step": 1, "evil": Payload(marker)}))
    elif kind == "torch.save zip":
        torch.save({"format_version": 1, "step": 1, "evil": Payload(marker)}, path)
    else:  # a real training state with the payload tucked into "extra"
        state = torch.load(path, weights_only=True)
        state["extra"]["note"] = Payload(marker)
        torch.save(state, path)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
@pytest.mark.parametrize("kind", ["raw pickle", "torch.save zip", "inside a real state"])
def test_malicious_pickle_as_state_pt_is_refused_without_running(kind, tmp_path):
    model = TransformerLM(LMConfig(**CONFIG))
    directory = save_checkpoint(tmp_path / "last", model, step=1)
    marker = tmp_path / "pwned"
    _malicious_state(kind, marker, directory / "state.pt")
    # The attacker controls the whole directory: the checksums agree with the payload.
    sums = json.loads((directory / "checksums.json").read_text())
    sums["sha256"]["state.pt"] = hashlib.sha256((directory / "state.pt").read_bytes()).hexdigest()
    (directory / "checksums.json").write_text(json.dumps(sums))

    with pytest.raises(CheckpointError, match=r"refused by torch\.load\(weights_only=True\)"):
        load_checkpoint(directory, model)
    assert not marker.exists()


def test_malicious_pickle_as_weights_is_refused_without_running(tmp_path):
    model = TransformerLM(LMConfig(**CONFIG))
    model.save_pretrained(tmp_path / "model")
    save_checkpoint(tmp_path / "last", model, step=1)
    (tmp_path / "last" / "checksums.json").unlink()  # as an older checkpoint
    marker = tmp_path / "pwned"
    for path in (tmp_path / "model" / "model.safetensors", tmp_path / "last" / "model.safetensors"):
        torch.save({"weight": Payload(marker)}, path)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        TransformerLM.from_pretrained(tmp_path / "model")
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        load_checkpoint(tmp_path / "last", model)
    assert cli.main(["show", str(tmp_path / "model" / "model.safetensors")]) == 2
    assert not marker.exists()


def test_no_code_path_unpickles_a_file():
    """Every torch.load in the library passes weights_only=True; nothing calls pickle.load,
    numpy's allow_pickle or torch.load without it."""
    offenders = []
    for path in SRC.rglob("*.py"):
        text = path.read_text()
        for match in re.finditer(r"torch\.load\(([^()]*(\([^()]*\))?)*\)", text):
            if "weights_only=True" not in match.group(0):
                offenders.append(f"{path.name}: {match.group(0)}")
        for bad in ("pickle.load", "pickle.Unpickler", "allow_pickle=True", "dill.", "joblib.load"):
            if bad in text:
                offenders.append(f"{path.name}: {bad}")
    assert not offenders


# -- weights that do not fit the config: refused from the header ---------------------------------


@pytest.fixture
def saved(tmp_path) -> Path:
    torch.manual_seed(0)
    TransformerLM(LMConfig(**CONFIG)).save_pretrained(tmp_path)
    return tmp_path


@pytest.fixture
def spy(monkeypatch) -> dict[str, list]:
    """Records every TransformerLM built (its device) and every tensor read from a file."""
    seen: dict[str, list] = {"built_on": [], "read": []}
    original_init = TransformerLM.__init__

    def init(self, config):
        original_init(self, config)
        seen["built_on"].append(self.embedding.weight.device.type)

    real_open = base.safe_open

    class Handle:
        def __init__(self, *args, **kwargs):
            self.inner = real_open(*args, **kwargs)

        def __enter__(self):
            self.file = self.inner.__enter__()
            return self

        def __exit__(self, *exc):
            return self.inner.__exit__(*exc)

        def get_tensor(self, name):
            seen["read"].append(name)
            return self.file.get_tensor(name)

    monkeypatch.setattr(TransformerLM, "__init__", init)
    monkeypatch.setattr(base, "safe_open", Handle)
    return seen


def _rewrite(directory: Path, change) -> None:
    from safetensors.torch import load_file

    state = load_file(directory / "model.safetensors")
    change(state)
    save_file(state, directory / "model.safetensors")


BAD_WEIGHTS = {
    "shape": (
        lambda s: s.__setitem__("embedding.weight", torch.zeros(12, 8)),
        r"embedding\.weight has shape \(12, 8\) but .* expects \(11, 8\)",
    ),
    "dtype": (
        lambda s: s.__setitem__("embedding.weight", s["embedding.weight"].to(torch.int32)),
        r"embedding\.weight has dtype torch\.int32 but .* expects torch\.float32",
    ),
    "bool": (
        lambda s: s.__setitem__("embedding.weight", s["embedding.weight"] > 0),
        r"embedding\.weight has dtype torch\.bool",
    ),
    "missing": (lambda s: s.pop("embedding.weight"), r"missing \['embedding\.weight'\]"),
    "unexpected": (
        lambda s: s.__setitem__("backdoor", torch.zeros(1)),
        r"unexpected \['backdoor'\]",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_WEIGHTS))
def test_weights_that_do_not_fit_are_refused_before_anything_is_read(case, saved, spy):
    change, message = BAD_WEIGHTS[case]
    _rewrite(saved, change)
    with pytest.raises(ValueError, match=message):
        TransformerLM.from_pretrained(saved)
    assert spy["read"] == []  # no tensor was read
    assert spy["built_on"] == ["meta"]  # only the shape-only skeleton was built


def test_float_weights_of_another_precision_are_converted(saved, spy):
    """Documented: a float64 (or bf16) save loads into the float32 model, converted."""
    _rewrite(saved, lambda s: s.update({k: v.double() for k, v in s.items()}))
    model = TransformerLM.from_pretrained(saved)
    assert model.embedding.weight.dtype == torch.float32
    assert spy["built_on"] == ["meta", "cpu"]


def _fake_safetensors(path: Path, header: dict, data: bytes) -> None:
    encoded = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(encoded)) + encoded + data)


@pytest.mark.parametrize(
    "header",
    [
        {"embedding.weight": {"dtype": "F32", "shape": [10**6, 10**6], "data_offsets": [0, 4]}},
        {"embedding.weight": {"dtype": "F32", "shape": [11, 8], "data_offsets": [0, 10**12]}},
        {"embedding.weight": {"dtype": "F32", "shape": [-1, 8], "data_offsets": [0, 4]}},
    ],
    ids=["huge shape", "huge offsets", "negative shape"],
)
def test_a_lying_header_is_refused(header, saved, spy):
    _fake_safetensors(saved / "model.safetensors", header, b"\x00" * 4)
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        TransformerLM.from_pretrained(saved)
    assert spy["built_on"] == [] and spy["read"] == []


def test_a_header_length_beyond_the_file_is_refused(saved):
    (saved / "model.safetensors").write_bytes(struct.pack("<Q", 2**62) + b"{}")
    with pytest.raises(ValueError, match="not a readable safetensors file"):
        TransformerLM.from_pretrained(saved)


# -- config.json with absurd or malformed content ------------------------------------------------

ABSURD = {
    "num_layers": ({"num_layers": 10**9}, r"num_layers=1000000000 but .* holds only"),
    "d_model": ({"d_model": 2**20, "num_heads": 2}, r"has shape .* but .* expects"),
    "vocab_size": ({"vocab_size": 10**12}, r"embedding\.weight has shape"),
    "learned max_len": ({"max_len": 10**9}, r"has shape .* but .* expects"),
    "sinusoidal max_len": (
        {"max_len": 10**9, "positions": "sinusoidal"},
        r"asks for .* GiB of buffers beyond the weights file",
    ),
    "dim_feedforward": ({"dim_feedforward": 10**10}, r"has shape .* but .* expects"),
}


class TensorsMade(TorchDispatchMode):
    """Records every tensor that an operation makes off the meta device (op, bytes): a meta
    tensor has a shape and no memory, anything else was allocated."""

    def __init__(self) -> None:
        super().__init__()
        self.made: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor) and tensor.device.type != "meta":
                self.made.append((str(func), tensor.untyped_storage().nbytes()))
        return out


@pytest.mark.parametrize("case", sorted(ABSURD))
def test_absurd_config_is_refused_without_allocating(case, saved, spy):
    fields, message = ABSURD[case]
    config = json.loads((saved / "config.json").read_text())
    config.update(fields)
    if fields.get("positions") == "sinusoidal":  # the weights then have no position table
        _rewrite(saved, lambda s: s.pop("positions.embedding.weight"))
    (saved / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=message), TensorsMade() as tensors:
        TransformerLM.from_pretrained(saved)
    assert tensors.made == []  # the declared sizes existed only as meta shapes
    assert spy["read"] == []
    # A billion layers are refused from the file's tensor count, before even the shape-only
    # skeleton (building that many modules takes forever, memory or not).
    assert spy["built_on"] == ([] if case == "num_layers" else ["meta"])


def test_the_allocation_probe_sees_a_real_load(saved):
    """The probe above is not blind: loading the saved model makes its weights."""
    with TensorsMade() as tensors:
        model = TransformerLM.from_pretrained(saved)
    largest = max(p.numel() * p.element_size() for p in model.parameters())
    assert max(size for _, size in tensors.made) >= largest


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must hold a JSON object"),
        ('{"d_model": 8}', "vocab_size"),
        ('{"vocab_size": 11, "d_model": "big"}', "d_model"),
        ('{"vocab_size": 11, "colour": "red"}', "colour"),
        ('{"vocab_size": 11, "num_heads": 0}', "num_heads"),
        ('{"vocab_size": 11, "dropout": 7}', "dropout"),
        (" " * (2 << 20) + "{}", "too big for a config"),
        (b"\xff\xfe", "not valid JSON"),
    ],
    ids=[
        "not json", "list", "missing", "string", "unknown", "zero", "dropout", "huge", "binary",
    ],
)  # fmt: skip
def test_malformed_config_is_refused(content, message, saved, spy):
    path = saved / "config.json"
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content)
    with pytest.raises(ValueError, match=message):
        TransformerLM.from_pretrained(saved)
    assert spy["built_on"] == [] and spy["read"] == []


def test_checkpoint_weights_that_do_not_fit_the_model_change_nothing(tmp_path):
    small = TransformerLM(LMConfig(**CONFIG))
    save_checkpoint(tmp_path / "last", small, step=1)
    other = TransformerLM(LMConfig(**{**CONFIG, "d_model": 12, "num_heads": 2}))
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"does not fit the model: .* has shape"):
        load_checkpoint(tmp_path / "last", other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())
