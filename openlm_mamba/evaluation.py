"""lm-evaluation-harness adapter: score tasks with ``MambaLM`` and our kernels (no transformers model involved).

```python
from openlm_mamba.evaluation import MambaEvalLM, evaluate
lm = MambaEvalLM(pretrained="mamba-7b-hf/", tokenizer="EleutherAI/gpt-neox-20b", batch_size=8)
results = evaluate(lm, ["hellaswag", "piqa"], num_fewshot=0)
```

Importing this module also registers it in lm-eval's model registry as ``openlm-mamba`` (for
``lm_eval.simple_evaluate(model="openlm-mamba", ...)``; the ``lm_eval`` command does not import plugins).
``openlm-mamba eval`` is the command-line entry.
"""

from __future__ import annotations

import copy
import difflib
import inspect
import logging
import math
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

try:
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
    from lm_eval.models.utils import handle_stop_sequences
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
except ImportError as e:  # pragma: no cover - exercised only without lm-eval
    raise ImportError(
        f"openlm_mamba.evaluation needs lm-evaluation-harness ({e}); install it: pip install lm-eval"
    ) from e

from tqdm.auto import tqdm

from .device import check_device, check_tokenizer
from .generation import check_prompt_backend
from .model import MambaLM

_log = logging.getLogger(__name__)

# The model card's evaluation (TRI-ML/mamba-7b-rw): task -> (lm-eval task name, num_fewshot, card accuracy %)
MODEL_CARD_TASKS = {
    "HellaSwag": ("hellaswag", 0, 77.9),
    "PIQA": ("piqa", 0, 81.0),
    "Winogrande": ("winogrande", 0, 71.8),
    "ARC-E": ("arc_easy", 0, 77.5),
    "ARC-C": ("arc_challenge", 0, 46.7),
    "MMLU (5-shot)": ("mmlu", 5, 33.3),
}


AUTO_BATCH_SIZE = 8  # batch_size="auto": the recurrent state does not grow with the context, as a KV cache does
PREFIX_MIN = 32  # tokens: a batch of contexts sharing a shorter start reads each context whole


