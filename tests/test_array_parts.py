"""Array files written a part at a time: ordinary safetensors files, indexed only when complete."""

from __future__ import annotations

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from engine.store.arrays import PartWriter, load_arrays, load_arrays_with_metadata


def _parts() -> list[dict[str, torch.Tensor]]:
    generator = torch.Generator().manual_seed(0)
    return [
        {"0.a": torch.randn(5, 3, dtype=torch.float64, generator=generator),
         "0.n": torch.tensor([7], dtype=torch.int64)},
        {"1.b": torch.randn(4, generator=generator).to(torch.bfloat16),
         "1.c": torch.randn(2, 2, generator=generator).t(),  # not contiguous
         "1.mask": torch.tensor([True, False, True]), "1.empty": torch.zeros(0, 3), "1.scalar": torch.tensor(2.5)},
    ]


def test_a_file_written_in_parts_reads_back_with_safetensors_and_the_store(store):
    with PartWriter(store, "parts", "calibration", {"model": "m"}) as writer:
        for part in _parts():
            writer.add(part)
        path = writer.finish()
    expected = {name: tensor for part in _parts() for name, tensor in part.items()}
    read = load_file(str(path))
    assert read.keys() == expected.keys()
    for name, tensor in expected.items():
        assert read[name].dtype == tensor.dtype and torch.equal(read[name], tensor), name
    with safe_open(str(path), framework="pt") as handle:
        assert handle.metadata() == {"model": "m"}
    tensors, metadata = load_arrays_with_metadata(store, "parts")  # indexed, with checksums that match
    assert metadata == {"model": "m"} and all(torch.equal(tensors[n], t) for n, t in expected.items())
    assert not list(path.parent.glob("*.body")) and not list(path.parent.glob("*.partial"))


def test_a_failed_write_leaves_no_file_and_no_index_entry(store):
    with pytest.raises(RuntimeError, match="interrupted"):
        with PartWriter(store, "broken", "calibration") as writer:
            writer.add(_parts()[0])
            raise RuntimeError("interrupted")
    assert load_arrays(store, "broken") is None
    assert not any((store.cache_dir / "arrays" / "calibration").iterdir())


def test_a_name_written_twice_is_refused(store):
    with PartWriter(store, "twice", "calibration") as writer:
        writer.add({"x": torch.zeros(2)})
        with pytest.raises(ValueError, match="'x' was already written"):
            writer.add({"x": torch.ones(2)})
        writer.discard()
