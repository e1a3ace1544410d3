"""The frozen PLM, driven with one soft prompt per batch row.

`Backbone` wraps a transformers causal LM or seq2seq LM and its tokenizer. Its parameters never receive
gradients; gradients flow only into the soft prompts passed in. Every method takes `prompts`, a tensor
[batch, n, d] (or None for no prompt) whose row i is prepended to the input embeddings of row i, so one
forward pass can serve rows of many tasks. For seq2seq models the prompt goes on the encoder side.

Three operations:
- `target_log_likelihood`: sum of log p(target tokens | prompt, source) per row; differentiable in the
  prompts (this is the training loss of PT, MSF and IST).
- `score_options`: rank classification, the log-likelihood of every answer option of every row, all
  options of all rows packed into as few forward passes as the token budget allows.
- `generate`: greedy decoding.
"""

from __future__ import annotations

import inspect
import logging
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ipt_engine.device import pick_device, resolve_dtype
from ipt_engine.errors import InputTruncatedWarning
from ipt_engine.model_loading import LoadInfo, is_default_backbone, load_pretrained, load_smollm2
from ipt_engine.option_packing import pack_rows, packed_width
from ipt_engine.prompt_kv import PromptKV

log = logging.getLogger(__name__)

DEFAULT_MAX_BATCH_TOKENS = 8192
"""Token budget (rows x padded length) of one scoring forward pass; bounds activation memory."""
HEAD_COLUMNS = 128
"""Positions whose vocabulary log-probabilities are computed at once when scoring (bounds the logits held)."""


@dataclass(frozen=True)
class OptionScores:
    """The answer options of one row, scored. Shapes: [num_options]."""

    log_likelihoods: Tensor  # sum of token log-probabilities of each option (float32, CPU)
    num_tokens: Tensor  # number of target tokens of each option (int64, CPU)

    def scores(self, length_normalized: bool = True) -> Tensor:
        """Ranking scores: mean token log-likelihood (default) or the plain sum."""
        if length_normalized:
            return self.log_likelihoods / self.num_tokens.clamp(min=1)
        return self.log_likelihoods

    def probabilities(self) -> Tensor:
        """The model's belief over the options: the probability of each option's whole token sequence,
        renormalised over the options, i.e. softmax of the total log-likelihoods. [num_options]

        The ranking (`scores`, `best`) is length-normalised by default, so a long option is not penalised for
        its length; where the two disagree the answer is the ranking's, and the API returns both."""
        return torch.softmax(self.log_likelihoods, dim=0)

    def best(self, length_normalized: bool = True) -> int:
        return int(self.scores(length_normalized).argmax())


@dataclass(frozen=True)
class _Row:
    """One tokenized (source, target) sequence and the index of the prompt row it uses."""

    prompt_row: int
    source: list[int]
    target: list[int]
    cached: int = 0  # source tokens before `source` whose keys and values come from the prompt cache

    @property
    def length(self) -> int:
        return len(self.source) + len(self.target)


def _strip_cached_prefix(row: _Row, prefix: tuple[int, ...]) -> _Row:
    """The row without the source tokens its prompt cache holds, when its source starts with them and goes on
    past them (a source cut from the left to fit the context does not); else the row as it is."""
    k = len(prefix)
    if k and len(row.source) > k and tuple(row.source[:k]) == prefix:
        return _Row(row.prompt_row, row.source[k:], row.target, cached=k)
    return row


