"""LLM judges for auto-interpretation: a local causal LM, or any OpenAI-compatible chat endpoint.

A judge does two things on chats (lists of ``{"role", "content"}`` messages):

- ``generate(chats, max_new_tokens)``: greedy completions (the explainer's explanations);
- ``option_logprobs(chats, options)``: [N, O] log-probabilities of the first token of each answer
  option as the assistant's first token (the scorer's Yes/No). One forward per question, no sampling.

:class:`LocalJudge` also gives ``continuation_logprobs(prefix, texts)``: per-token log-probabilities of
plain token sequences after a shared prefix (likelihood scoring, workflows/autointerp_likelihood.py),
which a chat endpoint does not return.

:class:`LocalJudge` runs a transformers model in this process (the default is the built-in SmolLM2).
Chats in one call share a long few-shot prefix, so it runs that prefix once and reuses its KV cache for
every question (and, per batch, the batch's own common prefix, e.g. the explanation), then the distinct
suffixes left-padded with explicit position ids, so a batched answer equals the unbatched one.
:class:`OpenAIJudge` posts to ``{url}/chat/completions`` (vLLM, llama.cpp server, Ollama, a hosted API)
with the standard library's HTTP client: ``temperature 0`` for generation, ``logprobs`` with
``top_logprobs`` for options. An option absent from the returned top list gets the smallest returned
log-probability minus 1 (its true value is at most the smallest listed; this puts it below all of them).
"""

from __future__ import annotations

import copy
import json
import math
import os
import urllib.error
import urllib.request
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import numpy as np
import torch
from torch import Tensor

from workflows.errors import UserError

Chat = list[dict[str, str]]
TOP_LOGPROBS = 20  # OpenAI's maximum; vLLM and llama.cpp accept it too
# Used when the tokenizer has no chat template (tiny test models, base models).
PLAIN_TEMPLATE = (
    "{% for m in messages %}{{ m['role'] | capitalize }}: {{ m['content'] }}\n\n{% endfor %}"
    "{% if add_generation_prompt %}Assistant:{% endif %}"
)


class Judge(Protocol):
    def generate(self, chats: Sequence[Chat], max_new_tokens: int) -> list[str]: ...

    def option_logprobs(self, chats: Sequence[Chat], options: Sequence[str]) -> np.ndarray: ...


def _common_prefix(seqs: Sequence[Sequence[int]]) -> int:
    n = min(len(s) for s in seqs)
    first = seqs[0]
    for i in range(n):
        if any(s[i] != first[i] for s in seqs[1:]):
            return i
    return n


