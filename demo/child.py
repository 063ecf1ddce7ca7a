"""The demo preference, *answers a child would understand*, and its automatic adherence score.

Asked plainly, SmolLM2-135M-Instruct answers a question like an encyclopedia ("The Earth's seasons
are caused by the tilt of its axis..."). Asked to "explain it to a five-year-old child", it talks
to a child instead: it opens with an image or an address ("Imagine you have a big box of toys...",
"Alright, little buddy, ...") and keeps to small words and comparisons. The demo trains a head so
that the customised model answers that way *without* being asked (demo/build_child.py).

`judge(text, finished)` labels one generated answer:

  "child"       it talks to a child: a child-directed opening or address anywhere in the answer
                (imagine, pretend, little one / buddy, kiddo, sweetie, hey there, ...), or at least
                two child-register comparisons (like a big ..., toys, a special kind of ...);
  "degenerate"  not a real answer: empty, fewer than 3 words, no letters, or a loop
                (the same word 3-gram 5 times or more, or under 30% distinct words);
  "plain"       anything else: an ordinary answer.

A looping answer is never counted as "child", even when its loop is child talk, so the score
cannot be won by repeating "little buddy": `adherence` is the share of "child" answers and
degenerate ones are reported apart. `finished` (the model ended the answer itself) is not needed
by the verdict; it is taken because evaluate.py calls every scorer of generated answers alike,
score(texts, finished).

`variety(texts)` says how alike the answers are, a thing the verdict cannot see: a head that opens
every answer "Imagine you have a big box..." is "child" every time.
"""
import re
from collections import Counter

MIN_WORDS = 3  # fewer words than this is no answer
OPENING_WORDS = 3  # an answer's opening: its first 3 words

# talking to a child: one of these is enough
_ADDRESS = re.compile(r"\b(imagine|pretend|little (one|buddy|friend|explorer)|buddy|kiddo|sweetie|sweetheart|"
                      r"hey there|hi there|you know how|kiddos?|young one|my friend)\b", re.I)
# the child register: comparisons to toys and everyday things; two of these are enough
_REGISTER = re.compile(r"\b(like a (big|little|giant|tiny|magic|special|super)|toys?|playground|candy|"
                       r"cookies?|lego|teddy|a special kind of|super ?hero|magic(al)?|mommy|daddy|"
                       r"grown-?ups?)\b", re.I)


def words(text):
    """The answer's words, lowercased: runs of letters and digits."""
    return re.findall(r"\w+", text.lower())


def is_degenerate(text):
    """Not a real answer: empty, fewer than MIN_WORDS words, no letters, or a loop (the same word
    3-gram 5 times or more, or under 30% distinct words in an answer of 10 words or more)."""
    w = words(text)
    if len(w) < MIN_WORDS or not re.search(r"[a-zA-Z]", text):
        return True
    trigrams = Counter(zip(w, w[1:], w[2:]))
    if trigrams and max(trigrams.values()) >= 5:
        return True
    return len(w) >= 10 and len(set(w)) / len(w) < 0.3


def judge(text, finished=True):
    if is_degenerate(text):
        return "degenerate"
    if _ADDRESS.search(text) or len(_REGISTER.findall(text)) >= 2:
        return "child"
    return "plain"


def adherence(texts, finished):
    """{'adherence': share "child", 'degenerate': share degenerate, 'plain': share plain, 'n': count}."""
    labels = Counter(judge(t, f) for t, f in zip(texts, finished))
    n = max(len(texts), 1)
    return {"adherence": labels["child"] / n, "degenerate": labels["degenerate"] / n,
            "plain": labels["plain"] / n, "n": len(texts)}


def opening(text):
    """An answer's first OPENING_WORDS words, lowercased, punctuation dropped: "imagine you have"."""
    return " ".join(words(text)[:OPENING_WORDS])


def variety(texts):
    """How varied the answers are, over all of them together:
      'openings'     distinct openings / answers (1: no two answers open alike);
      'distinct2'    distinct word bigrams / all word bigrams, the answers pooled (1: no bigram twice);
      'top_opening'  the commonest opening, and 'top_count' how many answers open with it."""
    openings = Counter(opening(t) for t in texts)
    bigrams = [b for w in map(words, texts) for b in zip(w, w[1:])]  # within each answer
    top, count = openings.most_common(1)[0] if texts else ("", 0)
    return {"openings": len(openings) / max(len(texts), 1), "distinct2": len(set(bigrams)) / max(len(bigrams), 1),
            "top_opening": top, "top_count": count}
