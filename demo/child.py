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
by the verdict; it is taken for the same call shape as demo/concise.py.
"""
import re
from collections import Counter

from demo.concise import is_degenerate  # the same rule for an empty or looping answer

# talking to a child: one of these is enough
_ADDRESS = re.compile(r"\b(imagine|pretend|little (one|buddy|friend|explorer)|buddy|kiddo|sweetie|sweetheart|"
                      r"hey there|hi there|you know how|kiddos?|young one|my friend)\b", re.I)
# the child register: comparisons to toys and everyday things; two of these are enough
_REGISTER = re.compile(r"\b(like a (big|little|giant|tiny|magic|special|super)|toys?|playground|candy|"
                       r"cookies?|lego|teddy|a special kind of|super ?hero|magic(al)?|mommy|daddy|"
                       r"grown-?ups?)\b", re.I)


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
