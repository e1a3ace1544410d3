"""Helpers for tests, benchmarks and the demo, importable from an installed package (as transformers has
testing_utils): tiny random-weight backbones, small deterministic tasks.

- Tiny backbones (`save_tiny`): random-weight Llama (causal), BART and T5 (seq2seq) models built from configs,
  with a small BPE tokenizer trained on the spot. Nothing is downloaded; fast enough for tests of shapes,
  batching, masking and training mechanics (not of quality).
- Category tasks (`category_task`, RELATED, TARGET): name the category of a word. Each task picks three
  categories; inputs are template sentences mentioning one item of a category and the label is the category's
  name. Tasks over different category triples are related (same format, overlapping label words) but distinct.
  `python -m ipt_engine.testing DIR` writes them as task files (examples/demo.sh).
- `build_category_study`: PT of the target and the related tasks, MSF on the related ones, and the artifact with
  their vectors: the real-model tests' setting (and `benchmarks/ist_start_probe.py`'s).
- `make_task`: a small valid task of any kind, for mechanics tests.

transformers and tokenizers are imported when a tiny model is built, not when this module is.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ipt_engine.tasks import Example, Task, TaskKind

if TYPE_CHECKING:
    from transformers import (
        BartForConditionalGeneration,
        LlamaForCausalLM,
        PreTrainedTokenizerFast,
        T5ForConditionalGeneration,
    )

    from ipt_engine.backbone import Backbone
    from ipt_engine.msf import MSFResult
    from ipt_engine.prompt_tuning import PromptTuningResult

# ------------------------------------------------------------------------------------------ tiny backbones

CORPUS = [
    "the movie was great and the actors were wonderful",
    "the food was terrible and the service was slow",
    "sports news: the team won the match yesterday",
    "weather report: rain tomorrow and sun on friday",
    "Answer: positive negative neutral yes no maybe",
    "Options: red | green | blue | alpha | beta | gamma",
    "translate english to french: hello world bonjour le monde",
    "0123456789 + - * / = ( ) ? ! . , : ; ' \" [ ]",
] * 4


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<pad>", "<s>", "</s>", "<unk>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def tiny_llama(vocab_size: int, seed: int = 0) -> LlamaForCausalLM:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
                         initializer_range=0.3)
    return LlamaForCausalLM(config)


def tiny_bart(vocab_size: int, seed: int = 0) -> BartForConditionalGeneration:
    import torch
    from transformers import BartConfig, BartForConditionalGeneration

    torch.manual_seed(seed)
    config = BartConfig(vocab_size=vocab_size, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None, init_std=0.3)
    return BartForConditionalGeneration(config)


def tiny_t5(vocab_size: int, seed: int = 0) -> T5ForConditionalGeneration:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    torch.manual_seed(seed)
    config = T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_layers=1, num_decoder_layers=1,
                      num_heads=4, pad_token_id=0, eos_token_id=2, decoder_start_token_id=0,
                      initializer_factor=5.0)
    return T5ForConditionalGeneration(config)


def save_tiny(kind: str, directory: Path) -> Path:
    """Write a tiny model of `kind` ('llama', 'bart', 't5') and the tokenizer to `directory`."""
    tokenizer = tiny_tokenizer()
    build = {"llama": tiny_llama, "bart": tiny_bart, "t5": tiny_t5}[kind]
    model = build(len(tokenizer))
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ------------------------------------------------------------------------------------------ tasks

def make_task(name: str = "sentiment", kind: TaskKind = TaskKind.CLASSIFICATION, n: int = 6) -> Task:
    """A small valid task of the given kind for mechanics tests."""
    words = ["great", "terrible", "fine", "awful", "lovely", "bad", "nice", "poor", "good", "sad", "happy", "dull"]
    labels = ("positive", "negative")
    exs = []
    for i in range(n):
        label = labels[i % 2]
        if kind is TaskKind.MULTIPLE_CHOICE:
            exs.append(Example(f"the movie was {words[i % len(words)]}", label, options=labels))
        elif kind is TaskKind.GENERATION:
            exs.append(Example(f"repeat: {words[i % len(words)]}", words[i % len(words)]))
        else:
            exs.append(Example(f"the movie was {words[i % len(words)]}", label))
    return Task(name, kind, exs[: n - 2], exs[n - 2:], exs[n - 2:],
                labels if kind is TaskKind.CLASSIFICATION else None)


CATEGORIES: dict[str, list[str]] = {
    "animal": ["dog", "cat", "horse", "rabbit", "lion", "tiger", "elephant", "sheep", "goat", "wolf", "bear", "fox"],
    "fruit": ["apple", "banana", "mango", "pear", "grape", "cherry", "peach", "lemon", "plum", "melon", "kiwi",
              "apricot"],
    "vehicle": ["car", "bus", "truck", "bicycle", "train", "motorcycle", "van", "tractor", "scooter", "taxi", "tram",
                "jeep"],
    "color": ["red", "blue", "green", "yellow", "purple", "pink", "brown", "black", "white", "grey", "violet",
              "crimson"],
    "sport": ["football", "tennis", "basketball", "golf", "hockey", "baseball", "cricket", "rugby", "volleyball",
              "boxing", "swimming", "skiing"],
    "instrument": ["piano", "guitar", "violin", "drum", "flute", "trumpet", "cello", "harp", "saxophone", "clarinet",
                   "banjo", "organ"],
    "profession": ["doctor", "teacher", "lawyer", "nurse", "farmer", "pilot", "chef", "engineer", "plumber",
                   "dentist", "baker", "soldier"],
    "weather": ["rain", "snow", "storm", "fog", "wind", "sunshine", "hail", "thunder", "drizzle", "frost", "sleet",
                "heatwave"],
}
TEMPLATES = [
    "I keep thinking about the {x}.",
    "My friend talked about the {x} all day.",
    "There is something about the {x} in this text.",
    "She wrote a short story about the {x}.",
    "The word of the day is {x}.",
    "Yesterday the news mentioned the {x}.",
]


def category_task(name: str, categories: list[str], seed: int, train_per_label: int = 16, dev_per_label: int = 8,
                  test_per_label: int = 12) -> Task:
    """A 3-way (or k-way) classification task over `categories`, disjoint train / dev / test examples."""
    rng = random.Random(seed)
    splits: dict[str, list[Example]] = {"train": [], "dev": [], "test": []}
    for cat in categories:
        pool = [t.format(x=item) for item in CATEGORIES[cat] for t in TEMPLATES]
        rng.shuffle(pool)
        sizes = {"train": train_per_label, "dev": dev_per_label, "test": test_per_label}
        start = 0
        for split, size in sizes.items():
            splits[split] += [Example(text, cat) for text in pool[start:start + size]]
            start += size
    for exs in splits.values():
        rng.shuffle(exs)
    return Task(name, TaskKind.CLASSIFICATION, splits["train"], splits["dev"], splits["test"], tuple(categories))


RELATED = {
    "category_a": ["animal", "fruit", "vehicle"],
    "category_b": ["color", "sport", "weather"],
    "category_c": ["profession", "instrument", "animal"],
    "category_d": ["vehicle", "color", "profession"],
}
TARGET = ("category_target", ["fruit", "sport", "instrument"])


@dataclass
class CategoryStudy:
    """PT on a new category task and four related ones (one batched run), and MSF on the related tasks'
    prompts (the target is unseen by the subspace), saved as an artifact with the related tasks' vectors."""

    target: Task
    related: list[Task]
    pt: PromptTuningResult
    msf: MSFResult
    artifact: Path


