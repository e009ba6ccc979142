"""Shared-context scoring: lm-eval's HFLM with `_loglikelihood_tokens` running the context of a multiple-choice
item once for all its choices (lm-eval runs it once per choice), with lm-eval's own numbers.

lm-eval scores a request (context, continuation) by running context + continuation[:-1] through the model and
summing the continuation's log-probabilities; a multiple-choice item sends one request per choice, so its
context runs once per choice. Here the context but its last token runs once with the key/value cache on, and
every choice runs on a copy of that cache as [last context token, continuation[:-1]]: the positions, tokens
and causal attention of each scored logit are lm-eval's, so the numbers are too, up to the float rounding of
other matrix shapes: ~2e-7 relative in float32, as between two of lm-eval's own batch sizes.
"""

from __future__ import annotations

import functools
import inspect
import logging
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from qtraj.joblog import Progress

log = logging.getLogger(__name__)

# A request as lm-eval's `_loglikelihood_tokens` takes it: ((context, continuation) text or None, context token
# ids, continuation token ids).
TokenRequest = tuple[tuple[str, str] | None, list[int], list[int]]


@dataclass(frozen=True)
class SharedContext:
    """Requests (by position in the request list) whose context token ids are equal."""

    context: tuple[int, ...]
    requests: tuple[int, ...]


def group_shared_contexts(requests: Sequence[TokenRequest],
                          max_length: int) -> tuple[list[SharedContext], list[int]]:
    """(contexts shared by two or more requests, the positions of every other request).

    A request lm-eval would truncate from the left (context + continuation longer than max_length + 1) no longer
    starts with its context, so it is left to lm-eval's own path, as are lone contexts (nothing to share) and
    empty parts (lm-eval's own assertions then name them).
    """
    by_context: dict[tuple[int, ...], list[int]] = {}
    unshared = []
    for position, (_, context, continuation) in enumerate(requests):
        if context and continuation and len(context) + len(continuation) <= max_length + 1:
            by_context.setdefault(tuple(context), []).append(position)
        else:
            unshared.append(position)
    shared = []
    for context, positions in by_context.items():
        if len(positions) > 1:
            shared.append(SharedContext(context, tuple(positions)))
        else:
            unshared.extend(positions)
    return shared, sorted(unshared)


def batch_shared_contexts(groups: Sequence[SharedContext], requests_per_batch: int) -> list[list[SharedContext]]:
    """Batches of contexts of one token length (so their cached prefixes need no padding, whose positions and
    masks would differ from lm-eval's), each with at most `requests_per_batch` requests (a larger group alone)."""
    batches: list[list[SharedContext]] = []
    by_length = sorted(groups, key=lambda group: (-len(group.context), group.requests))
    current: list[SharedContext] = []
    for group in by_length:
        fits = sum(len(member.requests) for member in current) + len(group.requests) <= requests_per_batch
        if current and (len(current[0].context) != len(group.context) or not fits):
            batches.append(current)
            current = []
        current.append(group)
    if current:
        batches.append(current)
    return batches


def continuation_inputs(batch: Sequence[SharedContext],
                        requests: Sequence[TokenRequest]) -> tuple[list[int], list[list[int]], list[list[int]]]:
    """(cache row of each request, its suffix [last context token, continuation[:-1]], its continuation), in
    the batch's request order."""
    rows, suffixes, continuations = [], [], []
    for row, group in enumerate(batch):
        for position in group.requests:
            continuation = requests[position][2]
            rows.append(row)
            suffixes.append([group.context[-1], *continuation[:-1]])
            continuations.append(continuation)
    return rows, suffixes, continuations


def continuation_answer(log_probs, continuation: list[int]) -> tuple[float, bool]:
    """lm-eval's (summed log-probability, whether every token is the greedy one) from a suffix's log-probs
    [positions, vocab]; the same tensor operations as `HFLM._loglikelihood_tokens`, so the same rounding."""
    import torch

    scored = log_probs[: len(continuation)].unsqueeze(0)
    targets = torch.tensor(continuation, dtype=torch.long, device=scored.device).unsqueeze(0)
    is_greedy = (scored.argmax(dim=-1) == targets).all()
    picked = torch.gather(scored, 2, targets.unsqueeze(-1)).squeeze(-1)
    return float(picked.sum()), bool(is_greedy)


