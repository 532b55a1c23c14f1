"""Where a base model's weights come from, and a prepared copy of them on this machine's disk.

A deployed SuperNode starts one ClientApp process per message, so every train message builds its
base model again; dequantizing SmolLM2's GGUF file and reading its tokenizer take tens of seconds
on a small CPU. So the first load of a model from local files (a packaged model, a local folder
or ``.gguf`` file) writes what ``from_pretrained`` built, with ``save_pretrained`` (safetensors),
to a folder under :func:`cache_root`, and later loads read that folder:

- **key**: the source (path, GGUF file), the version of its files (name, size and modification
  time of each), the auto class and its arguments (``model.dtype``), the transformers and torch
  versions and :data:`FORMAT`; the folder is named by a hash of it. A Hub name is not cached:
  the Hugging Face cache holds its files already, and the Hub decides its version.
- **atomic**: an entry is written under a temporary name next to it and renamed, so a reader
  sees all of it or none of it; of two processes that miss at once, the second rename fails and
  its copy is dropped.
- **checked**: an entry is used only when its manifest names this key, every file it lists has
  the listed size, and the model loads with no missing, unexpected or mismatched weight. Anything
  else is removed, loaded from the source and written again. Sizes, not contents, are checked:
  a copy corrupted in place is caught only when it no longer loads.
- a model whose source load initialised some weights (missing from its files: they depend on
  the RNG), or that stays quantized (``model.quantize`` = 4bit | 8bit: bitsandbytes quantizes
  it on the GPU as it loads), is not cached.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import torch
import transformers
from transformers import AutoTokenizer

CACHE_ENV = "HETFED_CACHE"  # the cache folder; "off": no cache
DEFAULT_ROOT = "~/.cache/hetfed/models"
MANIFEST = "hetfed-cache.json"
FORMAT = 1  # bump when what an entry holds changes
_STALE_SECONDS = 3600  # a temporary folder this old belongs to a writer that died
_log = logging.getLogger(__name__)
T = TypeVar("T")


@dataclass(frozen=True)
class ModelSource:
    """Where weights come from: a folder or Hub name, and the GGUF file in it if quantized."""

    path: str
    gguf_file: str | None = None

    def load(self, auto_class, **kwargs):
        """``auto_class.from_pretrained`` of this source (GGUF weights are dequantized)."""
        if self.gguf_file is not None:
            kwargs["gguf_file"] = self.gguf_file
        return auto_class.from_pretrained(self.path, **kwargs)


def cache_root() -> Path | None:
    """The folder of prepared copies: ``$HETFED_CACHE``, else ``~/.cache/hetfed/models``; None
    when ``HETFED_CACHE`` is ``off``."""
    value = os.environ.get(CACHE_ENV, "")
    if value.lower() == "off":
        return None
    return Path(value or DEFAULT_ROOT).expanduser()


def cache_key(source: ModelSource, auto_class: type, **kwargs: Any) -> dict[str, Any] | None:
    """What decides the weights ``source.load(auto_class, **kwargs)`` gives, or None when the
    version of its files is not known here (a Hub name)."""
    folder = Path(source.path)
    if not folder.is_dir():
        return None
    if source.gguf_file is not None:
        files = [folder / source.gguf_file]
    else:
        files = sorted(p for p in folder.iterdir() if p.is_file())
    stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = {
        "format": FORMAT,
        "source": str(folder.resolve()),
        "gguf_file": source.gguf_file,
        "files": stats,
        "class": auto_class.__name__,
        "arguments": {name: str(value) for name, value in sorted(kwargs.items())},
        "transformers": transformers.__version__,
        "torch": torch.__version__,
    }
    return json.loads(json.dumps(key))  # as a manifest reads back (tuples become lists)


def cache_folder(key: dict[str, Any]) -> Path | None:
    """The entry of ``key`` under :func:`cache_root` (None without a cache)."""
    root = cache_root()
    if root is None:
        return None
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:20]
    # readable: the GGUF file's name, or the folder's after its parent's (a package's "model")
    source = Path(key["source"])
    gguf = key["gguf_file"]
    name = Path(gguf).stem if gguf else f"{source.parent.name}-{source.name}"
    return root / f"{name}-{key['class']}-{digest}"


def pretrained_model(source: ModelSource, auto_class: type, **kwargs: Any) -> Any:
    """``source.load(auto_class, **kwargs)``, read from the cache when a whole entry is there.

    A GGUF model that transformers dequantized loses the quantizer's marks (it is a plain float
    model then), so that it can be saved and the copy read back is the same kind of model.
    """

    def read(folder: Path) -> Any:
        model, info = auto_class.from_pretrained(folder, output_loading_info=True, **kwargs)
        wrong = {kind: sorted(map(str, keys)) for kind, keys in info.items() if keys}
        if wrong:  # from_pretrained would initialise a missing weight at random
            raise ValueError(f"the copy does not fit the model: {wrong}")
        model.config.name_or_path = model.name_or_path = source.path
        return model

    def build() -> tuple[Any, bool]:
        model, info = source.load(auto_class, output_loading_info=True, **kwargs)
        quantizer = getattr(model, "hf_quantizer", None)
        tensors = [*model.parameters(), *model.buffers()]
        if quantizer is not None and all(t.is_floating_point() for t in tensors):
            quantizer.remove_quantization_config(model)  # dequantized: a plain float model
        from_files = not info["missing_keys"] and not info["mismatched_keys"]
        return model, from_files and getattr(model, "hf_quantizer", None) is None

    return _through_cache(cache_key(source, auto_class, **kwargs), read, build)


def pretrained_tokenizer(source: ModelSource) -> Any:
    """``source.load(AutoTokenizer)``, read from the cache when a whole entry is there (a GGUF
    file's tokenizer takes seconds to build)."""

    def read(folder: Path) -> Any:
        tokenizer = AutoTokenizer.from_pretrained(folder)
        tokenizer.name_or_path = source.path
        return tokenizer

    return _through_cache(
        cache_key(source, AutoTokenizer), read, lambda: (source.load(AutoTokenizer), True)
    )


def _through_cache(
    key: dict[str, Any] | None,
    read: Callable[[Path], T],
    build: Callable[[], tuple[T, bool]],
) -> T:
    """``read`` the entry of ``key`` if it is whole, else ``build`` (the object, and whether it
    may be cached) and write it."""
    folder = None if key is None else cache_folder(key)
    if folder is not None and folder.exists():
        if _whole(folder, key):
            try:
                return read(folder)
            except Exception as err:  # whatever a damaged copy raises: rebuild it
                _log.warning("model cache: not using %s (%s)", folder, err)
        _discard(folder)
    built, cacheable = build()
    if folder is not None and cacheable:
        _write(folder, key, built.save_pretrained)
    return built


def _whole(folder: Path, key: dict[str, Any]) -> bool:
    """The entry's manifest names ``key`` and every file it lists has the listed size."""
    try:
        manifest = json.loads((folder / MANIFEST).read_text())
        files = manifest["files"]
        return manifest["key"] == key and all(
            (folder / name).stat().st_size == size for name, size in files.items()
        )
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return False


def _write(folder: Path, key: dict[str, Any], save: Callable[[Path], None]) -> None:
    """``save`` into a temporary folder beside ``folder``, list its files in the manifest, flush
    them to disk, then rename it to ``folder``."""
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        _remove_stale(folder)
        temporary = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            save(temporary)
            files = sorted(p for p in temporary.rglob("*") if p.is_file())
            sizes = {str(p.relative_to(temporary)): p.stat().st_size for p in files}
            (temporary / MANIFEST).write_text(json.dumps({"key": key, "files": sizes}, indent=1))
            for path in [*files, temporary / MANIFEST]:
                with path.open("rb") as handle:  # on disk before the name says "whole"
                    os.fsync(handle.fileno())
            try:
                temporary.rename(folder)
            except OSError:
                pass  # another process renamed its copy first: keep that one
        finally:
            shutil.rmtree(temporary, ignore_errors=True)
    except OSError as err:
        _log.warning("model cache: cannot write %s (%s)", folder, err)


def _discard(folder: Path) -> None:
    """Remove an unusable entry: renamed aside first, so that its name is free at once."""
    aside = folder.with_name(f".{folder.name}.discarded-{os.getpid()}-{time.monotonic_ns()}")
    try:
        folder.rename(aside)
    except OSError:
        return  # gone already (another process discarded it), or not ours to remove
    shutil.rmtree(aside, ignore_errors=True)


def _remove_stale(folder: Path) -> None:
    """Temporary folders of ``folder`` left by writers that died (power, SIGKILL)."""
    for path in folder.parent.glob(f".{folder.name}.*"):
        try:
            if time.time() - path.stat().st_mtime > _STALE_SECONDS:
                shutil.rmtree(path, ignore_errors=True)
        except OSError:
            continue
