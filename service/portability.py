"""Tasks that travel, on the service's side: a stored task out as a zip of what ipt_engine.portability writes
(a PEFT prompt-tuning adapter, or plain embeddings), and a PEFT prompt-tuning adapter in as a stored z.

The routes (service/routes/portability.py) speak HTTP only; the tensors are handled here:
- export: the task's prompt Proj_b(z) in fp32, decoded as predictions decode it (service/predictor.py:
  decode_prompt), written by write_peft_adapter / write_embeddings with a README.md recipe, zipped in memory;
- import: the adapter's weights (safetensors bytes, never a pickle) and config checked against the backbone and
  the subspace (check_adapter: AdapterMismatchError names what differs), z fitted by least squares (fit_vector),
  and, with examples, the dev scores of the imported prompt, of Proj_b(z) and of the bare model.
"""

from __future__ import annotations

import copy
import io
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from ipt_engine.evaluation import evaluate
from ipt_engine.portability import (
    EMBEDDINGS_FILE,
    EMBEDDINGS_KEY,
    FORMAT_FILE,
    PEFT_CONFIG_FILE,
    PEFT_WEIGHTS_FILE,
    AdapterMismatchError,
    check_adapter,
    fit_vector,
    write_embeddings,
    write_peft_adapter,
)
from ipt_engine.subspace import ProjB
from ipt_engine.tasks import Task
from service.predictor import decode_prompt
from service.runtime import Runtime
from service.safe_text import clean_text
from service.task_store import TaskStore

ExportFormat = Literal["peft", "embeddings"]
EmbeddingsDtype = Literal["float32", "float16", "bfloat16"]
README_FILE = "README.md"
POOR_FIT = 0.5
"""An imported prompt whose relative reconstruction error is above this gets a `note`: the subspace keeps little
of it, and its predictions will differ from the adapter's."""


class ExportRefused(ValueError):
    """This backbone cannot be exported in that format (message for a 409)."""


@dataclass(frozen=True)
class ExportArchive:
    filename: str
    content: bytes


def task_prompt(runtime: Runtime, z: np.ndarray) -> torch.Tensor:
    """The prompt [n, d] in fp32 on the CPU that predictions of this z use (Proj_b(z), as decode_prompt)."""
    return decode_prompt(runtime, z).detach().float().cpu()


def export_archive(runtime: Runtime, task_id: str, name: str, kind: str, labels: list[str] | None, z: np.ndarray,
                   fmt: ExportFormat, dtype: EmbeddingsDtype = "float32") -> ExportArchive:
    """The zip of a task's export directory: its files at the root of the archive."""
    backbone = runtime.backbone
    if fmt == "peft" and backbone.is_encoder_decoder:
        raise ExportRefused("a PEFT export is written for causal LMs; this service runs a seq2seq backbone: "
                            "export format 'embeddings' instead")
    prompt = task_prompt(runtime, z)
    name = clean_text(name)  # the name the prompt formats inputs with (service/predictor.py:task_head)
    labels = [clean_text(label) for label in labels] if labels else None
    base_model = backbone.backbone_id
    with tempfile.TemporaryDirectory(prefix="ipt-export-") as tmp:
        out = Path(tmp)
        if fmt == "peft":
            config = backbone.model.config
            write_peft_adapter(out, prompt, base_model=base_model,
                               num_layers=int(getattr(config, "num_hidden_layers", 0) or 0),
                               num_heads=int(getattr(config, "num_attention_heads", 0) or 0),
                               task_name=name, kind=kind, labels=labels)
        else:
            write_embeddings(out, prompt, task_name=name, kind=kind, labels=labels, base_model=base_model,
                             dtype=getattr(torch, dtype))
        (out / README_FILE).write_text(export_readme(fmt, name, base_model, prompt.shape[0], dtype))
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            for path in sorted(out.iterdir()):
                archive.write(path, path.name)
    return ExportArchive(f"{name}-{task_id[:8]}-{fmt}.zip", buffer.getvalue())