class LocalJudge:
    """A causal LM in this process; greedy generation and first-token option log-probs, batched."""

    def __init__(self, model: Any, tokenizer: Any, *, batch_size: int = 16):
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.device = next(model.parameters()).device
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id

    def encode(self, chat: Chat) -> list[int]:
        """Token ids of the chat, ending where the assistant's answer starts."""
        template = None if getattr(self.tokenizer, "chat_template", None) else PLAIN_TEMPLATE
        text = self.tokenizer.apply_chat_template(
            chat, tokenize=False, add_generation_prompt=True, chat_template=template
        )
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def option_ids(self, options: Sequence[str]) -> list[int]:
        """First token of each option as the answer's first token; distinct options must differ there."""
        ids = [self.tokenizer(o, add_special_tokens=False).input_ids[0] for o in options]
        if len(set(ids)) < len(ids):
            raise UserError(f"answer options {list(options)} share their first token; choose other options")
        return ids

    @torch.no_grad()
    def _prefill(self, prefix: list[int], cache: Any = None, start: int = 0) -> Any:
        """The KV cache of ``prefix`` (batch 1); extends ``cache``, which holds its first ``start`` tokens."""
        from transformers import DynamicCache

        cache = DynamicCache() if cache is None else copy.deepcopy(cache)
        if len(prefix) > start:
            ids = torch.tensor([prefix[start:]], device=self.device)
            pos = torch.arange(start, len(prefix), device=self.device)[None]
            self.model(input_ids=ids, position_ids=pos, cache=cache, use_cache=True, logits_to_keep=1)
        return cache

    @torch.no_grad()
    def _after(self, cache: Any, P: int, rows: list[list[int]], *, left: bool,
               logits_to_keep: int = 0) -> tuple[Tensor, Any, Tensor]:
        """Run ``rows`` padded to one length (on the left, so every row ends at the last column, or on the
        right) after a batch-1 cache of P tokens: (logits, the batch's cache, the attention mask)."""
        B, S = len(rows), max(len(r) for r in rows)
        ids = torch.full((B, S), self.pad_id, dtype=torch.long)
        mask = torch.zeros((B, P + S), dtype=torch.long)
        mask[:, :P] = 1
        pos = torch.zeros((B, S), dtype=torch.long)
        for i, r in enumerate(rows):
            at = slice(S - len(r), S) if left else slice(0, len(r))
            ids[i, at] = torch.tensor(r)
            mask[i, P + at.start : P + at.stop] = 1
            pos[i, at] = torch.arange(P, P + len(r))
        cache = copy.deepcopy(cache)
        cache.batch_repeat_interleave(B)
        out = self.model(
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=pos.to(self.device),
            cache=cache,
            use_cache=True,
            logits_to_keep=logits_to_keep,
        )
        return out.logits.float(), cache, mask

    def _step(self, cache: Any, P: int, suffixes: list[list[int]]) -> tuple[Tensor, Any, Tensor, Tensor]:
        """Run left-padded suffixes after a batch-1 cache of P tokens: (last logits [B, V], cache, mask, next pos)."""
        logits, cache, mask = self._after(cache, P, suffixes, left=True, logits_to_keep=1)
        lengths = torch.tensor([P + len(s) for s in suffixes])
        return logits[:, -1], cache, mask, lengths

    def _batches(self, encoded: list[list[int]]):
        """(indices, batch-1 cache, its length) per batch. The common prefix of all rows is run once; a batch
        is a run of consecutive rows sharing at least as long a prefix as its first two rows (so callers order
        chats by what they share, e.g. questions grouped by explanation), at most ``batch_size`` rows."""
        n = len(encoded)
        g = min(_common_prefix(encoded) if n > 1 else len(encoded[0]), min(len(e) for e in encoded) - 1)
        base = self._prefill(encoded[0][:g])
        i = 0
        while i < n:
            p = _common_prefix([encoded[i], encoded[i + 1]]) if i + 1 < n else len(encoded[i])
            j = i + 1
            while j < n and j - i < self.batch_size and _common_prefix([encoded[i], encoded[j]]) >= p:
                j += 1
            p = max(g, min(p, min(len(encoded[k]) for k in range(i, j)) - 1))
            yield list(range(i, j)), self._prefill(encoded[i][:p], base, g), p
            i = j

    def option_logprobs(self, chats: Sequence[Chat], options: Sequence[str]) -> np.ndarray:
        if not chats:
            return np.zeros((0, len(options)))
        option_ids = self.option_ids(options)
        encoded = [self.encode(c) for c in chats]
        out = np.zeros((len(chats), len(options)))
        for idx, cache, p in self._batches(encoded):
            logits, *_ = self._step(cache, p, [encoded[i][p:] for i in idx])
            out[idx] = torch.log_softmax(logits, dim=-1)[:, option_ids].cpu().numpy()
        return out

    @torch.no_grad()
    def continuation_logprobs(
        self, prefix: Sequence[int], texts: Sequence[Sequence[int]]
    ) -> list[np.ndarray]:
        """Per text, the log-probability of each of its tokens after ``prefix`` + the text's earlier tokens
        (plain token ids, no chat template). The prefix runs once; texts run right-padded in batches."""
        if not texts:
            return []
        if len(prefix) < 2:
            raise ValueError("continuation_logprobs needs a prefix of at least 2 tokens")
        P = len(prefix) - 1
        cache = self._prefill(list(prefix[:P]))
        out: list[np.ndarray] = []
        for start in range(0, len(texts), self.batch_size):
            rows = [[prefix[P], *t] for t in texts[start : start + self.batch_size]]
            logits, *_ = self._after(cache, P, rows, left=False)
            ids = torch.tensor([r + [self.pad_id] * (logits.shape[1] - len(r)) for r in rows])
            logp = torch.log_softmax(logits[:, :-1], dim=-1)
            logp = logp.gather(2, ids[:, 1:, None].to(self.device))[..., 0]
            out += [logp[i, : len(r) - 1].cpu().numpy() for i, r in enumerate(rows)]
        return out

    @torch.no_grad()
    def generate(self, chats: Sequence[Chat], max_new_tokens: int) -> list[str]:
        if not chats:
            return []
        encoded = [self.encode(c) for c in chats]
        texts: list[str] = [""] * len(chats)
        stop = {self.tokenizer.eos_token_id, self.pad_id}
        for idx, cache, p in self._batches(encoded):
            logits, cache, mask, lengths = self._step(cache, p, [encoded[i][p:] for i in idx])
            tokens: list[list[int]] = [[] for _ in idx]
            done = torch.zeros(len(idx), dtype=torch.bool)
            for step in range(max_new_tokens):
                nxt = logits.argmax(dim=-1).cpu()
                for row, t in enumerate(nxt.tolist()):
                    done[row] |= t in stop
                    if not done[row]:
                        tokens[row].append(t)
                if bool(done.all()) or step == max_new_tokens - 1:
                    break
                mask = torch.cat([mask, torch.ones((len(idx), 1), dtype=mask.dtype)], dim=1)
                out = self.model(
                    input_ids=nxt[:, None].to(self.device),
                    attention_mask=mask.to(self.device),
                    position_ids=(lengths + step)[:, None].to(self.device),
                    cache=cache,
                    use_cache=True,
                    logits_to_keep=1,
                )
                logits = out.logits[:, -1].float()
            for row, i in enumerate(idx):
                texts[i] = self.tokenizer.decode(tokens[row], skip_special_tokens=True)
        return texts