def _common_length(a: tuple, b: tuple) -> int:
    """How many leading tokens two sequences share."""
    return next((k for k, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def _right_padded(rows: list, device: torch.device) -> torch.Tensor:
    """Token rows of any lengths as one (len(rows), longest) int64 tensor on ``device``, zeros after each row."""
    ids = torch.zeros(len(rows), max(len(r) for r in rows), dtype=torch.long)
    for k, r in enumerate(rows):
        ids[k, : len(r)] = torch.as_tensor(r, dtype=torch.long)
    return ids.to(device)


def _flag(name: str, value: Any) -> bool:
    """A bool argument, also as lm-eval's model_args strings ("true", "False", "1", "no", ...)."""
    if isinstance(value, bool):
        return value
    text = str(value).strip().lower()
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off"):
        return False
    raise ValueError(f"MambaEvalLM: {name} must be true or false, got {value!r}")


def _load_tokenizer(tokenizer: Any, pretrained: str | Path | None, add_bos_token: bool | None = None) -> Any:
    """A tokenizer object as is; else what ``openlm-mamba generate --tokenizer`` would load (a directory, a
    tokenizer.json file or a hub name; default: the checkpoint dir's, else gpt-neox-20b), told ``add_bos_token``
    as ``HFLM`` tells the tokenizers it loads. ValueError if it cannot."""
    if tokenizer is not None and not isinstance(tokenizer, (str, Path)):
        return tokenizer
    from .commands.generate import default_tokenizer, load_tokenizer

    defaulted, own = tokenizer is None, False
    if defaulted:
        tokenizer, own = default_tokenizer(pretrained)
    try:
        return load_tokenizer(str(tokenizer), add_bos_token)
    except SystemExit as e:  # its message is the CLI's one line, "error: --tokenizer ...: ..."
        message = str(e).removeprefix("error: ")
        if defaulted and not own:
            message += f" (no tokenizer was given and {pretrained} has no tokenizer files, so Mamba-7B's was tried)"
        raise ValueError(message) from None


def check_limit(limit: float | None) -> int | float | None:
    """lm-eval's ``limit``, checked: None (every example), a count (a whole number >= 1) or a fraction in (0, 1)."""
    if limit is None:
        return None
    if isinstance(limit, bool) or not isinstance(limit, (int, float)):
        raise ValueError(f"limit must be a number, got {limit!r}")
    if not math.isfinite(limit) or limit <= 0 or (limit >= 1 and limit != int(limit)):
        raise ValueError(
            f"expected a count of examples per task (a whole number >= 1) or a fraction in (0, 1), got {limit:g}"
        )
    return int(limit) if limit >= 1 else float(limit)


def make_task_manager(include_path: str | Path | None = None, include_defaults: bool = True) -> Any:
    """lm-eval's ``TaskManager``: its built-in tasks (unless ``include_defaults=False``) plus ``include_path``'s YAMLs."""
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=str(include_path) if include_path else None, include_defaults=include_defaults)


def check_tasks(tasks: list[Any], manager: Any) -> None:
    """ValueError naming each of ``tasks`` that ``manager`` does not know (with close matches) and how to list them.

    A task is a registered task/group/tag name, a task YAML file path, or a config dict (not checked here).
    """
    known = list(manager.all_tasks)
    unknown = [t for t in tasks if isinstance(t, str) and t not in known and not Path(t).expanduser().is_file()]
    if not unknown:
        return
    parts = []
    for name in unknown:
        close = difflib.get_close_matches(name, known, n=3, cutoff=0.75)
        parts.append(f"{name!r}" + (f" (did you mean {', '.join(close)}?)" if close else ""))
    message = (
        f"unknown task{'s' if len(unknown) > 1 else ''} {', '.join(parts)}: not a registered lm-eval task, group or tag"
    )
    if not known:
        message += "; no tasks are registered at all (built-in tasks skipped and no task YAMLs in the include path)"
    elif len(known) <= 20:
        message += f"; registered: {', '.join(known)}"
    else:
        message += f"; {len(known)} are registered (`lm-eval ls tasks` lists the built-in ones)"
    raise ValueError(message)


def _check_given_model(model: MambaLM, device: str | torch.device | None, dtype: str | torch.dtype | None) -> None:
    """device= / dtype= with model= must describe the model as given: they only move and cast a loaded checkpoint."""
    param = next(model.parameters())
    if dtype is not None:
        from .convert import ConversionError
        from .convert import _dtype as parse_dtype

        try:
            wanted = parse_dtype(dtype)
        except ConversionError as e:
            raise ValueError(f"MambaEvalLM: {e}") from None
        if wanted != param.dtype:
            raise ValueError(
                f"MambaEvalLM: dtype= applies to pretrained= only; with model= cast the model first "
                f"(model.to({wanted})); it is {str(param.dtype).removeprefix('torch.')}"
            )
    if device is not None:
        try:
            want = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"MambaEvalLM: device {str(device)!r} is not a device") from None
        if want.type != param.device.type or want.index not in (None, param.device.index):
            raise ValueError(
                f"MambaEvalLM: device={str(device)!r} but the model given is on {param.device}; "
                "move it first (model.to(device)) or leave device= out"
            )


