"""Prompts of the auto-interp explainer and scorers, and how an example is shown to them.

An example is a short token context; the tokens where the latent is active are marked ``<<like this>>``
(adjacent marked tokens share one pair of marks, a token's leading space stays outside them), as Bills
et al. 2023 and EleutherAI's delphi show them. The explainer sees marked top and quantile examples and
answers with one line. The detection scorer sees an unmarked text and the explanation and answers Yes
or No (does the latent fire here?); the fuzzing scorer sees a text with some tokens marked and answers
Yes or No (are the marked tokens the ones the explanation describes?). Every prompt is few-shot with
made-up demonstrations (balanced Yes/No), which a small judge needs to answer in the expected format.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

from workflows.judges import Chat

OPTIONS = ("Yes", "No")

EXPLAIN_SYSTEM = (
    "You study a feature of a language model. You see text snippets; the tokens where the feature is "
    "active are marked like <<this>> and listed, most frequent first. Reply with one short line: the "
    "most frequent marked tokens in quotes, then what they have in common."
)
EXPLAIN_DEMOS = [
    (
        ["the old <<dog>> slept", "fed the <<cat>> twice", "two <<dogs>> ran", "a <<bird>> sang"],
        'words like "dog", "cat": animals',
    ),
    (["call print<<(>>x", "if len<<(>>items", "return max<<(>>a, b"], 'words like "(": calls of functions'),
    (["in <<1999>> the", "by <<2010>>,", "since <<1850>> there"], 'words like "1999", "2010": years'),
]

DETECT_SYSTEM = (
    "A feature of a language model is described. Read the text and answer Yes if the text contains "
    "what the feature describes, No if it does not."
)
DETECT_DEMOS = [
    ('words like "dog", "cat": animals', "the old dog slept by the door", "Yes"),
    ('words like "1999", "2010": years', "the meeting starts at noon today", "No"),
    ('words like "(": calls of functions', "then call print(x) again", "Yes"),
    ('words like "dog", "cat": animals', "prices went up in the market", "No"),
]

FUZZ_SYSTEM = (
    "A feature of a language model is described. Some tokens of the text are marked like <<this>>. "
    "Answer Yes if the marked tokens are what the feature describes, No if they are not."
)
FUZZ_DEMOS = [
    ('words like "dog", "cat": animals', "the old <<dog>> slept by the door", "Yes"),
    ('words like "1999", "2010": years', "in 1999 the <<meeting>> started", "No"),
    ('words like "1999", "2010": years', "in <<1999>> the meeting started", "Yes"),
    ('words like "dog", "cat": animals', "the old dog <<slept>> by the door", "No"),
]


def render(tokens: Sequence[str], marked: set[int] | frozenset[int] = frozenset()) -> str:
    """Join token texts, wrapping runs of marked tokens in ``<<``/``>>`` (leading spaces left outside)."""
    out: list[str] = []
    inside = False
    for i, tok in enumerate(tokens):
        if i in marked and not inside:
            stripped = tok.lstrip() or tok  # a whitespace-only token stays inside its marks
            out.append(tok[: len(tok) - len(stripped)] + "<<" + stripped)
            inside = True
            continue
        if i not in marked and inside:
            out.append(">>")
            inside = False
        out.append(tok)
    if inside:
        out.append(">>")
    return "".join(out)


def _snippets(texts: Sequence[str]) -> str:
    return "\n".join(f"{i + 1}. {t}" for i, t in enumerate(texts))


def marked_tokens(texts: Sequence[str], limit: int = 8) -> list[str]:
    """The distinct marked spans of ``texts``, most frequent first (ties: first seen)."""
    spans = [m.strip() for t in texts for m in re.findall(r"<<(.*?)>>", t) if m.strip()]
    return [m for m, _ in Counter(spans).most_common(limit)]


def _explain_user(texts: Sequence[str]) -> str:
    # Listing the marked tokens lets a small explainer copy them instead of echoing a demonstration.
    listed = ", ".join(f'"{m}"' for m in marked_tokens(texts))
    return (
        f"Snippets:\n{_snippets(texts)}\nMarked tokens: {listed}\nWhat do the marked tokens have in common?"
    )


def explain_chat(texts: Sequence[str]) -> Chat:
    """The explainer's chat for marked example texts."""
    chat: Chat = [{"role": "system", "content": EXPLAIN_SYSTEM}]
    for demo, answer in EXPLAIN_DEMOS:
        chat += [{"role": "user", "content": _explain_user(demo)}, {"role": "assistant", "content": answer}]
    return chat + [{"role": "user", "content": _explain_user(texts)}]


def _question(explanation: str, text: str, ask: str) -> str:
    # The text comes last: questions about one explanation then share everything before it.
    return f"Feature: {explanation}\n{ask}\nText: {text}"


DETECT_ASK = "Does the text contain what the feature describes?"
FUZZ_ASK = "Are the marked tokens what the feature describes?"


def _scorer_chat(system: str, demos, ask: str, explanation: str, text: str) -> Chat:
    chat: Chat = [{"role": "system", "content": system}]
    for demo_expl, demo_text, answer in demos:
        chat += [
            {"role": "user", "content": _question(demo_expl, demo_text, ask)},
            {"role": "assistant", "content": answer},
        ]
    return chat + [{"role": "user", "content": _question(explanation, text, ask)}]


def detect_chat(explanation: str, text: str) -> Chat:
    return _scorer_chat(DETECT_SYSTEM, DETECT_DEMOS, DETECT_ASK, explanation, text)


def fuzz_chat(explanation: str, text: str) -> Chat:
    return _scorer_chat(FUZZ_SYSTEM, FUZZ_DEMOS, FUZZ_ASK, explanation, text)


def clean_explanation(text: str, limit: int = 120) -> str:
    """The first non-empty line of a completion, stripped of quotes and a trailing period."""
    line = next((ln.strip() for ln in text.splitlines() if ln.strip()), "")
    return line.strip("\"'` ").rstrip(".")[:limit] or "(no explanation)"