def build_category_study(bb: Backbone, artifact: Path, *, pt_steps: int = 30, msf_steps: int = 50,
                         d_intrinsic: int = 4) -> CategoryStudy:
    """The target (16/8/12 examples per label) and RELATED tasks, PT (n = 10) of all five, MSF (d_I' = 64) on the
    related ones, written to `artifact` with `task_vectors.safetensors`, as `ipt msf` writes them: the worker's
    Gauss-Newton IST chooses its start among z = 0, their mean and each of them."""
    from ipt_engine.msf import find_subspace
    from ipt_engine.named_tensors import save_named
    from ipt_engine.prompt_tuning import prompt_tune
    from ipt_engine.subspace import SubspaceConfig
    from ipt_engine.subspace_artifact import VECTORS_FILE, save_artifact
    from ipt_engine.training import TrainConfig

    target = category_task(TARGET[0], TARGET[1], seed=len(RELATED), train_per_label=16, dev_per_label=8,
                           test_per_label=12)
    related = [category_task(name, cats, seed=i, dev_per_label=4) for i, (name, cats) in enumerate(RELATED.items())]
    pt = prompt_tune(bb, [target, *related], TrainConfig(learning_rate=0.1, max_steps=pt_steps, batch_size=6,
                                                         eval_every=10, patience=2), n_prompt=10)
    msf = find_subspace(bb, related, TrainConfig(learning_rate=3e-3, max_steps=msf_steps, batch_size=6,
                                                 eval_every=25, patience=2),
                        SubspaceConfig(n_prompt=10, d_model=bb.hidden_size, d_intrinsic=d_intrinsic, d_hidden=64),
                        task_prompts=pt.prompts[1:], alpha=200.0)
    save_artifact(artifact, msf.subspace, bb.backbone_id, bb.input_embeddings,
                  provenance={"tasks": [t.name for t in related]})
    save_named(artifact / VECTORS_FILE, {t.name: msf.task_vectors[i] for i, t in enumerate(related)})
    return CategoryStudy(target, related, pt, msf, artifact)