@register_model("openlm-mamba", "openlm_mamba")
class MambaEvalLM(TemplateLM):
    """lm-eval ``LM`` around ``MambaLM``: loglikelihood, loglikelihood_rolling and generate_until.

    ``share_contexts``: work that requests share is done once, continuing from copies of the recurrent state:
    the choices of a question read its context once, and contexts with a long common start (a few-shot task's
    examples) read it once. False scores every request whole, as transformers' does.

    Tokens are handled as lm-eval's transformers adapter (``HFLM``) handles them, so both give the same numbers on
    the same weights: texts are encoded with the tokenizer's own special tokens (a BOS where it adds one) unless
    ``add_bos_token`` says otherwise; an empty context is scored after ``prefix_token_id`` (default: the
    tokenizer's BOS, else its EOS); generated text drops special tokens. ``max_length`` bounds context plus
    continuation (plus generated tokens), as in ``HFLM``.
    """

    def __init__(
        self,
        pretrained: str | Path | None = None,
        model: MambaLM | None = None,
        tokenizer: Any = None,
        model_config: str | None = None,
        batch_size: int | str = 1,
        max_length: int = 2048,
        max_gen_toks: int = 256,
        device: str | None = None,
        dtype: str | torch.dtype | None = None,
        backend: str | None = None,
        check_checkpoint: bool = True,
        share_contexts: bool = True,
        add_bos_token: bool | None = None,
        prefix_token_id: int | None = None,
        max_batch_size: int | None = None,  # lm-eval passes it with batch_size "auto"; the batch is fixed here
        **unknown: Any,
    ) -> None:
        super().__init__()
        if unknown:  # a misspelt model_args entry (share_context=, dtpye=) must not be dropped silently
            known = [n for n in inspect.signature(type(self).__init__).parameters if n not in ("self", "unknown")]
            close = {k: difflib.get_close_matches(k, known, n=1) for k in sorted(unknown)}
            hints = "; ".join(f"{k}: did you mean {v[0]}?" for k, v in close.items() if v)
            raise TypeError(
                f"MambaEvalLM: unknown argument(s) {', '.join(sorted(unknown))}"
                + (f" ({hints})" if hints else "")
                + f"; known: {', '.join(known)}"
            )
        if (pretrained is None) == (model is None):
            raise ValueError("MambaEvalLM: pass exactly one of pretrained= (a checkpoint path) or model= (a MambaLM)")
        if model is not None and not isinstance(model, MambaLM):
            raise TypeError(f"MambaEvalLM: model must be a MambaLM, got {type(model).__name__}")
        # the cheap checks first, the checkpoint last
        text = str(batch_size).strip().lower()
        try:  # "auto" / "auto:N" (lm-eval's search for the largest batch): a fixed default
            bs = AUTO_BATCH_SIZE if batch_size is None or text.startswith("auto") else int(text)
        except ValueError:
            bs = 0
        if bs <= 0:
            raise ValueError(f"MambaEvalLM: batch_size must be a positive int or 'auto', got {batch_size!r}")
        if int(max_length) < 2:
            raise ValueError(f"MambaEvalLM: max_length must be >= 2, got {max_length!r}")
        if model is None and check_checkpoint:  # the CLI, which checked it already, passes False
            from .convert import check_checkpoint as check

            check(pretrained, model_config)  # a bad checkpoint is named before a tokenizer is looked for
        self.add_bos_token = None if add_bos_token is None else _flag("add_bos_token", add_bos_token)
        self.tokenizer = _load_tokenizer(tokenizer, pretrained, self.add_bos_token)
        if model is None:
            from .convert import load_model

            try:
                device = check_device(device or "cpu")
            except ValueError as e:
                raise ValueError(f"MambaEvalLM: device {str(device)!r}: {e}") from None
            model = load_model(pretrained, model=model_config, backend=backend, dtype=dtype, device=device)
        else:
            _check_given_model(model, device, dtype)
            if backend is not None:
                model.set_backend(backend)
        check_prompt_backend(model, next(model.parameters()).device)  # BackendUnavailableError, before any task
        try:
            check_tokenizer(self.tokenizer, model.cfg.vocab_size)
        except ValueError as e:
            raise ValueError(f"MambaEvalLM: {e}") from None
        self.model = model.eval()
        self._device = next(model.parameters()).device
        self._batch_size = bs
        self._max_length = int(max_length)
        self.max_gen_toks = int(max_gen_toks)
        self.share_contexts = _flag("share_contexts", share_contexts)
        self.custom_prefix_token_id = None
        if prefix_token_id is not None:
            try:
                custom = int(str(prefix_token_id)) if not isinstance(prefix_token_id, bool) else -1
            except ValueError:
                custom = -1
            if not 0 <= custom < model.cfg.vocab_size:
                raise ValueError(
                    f"MambaEvalLM: prefix_token_id must be a token id in [0, {model.cfg.vocab_size}), "
                    f"got {prefix_token_id!r}"
                )
            self.custom_prefix_token_id = custom

    # -- properties lm-eval reads --------------------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        eos = self.tokenizer.eos_token_id
        return 0 if eos is None else int(eos)

    @property
    def prefix_token_id(self) -> int:
        """The token an empty context is scored after (and rolling windows start with): as ``HFLM``'s."""
        if self.custom_prefix_token_id is not None:
            return self.custom_prefix_token_id
        bos = self.tokenizer.bos_token_id
        return self.eot_token_id if bos is None else int(bos)

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def batch_size(self) -> int:
        return self._batch_size

    @property
    def device(self) -> torch.device:
        return self._device

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        """Token ids of ``string``, with special tokens as ``HFLM.tok_encode`` adds them: as asked, else as
        ``add_bos_token`` says, else the tokenizer's default; never a second BOS before a text that starts with one."""
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token
            bos = self.tokenizer.decode([self.prefix_token_id])
            if bos and string.startswith(bos):
                add_special_tokens = False
        special = {} if add_special_tokens is None else {"add_special_tokens": bool(add_special_tokens)}
        return list(self.tokenizer.encode(string, **special))

    def _encode_context(self, text: str) -> list[int]:
        """A generate_until context's ids as ``HFLM.tok_batch_encode`` makes them: no special tokens for a text
        that starts with the tokenizer's BOS, else as ``add_bos_token`` says, else the tokenizer's default."""
        bos = getattr(self.tokenizer, "bos_token", None)
        if isinstance(bos, str) and bos and text.startswith(bos):
            special = {"add_special_tokens": False}
        else:
            special = {} if self.add_bos_token is None else {"add_special_tokens": self.add_bos_token}
        return list(self.tokenizer.encode(text, **special))

    def tok_decode(self, tokens: list[int], skip_special_tokens: bool = True, **kwargs: Any) -> str:
        return self.tokenizer.decode(tokens, skip_special_tokens=skip_special_tokens)

    # -- scoring -------------------------------------------------------------------------------------
    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(request, context tokens, continuation tokens) -> (sum log p(continuation | context), is greedy).

        With ``share_contexts``, work that requests share is done once: contexts with a long common start
        (few-shot examples) read that prefix once and the rest of each from copies of its recurrent state,
        and the choices of a question read its context once (:meth:`_score_prefixed`, :meth:`_score_shared`).
        Other requests run whole, right-padded, in batches."""
        prepared = []  # (request index, model input, scored continuation)
        for i, (_, ctx, cont) in enumerate(requests):
            if not cont:
                raise ValueError("MambaEvalLM: a request has an empty continuation (nothing to score)")
            if len(cont) > self.max_length:  # HFLM refuses it too; scoring only its tail would be a wrong number
                raise ValueError(
                    f"MambaEvalLM: a continuation of {len(cont)} tokens is longer than max_length "
                    f"({self.max_length}); raise max_length"
                )
            ctx = ctx or [self.prefix_token_id]  # as lm-eval's loglikelihood does for an empty context
            whole = (list(ctx) + list(cont))[-(self.max_length + 1) :]
            inp = whole[:-1]
            prepared.append((i, inp, list(cont)))
        groups: dict[tuple[int, ...], list] = {}
        if self.share_contexts:
            for item in prepared:
                _, inp, cont = item
                if len(inp) >= len(cont):  # a context to share: the input up to the first scored token
                    groups.setdefault(tuple(inp[: len(inp) - len(cont) + 1]), []).append(item)
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        bar = tqdm(total=len(prepared), desc="loglikelihood", disable=disable_tqdm or len(prepared) < 2)
        left = self._score_prefixed(list(groups.items()), requests, results, bar)
        shared = [(key, items) for key, items in left if len(items) > 1]
        in_groups = {item[0] for key, items in groups.items() for item in items}
        alone = [item for item in prepared if item[0] not in in_groups] + [
            items[0] for _, items in left if len(items) == 1
        ]
        self._score_whole(alone, requests, results, bar)
        self._score_shared(shared, requests, results, bar)
        bar.close()
        return results  # type: ignore[return-value]

    def _record(self, requests, results: list, i: int, logits: torch.Tensor, cont: list[int]) -> None:
        """Score continuation ``cont`` of request ``i`` from the logits (len(cont), vocab) that predict it."""
        logp = F.log_softmax(logits.float(), dim=-1)
        target = torch.tensor(cont, device=logp.device)
        ll = logp.gather(-1, target[:, None]).sum().item()
        greedy = bool((logp.argmax(-1) == target).all())
        results[i] = (ll, greedy)
        req = requests[i][0]
        if req is not None:
            self.cache_hook.add_partial("loglikelihood", req, (ll, greedy))

    def _head_at(self, hidden: torch.Tensor, spans: list[tuple[int, int]]) -> tuple[torch.Tensor, ...]:
        """float32 logits of rows k's positions [a, b) of ``hidden`` (rows, L, d_model), one tensor per span: the
        output layer only where tokens are scored, all in one matmul (one read of its weight)."""
        picked = torch.cat([hidden[k, a:b] for k, (a, b) in enumerate(spans)])
        return self.model.model.lm_head(picked).float().split([b - a for a, b in spans])

    def _score_whole(self, items: list, requests, results: list, bar) -> None:
        """Each input whole, right-padded, ``batch_size`` at a time (longest first: little padding)."""
        order = sorted(items, key=lambda r: -len(r[1]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            ids = _right_padded([inp for _, inp, _ in batch], self.device)  # causal: real logits unaffected
            cache = self.model.allocate_cache(len(batch), device=self.device)
            hidden = self.model.forward_with_cache(ids, cache, head=False)[1]
            # logits only where a continuation token is predicted, not (batch, width, vocab) of them
            spans = [(len(inp) - len(cont), len(inp)) for _, inp, cont in batch]
            for (i, _, cont), own in zip(batch, self._head_at(hidden, spans)):
                self._record(requests, results, i, own, cont)
            bar.update(len(batch))

    def _score_prefixed(self, groups: list, requests, results: list, bar) -> list:
        """Groups of requests (context -> its requests) whose contexts start alike: in sorted order, runs of
        contexts sharing at least PREFIX_MIN tokens (a few-shot task's examples) form clusters. Where that saves
        work, a cluster's common prefix is read once and, from copies of its state, right-padded rows in batches
        of ``batch_size``: each context's rest once for its 1-token choices, and rest + continuation but its
        last token for each longer choice. Returns the groups left to the per-context path."""
        left: list = []
        clusters: list[list] = []
        for group in sorted(groups, key=lambda g: g[0]):  # lexicographic: neighbours share the longest starts
            if clusters and _common_length(clusters[-1][-1][0], group[0]) >= PREFIX_MIN:
                clusters[-1].append(group)
            else:
                clusters.append([group])
        for cluster in clusters:
            common = _common_length(cluster[0][0], cluster[-1][0])  # sorted: the ends' common start is all's
            rows = []  # (tokens after the prefix, [(request index, continuation, where its logits start)])
            for ctx, items in cluster:
                rest = list(ctx[common:])
                ones = [(i, cont, len(rest) - 1) for i, _, cont in items if len(cont) == 1]
                if ones:  # one row serves every 1-token choice
                    rows.append((rest, ones))
                rows += [(rest + cont[:-1], [(i, cont, len(rest) - 1)]) for i, _, cont in items if len(cont) > 1]
            # tokens through the model this way, and per context (each read once, its longer choices forked);
            # the per-context path reads its contexts' last layer at one position only: worth some tokens
            prefixed = common + sum(len(toks) for toks, _ in rows)
            per_context = sum(len(ctx) + sum(len(c) - 1 for _, _, c in items) for ctx, items in cluster)
            if len(cluster) < 2 or prefixed > 0.8 * per_context:
                left += cluster
                continue
            cache = self.model.allocate_cache(1, device=self.device)
            prefix = torch.tensor([cluster[0][0][:common]], device=self.device)
            after_prefix = self.model.forward_with_cache(prefix, cache, last_only=True)[0][0, -1:]  # (1, vocab)
            rows.sort(key=lambda r: -len(r[0]))
            for lo in range(0, len(rows), self.batch_size):
                self._score_rows(rows[lo : lo + self.batch_size], cache, after_prefix, requests, results)
            bar.update(sum(len(items) for _, items in cluster))
        return left

    def _score_rows(self, part: list, cache, after_prefix: torch.Tensor, requests, results: list) -> None:
        """Rows of tokens after a prefix (right-padded, from copies of its state ``cache``) and the requests
        each scores; ``after_prefix`` (1, vocab) predicts the first token after the prefix."""
        spans = [(max(0, min(at for _, _, at in m)), max(at + len(c) for _, c, at in m)) for _, m in part]
        logits = None
        if any(toks for toks, _ in part):
            ids = _right_padded([toks for toks, _ in part], self.device)  # the padding is never read
            hidden = self.model.forward_with_cache(ids, cache.clone(repeat=len(part)), head=False)[1]
            logits = self._head_at(hidden, spans)
        for k, (_, members) in enumerate(part):
            for i, cont, at in members:  # the logits at `at` predict cont[0]; at -1 the prefix's do
                a = spans[k][0]
                own = logits[k][max(at, 0) - a : at + len(cont) - a] if logits is not None else after_prefix[:0]
                self._record(requests, results, i, own if at >= 0 else torch.cat([after_prefix, own]), cont)

    def _score_shared(self, groups: list, requests, results: list, bar) -> None:
        """Groups of requests with one context: ``batch_size`` contexts read at a time (left-padded), their last
        logits score each continuation's first token, and each continuation's other tokens run from a copy of
        its context's state (right-padded, ``batch_size`` rows at a time)."""
        from .generation import _prompt_rows

        groups = sorted(groups, key=lambda g: -len(g[0]))
        for start in range(0, len(groups), self.batch_size):
            batch = groups[start : start + self.batch_size]
            ids, mask = _prompt_rows([torch.tensor(ctx) for ctx, _ in batch], self.device)  # left-padded
            cache = self.model.allocate_cache(len(batch), device=self.device)
            mask = None if bool(mask.all()) else mask
            first = self.model.forward_with_cache(ids, cache, last_only=True, mask=mask)[0][:, -1]
            members = [(row, item) for row, (_, items) in enumerate(batch) for item in items]
            for row, (i, _, cont) in members:
                if len(cont) == 1:
                    self._record(requests, results, i, first[row : row + 1], cont)
            rest = sorted(((row, item) for row, item in members if len(item[2]) > 1), key=lambda m: -len(m[1][2]))
            for lo in range(0, len(rest), self.batch_size):
                part = rest[lo : lo + self.batch_size]
                more = _right_padded([cont[:-1] for _, (_, _, cont) in part], self.device)  # padding never read
                hidden = self.model.forward_with_cache(more, cache.select([row for row, _ in part]), head=False)[1]
                logits = self._head_at(hidden, [(0, len(c) - 1) for _, (_, _, c) in part])
                for k, (row, (i, _, cont)) in enumerate(part):
                    self._record(requests, results, i, torch.cat([first[row : row + 1], logits[k]]), cont)
            bar.update(len(members))

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for req in tqdm(requests, desc="loglikelihood_rolling", disable=disable_tqdm):
            (text,) = req.args
            windows = [
                (None, ctx, cont)
                for ctx, cont in map(
                    make_disjoint_window,
                    get_rolling_token_windows(
                        token_list=self.tok_encode(text),
                        prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length,
                        context_len=1,
                    ),
                )
            ]
            total = sum(ll for ll, _ in self._loglikelihood_tokens(windows, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Continuations cut at each request's stop strings: greedy, or sampled (with the request's temperature /
        top_p / top_k) where lm-eval's own rules say so (see :func:`_sampling_settings`). Up to ``batch_size``
        requests with the same token budget and settings decode together (left-padded: each as it would alone)."""
        eos_text = self.tok_decode([self.eot_token_id], skip_special_tokens=False)
        jobs = []  # (request index, context ids, max new tokens, stop strings, sampling settings)
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            kwargs = copy.deepcopy(dict(gen_kwargs or {}))  # the request's own args stay as they were (cache keys)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos_text)
            limits = [kwargs.pop(k, None) for k in _MAX_TOKEN_KEYS]  # lm-eval's names, in its priority order
            max_new = int(next((v for v in limits if v is not None), self.max_gen_toks))
            if max_new >= self.max_length:  # as HFLM: the context keeps max_length - max_new tokens, at least one
                raise ValueError(
                    f"MambaEvalLM: a request asks for {max_new} new tokens, which leaves no room for its context "
                    f"in max_length ({self.max_length}); raise max_length above {max_new}"
                )
            sampling = _sampling_settings(kwargs)
            ctx = self._encode_context(context)[-(self.max_length - max_new) :] or [self.prefix_token_id]
            jobs.append((i, ctx, max_new, until, sampling))
        out: list[str] = [""] * len(jobs)
        groups: dict[tuple, list] = {}
        for job in sorted(jobs, key=lambda j: -len(j[1])):  # longest contexts first: little padding per batch
            groups.setdefault((job[2], job[4]), []).append(job)
        with tqdm(total=len(jobs), desc="generate_until", disable=disable_tqdm) as bar:
            for (max_new, sampling), group in groups.items():
                for start in range(0, len(group), self.batch_size):
                    batch = group[start : start + self.batch_size]
                    news = self._continue([j[1] for j in batch], max_new, dict(sampling))
                    for (i, _, _, until, _), new in zip(batch, news):
                        text = self.tok_decode(new)
                        for stop in until:
                            if stop and stop in text:
                                text = text[: text.index(stop)]
                        self.cache_hook.add_partial("generate_until", requests[i].args, text)
                        out[i] = text
                    bar.update(len(batch))
        return out

    def _continue(self, contexts: list[list[int]], max_new: int, sampling: dict[str, Any]) -> list[list[int]]:
        """New tokens for each context (one left-padded batch), each cut before its first EOS; greedy unless
        ``sampling`` has do_sample."""
        from .generation import generate

        rows = [torch.tensor(c, device=self.device) for c in contexts]
        full = generate(self.model, rows, max_new_tokens=max_new, eos_token_id=self.eot_token_id, **sampling)
        width = max(len(c) for c in contexts)
        news = full[:, width:].tolist()
        return [new[: new.index(self.eot_token_id)] if self.eot_token_id in new else new for new in news]


_SAMPLING_KEYS = ("temperature", "top_p", "top_k", "repetition_penalty")
_MAX_TOKEN_KEYS = ("max_gen_toks", "max_new_tokens", "max_tokens", "max_completion_tokens")
_warned_kwargs: set[str] = set()


def _sampling_settings(kwargs: dict[str, Any]) -> tuple:
    """A request's generation settings for :func:`generate`, as a hashable tuple of items, with lm-eval's own
    rules (``normalize_gen_kwargs``): sampling with ``do_sample: true``, or without ``do_sample`` when the
    temperature is above 0; greedy otherwise (a temperature of 0 with ``do_sample: true`` too). Settings generate()
    has no equivalent for are named once in a warning, not silently dropped."""
    do_sample = kwargs.pop("do_sample", None)
    picked = {k: kwargs.pop(k) for k in _SAMPLING_KEYS if kwargs.get(k) is not None}
    for key in sorted(k for k in set(kwargs) - _warned_kwargs if kwargs[k] is not None):
        _warned_kwargs.add(key)
        _log.warning("generate_until: generation setting %r is not supported here and is ignored", key)
    given = picked.pop("temperature", None)
    temperature = 1.0 if given is None else float(given)  # do_sample alone: transformers' default of 1
    penalty = picked.pop("repetition_penalty", None)
    common = (("repetition_penalty", penalty),) if penalty is not None else ()
    sample = given is not None and temperature > 0.0 if do_sample is None else bool(do_sample) and temperature > 0.0
    if sample:
        return (("do_sample", True), *common, ("temperature", temperature), *sorted(picked.items()))
    return (("do_sample", False), *common)


def evaluate(
    lm: MambaEvalLM,
    tasks: list[str],
    num_fewshot: int | None = None,
    include_path: str | Path | None = None,
    limit: int | float | None = None,
    log_samples: bool = False,
    include_defaults: bool = True,
    task_manager: Any = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Run lm-eval's ``simple_evaluate`` on ``tasks`` with our adapter.

    ``include_path`` adds a folder of task YAMLs; ``include_defaults=False`` skips indexing lm-eval's
    built-in tasks (seconds saved when only local tasks run). A ready ``task_manager`` (see ``make_task_manager``)
    replaces both. ``limit``: examples per task, a count >= 1 or a fraction in (0, 1). Other keyword arguments go
    to ``simple_evaluate``; ``bootstrap_iters`` defaults to 0 here (no standard errors, which cost minutes on
    large tasks): pass e.g. ``bootstrap_iters=1000`` for them. Unknown task names and a
    bad ``limit`` raise ValueError before anything runs.
    """
    from lm_eval import simple_evaluate

    try:
        limit = check_limit(limit)
    except ValueError as e:
        raise ValueError(f"limit: {e}") from None
    manager = task_manager if task_manager is not None else make_task_manager(include_path, include_defaults)
    check_tasks(list(tasks), manager)
    results = simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        task_manager=manager,
        limit=limit,
        log_samples=log_samples,
        **{"bootstrap_iters": 0, **kwargs},  # no standard errors unless asked for (lm-eval's default: 100000)
    )
    if results is None:
        raise RuntimeError("lm-eval returned no results")
    return results


def results_table(results: dict[str, Any], reference: dict[str, float] | None = None) -> str:
    """A markdown table (task, n-shot, acc, acc_norm, other metrics[, model card]) from lm-eval results.

    acc / acc_norm in %; every other metric a task reports (perplexities, exact_match, ...; with its filter when
    not "none") in the last column. With ``reference`` (task -> model card %), only the reference tasks are listed.
    """
    n_shot = results.get("n-shot", {})
    has_ref = bool(reference)
    head = "| Task | n-shot | acc | acc_norm | other metrics |" + (" model card |" if has_ref else "")
    lines = [head, "|" + "---|" * (6 if has_ref else 5)]
    rows = {**results.get("results", {}), **results.get("groups", {})}
    for task, metrics in sorted(rows.items()):
        if has_ref and task not in reference:
            continue  # e.g. MMLU's 57 subjects: the group row carries the model card's number
        acc = metrics.get("acc,none")
        norm = metrics.get("acc_norm,none")
        row = f"| {task} | {n_shot.get(task, '')} | {_pct(acc)} | {_pct(norm)} | {_other_metrics(metrics) or '-'} |"
        if has_ref:
            row += f" {reference.get(task, '')} |"
        lines.append(row)
    return "\n".join(lines)


def _other_metrics(metrics: dict[str, Any]) -> str:
    """ "name value" for each numeric metric but acc / acc_norm (with ``filter`` when it is not "none")."""
    parts = []
    for key, value in metrics.items():
        name, _, filt = key.partition(",")
        if not filt or name.endswith("_stderr") or (name in ("acc", "acc_norm") and filt == "none"):
            continue
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            label = name if filt == "none" else f"{name} ({filt})"
            parts.append(f"{label} {value:,.0f}" if abs(value) >= 1e4 else f"{label} {value:.4g}")
    return ", ".join(parts)


def _pct(value: Any) -> str:
    return f"{100 * value:.1f}" if isinstance(value, (int, float)) else "-"
