"""A judge of an answer's domain style that does not use the model being judged.

To measure whether a customised model answers in a preference's style (DSP academy, business, ...),
we need a scorer that is not the model itself, nor its head, nor the frozen SmolLM2 under it. This
is a plain text classifier (scikit-learn): TF-IDF of word 1-2-grams and of character 1-4-grams
(case and punctuation kept: the styles differ in layout and openings as much as in words), then a
logistic regression with balanced class weights. It learns to tell the domain's chosen answers
(label 1) from the answers in the other styles (label 0, the rejected sides).

Training and validation, with the project's own split:
  - the pairs are read with data.load_pairs (which drops pairs with identical or empty sides) and
    split with data.split_by_prompt at train.py's defaults (--test-fraction 0.2, --seed 0), so the
    judge is fitted on train.py's training queries only, and the held-out queries are unseen by
    both the judge and the head;
  - each answer is used once (a chosen answer sits in 4 pairs);
  - held-out accuracy is reported two ways: pairwise (prob(chosen) > prob(rejected) for each
    held-out pair: the same query answered in the domain's style and in another style), and per
    answer (each distinct held-out answer classified at --threshold), with the majority-class
    baseline beside it (4 of 5 answers are label 0).

Saving never pickles: a fitted judge is its vocabularies, idf weights, coefficients and intercept,
written as JSON and rebuilt at load time (Judge.save / Judge.load). `for_data` refits
deterministically from a data file and caches those arrays under $QADAPTER_CACHE/judge (default
~/.cache/q-adapter/judge), keyed by the file's content, the split and the settings.

    python judge.py --data dsp_academy_pairs.jsonl      # DSP-style pairs: a query, its domain's answer, another's
    python judge.py --data dsp_academy_pairs.jsonl --score runs/academy/samples.json
    python judge.py --data dsp_academy_pairs.jsonl --frozen 20 --out frozen20.json

--score reads a JSON list of strings, or sample.py's --out file (each answer's "customised" and,
with --compare, "frozen" text). --frozen N decodes the first N held-out queries with the frozen
base model alone (greedy) and scores those answers: how often the plain model is already judged
in the style.
"""
import argparse
import hashlib
import json
import math
import os
import time
from pathlib import Path

import numpy as np
import scipy.sparse as sp

import data
from support import cli
from support.data_files import DataError

FORMAT = "q-adapter-style-judge/1"
# the two feature blocks: CountVectorizer settings (vocabulary learnt at fit time); each block is
# TF-IDF with sublinear tf and l2-normalised on its own, as sklearn's TfidfVectorizer does
WORDS = {"analyzer": "word", "ngram_range": [1, 2], "lowercase": True}
CHARS = {"analyzer": "char", "ngram_range": [1, 4], "lowercase": False}


