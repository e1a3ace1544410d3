"""Tasks that travel: a task's soft prompt out as a HuggingFace PEFT prompt-tuning adapter or as plain
embeddings, and a PEFT prompt-tuning adapter in as an intrinsic vector z.

Export writes files PEFT reads without this package (PEFT itself is never imported here):
    adapter_config.json, adapter_model.safetensors   PROMPT_TUNING adapter: `prompt_embeddings` [n, d]
    ipt_format.json                                  how the service formats and scores inputs (PEFT keeps no
                                                     record of it), so that scores can be reproduced
Import reads such an adapter, checks that it fits the backbone and the subspace (base model, n, d, adapter
type), and finds the z whose Proj_b(z) is closest to the prompt (least squares in d_I dimensions,
Levenberg-Marquardt with Proj_b's analytic Jacobian; no model forward), with the relative error left.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from ipt_engine.errors import InvalidTaskError
from ipt_engine.subspace import ProjB

PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
PEFT_WEIGHTS_KEY = "prompt_embeddings"
FORMAT_FILE = "ipt_format.json"
EMBEDDINGS_FILE = "soft_prompt.safetensors"
EMBEDDINGS_KEY = "soft_prompt"

INPUT_FORMAT = {
    "source": "'{task_name}: {input}' (multiple choice: + '\\nOptions: ' + ' | '.join(options)) + '\\nAnswer:', "
              "tokenized with the tokenizer's special tokens (a BOS where the tokenizer adds one)",
    "target": "' ' + option (or output), tokenized without special tokens, then the EOS token",
    "prompt": "the n soft-prompt vectors come first, before the source tokens; positions count from the prompt",
    "option_score": "ranking: mean log-probability per target token (EOS included); probabilities: softmax over "
                    "the options of each option's total log-probability",
    "generation": "greedy decoding after the source, stopped at EOS",
}


class AdapterMismatchError(InvalidTaskError):
    """An adapter that cannot become a task of this service (wrong type, backbone or shapes)."""


@dataclass(frozen=True)
class VectorFit:
    """The z closest to an imported prompt: Proj_b(z) ~ prompt."""

    z: Tensor  # [d_I]
    relative_error: float  # |Proj_b(z) - P| / |P| (Frobenius)
    iterations: int


def write_peft_adapter(out_dir: Path, prompt: Tensor, *, base_model: str, num_layers: int, num_heads: int,
                       task_name: str, kind: str, labels: list[str] | None = None) -> Path:
    """Write prompt [n, d] as a PEFT PROMPT_TUNING adapter for a causal LM, with the service's input format.
    `PeftModel.from_pretrained(model, out_dir)` loads it on the same base model."""
    if prompt.dim() != 2:
        raise ValueError(f"prompt must be [n, d], got {tuple(prompt.shape)}")
    n, d = prompt.shape
    out_dir.mkdir(parents=True, exist_ok=True)
    config = {
        "peft_type": "PROMPT_TUNING", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "revision": None, "inference_mode": True, "num_virtual_tokens": int(n), "token_dim": int(d),
        "num_transformer_submodules": 1, "num_attention_heads": int(num_heads), "num_layers": int(num_layers),
        "prompt_tuning_init": "RANDOM", "prompt_tuning_init_text": None, "tokenizer_name_or_path": None,
        "tokenizer_kwargs": None, "modules_to_save": None, "auto_mapping": None,
    }
    (out_dir / PEFT_CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")
    save_file({PEFT_WEIGHTS_KEY: prompt.detach().float().cpu().contiguous()}, str(out_dir / PEFT_WEIGHTS_FILE))
    (out_dir / FORMAT_FILE).write_text(json.dumps({
        "task_name": task_name, "kind": kind, "labels": labels, "base_model": base_model, "n_prompt": int(n),
        "format": INPUT_FORMAT}, indent=1) + "\n")
    return out_dir


def write_embeddings(out_dir: Path, prompt: Tensor, *, task_name: str, kind: str, labels: list[str] | None = None,
                     base_model: str, dtype: torch.dtype = torch.float32) -> Path:
    """Write prompt [n, d] as plain embeddings (`soft_prompt` in safetensors, in `dtype`) to prepend to a
    model's token embeddings (`inputs_embeds`), with the input format beside it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    save_file({EMBEDDINGS_KEY: prompt.detach().to(dtype).cpu().contiguous()}, str(out_dir / EMBEDDINGS_FILE),
              metadata={"dtype": str(dtype).removeprefix("torch."), "base_model": base_model})
    (out_dir / FORMAT_FILE).write_text(json.dumps({
        "task_name": task_name, "kind": kind, "labels": labels, "base_model": base_model,
        "n_prompt": int(prompt.shape[0]), "format": INPUT_FORMAT}, indent=1) + "\n")
    return out_dir


def read_peft_prompt(adapter_dir: Path, *, base_model: str, n_prompt: int, d_model: int) -> Tensor:
    """The prompt [n, d] of a PEFT prompt-tuning adapter directory, checked against the backbone and the
    subspace; AdapterMismatchError names what differs."""
    config = read_adapter_config(adapter_dir)
    return check_adapter(config, load_file(str(adapter_dir / PEFT_WEIGHTS_FILE)), base_model=base_model,
                         n_prompt=n_prompt, d_model=d_model)