def right_padded(rows: Sequence[Sequence[int]], device):
    """A [rows, longest] LongTensor padded with 0 on the right, as lm-eval pads: causal attention keeps the
    padding out of every real position."""
    import torch

    width = max(len(row) for row in rows)
    return torch.tensor([[*row, *[0] * (width - len(row))] for row in rows], dtype=torch.long, device=device)


def forward_accepts(model, *names: str) -> bool:
    """Whether the model's forward names every one of `names` (a bare **kwargs may drop them silently)."""
    parameters = inspect.signature(model.forward).parameters
    return all(name in parameters for name in names)


def cache_rows_are_plain_key_values(cache, prefix_length: int) -> bool:
    """Whether `cache` holds each batch row as plain key/value tensors of the whole prefix, so selecting rows
    copies contexts exactly (recurrent or quantized cache layers keep other state, or an approximation)."""
    from transformers.cache_utils import DynamicCache, DynamicLayer, DynamicSlidingWindowLayer

    return (isinstance(cache, DynamicCache) and len(cache.layers) > 0
            and all(type(layer) in (DynamicLayer, DynamicSlidingWindowLayer) for layer in cache.layers)
            and cache.get_seq_length() == prefix_length)


def probe_tolerance(dtypes: Iterable) -> float:
    """Relative tolerance for checking the shared path once against lm-eval's: a few roundings of the least
    precise floating dtype the model computes in (another batch shape rounds differently). A context the cache
    lost moves the scores by whole nats, far beyond it."""
    import torch

    return max([1e-4, *(8 * torch.finfo(dtype).eps for dtype in dtypes if dtype.is_floating_point)])


def answers_agree(shared: Sequence[tuple[float, bool]], plain: Sequence[tuple[float, bool]],
                  tolerance: float) -> bool:
    return all(abs(a - b) <= tolerance * max(1.0, abs(b)) for (a, _), (b, _) in zip(shared, plain, strict=True))