class Judge:
    """A fitted style classifier: prob(texts) is the probability that each text is in the style."""

    def __init__(self, blocks, intercept, meta=None):
        # blocks: [{"params": CountVectorizer settings, "vocabulary": [term, ...], "idf": [...], "coef": [...]}]
        self.blocks = blocks
        self.intercept = float(intercept)
        self.meta = dict(meta or {})
        self._counters = None

    def _features(self, texts):
        """(n, features) csr matrix: per block, counts -> 1 + log(tf) -> · idf -> l2 rows."""
        from sklearn.feature_extraction.text import CountVectorizer
        if self._counters is None:
            self._counters = [CountVectorizer(analyzer=b["params"]["analyzer"],
                                              ngram_range=tuple(b["params"]["ngram_range"]),
                                              lowercase=b["params"]["lowercase"], vocabulary=b["vocabulary"],
                                              dtype=np.float64) for b in self.blocks]
            self._idf = [np.asarray(b["idf"], dtype=np.float64) for b in self.blocks]
            self._coef = np.concatenate([np.asarray(b["coef"], dtype=np.float64) for b in self.blocks])
        parts = []
        for counter, idf in zip(self._counters, self._idf):
            x = counter.transform(texts).tocsr()
            x.data = np.log(x.data) + 1.0
            x = x @ sp.diags(idf)
            norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1)).ravel())
            x = sp.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ x
            parts.append(x)
        return sp.hstack(parts).tocsr()

    def scores(self, texts):
        """The logistic regression's logits, one per text."""
        texts = list(texts)
        if not texts:
            return np.zeros(0)
        return self._features(texts) @ self._coef + self.intercept

    def prob(self, texts) -> list[float]:
        """Probability that each text is in the domain's style."""
        return [1.0 / (1.0 + math.exp(-s)) for s in self.scores(texts)]

    def adherence(self, texts, threshold=0.5) -> dict:
        """{'adherence': share of texts judged in style (prob >= threshold), 'mean_prob', 'n'}."""
        probs = self.prob(texts)
        n = len(probs)
        return {"adherence": sum(p >= threshold for p in probs) / max(n, 1),
                "mean_prob": sum(probs) / max(n, 1), "n": n}

    def to_dict(self):
        return {"format": FORMAT, "meta": self.meta, "intercept": self.intercept, "blocks": self.blocks}

    def save(self, path):
        """JSON only (no pickle); written atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.to_dict()))
        os.replace(tmp, path)

    @classmethod
    def load(cls, path):
        try:
            saved = json.loads(Path(path).read_text())
            if saved.get("format") != FORMAT:
                raise ValueError(f"not a {FORMAT} file")
            for b in saved["blocks"]:
                if not len(b["vocabulary"]) == len(b["idf"]) == len(b["coef"]):
                    raise ValueError("vocabulary, idf and coef lengths differ")
            return cls(saved["blocks"], saved["intercept"], saved.get("meta"))
        except OSError as e:
            raise SystemExit(f"error: judge {path}: cannot read ({e.strerror})")
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SystemExit(f"error: judge {path}: not a saved judge ({e})")


# ------------------------------------------------------------------------------------------------
# fitting


def labelled_answers(pairs):
    """(texts, labels): each distinct answer once, 1 for a chosen answer, 0 for a rejected one. An
    answer that is chosen in one pair and rejected in another (none in DSP once identical pairs are
    dropped) is left out."""
    labels = {}
    for pair in pairs:
        for text, label in ((pair.chosen, 1), (pair.rejected, 0)):
            labels[text] = label if labels.get(text, label) == label else None
    texts = [t for t, label in labels.items() if label is not None]
    return texts, [labels[t] for t in texts]


def fit(pairs, C=1.0, min_df=2, max_char_features=50000, meta=None) -> Judge:
    """A Judge fitted on the pairs' answers (chosen: 1, rejected: 0). Deterministic."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    texts, labels = labelled_answers(pairs)
    if len(set(labels)) < 2:
        raise DataError("the judge needs both chosen and rejected answers to learn from")
    blocks, features = [], []
    for params, limit in ((WORDS, None), (CHARS, max_char_features)):
        vec = TfidfVectorizer(analyzer=params["analyzer"], ngram_range=tuple(params["ngram_range"]),
                              lowercase=params["lowercase"], min_df=min_df, max_features=limit, sublinear_tf=True)
        features.append(vec.fit_transform(texts))
        vocabulary = sorted(vec.vocabulary_, key=vec.vocabulary_.get)  # in column order
        blocks.append({"params": params, "vocabulary": vocabulary, "idf": vec.idf_.tolist()})
    X = sp.hstack(features).tocsr()
    model = LogisticRegression(C=C, class_weight="balanced", solver="liblinear", max_iter=1000,
                               random_state=0).fit(X, labels)
    coef, start = model.coef_[0], 0
    for block in blocks:
        block["coef"] = coef[start:start + len(block["vocabulary"])].tolist()
        start += len(block["vocabulary"])
    settings = {"C": C, "min_df": min_df, "max_char_features": max_char_features}
    return Judge(blocks, model.intercept_[0],
                 {**(meta or {}), "settings": settings, "answers": len(texts), "in_style": int(sum(labels))})


def split(data_path, test_fraction=0.2, seed=0):
    """(train pairs, held-out pairs): train.py's split of the file (data.split_by_prompt)."""
    try:
        pairs = data.load_pairs(str(data_path))
    except DataError as e:
        raise SystemExit(f"error: {e}")
    train, test = data.split_by_prompt(pairs, test_fraction, seed)
    if not test:
        raise SystemExit(f"error: {data_path}: every pair has the same prompt, so there is no held-out query")
    return train, test


