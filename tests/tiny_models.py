"""Tiny random-weight backbones built from configs, with a small BPE tokenizer trained on the spot.

Nothing is downloaded: the tokenizer is trained on a few sentences and the models are random, so they
are fast enough for unit tests of shapes, batching, masking and training mechanics (not of quality).
"""

from __future__ import annotations

from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (
    BartConfig,
    BartForConditionalGeneration,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    T5Config,
    T5ForConditionalGeneration,
)

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

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True,
                         initializer_range=0.3)
    return LlamaForCausalLM(config)


def tiny_bart(vocab_size: int, seed: int = 0) -> BartForConditionalGeneration:
    import torch

    torch.manual_seed(seed)
    config = BartConfig(vocab_size=vocab_size, d_model=32, encoder_layers=1, decoder_layers=1,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_position_embeddings=128, pad_token_id=0, bos_token_id=1,
                        eos_token_id=2, decoder_start_token_id=2, forced_eos_token_id=None, init_std=0.3)
    return BartForConditionalGeneration(config)


def tiny_t5(vocab_size: int, seed: int = 0) -> T5ForConditionalGeneration:
    import torch

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
