"""The demo preference, *concise answers*, and its automatic adherence score.

SmolLM2-135M-Instruct usually answers a simple question with a paragraph or a list. The demo asks
it for a complete answer in one or two sentences instead. `judge(text, finished)` labels one
generated answer:

  "concise"     1 or 2 sentences, at most MAX_WORDS words, and the model ended it itself (EOS);
  "degenerate"  not a real answer: empty, fewer than MIN_WORDS words, no letters, or a loop
                (the same word 3-gram 5 times or more, or under 30% distinct words);
  "long"        anything else: more sentences, more words, or cut off by the token budget.

An empty or looping answer is never counted as concise, so the score cannot be won by saying
nothing: `adherence` is the share of "concise" answers and degenerate ones are reported apart.
"""
import re
from collections import Counter

MAX_SENTENCES, MAX_WORDS, MIN_WORDS = 2, 60, 3

# a sentence ends at . ! ? (or a closing quote/bracket after one) followed by space, or at a line break
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+|\n+")


def sentences(text):
    return [s for s in (p.strip() for p in _SENTENCE_END.split(text.strip())) if re.search(r"\w", s)]


def first_sentences(text, n):
    """The start of text up to the end of its n-th sentence, exactly as written (a prefix of text)."""
    ends = [m.start() for m in _SENTENCE_END.finditer(text.strip())]
    return text.strip()[:ends[n - 1]] if len(ends) >= n else text.strip()


def is_degenerate(text):
    words = re.findall(r"\w+", text.lower())
    if len(words) < MIN_WORDS or not re.search(r"[a-zA-Z]", text):
        return True
    trigrams = Counter(zip(words, words[1:], words[2:]))
    if trigrams and max(trigrams.values()) >= 5:
        return True
    return len(words) >= 10 and len(set(words)) / len(words) < 0.3


def judge(text, finished):
    if is_degenerate(text):
        return "degenerate"
    n_words = len(re.findall(r"\w+", text))
    if finished and len(sentences(text)) <= MAX_SENTENCES and n_words <= MAX_WORDS:
        return "concise"
    return "long"


def adherence(texts, finished):
    """{'adherence': share concise, 'degenerate': share degenerate, 'long': share long, 'n': count}."""
    labels = Counter(judge(t, f) for t, f in zip(texts, finished))
    n = max(len(texts), 1)
    return {"adherence": labels["concise"] / n, "degenerate": labels["degenerate"] / n,
            "long": labels["long"] / n, "n": len(texts)}