def for_data(data_path, test_fraction=0.2, seed=0, refit=False, **settings):
    """(judge, train pairs, held-out pairs): the judge fitted on the file's training queries, from
    the cache when it holds one for this file, split and settings (JSON, never pickle)."""
    from sklearn import __version__ as sklearn_version
    from support.loading import cache_dir
    data_path = Path(data_path)
    if not data_path.is_file():
        raise SystemExit(f"error: --data {data_path}: no such file")
    train, test = split(data_path, test_fraction, seed)
    key = {"file": hashlib.sha256(data_path.read_bytes()).hexdigest(), "test_fraction": test_fraction,
           "seed": seed, "settings": settings, "sklearn": sklearn_version, "format": FORMAT}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    cached = cache_dir() / "judge" / f"{data_path.stem}-{digest}.json"
    if cached.exists() and not refit:
        judge = Judge.load(cached)
        print(f"judge: loaded from {cached}")
    else:
        start = time.perf_counter()
        judge = fit(train, meta={"data": str(data_path), "test_fraction": test_fraction, "seed": seed}, **settings)
        judge.meta["fit_seconds"] = round(time.perf_counter() - start, 2)
        judge.save(cached)
        print(f"judge: fitted on {judge.meta['answers']} answers of {len({_key(p) for p in train})} training "
              f"queries in {judge.meta['fit_seconds']:.1f} s, cached in {cached}")
    return judge, train, test


def _key(pair):
    return json.dumps(pair.prompt, sort_keys=True)


# ------------------------------------------------------------------------------------------------
# validation and scoring


def held_out(judge, test_pairs, threshold=0.5) -> dict:
    """Held-out accuracy: pairwise (chosen judged likelier than rejected), per answer, and baselines."""
    texts, labels = labelled_answers(test_pairs)
    prob = dict(zip(texts, judge.prob(texts)))
    labels = np.array(labels)
    probs = np.array([prob[t] for t in texts])
    pairwise = [prob[p.chosen] > prob[p.rejected] for p in test_pairs if p.chosen in prob and p.rejected in prob]
    longer = [len(p.chosen) > len(p.rejected) for p in test_pairs]
    judged = probs >= threshold
    return {"queries": len({_key(p) for p in test_pairs}), "pairs": len(pairwise), "answers": len(texts),
            "pairwise_accuracy": float(np.mean(pairwise)),
            "per_answer_accuracy": float(np.mean(judged == labels)),
            "in_style_recall": float(np.mean(judged[labels == 1])),
            "other_style_specificity": float(np.mean(~judged[labels == 0])),
            "mean_prob_in_style": float(np.mean(probs[labels == 1])),
            "mean_prob_other_styles": float(np.mean(probs[labels == 0])),
            "baseline_longer_wins": float(np.mean(longer)),
            "baseline_majority": float(max(np.mean(labels), 1 - np.mean(labels)))}


def read_answers(path):
    """{set name: [texts]} from a JSON list of strings or sample.py's --out file."""
    try:
        loaded = json.loads(Path(path).read_text(encoding="utf-8"))
    except OSError as e:
        raise SystemExit(f"error: --score {path}: cannot read ({e.strerror})")
    except (ValueError, UnicodeDecodeError) as e:
        raise SystemExit(f"error: --score {path}: not JSON ({e})")
    if isinstance(loaded, list) and all(isinstance(t, str) for t in loaded):
        return {"answers": loaded}
    answers = loaded.get("answers") if isinstance(loaded, dict) else None
    if isinstance(answers, list) and answers and all(isinstance(a, dict) for a in answers):
        sets = {name: [a[name] for a in answers] for name in ("customised", "frozen")
                if all(isinstance(a.get(name), str) for a in answers)}
        if sets:
            return sets
    raise SystemExit(f"error: --score {path}: expected a JSON list of strings, or sample.py's --out file "
                     f"({{\"answers\": [{{\"customised\": ..., \"frozen\": ...}}, ...]}})")


def frozen_answers(conversations, base_model, max_new_tokens, batch_size, device="auto"):
    """Greedy answers of the frozen base model alone (no head), a batch of prompts at a time."""
    import torch
    from support import loading
    device, dtype, why = loading.pick_device(device)
    print(why)
    model, tok = loading.load_base(base_model, device, dtype)
    tok.padding_side = "left"
    answers = []
    for i in range(0, len(conversations), batch_size):
        enc = tok.apply_chat_template(conversations[i:i + batch_size], add_generation_prompt=True, padding=True,
                                      return_tensors="pt", return_dict=True).to(device)
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id)
        for row in out[:, enc["input_ids"].shape[1]:]:
            answers.append(tok.decode(row, skip_special_tokens=True).strip())
        print(f"decoded {len(answers)} of {len(conversations)}")
    return answers