def read_adapter_config(adapter_dir: Path) -> dict[str, Any]:
    path = adapter_dir / PEFT_CONFIG_FILE
    if not path.is_file():
        raise AdapterMismatchError(f"{adapter_dir} holds no {PEFT_CONFIG_FILE}: not a PEFT adapter directory")
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise AdapterMismatchError(f"{PEFT_CONFIG_FILE} is not valid JSON ({exc.msg})") from None
    if not isinstance(config, dict):
        raise AdapterMismatchError(f"{PEFT_CONFIG_FILE} must hold a JSON object")
    return config


def check_adapter(config: dict[str, Any], tensors: dict[str, Tensor], *, base_model: str, n_prompt: int,
                  d_model: int) -> Tensor:
    """Validate a PEFT adapter's config and weights against this backbone and subspace; returns prompt [n, d]."""
    kind = config.get("peft_type")
    if kind != "PROMPT_TUNING":
        raise AdapterMismatchError(f"a {kind or 'unknown'} adapter cannot be imported: only PROMPT_TUNING adapters "
                                   f"(a soft prompt) map to a task vector")
    if config.get("task_type") not in (None, "CAUSAL_LM"):
        raise AdapterMismatchError(f"the adapter is for task_type {config.get('task_type')}; this backbone is a "
                                   f"CAUSAL_LM")
    model = str(config.get("base_model_name_or_path") or "")
    if model and _model_key(model) != _model_key(base_model):
        raise AdapterMismatchError(f"the adapter was trained on {model!r}; this service runs {base_model!r}")
    if config.get("num_transformer_submodules", 1) not in (1, None):
        raise AdapterMismatchError(f"num_transformer_submodules={config['num_transformer_submodules']}: a causal "
                                   f"LM adapter has 1")
    n, d = config.get("num_virtual_tokens"), config.get("token_dim")
    if n != n_prompt:
        raise AdapterMismatchError(f"the adapter has {n} virtual tokens; this subspace's prompts have n={n_prompt}")
    if d != d_model:
        raise AdapterMismatchError(f"the adapter's token_dim is {d}; this backbone's hidden size is d={d_model}")
    if PEFT_WEIGHTS_KEY not in tensors:
        raise AdapterMismatchError(f"{PEFT_WEIGHTS_FILE} holds no {PEFT_WEIGHTS_KEY!r} tensor "
                                   f"(found {sorted(tensors)[:5]})")
    prompt = tensors[PEFT_WEIGHTS_KEY].float()
    if tuple(prompt.shape) != (n_prompt, d_model):
        raise AdapterMismatchError(f"{PEFT_WEIGHTS_KEY} has shape {tuple(prompt.shape)}; expected "
                                   f"[{n_prompt}, {d_model}]")
    if not torch.isfinite(prompt).all():
        raise AdapterMismatchError(f"{PEFT_WEIGHTS_KEY} holds NaN or infinite values")
    return prompt


def _model_key(name: str) -> str:
    """'HuggingFaceTB/SmolLM2-135M-Instruct' and a local '.../smollm2-135m-instruct-fp32-v1' compare equal."""
    tail = name.rstrip("/").split("/")[-1].lower()
    return tail.removesuffix("-fp32-v1")


def fit_vector(proj_b: ProjB, prompt: Tensor, *, max_iterations: int = 50, tolerance: float = 1e-8) -> VectorFit:
    """min_z |Proj_b(z) - prompt|^2 for prompt [n, d]: Levenberg-Marquardt from z = 0 with Proj_b's analytic
    Jacobian J [n*d, d_I] (no model forward). Returns z, the relative error left and the iterations taken."""
    w_up, b_up = proj_b.up.weight.detach().double(), proj_b.up.bias.detach().double()
    w_out, b_out = proj_b.out.weight.detach().double(), proj_b.out.bias.detach().double()
    target = prompt.detach().double().flatten()
    if target.numel() != w_out.shape[0]:
        raise ValueError(f"prompt has {target.numel()} values; Proj_b makes {w_out.shape[0]}")

    def residual(z: Tensor) -> tuple[Tensor, Tensor]:
        hidden = torch.tanh(w_up @ z + b_up)
        return w_out @ hidden + b_out - target, hidden

    z = torch.zeros(w_up.shape[1], dtype=torch.float64)
    r, hidden = residual(z)
    cost, lam, iterations = float(r @ r), 1e-3, 0
    for iterations in range(1, max_iterations + 1):  # noqa: B007 (reported)
        jac = w_out @ ((1 - hidden ** 2)[:, None] * w_up)  # [n*d, d_I]
        jtj, jtr = jac.T @ jac, jac.T @ r
        improved = False
        while lam < 1e12:
            step = torch.linalg.solve(jtj + lam * torch.diag(torch.diag(jtj).clamp(min=1e-12)), -jtr)
            new_r, new_hidden = residual(z + step)
            new_cost = float(new_r @ new_r)
            if new_cost < cost:
                improved = True
                z, r, hidden = z + step, new_r, new_hidden
                gain, cost, lam = cost - new_cost, new_cost, max(lam / 3, 1e-9)
                break
            lam *= 4
        if not improved or gain <= tolerance * max(cost, 1e-30):
            break
    norm = float(target @ target)
    error = math.sqrt(cost / norm) if norm > 0 else 0.0
    return VectorFit(z.float(), error, iterations)