def write_task_files(directory: str) -> None:
    """Write related.jsonl (the related tasks) and target.jsonl (the new task) for the demo."""
    from ipt_engine.tasks import save_tasks

    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    save_tasks([category_task(n, c, seed=i) for i, (n, c) in enumerate(RELATED.items())], out / "related.jsonl")
    save_tasks([category_task(TARGET[0], TARGET[1], seed=len(RELATED))], out / "target.jsonl")


if __name__ == "__main__":
    import sys

    write_task_files(sys.argv[1] if len(sys.argv) > 1 else "runs/demo")


def option_log_likelihoods_by_format(model: Any, tokenizer: Any, task_name: str, inputs: Sequence[str],
                                     labels: Sequence[str], n_prompt: int, prefix: Any = None
                                     ) -> list[list[tuple[float, int]]]:
    """Each label's (total log-probability, token count) for each input, computed the way an export's
    ipt_format.json describes it, on a plain transformers causal LM: a PEFT prompt-tuning model (prefix None:
    its virtual tokens come first) or a plain one with `prefix` [n, d] prepended as inputs_embeds. The reference
    the export tests compare the service's scores with."""
    import torch

    from ipt_engine.tasks import TaskKind, to_text_pair

    rows = []
    for text in inputs:
        src = tokenizer(to_text_pair(task_name, TaskKind.CLASSIFICATION, text).source,
                        add_special_tokens=True).input_ids
        row = []
        for label in labels:
            tgt = [*tokenizer(" " + label, add_special_tokens=False).input_ids, tokenizer.eos_token_id]
            ids = torch.tensor([src + tgt])
            with torch.no_grad():
                if prefix is None:
                    logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
                else:
                    embeds = torch.cat([prefix[None].float(), model.get_input_embeddings()(ids)], dim=1)
                    logits = model(inputs_embeds=embeds).logits
            logp = logits[0].float().log_softmax(-1)
            start = n_prompt + len(src)  # a PEFT prompt-tuning model's logits include its virtual tokens
            row.append((sum(float(logp[start - 1 + j, t]) for j, t in enumerate(tgt)), len(tgt)))
        rows.append(row)
    return rows