def parse_args(argv=None):
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="preference pairs of the domain (chosen = in its style), "
                    "e.g. dsp_academy_pairs.jsonl of the DSP data; the judge learns from its training queries")
    ap.add_argument("--test-fraction", type=float, default=0.2,
                    help="share of queries held out, as train.py's --test-fraction (keep them equal)")
    ap.add_argument("--seed", type=int, default=0, help="split seed, as train.py's --seed (keep them equal)")
    ap.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    ap.add_argument("--min-df", type=int, default=2, help="keep n-grams found in at least this many answers")
    ap.add_argument("--max-char-features", type=int, default=50000, help="most frequent character n-grams kept")
    ap.add_argument("--threshold", type=float, default=0.5, help="prob at or above which an answer is in style")
    ap.add_argument("--refit", action="store_true", help="fit again even when the cache holds this judge")
    ap.add_argument("--save", help="also write the fitted judge to this JSON file (no pickle)")
    ap.add_argument("--score", help="score these answers: a JSON list of strings, or sample.py's --out file")
    ap.add_argument("--frozen", type=int, default=0, metavar="N",
                    help="decode the first N held-out queries with the frozen base model (greedy) and score them")
    ap.add_argument("--base-model", default=None, help="the frozen model for --frozen (default: the embedded SmolLM2)")
    ap.add_argument("--max-new-tokens", type=int, default=160, help="tokens per --frozen answer at most")
    ap.add_argument("--batch-size", type=int, default=10, help="prompts decoded together with --frozen")
    ap.add_argument("--device", default="auto", help="device for --frozen: cpu, cuda, ... (auto: a GPU if any)")
    ap.add_argument("--out", help="write the held-out accuracy, the scores and the --frozen answers to this JSON file")
    args = ap.parse_args(argv)
    cli.check(0 < args.test_fraction < 1, f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    cli.check(args.C > 0, f"--C must be > 0, got {args.C}")
    cli.check(args.min_df >= 1, f"--min-df must be >= 1, got {args.min_df}")
    cli.check(args.max_char_features >= 1, f"--max-char-features must be >= 1, got {args.max_char_features}")
    cli.check(0 < args.threshold < 1, f"--threshold must be in (0, 1), got {args.threshold}")
    cli.check(args.frozen >= 0, f"--frozen must be >= 0, got {args.frozen}")
    cli.check(args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    cli.check(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    return args


def main(argv=None):
    args = parse_args(argv)
    judge, _, test = for_data(args.data, args.test_fraction, args.seed, args.refit, C=args.C,
                              min_df=args.min_df, max_char_features=args.max_char_features)
    if args.save:
        judge.save(args.save)
        print(f"wrote {args.save}")
    results = {"data": args.data, "judge": {k: v for k, v in judge.meta.items() if k != "data"},
               "held_out": held_out(judge, test, args.threshold)}
    h = results["held_out"]
    print(f"held out: {h['queries']} queries, {h['pairs']} pairs, {h['answers']} answers")
    print(f"  pairwise accuracy   {h['pairwise_accuracy']:.3f}   (the longer answer wins: {h['baseline_longer_wins']:.3f})")
    print(f"  per-answer accuracy {h['per_answer_accuracy']:.3f}   (majority class: {h['baseline_majority']:.3f}; "
          f"in-style recall {h['in_style_recall']:.3f}, other-style specificity {h['other_style_specificity']:.3f})")
    print(f"  mean prob: in style {h['mean_prob_in_style']:.3f}, other styles {h['mean_prob_other_styles']:.3f}")
    if args.score:
        results["score"] = {}
        for name, texts in read_answers(args.score).items():
            results["score"][name] = judge.adherence(texts, args.threshold)
            print(f"{args.score} [{name}]: {results['score'][name]}")
    if args.frozen:
        from support import loading
        prompts = list(dict.fromkeys(_key(p) for p in test))[:args.frozen]
        conversations = [json.loads(p) for p in prompts]
        texts = frozen_answers(conversations, args.base_model or loading.EMBEDDED, args.max_new_tokens,
                               args.batch_size, args.device)
        probs = judge.prob(texts)
        results["frozen"] = judge.adherence(texts, args.threshold)
        results["answers"] = [{"prompt": c, "frozen": t, "prob": p} for c, t, p in zip(conversations, texts, probs)]
        print(f"frozen model, {len(texts)} held-out queries: {results['frozen']}")
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False))
        os.replace(tmp, out)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    cli.run(main)