@functools.cache
def shared_context_lm_class() -> type:
    """lm-eval's HFLM with `_loglikelihood_tokens` scoring each shared context once (built on first use, so
    importing this module imports no lm-eval or torch).

    Everything else is lm-eval's: request building, tokenization (`_encode_pair`), metrics and aggregation. Its
    own path scores what cannot share a context (lone contexts, truncated requests, seq2seq models, an "auto"
    batch size) and every request of a model whose forward does not use a passed cache: the first shared batch
    is checked against it, and on a mismatch the rest goes there too.
    """
    import torch
    import torch.nn.functional as F
    from lm_eval.models.huggingface import HFLM
    from tqdm import tqdm

    class SharedContextHFLM(HFLM):
        # None until the first shared batch has been compared with lm-eval's own scoring of it
        _cache_is_trusted: bool | None = None
        # None until decided on the first shared batch: whether the suffixes' logits can be made one row at a time
        # from the decoder's hidden states (qtraj.evaluation.head_split_agrees), instead of every choice's at once
        _split_head: bool | None = None
        # string -> its tokens as lm-eval's `tok_encode(string)` gives them, encoded in batches (`loglikelihood`)
        _encodings: dict[str, list[int]] | None = None

        def loglikelihood(self, requests, disable_tqdm: bool = False):
            # lm-eval encodes each request's context + continuation and its context one call at a time (~0.27 ms
            # each, the context once per choice): ~30% of scoring 600 items with a micro model. The same strings
            # encoded in one batch call of the same tokenizer with the same arguments, checked against lm-eval's
            # own call on a sample; any string not prepared here is encoded by lm-eval as before.
            self._encodings = self._encoded_in_batches(
                {text for context, continuation in (request.args for request in requests) if context
                 for text in (context + continuation, context[:len(context.rstrip())])})
            try:
                return super().loglikelihood(requests, disable_tqdm=disable_tqdm)
            finally:
                self._encodings = None

        def tok_encode(self, string: str, add_special_tokens: bool | None = None,
                       left_truncate_len: int | None = None, **kwargs) -> list[int]:
            if self._encodings and add_special_tokens is None and not left_truncate_len and not kwargs:
                encoded = self._encodings.get(string)
                if encoded is not None:
                    return list(encoded)
            return super().tok_encode(string, add_special_tokens, left_truncate_len, **kwargs)

        def _encoded_in_batches(self, texts: set[str]) -> dict[str, list[int]]:
            """`tok_encode(text)` for every text, one tokenizer call per set of special-token arguments; empty
            when a sample disagrees with lm-eval's one-at-a-time encoding (then lm-eval encodes everything)."""
            try:
                from lm_eval.models.utils import _add_special_kwargs, has_bos_prefix
            except ImportError:  # another lm-eval: its own encoding throughout
                return {}
            bos = self.tokenizer.decode(self.prefix_token_id)
            by_arguments: dict[tuple, list[str]] = defaultdict(list)
            for text in sorted(texts):
                arguments = _add_special_kwargs(None, self.add_bos_token)
                if has_bos_prefix(text, bos):
                    arguments["add_special_tokens"] = False
                by_arguments[tuple(sorted(arguments.items()))].append(text)
            encoded = {}
            for arguments, group in by_arguments.items():
                ids = self.tokenizer(group, **dict(arguments))["input_ids"]
                encoded.update(zip(group, ids, strict=True))
            sample = sorted(encoded)[:: max(1, len(encoded) // 16)]
            if any(encoded[text] != HFLM.tok_encode(self, text) for text in sample):
                log.warning("batched tokenization differs from lm-eval's; lm-eval encodes every request")
                return {}
            return encoded

        def _loglikelihood_tokens(self, requests: list[TokenRequest], disable_tqdm: bool = False,
                                  override_bs: int | None = None) -> list[tuple[float, bool]]:
            if not self._can_share_contexts(override_bs):
                return super()._loglikelihood_tokens(requests, disable_tqdm=disable_tqdm, override_bs=override_bs)
            groups, unshared = group_shared_contexts(requests, self.max_length)
            answers: list[tuple[float, bool] | None] = [None] * len(requests)
            progress = tqdm(total=len(requests), disable=disable_tqdm or self.rank != 0,
                            desc="Running loglikelihood requests (shared contexts)")
            progress_lines = Progress(log, "accuracy scoring", len(requests), "requests")
            for batch in batch_shared_contexts(groups, self.batch_size):
                positions = [position for group in batch for position in group.requests]
                scored = self._score_batch(batch, requests) if self._cache_is_trusted is not False else None
                if scored is not None and self._cache_is_trusted is None:
                    scored = self._checked_against_lm_eval(batch, requests, scored)
                if scored is None:
                    unshared.extend(positions)
                    continue
                for position, answer in zip(positions, scored, strict=True):
                    answers[position] = answer
                    if requests[position][0] is not None:
                        self.cache_hook.add_partial("loglikelihood", requests[position][0], answer)
                progress.update(len(positions))
                progress_lines.advance(len(positions))
            progress.close()
            if unshared:
                unshared.sort()
                own = super()._loglikelihood_tokens([requests[position] for position in unshared],
                                                    disable_tqdm=disable_tqdm)
                for position, answer in zip(unshared, own, strict=True):
                    answers[position] = answer
                progress_lines.advance(len(unshared))
            return answers

        def _can_share_contexts(self, override_bs: int | None) -> bool:
            # an explicit override_bs comes from loglikelihood_rolling's windows, which share nothing
            return (self.backend == "causal" and isinstance(self.batch_size, int) and override_bs is None
                    and self._cache_is_trusted is not False
                    and forward_accepts(self.model, "past_key_values", "use_cache"))

        def _no_grad_call(self, function, *args, **kwargs):
            # as HFLM._model_call: no gradients, lm-eval's optional autocast
            with torch.no_grad(), torch.autocast(device_type=self.device.type, dtype=self.mixed_precision_dtype,
                                                 enabled=self.mixed_precision_dtype is not None):
                return function(*args, **kwargs)

        def _forward(self, input_ids, module=None, **kwargs):
            return self._no_grad_call(module or self.model, input_ids=input_ids, **kwargs)

        def _suffix_log_probs(self, suffixes: torch.Tensor, cache):
            """Each suffix row's log-probabilities [positions, vocab], one row's logits in memory at a time where
            the head splits off (a 262k vocabulary x every choice of a batch would not fit beside the weights)."""
            from qtraj.evaluation import head_logits, head_split_agrees

            if self._split_head is None:
                with torch.no_grad():
                    self._split_head = head_split_agrees(self.model, suffixes[:1, :8])
            if not self._split_head:
                logits = self._forward(suffixes, past_key_values=cache, use_cache=cache is not None).logits
                yield from F.log_softmax(logits, dim=-1, dtype=self.softmax_dtype)
                return
            hidden = self._forward(suffixes, module=self.model.get_decoder(), past_key_values=cache,
                                   use_cache=cache is not None).last_hidden_state
            for row in hidden:
                yield F.log_softmax(self._no_grad_call(head_logits, self.model, row), dim=-1, dtype=self.softmax_dtype)

        def _score_batch(self, batch: list[SharedContext],
                         requests: list[TokenRequest]) -> list[tuple[float, bool]] | None:
            """Answers for the batch's requests in order, or None when the model's cache cannot be shared."""
            prefix_length = len(batch[0].context) - 1
            rows, suffixes, continuations = continuation_inputs(batch, requests)
            cache = None
            if prefix_length:  # a one-token context has no prefix to cache: the suffix is lm-eval's whole input
                prefixes = torch.tensor([group.context[:-1] for group in batch], dtype=torch.long,
                                        device=self.device)
                # only the cache is needed: the prefix's logits are never scored
                keep = {"logits_to_keep": 1} if forward_accepts(self.model, "logits_to_keep") else {}
                cache = self._forward(prefixes, use_cache=True, **keep).past_key_values
                if not cache_rows_are_plain_key_values(cache, prefix_length):
                    log.warning("%s: its key/value cache (%s) cannot be shared between choices; lm-eval scores "
                                "every request on its own", type(self.model).__name__, type(cache).__name__)
                    self._cache_is_trusted = False
                    return None
                cache.batch_select_indices(torch.tensor(rows, device=self.device))
            log_probs = self._suffix_log_probs(right_padded(suffixes, self.device), cache)
            return [continuation_answer(row_log_probs, continuation)
                    for row_log_probs, continuation in zip(log_probs, continuations, strict=True)]

        def _checked_against_lm_eval(self, batch: list[SharedContext], requests: list[TokenRequest],
                                     scored: list[tuple[float, bool]]) -> list[tuple[float, bool]] | None:
            """`scored` if its first context scores as lm-eval scores it, else None (and lm-eval scores the rest):
            a model may accept a cache and still not use it as transformers' own models do."""
            probe = batch[0].requests
            plain = super()._loglikelihood_tokens([requests[position] for position in probe], disable_tqdm=True)
            dtypes = [self.model.dtype, *([self.mixed_precision_dtype] if self.mixed_precision_dtype else [])]
            self._cache_is_trusted = answers_agree(scored[: len(probe)], plain, probe_tolerance(dtypes))
            if not self._cache_is_trusted:
                log.warning("%s: scores with a shared context differ from lm-eval's (%s vs %s); lm-eval scores "
                            "every request on its own", type(self.model).__name__, scored[: len(probe)], plain)
                return None
            return scored

    return SharedContextHFLM