class OpenAIJudge:
    """Any OpenAI-compatible ``/chat/completions`` endpoint; requests run ``concurrency`` at a time."""

    def __init__(
        self,
        url: str,
        model: str,
        *,
        api_key: str | None = None,
        timeout: float = 120.0,
        concurrency: int = 4,
        what: str = "judge",
    ):
        if not url.startswith(("http://", "https://")):
            raise UserError(f"{what} URL {url!r} is not http(s)://host[:port]/v1")
        url = url.rstrip("/")
        self.url = url if url.endswith("/chat/completions") else f"{url}/chat/completions"
        self.model, self.api_key, self.timeout, self.concurrency, self.what = (
            model,
            api_key,
            timeout,
            concurrency,
            what,
        )

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        headers = {"Content-Type": "application/json"}
        if self.api_key:
            headers["Authorization"] = f"Bearer {self.api_key}"
        request = urllib.request.Request(
            self.url, data=json.dumps({"model": self.model, **body}).encode(), headers=headers, method="POST"
        )
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read())
        except urllib.error.HTTPError as exc:
            detail = exc.read()[:300].decode(errors="replace")
            raise UserError(
                f"the {self.what} endpoint {self.url} answered HTTP {exc.code}: {detail}"
            ) from exc
        except (urllib.error.URLError, OSError) as exc:
            raise UserError(
                f"cannot reach the {self.what} endpoint {self.url} ({exc}); start the server or fix its URL"
            ) from exc

    def _map(self, fn, items: Sequence[Any]) -> list[Any]:
        with ThreadPoolExecutor(max_workers=max(1, self.concurrency)) as pool:
            return list(pool.map(fn, items))

    def generate(self, chats: Sequence[Chat], max_new_tokens: int) -> list[str]:
        def one(chat: Chat) -> str:
            reply = self._post({"messages": chat, "max_tokens": max_new_tokens, "temperature": 0})
            return reply["choices"][0]["message"].get("content") or ""

        return self._map(one, chats)

    def option_logprobs(self, chats: Sequence[Chat], options: Sequence[str]) -> np.ndarray:
        def one(chat: Chat) -> list[float]:
            reply = self._post(
                {
                    "messages": chat,
                    "max_tokens": 1,
                    "temperature": 0,
                    "logprobs": True,
                    "top_logprobs": TOP_LOGPROBS,
                }
            )
            choice = reply["choices"][0]
            content = (choice.get("logprobs") or {}).get("content") or []
            if not content:
                raise UserError(
                    f"the {self.what} endpoint {self.url} returned no logprobs; use a server that "
                    "supports logprobs/top_logprobs (vLLM, llama.cpp server, OpenAI)"
                )
            return option_scores(content[0].get("top_logprobs") or [], options)

        return np.asarray(self._map(one, chats), dtype=float).reshape(len(chats), len(options))


def option_scores(top: list[dict[str, Any]], options: Sequence[str]) -> list[float]:
    """Log-prob of each option from an OpenAI ``top_logprobs`` list (tokens compared stripped);
    an option not listed gets the smallest listed log-prob minus 1."""
    floor = min((float(t["logprob"]) for t in top), default=0.0) - 1.0
    out = []
    for option in options:
        found = [float(t["logprob"]) for t in top if t["token"].strip() == option.strip()]
        out.append(max(found) if found else floor)
    return [v if math.isfinite(v) else floor for v in out]


def make_judge(
    url: str | None,
    model: str | None,
    *,
    local: Any,
    api_key_env: str = "OPENAI_API_KEY",
    what: str = "judge",
    batch_size: int = 16,
) -> Judge:
    """An OpenAIJudge for ``url``, else a LocalJudge on ``local`` (a LoadedModel)."""
    if url:
        if not model:
            raise UserError(f"the {what} endpoint {url} needs a model name (the server's model id)")
        return OpenAIJudge(url, model, api_key=os.environ.get(api_key_env), what=what)
    return LocalJudge(local.model, local.tokenizer, batch_size=batch_size)