class Backbone:
    """A frozen pretrained LM and its tokenizer, taking a different soft prompt on every batch row."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, backbone_id: str, *,
                 device: torch.device | str | None = None, max_length: int | None = None,
                 max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS, load_info: LoadInfo | None = None) -> None:
        self.device = pick_device(str(device) if device is not None else None)
        self.model = model.to(self.device).eval()
        self.model.requires_grad_(False)
        self.tokenizer = tokenizer
        self.backbone_id = backbone_id
        self.load_info = load_info
        self.max_batch_tokens = max_batch_tokens
        self.is_encoder_decoder = bool(getattr(model.config, "is_encoder_decoder", False))
        self.max_length = min(max_length or self.context_length, self.context_length)
        self.truncated_inputs = 0  # how many inputs were cut to fit the context (for logs and metrics)
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        self._eos = tokenizer.eos_token_id
        self._bos = tokenizer.bos_token_id
        self._head_path = (not self.is_encoder_decoder) and self._lm_head_matches_logits()
        self._logits_to_keep = "logits_to_keep" in inspect.signature(model.forward).parameters

    # ----------------------------------------------------------------------------------------- loading
    @classmethod
    def load(cls, name_or_path: str = "smollm2", *, device: str | None = None, dtype: str | None = "float32",
             cache_dir: str | Path | None = None, max_length: int | None = None,
             max_batch_tokens: int = DEFAULT_MAX_BATCH_TOKENS) -> Backbone:
        """Load a backbone by name: 'smollm2' (the packaged default) or any transformers model name/path."""
        dev = pick_device(device)
        torch_dtype = resolve_dtype(dtype, dev)
        if is_default_backbone(name_or_path):
            model, tokenizer, info = load_smollm2(Path(cache_dir) if cache_dir else None, torch_dtype)
        else:
            model, tokenizer, info = load_pretrained(name_or_path, torch_dtype)
        log.info("loaded backbone %s from %s in %.1f s", info.backbone_id, info.source, info.seconds)
        return cls(model, tokenizer, info.backbone_id, device=dev, max_length=max_length,
                   max_batch_tokens=max_batch_tokens, load_info=info)

    # ------------------------------------------------------------------------------------- properties
    @property
    def hidden_size(self) -> int:
        """d, the width of one soft-prompt vector."""
        return int(self.input_embeddings.shape[1])

    @property
    def dtype(self) -> torch.dtype:
        return self.input_embeddings.dtype

    @property
    def input_embeddings(self) -> Tensor:
        """The token embedding matrix [vocab, d] (frozen)."""
        return self.model.get_input_embeddings().weight

    @property
    def context_length(self) -> int:
        """The longest sequence the model takes, from its config (or its tokenizer when the config has none)."""
        config = self.model.config
        for attr in ("max_position_embeddings", "n_positions", "max_sequence_length"):
            value = getattr(config, attr, None)
            if isinstance(value, int) and value > 0:
                return value
        tok_max = getattr(self.tokenizer, "model_max_length", None)
        return tok_max if isinstance(tok_max, int) and 0 < tok_max < 1_000_000 else 1024

    # ------------------------------------------------------------------------------------- operations
    def target_log_likelihood(self, prompts: Tensor | None, sources: Sequence[str],
                              targets: Sequence[str]) -> tuple[Tensor, Tensor]:
        """Log-likelihood of each target given its prompt and source, in one forward pass.

        Args:
            prompts: [batch, n, d] soft prompts (row i for row i), or None.
            sources, targets: `batch` strings each (see `ipt_engine.tasks.to_text_pair`).
        Returns:
            (sum of target-token log-probabilities [batch], number of target tokens [batch]); the first is
            differentiable with respect to `prompts`.
        """
        self._check_prompts(prompts, len(sources))
        if len(sources) != len(targets):
            raise ValueError(f"{len(sources)} sources but {len(targets)} targets")
        n = 0 if prompts is None else prompts.shape[1]
        rows = [self._tokenize(i, s, [t], n)[0] for i, (s, t) in enumerate(zip(sources, targets, strict=True))]
        order = sorted(range(len(rows)), key=lambda k: rows[k].length)
        chunks = self._chunks(order, rows, n)
        if len(chunks) <= 1:
            return self._log_likelihood(prompts, rows)
        # rows of very different lengths (tasks mixed in one batch): forward passes of similar lengths within the
        # token budget, instead of padding every row to the longest
        parts = [self._log_likelihood(prompts, [rows[k] for k in chunk]) for chunk in chunks]
        inverse = torch.empty(len(rows), dtype=torch.long, device=self.device)
        inverse[torch.tensor([k for chunk in chunks for k in chunk], device=self.device)] = torch.arange(
            len(rows), device=self.device)
        sums = torch.cat([p[0] for p in parts]).index_select(0, inverse)
        counts = torch.cat([p[1] for p in parts]).index_select(0, inverse)
        return sums, counts

    @torch.no_grad()
    def score_options(self, prompts: Tensor | None, sources: Sequence[str], options: Sequence[Sequence[str]], *,
                      prompt_kv: PromptKV | None = None) -> list[OptionScores]:
        """Rank classification: the log-likelihood of every option of every row (no gradient).

        Args:
            prompts: [batch, n, d] or None. sources: batch strings. options: per row, its option texts
                (formatted as targets, i.e. with the leading space `to_text_pair` gives).
            prompt_kv: instead of `prompts` (causal LMs), the rows' prompts already run through the model
                (`prompt_kv(prompts)`, batch rows); only the sources and options are computed.
        Returns:
            per row, an OptionScores over its options. All (row, option) pairs are sorted by length and
            packed into forward passes of at most `max_batch_tokens` tokens.
        """
        sums, counts = self.option_log_likelihoods(prompts, sources, options, prompt_kv=prompt_kv)
        out: list[OptionScores] = []
        start = 0
        for opts in options:
            end = start + len(opts)
            out.append(OptionScores(sums[start:end].detach(), counts[start:end]))
            start = end
        return out

    def option_log_likelihoods(self, prompts: Tensor | None, sources: Sequence[str],
                               options: Sequence[Sequence[str]], *, prompt_kv: PromptKV | None = None
                               ) -> tuple[Tensor, Tensor]:
        """The log-likelihood of every option of every row, differentiable with respect to `prompts`.

        Returns (sums [P], token counts [P]) over the P (row, option) pairs, row after row (CPU, float32 and
        int64). Causal LMs run each row's prompt and source once and score all its options in that pass.
        """
        n = self._check_prompt_inputs(prompts, prompt_kv, len(sources))
        if len(options) != len(sources):
            raise ValueError(f"{len(sources)} sources but options for {len(options)} rows")
        empty = [i for i, opts in enumerate(options) if not opts]
        if empty:
            raise ValueError(f"rows {empty[:10]} have no answer options to score")
        rows = [row for i, opts in enumerate(options) for row in self._tokenize(i, sources[i], opts, n)]
        if prompt_kv is not None:
            rows = [_strip_cached_prefix(r, prompt_kv.source_prefixes[r.prompt_row]) for r in rows]
        sums = torch.zeros(len(rows))
        counts = torch.tensor([len(r.target) for r in rows], dtype=torch.long)
        if not rows:
            return sums, counts
        if self.is_encoder_decoder:
            order = sorted(range(len(rows)), key=lambda k: rows[k].length)
            for chunk in self._chunks(order, rows, n):
                s, _ = self._log_likelihood(prompts, [rows[k] for k in chunk])
                sums = sums.index_put((torch.tensor(chunk),), s.float().cpu())
        else:
            sums = self._score_packed(prompts, rows, n, sums, prompt_kv)
        return sums, counts

    @torch.no_grad()
    def generate(self, prompts: Tensor | None, sources: Sequence[str], max_new_tokens: int = 32, *,
                 prompt_kv: PromptKV | None = None) -> list[str]:
        """Greedy decoding of each row's continuation. prompts: [batch, n, d] or None; or, instead (causal
        LMs), `prompt_kv` with batch rows. Returns batch strings."""
        n = self._check_prompt_inputs(prompts, prompt_kv, len(sources))
        if not sources:
            return []
        if self.is_encoder_decoder:
            emb, mask = self._encoder_inputs(prompts, [self._tokenize(i, s, [], n)[0].source
                                                       for i, s in enumerate(sources)])
            out = self.model.generate(inputs_embeds=emb, attention_mask=mask, max_new_tokens=max_new_tokens,
                                      do_sample=False, num_beams=1, pad_token_id=self.tokenizer.pad_token_id)
            return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]
        # generation runs on the prompts' own positions: a cached source prefix saves little of a decode
        return self._greedy_causal(prompts, sources, max_new_tokens,
                                   None if prompt_kv is None else prompt_kv.prompt_only())

    @torch.no_grad()
    def prompt_kv(self, prompts: Tensor, source_prefixes: Sequence[str] | None = None) -> PromptKV:
        """Run soft prompts [batch, n, d] through the model once: their keys and values at every layer, to be
        passed as `prompt_kv` to `score_options` and `generate` instead of the prompts (same scores, without
        recomputing the prompt positions). Causal LMs only: a seq2seq encoder attends both ways, so there a
        prompt's states depend on the input and cannot be cached.

        source_prefixes: per row, text that starts every source the row will be asked with (a task's
        `source_prefix`, "{name}:"); its tokens run after the prompt here, once. A source later scored on this
        cache skips them when its tokens start with them (else it runs whole, on the prompt positions alone),
        so the scores stay those of the prompts."""
        if self.is_encoder_decoder:
            raise ValueError("a seq2seq backbone cannot cache its prompts: its encoder attends both ways, so the "
                             "prompt's states depend on the input; pass the prompts instead")
        self._check_prompts(prompts, prompts.shape[0])
        emb = prompts.to(self.device, self.dtype)
        n = emb.shape[1]
        if source_prefixes is not None and len(source_prefixes) != emb.shape[0]:
            raise ValueError(f"{len(source_prefixes)} source prefixes for {emb.shape[0]} prompts")
        prefixes = (self.cached_prefix_ids(source_prefixes, n) if source_prefixes is not None
                    else [()] * emb.shape[0])
        ids, tok_mask = self._pad([list(p) for p in prefixes])  # right padding: a row's real positions come first
        emb = torch.cat([emb, self.model.get_input_embeddings()(ids.to(self.device))], dim=1)
        mask = torch.cat([torch.ones(emb.shape[0], n, dtype=torch.long, device=self.device), tok_mask], dim=1)
        _, cache = self._causal_states(inputs_embeds=emb, attention_mask=mask, use_cache=True)
        return PromptKV.from_cache(cache, n, prefixes)

    def cached_prefix_ids(self, source_prefixes: Sequence[str], n_prompt: int) -> list[tuple[int, ...]]:
        """The tokens `prompt_kv` caches after `n_prompt` prompt positions for each source prefix: those every
        source starting with it starts with, cut so that at least one source token still fits the context. A
        caller can size a `PromptKV` with them (`PromptKV.empty_like`) before running the prompts."""
        budget = max(self.max_length - n_prompt - 1, 0)
        return [self._source_prefix_ids(p)[:budget] for p in source_prefixes]

    def row_tokens(self, source: str, targets: Sequence[str] | None = None, *, cached_prefix: str | None = None,
                   tokenizer: PreTrainedTokenizerBase | None = None) -> int:
        """Tokens one row feeds a forward pass besides its prompt: its source and, for a causal LM, each target's
        tokens but the last (`option_packing`; a target ends with EOS); a seq2seq row counts its targets whole.
        Counted before any cut to fit the context. cached_prefix: text whose tokens a prefix KV cache holds
        (`prompt_kv`), not fed again. tokenizer: a copy of this backbone's to count with, for a caller on
        another thread (a fast tokenizer must not be used by two threads at once)."""
        tok = tokenizer or self.tokenizer
        fed = len(tok(source, add_special_tokens=True).input_ids)
        if cached_prefix is not None:  # the tokens `prompt_kv` caches for it, as the scoring pass skips them
            fed = max(fed - len(self._source_prefix_ids(cached_prefix, tok)), 1)
        for target in targets or ():
            ids = len(tok(target, add_special_tokens=False).input_ids)
            if self.is_encoder_decoder:
                fed += ids + 1  # the decoder runs each target whole, after its start token
            else:
                fed += ids if self._eos is not None else max(ids - 1, 0)  # + EOS, less the last token
        return fed

    # ------------------------------------------------------------------------------------- internals
    def _source_prefix_ids(self, prefix: str, tokenizer: PreTrainedTokenizerBase | None = None) -> tuple[int, ...]:
        """The tokens every source starting with `prefix` starts with: those of the prefix alone that the prefix
        followed by more text keeps (a tokenizer may end a text with EOS, or merge its last token with the next).
        tokenizer: a copy of this backbone's, for a caller on another thread (`row_tokens`)."""
        tok = tokenizer or self.tokenizer
        alone = tok(prefix, add_special_tokens=True).input_ids
        followed = tok(prefix + " x", add_special_tokens=True).input_ids
        k = 0
        while k < min(len(alone), len(followed)) and alone[k] == followed[k]:
            k += 1
        return tuple(alone[:k])

    def _check_prompt_inputs(self, prompts: Tensor | None, prompt_kv: PromptKV | None, batch: int) -> int:
        """Check prompts or their cache for `batch` rows; returns the prompt length n (0 without a prompt)."""
        if prompt_kv is None:
            self._check_prompts(prompts, batch)
            return 0 if prompts is None else prompts.shape[1]
        if prompts is not None:
            raise ValueError("give the prompts or their cache (prompt_kv), not both")
        if self.is_encoder_decoder:
            raise ValueError("a seq2seq backbone cannot use a prompt cache; pass the prompts instead")
        if prompt_kv.batch != batch:
            raise ValueError(f"prompt_kv has {prompt_kv.batch} rows for {batch} inputs")
        return prompt_kv.n_prompt
    def _check_prompts(self, prompts: Tensor | None, batch: int) -> None:
        if prompts is None:
            return
        if prompts.dim() != 3 or prompts.shape[0] != batch or prompts.shape[2] != self.hidden_size:
            raise ValueError(
                f"prompts must have shape [batch={batch}, n, d={self.hidden_size}], got {tuple(prompts.shape)}"
            )

    def _tokenize(self, prompt_row: int, source: str, targets: Sequence[str], n_prompt: int,
                  reserve: int = 0) -> list[_Row]:
        """Token ids of one source and each of its targets (one _Row per target, all sharing the source).

        The source is cut from the left, once, so that the prompt, the source and the longest target fit
        the context; `reserve` keeps room for tokens generated later."""
        tok = self.tokenizer
        src = tok(source, add_special_tokens=True).input_ids
        if n_prompt + len(src) == 0:
            if self._bos is None:
                raise ValueError(f"row {prompt_row} has an empty input and no prompt: nothing to condition on")
            src = [self._bos]
        if self.is_encoder_decoder:
            tgts = [tok(t.strip(), add_special_tokens=True).input_ids[: self.max_length] for t in targets]
            budget_src = self.max_length - n_prompt
        else:
            cap = max(self.max_length - n_prompt - reserve - 1, 1)
            tgts = [[*tok(t, add_special_tokens=False).input_ids, *([self._eos] if self._eos is not None else [])][:cap]
                    for t in targets]
            budget_src = self.max_length - n_prompt - reserve - max((len(t) for t in tgts), default=0)
        if budget_src < 1:
            raise ValueError(
                f"no room for the input of row {prompt_row}: context {self.max_length} tokens, prompt {n_prompt}, "
                f"answer {self.max_length - n_prompt - budget_src} (generated tokens reserved: {reserve})")
        if len(src) > budget_src:
            keep_bos = src[0] == self._bos and budget_src > 1
            src = ([src[0]] if keep_bos else []) + src[len(src) - budget_src + int(keep_bos):]
            self.truncated_inputs += 1
            message = (f"input of row {prompt_row} is longer than the model's context ({self.max_length} "
                       f"tokens with a {n_prompt}-token prompt); cut from the left to {budget_src} tokens")
            log.warning(message)
            warnings.warn(InputTruncatedWarning(message), stacklevel=3)
        return [_Row(prompt_row, src, tgt) for tgt in tgts] or [_Row(prompt_row, src, [])]

    def _chunks(self, order: list[int], rows: list[_Row], n_prompt: int) -> list[list[int]]:
        """Group row indices (sorted by length) into batches whose padded size fits the token budget."""
        chunks: list[list[int]] = []
        current: list[int] = []
        for k in order:
            width = n_prompt + rows[k].length
            if current and (len(current) + 1) * width > self.max_batch_tokens:
                chunks.append(current)
                current = []
            current.append(k)
        if current:
            chunks.append(current)
        return chunks

    def _score_packed(self, prompts: Tensor | None, rows: list[_Row], n: int, sums: Tensor,
                      prompt_kv: PromptKV | None = None) -> Tensor:
        """Causal LMs: one forward pass per chunk of rows scores every option of those rows (`option_packing`).

        A row with k options of T tokens costs n + S + k (T - 1) tokens instead of k (n + S + T). `rows` holds one
        entry per (row, option); entries of one row are contiguous. Rows that need more than one pass are sorted by
        packed width and cut into passes of at most `max_batch_tokens` tokens (rows x (n + widest row)). Returns
        `sums` with each option's log-likelihood put in (out of place, so that gradients flow to the prompts).
        """
        groups: dict[int, list[int]] = {}
        for k, r in enumerate(rows):
            groups.setdefault(r.prompt_row, []).append(k)
        width = {i: packed_width(rows[ks[0]].source, [rows[k].target for k in ks]) for i, ks in groups.items()}
        if len(groups) * (n + max(width.values())) <= self.max_batch_tokens:
            order = list(groups)  # one pass: rows keep their order (a cached batch then needs no reordered copy)
        else:
            order = sorted(groups, key=lambda i: width[i])
        chunk: list[int] = []
        for i in order:
            if chunk and (len(chunk) + 1) * (n + width[i]) > self.max_batch_tokens:
                sums = self._score_packed_chunk(prompts, chunk, rows, groups, n, sums, prompt_kv)
                chunk = []
            chunk.append(i)
        if chunk:
            sums = self._score_packed_chunk(prompts, chunk, rows, groups, n, sums, prompt_kv)
        return sums

    def _score_packed_chunk(self, prompts: Tensor | None, chunk: list[int], rows: list[_Row],
                            groups: dict[int, list[int]], n: int, sums: Tensor,
                            prompt_kv: PromptKV | None = None) -> Tensor:
        packed = pack_rows([rows[groups[i][0]].source for i in chunk],
                           [[(k, rows[k].target) for k in groups[i]] for i in chunk], self.tokenizer.pad_token_id)
        ids = packed.ids.to(self.device)
        if prompt_kv is not None:
            # the prompts' keys and values are given: run the packed rows only, at positions n.., after them
            if bool((packed.pick_col < 0).any()):
                raise ValueError("a row with an empty input cannot be scored on a prompt cache: its first answer "
                                 "token is predicted from the prompt's last position; pass the prompts instead")
            # each row sees its prompt, and its source prefix where its source starts with it (`_Row.cached`)
            seen = torch.tensor([n + rows[groups[i][0]].cached for i in chunk])  # [B]
            kv = prompt_kv.select(chunk) if int(seen.max()) > n else prompt_kv.prompt_only().select(chunk)
            mask = packed.cached_attention_mask(torch.arange(kv.width)[None] < seen[:, None])
            states, _ = self._causal_states(input_ids=ids, attention_mask=self._model_mask(mask),
                                            position_ids=(seen[:, None] + packed.positions).to(self.device),
                                            cache=kv.to_cache(grow=False), use_cache=True)
            offset = 0  # states start at the first source column
        else:
            emb = self.model.get_input_embeddings()(ids)
            positions = packed.positions
            if prompts is not None and n:
                p = prompts.index_select(0, torch.tensor(chunk, device=prompts.device)).to(self.device, self.dtype)
                emb = torch.cat([p, emb], dim=1)
                positions = torch.cat([torch.arange(n).expand(len(chunk), -1), n + positions], dim=1)
            mask = packed.attention_mask(n, prompt_queries=True)
            states, _ = self._causal_states(inputs_embeds=emb, attention_mask=self._model_mask(mask),
                                            position_ids=positions.to(self.device), use_cache=False)
            offset = n
        columns, which = packed.scored_columns()
        picked = states[columns[:, 0].to(self.device), (offset + columns[:, 1]).to(self.device)]  # [C, d]
        token_logp = self._token_log_probs(picked, which.to(self.device), packed.pick_token.to(self.device))
        # each pair is scored in exactly one chunk, so adding into its zero slot puts its sum in (out of place)
        return sums.index_add(0, packed.pick_pair, token_logp.cpu())

    def _token_log_probs(self, states: Tensor, which: Tensor, tokens: Tensor) -> Tensor:
        """log p(tokens[q] | states[which[q]]) [Q] from hidden states [C, d] (or logits, head path off), the
        vocabulary's softmax taken over `HEAD_COLUMNS` states at a time: a pass of ~80 served rows scores ~320
        columns, whose full logits and log-probabilities held at once were 126 MB for SmolLM2. Differentiable."""
        parts, order = [], []
        for begin in range(0, states.shape[0], HEAD_COLUMNS):
            logp = self._to_logits(states[begin:begin + HEAD_COLUMNS]).float().log_softmax(-1)  # [c, V]
            here = torch.nonzero((which >= begin) & (which < begin + HEAD_COLUMNS)).squeeze(1)
            parts.append(logp[which[here] - begin, tokens[here]])
            order.append(here)
        values = torch.cat(parts)
        return values.new_zeros(which.shape[0]).scatter(0, torch.cat(order), values)

    def _model_mask(self, allowed: Tensor) -> Tensor:
        """A boolean attention mask [B, 1, q, kv] (True: may attend) in the form this model's attention takes."""
        impl = getattr(self.model.config, "_attn_implementation", "sdpa")
        allowed = allowed.to(self.device)
        if impl == "sdpa":
            return allowed
        if impl == "eager":
            return torch.zeros(allowed.shape, dtype=self.dtype, device=self.device).masked_fill(
                ~allowed, torch.finfo(self.dtype).min)
        raise ValueError(f"scoring answer options packs them with a custom attention mask, which the model's "
                         f"'{impl}' attention does not take; load it with attn_implementation='sdpa' or 'eager'")

    def _causal_states(self, **inputs: object) -> tuple[Tensor, object]:
        """Forward a causal LM; returns (hidden states, or logits when the head path is off) and the cache."""
        if self._head_path:
            out = getattr(self.model, self.model.base_model_prefix)(**inputs)
            return out.last_hidden_state, out.cache
        out = self.model(**inputs)
        return out.logits, out.cache

    def _to_logits(self, states: Tensor) -> Tensor:
        return self.model.get_output_embeddings()(states) if self._head_path else states

    def _log_likelihood(self, prompts: Tensor | None, rows: list[_Row]) -> tuple[Tensor, Tensor]:
        if self.is_encoder_decoder:
            return self._seq2seq_log_likelihood(prompts, rows)
        return self._causal_log_likelihood(prompts, rows)

    def _row_prompts(self, prompts: Tensor | None, rows: list[_Row]) -> Tensor | None:
        if prompts is None:
            return None
        index = torch.tensor([r.prompt_row for r in rows], device=prompts.device)
        return prompts.index_select(0, index).to(device=self.device, dtype=self.dtype)

    def _pad(self, seqs: list[list[int]], left: bool = False) -> tuple[Tensor, Tensor]:
        """Pad token id lists to [b, T] ids and a [b, T] attention mask."""
        width = max((len(s) for s in seqs), default=0)
        ids = torch.full((len(seqs), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            if s:
                sl = slice(width - len(s), width) if left else slice(0, len(s))
                ids[i, sl] = torch.tensor(s)
                mask[i, sl] = 1
        return ids.to(self.device), mask.to(self.device)

    def _causal_log_likelihood(self, prompts: Tensor | None, rows: list[_Row]) -> tuple[Tensor, Tensor]:
        # Layout per row (right padding): [prompt (n)] [source] [target] [pad...]. With causal attention,
        # padding after a row's tokens cannot change them, so a row's result does not depend on its batch.
        row_prompts = self._row_prompts(prompts, rows)
        n = 0 if row_prompts is None else row_prompts.shape[1]
        ids, mask = self._pad([r.source + r.target for r in rows])
        emb = self.model.get_input_embeddings()(ids)
        if row_prompts is not None:
            emb = torch.cat([row_prompts, emb], dim=1)
            mask = torch.cat([torch.ones(len(rows), n, dtype=mask.dtype, device=self.device), mask], dim=1)
        # Target token j of row i sits at n + len(source) + j and is predicted from the position before it.
        row_idx, pos_idx, tok = [], [], []
        for i, r in enumerate(rows):
            start = n + len(r.source)
            row_idx += [i] * len(r.target)
            pos_idx += range(start - 1, start - 1 + len(r.target))
            tok += r.target
        row_t = torch.tensor(row_idx, dtype=torch.long, device=self.device)
        pos_t = torch.tensor(pos_idx, dtype=torch.long, device=self.device)
        tok_t = torch.tensor(tok, dtype=torch.long, device=self.device)
        if self._head_path:
            base = getattr(self.model, self.model.base_model_prefix)
            hidden = base(inputs_embeds=emb, attention_mask=mask).last_hidden_state
            logits = self.model.get_output_embeddings()(hidden[row_t, pos_t])  # [num_target_tokens, V]
        else:
            logits = self.model(inputs_embeds=emb, attention_mask=mask).logits[row_t, pos_t]
        token_logp = logits.float().log_softmax(-1).gather(1, tok_t[:, None]).squeeze(1)
        sums = torch.zeros(len(rows), device=self.device).index_add(0, row_t, token_logp)
        counts = torch.bincount(row_t, minlength=len(rows))
        return sums, counts

    def _encoder_inputs(self, prompts: Tensor | None, sources: list[list[int]],
                        rows: list[_Row] | None = None) -> tuple[Tensor, Tensor]:
        """Encoder input embeddings [b, n + S, d] with the prompt first, and their mask [b, n + S]."""
        ids, mask = self._pad(sources)
        emb = self.model.get_input_embeddings()(ids)
        row_prompts = self._row_prompts(prompts, rows) if rows is not None else (
            None if prompts is None else prompts.to(device=self.device, dtype=self.dtype))
        if row_prompts is not None:
            n = row_prompts.shape[1]
            emb = torch.cat([row_prompts, emb], dim=1)
            mask = torch.cat([torch.ones(len(sources), n, dtype=mask.dtype, device=self.device), mask], dim=1)
        return emb, mask

    def _seq2seq_log_likelihood(self, prompts: Tensor | None, rows: list[_Row]) -> tuple[Tensor, Tensor]:
        emb, mask = self._encoder_inputs(prompts, [r.source for r in rows], rows)
        labels, label_mask = self._pad([r.target for r in rows])
        start = self.model.config.decoder_start_token_id
        if start is None:
            start = self.tokenizer.pad_token_id
        decoder_in = torch.cat([torch.full_like(labels[:, :1], start), labels[:, :-1]], dim=1)
        decoder_mask = torch.cat([torch.ones_like(label_mask[:, :1]), label_mask[:, :-1]], dim=1)
        logits = self.model(inputs_embeds=emb, attention_mask=mask, decoder_input_ids=decoder_in,
                            decoder_attention_mask=decoder_mask).logits
        token_logp = logits.float().log_softmax(-1).gather(2, labels[..., None]).squeeze(2) * label_mask
        return token_logp.sum(1), label_mask.sum(1)

    def _greedy_causal(self, prompts: Tensor | None, sources: Sequence[str], max_new_tokens: int,
                       prompt_kv: PromptKV | None = None) -> list[str]:
        # Layout per row (left padding): [pad...] [prompt] [source]; positions count real tokens only, so
        # a row's tokens get the same positions as when it runs alone. With the prompts' keys and values
        # given: [prompt (cached)] [pad...] [source], the same positions and the same attended tokens.
        n = prompt_kv.n_prompt if prompt_kv is not None else 0 if prompts is None else prompts.shape[1]
        rows = [self._tokenize(i, s, [], n, reserve=max_new_tokens)[0] for i, s in enumerate(sources)]
        ids, tok_mask = self._pad([r.source for r in rows], left=True)
        extra = {"logits_to_keep": 1} if self._logits_to_keep else {}
        if prompt_kv is not None:
            mask = torch.cat([torch.ones(len(rows), n, dtype=tok_mask.dtype, device=self.device), tok_mask], dim=1)
            positions = n + (tok_mask.cumsum(-1) - 1).clamp(min=0)
            out = self.model(input_ids=ids, attention_mask=mask, position_ids=positions,
                             cache=prompt_kv.to_cache(), use_cache=True, **extra)
            return self._continue_greedy(out, mask, positions, len(rows), max_new_tokens, extra)
        tok_emb = self.model.get_input_embeddings()(ids)
        if prompts is None:
            emb, mask = tok_emb, tok_mask
        else:
            p = prompts.to(device=self.device, dtype=self.dtype)
            parts, masks = [], []
            width = tok_emb.shape[1]
            for i, r in enumerate(rows):
                pad = width - len(r.source)
                parts.append(torch.cat([tok_emb[i, :pad], p[i], tok_emb[i, pad:]], dim=0))
                masks.append(torch.cat([tok_mask[i, :pad], torch.ones(n, dtype=tok_mask.dtype,
                                                                       device=self.device), tok_mask[i, pad:]]))
            emb, mask = torch.stack(parts), torch.stack(masks)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = self.model(inputs_embeds=emb, attention_mask=mask, position_ids=positions, use_cache=True, **extra)
        return self._continue_greedy(out, mask, positions, len(rows), max_new_tokens, extra)

    def _continue_greedy(self, out: object, mask: Tensor, positions: Tensor, batch: int, max_new_tokens: int,
                         extra: dict[str, int]) -> list[str]:
        """Greedy steps after the first forward `out` (its logits and cache): one token per row per step."""
        generated = torch.empty((batch, 0), dtype=torch.long, device=self.device)
        done = torch.zeros(batch, dtype=torch.bool, device=self.device)
        for _ in range(max_new_tokens):
            next_tok = out.logits[:, -1].argmax(-1)
            if self._eos is not None:
                next_tok = torch.where(done, torch.full_like(next_tok, self._eos), next_tok)
                done |= next_tok == self._eos
            generated = torch.cat([generated, next_tok[:, None]], dim=1)
            if bool(done.all()):
                break
            mask = torch.cat([mask, torch.ones_like(mask[:, :1])], dim=1)
            positions = positions[:, -1:] + 1
            out = self.model(input_ids=next_tok[:, None], attention_mask=mask, position_ids=positions,
                             cache=out.cache, use_cache=True, **extra)
        texts = []
        for row in generated.tolist():
            if self._eos is not None and self._eos in row:
                row = row[: row.index(self._eos)]
            texts.append(self.tokenizer.decode(row, skip_special_tokens=True).strip())
        return texts

    @torch.no_grad()
    def _lm_head_matches_logits(self) -> bool:
        """Whether logits == output_embeddings(base_model(x)) for this model, checked once on a tiny input.

        When true, scoring applies the LM head only at target positions instead of over the whole
        sequence, which saves a [batch, length, vocab] tensor. Models that post-process logits (soft
        capping, scaling) fail the check and use the full forward."""
        head = self.model.get_output_embeddings()
        base = getattr(self.model, getattr(self.model, "base_model_prefix", ""), None)
        if head is None or base is None or base is self.model:
            return False
        ids = torch.tensor([[min(5, self.model.config.vocab_size - 1)] * 3], device=self.device)
        try:
            full = self.model(input_ids=ids).logits
            partial = head(base(input_ids=ids).last_hidden_state)
        except Exception:  # an unusual architecture: take the safe path
            return False
        return bool(torch.allclose(full, partial, atol=1e-4, rtol=1e-4))