def export_readme(fmt: ExportFormat, name: str, base_model: str, n: int, dtype: str) -> str:
    """A short recipe for the exported files (the input format itself is in ipt_format.json)."""
    source = f'f"{name}: {{text}}\\nAnswer:"'
    head = (f"# Task `{name}`, exported from the IPT service\n\nBase model: `{base_model}`; soft prompt: {n} vectors."
            f" `{FORMAT_FILE}` says how the service formats inputs and scores options; scores match the service's"
            f" (to 1e-4 in fp32) only with that format: the source is {source} (multiple choice: the options line"
            " before `Answer:`), tokenized with special tokens, and each option is `' ' + option` + EOS.\n\n")
    if fmt == "peft":
        return head + f"""Files: `{PEFT_CONFIG_FILE}`, `{PEFT_WEIGHTS_FILE}` (a PEFT PROMPT_TUNING adapter).

```python
import torch
from peft import PeftModel
from transformers import AutoModelForCausalLM, AutoTokenizer

model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(BASE), "THIS_DIR").eval()
tok = AutoTokenizer.from_pretrained(BASE)
src = tok({source}, add_special_tokens=True).input_ids
tgt = tok(" " + option, add_special_tokens=False).input_ids + [tok.eos_token_id]
logp = model(input_ids=torch.tensor([src + tgt])).logits[0].log_softmax(-1)
# the logits include the {n} virtual tokens' positions: target token j is predicted at {n} + len(src) - 1 + j
total = sum(logp[{n} + len(src) - 1 + j, t] for j, t in enumerate(tgt))
# the service's `scores` = total / len(tgt); its `probabilities` = softmax of `total` over the options
```
"""
    return head + f"""Files: `{EMBEDDINGS_FILE}`: tensor `{EMBEDDINGS_KEY}` [{n}, d] in {dtype} (its metadata names the
dtype and the base model). Prepend it to the token embeddings of the source (and target).

transformers:

```python
import torch
from safetensors.torch import load_file
soft = load_file("THIS_DIR/{EMBEDDINGS_FILE}")["{EMBEDDINGS_KEY}"].to(model.dtype)
ids = tok({source}, add_special_tokens=True).input_ids + target_ids
embeds = torch.cat([soft, model.get_input_embeddings()(torch.tensor(ids))])[None]
logp = model(inputs_embeds=embeds).logits[0].log_softmax(-1)  # positions count from the soft prompt
```

vLLM (started with `enable_prompt_embeds=True`): pass the same [n + len(ids), d] tensor as
`llm.generate({{"prompt_embeds": embeds[0]}}, SamplingParams(temperature=0))`: greedy generation after the source,
as the service generates.
"""


# ------------------------------------------------------------------------------------------------- import
@dataclass(frozen=True)
class ImportedPrompt:
    z: np.ndarray  # [d_I] float32
    prompt: torch.Tensor  # [n, d] the adapter's prompt, fp32 on the CPU
    relative_error: float  # |Proj_b(z) - prompt| / |prompt|
    iterations: int


def max_weights_bytes(runtime: Runtime) -> int:
    """The largest adapter_model.safetensors that can fit: n * d values of 8 bytes, plus a header."""
    config = runtime.subspace.config
    return config.n_prompt * config.d_model * 8 + 64 * 1024


def fit_adapter(runtime: Runtime, config: dict[str, Any], weights: bytes) -> ImportedPrompt:
    """The z of this subspace closest to a PEFT prompt-tuning adapter's prompt. AdapterMismatchError when the
    weights do not parse or the adapter does not fit (its message names what differs)."""
    try:
        tensors = load_safetensors(weights)
    except (SafetensorError, ValueError, RuntimeError) as exc:
        raise AdapterMismatchError(f"{PEFT_WEIGHTS_FILE} is not a readable safetensors file "
                                   f"({str(exc)[:200]})") from None
    sub = runtime.subspace.config
    prompt = check_adapter(config, tensors, base_model=runtime.backbone.backbone_id, n_prompt=sub.n_prompt,
                           d_model=sub.d_model)
    fit = fit_vector(_cpu_proj_b(runtime.subspace.proj_b), prompt)
    if not torch.isfinite(fit.z).all():
        raise AdapterMismatchError("the prompt could not be fitted in this subspace (the fit is not finite)")
    return ImportedPrompt(fit.z.numpy().astype(np.float32), prompt, fit.relative_error, fit.iterations)


def _cpu_proj_b(proj_b: ProjB) -> ProjB:
    """fit_vector works on the CPU (float64); a Proj_b on an accelerator is copied."""
    if proj_b.up.weight.device.type == "cpu":
        return proj_b
    return copy.deepcopy(proj_b).cpu()


@dataclass(frozen=True)
class DevScores:
    imported_prompt: float  # the adapter's own prompt
    vector: float  # Proj_b(z), the prompt the service will use
    bare: float  # the model without a prompt
    examples: int


def dev_scores(runtime: Runtime, task: Task, imported: ImportedPrompt) -> DevScores | None:
    """The dev scores of the imported prompt, of its z and of the bare model on the task's dev split."""
    if not task.dev:
        return None
    device = runtime.backbone.device
    prompts = torch.stack([imported.prompt, task_prompt(runtime, imported.z)]).to(device)
    with torch.no_grad():
        by_prompt, by_vector = evaluate(runtime.backbone, [task, task], prompts, "dev")
        (bare,) = evaluate(runtime.backbone, [task], None, "dev")
    return DevScores(float(by_prompt), float(by_vector), float(bare), len(task.dev))


def store_imported(store: TaskStore, task_id: str, z: np.ndarray, dev: DevScores | None) -> bool:
    """A created (queued) task becomes `succeeded` with z, at once: no IST ran. Its dev score and the bare
    model's are set when examples gave a dev split, else left empty. False if the task went meanwhile."""
    return store.mark_imported(task_id, z, dev.vector if dev else None, dev.bare if dev else None)

