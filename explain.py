"""See what the head learned, token by token: the reward r2 that Q_R implies for every response token.

A trained head (one, a stacked chain, or a weighted composition: support/loading.load_policy) and a prompt
with one or two answers. At each response token a_t, in state s_t = prompt + the answer so far,
from Q_R and log pi1 over the vocabulary (model.QAdapter.forward, the plain path) and the
functions of residual_q.py:

  r2(s_t, a_t) = Q_R(s_t, a_t) − γ·V(s_{t+1})          residual_q.derived_reward; V = 0 after the last token
  V(s)         = α̃·logsumexp_a (Q_R(s,a) + α0·log pi1(a|s)) / α̃      residual_q.soft_value
  log pi~(a_t|s_t) − log pi1(a_t|s_t)                  how much the head raised (> 0) or lowered this token
  raised / lowered: the k tokens a with the largest / smallest log pi~(a|s_t) − log pi1(a|s_t), among
                     those that pi~ or pi1 gives probability >= --min-p (0: the whole vocabulary)

and per answer the return R(x, y) = Σ_t r2(s_t, a_t) (residual_q.response_return), which for γ = 1
telescopes to
  R(x, y) = α̃·log pi~(y|x) − α0·log pi1(y|x) + V(s_0),
printed beside it: the two must agree. Green tokens are rewarded (r2 > 0), red penalised.

Answers come from the command line (--prompt, --answer [--answer]), from a preference file
(--pairs FILE --index N: chosen, then rejected), or are decoded greedily (--generate: the
customised policy's answer, then the frozen model's). Either way an answer is tokenised the way
training sees it (data.tokenize_pair: the chat template, the turn's EOS scored).

    python explain.py --checkpoint runs/demo --pairs demo/child_test.jsonl --index 0 --html explain.html
    python explain.py --checkpoint runs/demo --prompt "Why is the sky blue?" --generate
    python explain.py --checkpoint runs/demo --prompt "What is rain?" --answer "Water from clouds." --no-color
"""
import argparse
import html
import json
import math
import sys
from pathlib import Path

import torch

import data
from residual_q import (customised_logits, derived_reward, gather_actions, next_tokens, next_value, response_logprob,
                        response_return, soft_value)
from sample import generate
from support import cli, loading


# ------------------------------------------------------------------------------------------------
# the numbers


def token_text(tokenizer, token_id):
    """One token as text, special tokens (EOS) included."""
    return tokenizer.decode([token_id], skip_special_tokens=False, clean_up_tokenization_spaces=False)


def ranked(tokenizer, order_by, logratio, logp, logp1, keep, k):
    """At one state, (V,) each: the k tokens with the largest order_by among keep, largest first."""
    top = order_by.masked_fill(~keep, -math.inf).topk(min(k, int(keep.sum()))).indices.tolist()
    return [{"id": a, "text": token_text(tokenizer, a), "logratio": float(logratio[a]), "p": float(logp[a].exp()),
             "p1": float(logp1[a].exp())} for a in top]


@torch.no_grad()
def explain(adapter, tokenizer, batch, alpha0, alpha_tilde, gamma, top_k=5, min_p=0.0):
    """batch: {"input_ids", "attention_mask", "labels"}: (B, T) as data.collate makes them.

    Returns one dict per row: "tokens", a list with one dict per response token (id, text, r2, q,
    v_next, logratio, logp, logp1, raised, lowered), and the totals: return (Σ r2, as
    residual_q.response_return sums it), sum_r2 (the per-token values summed in Python), telescoped
    (α̃·log pi~(y|x) − α0·log pi1(y|x) + V(s_0)), logp, logp1, v0.
    Plain Python numbers only.
    raised / lowered: up to top_k tokens a with log pi~(a|s) − log pi1(a|s) > 0 / < 0, the largest / smallest
    first, among those with pi~(a|s) or pi1(a|s) >= min_p (0: the whole vocabulary)."""
    ids, mask, labels = batch["input_ids"], batch["attention_mask"], batch["labels"]  # (B, T)
    q_r, logp1, *_ = adapter(ids, mask)  # (B, T, V) Q_R(s, ·), log pi1(·|s)
    q_r, logp1 = q_r.float(), logp1.float()
    v = soft_value(q_r, logp1, alpha0, alpha_tilde)  # (B, T) V(s_t)
    q_sa = gather_actions(q_r, labels)  # (B, T-1) Q_R(s_t, a_t)
    r2 = derived_reward(q_sa, v, labels, gamma)  # (B, T-1) r2 = Q_R(s_t, a_t) − γ·V(s_{t+1})
    ret = response_return(r2, labels)  # (B,) R(x, y) = Σ_t r2
    actions, scored = next_tokens(labels)  # (B, T-1) a_t, and whether it is a response token
    v_next = next_value(v, labels)  # (B, T-1) V(s_{t+1}): what derived_reward subtracts, 0 when terminal
    logits = customised_logits(q_r, logp1, alpha0, alpha_tilde)  # (B, T, V) (Q_R + α0·log pi1) / α̃
    logp = torch.log_softmax(logits, dim=-1)  # (B, T, V) log pi~(·|s)
    logratio = logp - logp1  # (B, T, V) log pi~ − log pi1: > 0 where the head raised a token
    logratio_sa = gather_actions(logratio, labels)  # (B, T-1)
    listable = torch.maximum(logp, logp1) >= (math.log(min_p) if min_p > 0 else -math.inf)  # (B, T, V)
    logp_sa, logp1_sa = gather_actions(logp, labels), gather_actions(logp1, labels)  # (B, T-1)
    logp_y = response_logprob(logits, labels)  # (B,) log pi~(y|x)
    logp1_y = response_logprob(logp1, labels)  # (B,) log pi1(y|x) (log_softmax leaves log pi1 as it is)
    first = scored.int().argmax(-1)  # (B,) s_0, the state before the first response token
    v0 = v.gather(1, first[:, None]).squeeze(1)  # (B,) V(s_0)
    telescoped = alpha_tilde * logp_y - alpha0 * logp1_y + v0  # (B,) equals R when γ = 1

    rows = []
    for b in range(ids.shape[0]):
        tokens = []
        for t in scored[b].nonzero().flatten().tolist():  # the states that take a response action
            lr, ok = logratio[b, t], listable[b, t]  # (V,) at state s_t
            tokens.append({"id": int(actions[b, t]), "text": token_text(tokenizer, int(actions[b, t])),
                           "r2": float(r2[b, t]), "q": float(q_sa[b, t]), "v_next": float(v_next[b, t]),
                           "logratio": float(logratio_sa[b, t]), "logp": float(logp_sa[b, t]),
                           "logp1": float(logp1_sa[b, t]),
                           "raised": ranked(tokenizer, lr, lr, logp[b, t], logp1[b, t], ok & (lr > 0), top_k),
                           "lowered": ranked(tokenizer, -lr, lr, logp[b, t], logp1[b, t], ok & (lr < 0), top_k)})
        rows.append({"tokens": tokens, "return": float(ret[b]), "sum_r2": sum(x["r2"] for x in tokens),
                     "telescoped": float(telescoped[b]), "logp": float(logp_y[b]), "logp1": float(logp1_y[b]),
                     "v0": float(v0[b])})
    return rows


def encode(tokenizer, prompt, answers, cutoff):
    """Prompt messages and one or two answers -> a batch of len(answers) rows, tokenised as in
    training (data.tokenize_pair: chat template, the turn's EOS included, labels on the answer)."""
    pair = data.Pair(prompt, answers[0], answers[-1], "explain.py")
    example = data.tokenize_pair(tokenizer, pair, cutoff)
    if example is None:
        raise SystemExit(f"error: the prompt fills --cutoff {cutoff}: no room left for an answer")
    batch = data.collate([example], tokenizer.pad_token_id)  # (2, T): row 0 the first answer, row 1 the last
    return {k: v[:len(answers)] for k, v in batch.items()}


# ------------------------------------------------------------------------------------------------
# the terminal view

GREENS, REDS = [194, 157, 120, 83, 46], [224, 217, 210, 203, 196]  # 256-colour backgrounds, pale to strong


def shade(r2, scale):
    """r2 -> (level 0..5, sign): level 0 is |r2| < 10% of the scale (left uncoloured)."""
    s = min(abs(r2) / scale, 1.0) if scale > 0 else 0.0
    return (0 if s < 0.1 else 1 + min(int(s * 5), 4)), (1 if r2 > 0 else -1)


def visible(text):
    """A newline is shown as ↵ and kept; a tab as →."""
    return text.replace("\n", "↵\n").replace("\t", "→\t")


def terminal_text(tokens, scale, color):
    """The answer with each token coloured by r2 (ANSI backgrounds), or as token[+0.12] without colour."""
    out = []
    for tok in tokens:
        if not color:  # the number goes before a trailing newline, beside its token
            text = visible(tok["text"])
            stripped = text.rstrip("\n")
            out.append(f"{stripped}[{tok['r2']:+.2f}]" + "\n" * (len(text) - len(stripped)))
            continue
        level, sign = shade(tok["r2"], scale)
        pieces = visible(tok["text"]).split("\n")  # colour each line's part, so a background never spans a newline
        if level:
            code = (GREENS if sign > 0 else REDS)[level - 1]
            pieces = [f"\x1b[48;5;{code}m\x1b[30m{p}\x1b[0m" if p else p for p in pieces]
        out.append("\n".join(pieces))
    return "".join(out)


def legend(scale, color):
    if not color:
        return f"[+x.xx] after each token: its r2 (> 0 rewarded, < 0 penalised); max |r2| = {scale:.2f}"
    boxes = "".join(f"\x1b[48;5;{c}m\x1b[30m {-scale * (i + 1) / 5:+.2f} \x1b[0m" for i, c in reversed(list(enumerate(REDS))))
    boxes += " 0 " + "".join(f"\x1b[48;5;{c}m\x1b[30m {scale * (i + 1) / 5:+.2f} \x1b[0m" for i, c in enumerate(GREENS))
    return f"r2 per token, red penalised, green rewarded: {boxes}"


def totals_line(row, alpha0, alpha_tilde, gamma):
    """R = Σ r2 beside the telescoped form, and whether they agree."""
    line = (f"R = Σ r2 = {row['return']:+.4f};  α̃·log pi~(y|x) − α0·log pi1(y|x) + V(s0) = "
            f"{alpha_tilde:g}·({row['logp']:.3f}) − {alpha0:g}·({row['logp1']:.3f}) + {row['v0']:.3f} = "
            f"{row['telescoped']:+.4f}")
    if gamma != 1:
        return line + f"  (the identity holds for γ = 1 only; here γ = {gamma:g})"
    agree = abs(row["return"] - row["telescoped"]) <= 1e-3 * max(1.0, abs(row["return"]))
    return line + ("  (they agree)" if agree else "  (they DISAGREE: a bug)")


def show_terminal(rows, names, alpha0, alpha_tilde, gamma, color, extremes=5):
    scale = max((abs(t["r2"]) for row in rows for t in row["tokens"]), default=0.0)
    print(legend(scale, color))
    for name, row in zip(names, rows):
        print(f"\n=== {name}: {len(row['tokens'])} tokens")
        print(terminal_text(row["tokens"], scale, color))
        print(totals_line(row, alpha0, alpha_tilde, gamma))
        by_r2 = sorted(row["tokens"], key=lambda t: t["r2"])
        rewarded = [t for t in by_r2[::-1][:extremes] if t["r2"] > 0]
        penalised = [t for t in by_r2[:extremes] if t["r2"] < 0]
        for title, picked in (("most rewarded", rewarded), ("most penalised", penalised)):
            print(f"{title}: " + (", ".join(f"{t['text']!r} {t['r2']:+.3f}" for t in picked) or "none"))


# ------------------------------------------------------------------------------------------------
# the HTML view: one self-contained page

PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>What the head learned</title>
<style>
body {{ font: 15px/1.5 system-ui, sans-serif; margin: 1.2em 2em; color: #111; }}
.wrap {{ display: flex; gap: 1.5em; align-items: flex-start; }} main {{ flex: 1; min-width: 0; max-width: 820px; }}
h1 {{ font-size: 1.3em; margin: 0 0 .2em; }} h2 {{ font-size: 1.05em; margin: 1em 0 .3em; }}
.meta, .totals {{ color: #444; font-size: .88em; }}
.prompt {{ background: #f3f3f3; padding: .4em .7em; border-radius: 4px; white-space: pre-wrap; }}
.answer {{ white-space: pre-wrap; font-family: ui-monospace, Menlo, Consolas, monospace; font-size: 14px;
          line-height: 1.7; border: 1px solid #ddd; border-radius: 4px; padding: .5em .7em; }}
.t {{ cursor: pointer; border-radius: 2px; }} .t:hover, .t.sel {{ outline: 2px solid #333; }}
.nl {{ color: #999; }}
.legend span {{ display: inline-block; padding: 0 .45em; font-size: .85em; font-family: ui-monospace, monospace; }}
#panel {{ position: sticky; top: 1em; width: 330px; flex: none; background: #fff; border: 1px solid #888;
         border-radius: 6px; padding: .6em .8em; font-size: .82em; box-shadow: 0 2px 8px #0003; }}
#panel table {{ border-collapse: collapse; }} #panel td {{ padding: 0 .5em 0 0; font-family: ui-monospace, monospace; }}
</style></head><body>
<div class="wrap"><main>
<h1>What the head learned, token by token</h1>
<div class="meta">{meta}</div>
<p class="legend">r2(s<sub>t</sub>,a<sub>t</sub>) = Q<sub>R</sub>(s<sub>t</sub>,a<sub>t</sub>) − γ·V(s<sub>t+1</sub>)
per token, red penalised, green rewarded: {legend}. Hover or click a token for its numbers.</p>
<div class="prompt"><b>prompt</b>: {prompt}</div>
{sections}
</main><aside id="panel">Hover or click a token.</aside></div>
<script>
const panel = document.getElementById("panel");
function fmt(x) {{ const v = Number(x); return (v >= 0 ? "+" : "") + v.toFixed(3); }}
function esc(s) {{ return s.replace(/[&<>"]/g, c => ({{"&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;"}})[c]); }}
function list(items) {{
  return items.map(x => "<tr><td>" + esc(JSON.stringify(x.text)) + "</td><td>" + fmt(x.logratio) +
    "</td><td>p~ " + x.p.toExponential(1) + "</td><td>p1 " + x.p1.toExponential(1) + "</td></tr>").join("");
}}
function show(el) {{
  document.querySelectorAll(".t.sel").forEach(e => e.classList.remove("sel"));
  el.classList.add("sel");
  const d = el.dataset;
  panel.innerHTML = "<b>" + esc(JSON.stringify(d.text)) + "</b><table>" +
    "<tr><td>r2</td><td>" + fmt(d.r2) + "</td></tr><tr><td>Q_R(s,a)</td><td>" + fmt(d.q) + "</td></tr>" +
    "<tr><td>V(s')</td><td>" + fmt(d.vNext) + "</td></tr>" +
    "<tr><td>log pi~ − log pi1</td><td>" + fmt(d.logratio) + "</td></tr></table>" +
    "<b>in this state the head raised most</b> (log pi~ − log pi1)<table>" + list(JSON.parse(d.raised)) +
    "</table><b>and lowered most</b><table>" + list(JSON.parse(d.lowered)) + "</table>";
}}
const spans = [...document.querySelectorAll(".t")];
if (spans.length) show(spans.reduce((a, b) => Math.abs(b.dataset.r2) > Math.abs(a.dataset.r2) ? b : a));  // the largest |r2|
spans.forEach(el => {{
  el.addEventListener("mouseenter", () => show(el));
  el.addEventListener("click", () => show(el));
}});
</script>
</body></html>
"""


def background(r2, scale):
    """r2 -> a CSS background: green for a reward, red for a penalty, stronger the larger |r2|."""
    s = min(abs(r2) / scale, 1.0) if scale > 0 else 0.0
    rgb = "0,170,40" if r2 > 0 else "220,30,30"
    return f"rgba({rgb},{0.8 * s:.3f})"


def token_span(tok, scale):
    """One token as a <span> carrying its numbers in data-* attributes and a title tooltip."""
    attrs = {"class": "t", "style": f"background:{background(tok['r2'], scale)}", "data-text": tok["text"],
             "data-r2": f"{tok['r2']:.6f}", "data-q": f"{tok['q']:.6f}", "data-v-next": f"{tok['v_next']:.6f}",
             "data-logratio": f"{tok['logratio']:.6f}",
             "data-raised": json.dumps(tok["raised"], ensure_ascii=False),
             "data-lowered": json.dumps(tok["lowered"], ensure_ascii=False),
             "title": (f"{tok['text']!r}  r2 {tok['r2']:+.3f} = Q_R {tok['q']:+.3f} − γ·V(s') {tok['v_next']:+.3f}; "
                       f"log pi~ − log pi1 {tok['logratio']:+.3f}")}
    text = html.escape(tok["text"]).replace("\n", '<span class="nl">↵</span>\n')  # newlines shown and kept
    return "<span " + " ".join(f'{k}="{html.escape(v, quote=True)}"' for k, v in attrs.items()) + f">{text}</span>"


def html_page(rows, names, prompt, meta, alpha0, alpha_tilde, gamma):
    """The whole page as one string: no external files, scripts or fonts."""
    scale = max((abs(t["r2"]) for row in rows for t in row["tokens"]), default=0.0)
    legend_html = "".join(f'<span style="background:{background(x, scale)}">{x:+.2f}</span>'
                          for x in [-scale, -scale / 2, 0.0, scale / 2, scale])
    sections = []
    for name, row in zip(names, rows):
        spans = "".join(token_span(tok, scale) for tok in row["tokens"])
        sections.append(f'<h2>{html.escape(name)}: R = {row["return"]:+.3f}</h2>\n'
                        f'<div class="answer">{spans}</div>\n'
                        f'<div class="totals">{html.escape(totals_line(row, alpha0, alpha_tilde, gamma))}</div>')
    return PAGE.format(meta=html.escape(meta), legend=legend_html, prompt=html.escape(prompt),
                       sections="\n".join(sections))


# ------------------------------------------------------------------------------------------------
# the script


def parse_args(argv=None):
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", required=True,
                    help="a train.py output directory (or its checkpoint/); a stacked head brings the heads below "
                         "it. Repeat to compose heads trained on the same base (see --weights)")
    ap.add_argument("--weights", type=float, nargs="+", default=None,
                    help="with several --checkpoint: w_i in pi~ ∝ exp((Σ w_i·Q_R^i + α0·log pi1)/α̃) (default 1 each)")
    ap.add_argument("--prompt", help="the user message (with --answer or --generate)")
    ap.add_argument("--answer", action="append", default=[],
                    help="an answer to --prompt; give it twice to compare two (the first is shown on top)")
    ap.add_argument("--pairs", help="a preference file (.jsonl/.json/.parquet): explain its pair --index, chosen "
                                    "then rejected")
    ap.add_argument("--index", type=int, default=0, help="which pair of --pairs (0 is the first)")
    ap.add_argument("--generate", action="store_true",
                    help="decode --prompt greedily with the customised policy and with the frozen model, and "
                         "explain both answers")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="--generate: tokens per answer at most")
    ap.add_argument("--cutoff", type=int, default=1024, help="tokens of prompt + answer kept at most")
    ap.add_argument("--top-k", type=int, default=5,
                    help="tokens listed per state as raised most and lowered most by the head (0: none)")
    ap.add_argument("--min-p", type=float, default=1e-3,
                    help="list as raised/lowered only tokens with pi~ or pi1 >= this probability at the state (0: the "
                         "whole vocabulary, where the extremes are mostly tokens of probability 1e-10 and less)")
    ap.add_argument("--alpha0", type=float, default=None,
                    help="α0 = α̃ = a, as in sample.py (default: the checkpoint's α0 and α̃)")
    ap.add_argument("--gamma", type=float, default=None, help="γ in r2 = Q_R − γ·V(s') (default: the checkpoint's)")
    ap.add_argument("--no-color", action="store_true",
                    help="plain text, token[+0.12], also on a terminal (the default when stdout is not a terminal)")
    ap.add_argument("--html", help="also write the view to this self-contained HTML file")
    ap.add_argument("--json", help="also write the numbers (per token and totals) to this JSON file")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: a GPU if there is one)")
    ap.add_argument("--trust-remote-code", action="store_true", help="allow the base model's own code (opt-in)")
    args = ap.parse_args(argv)
    sources = [bool(args.answer), bool(args.pairs), args.generate]
    cli.check(sum(sources) == 1, "give exactly one of --answer (with --prompt), --pairs FILE --index N, "
                                 "or --generate (with --prompt)")
    cli.check(len(args.answer) <= 2, f"--answer is given at most twice, got {len(args.answer)}")
    cli.check(bool(args.prompt) != bool(args.pairs), "--prompt goes with --answer or --generate; --pairs has its own")
    cli.check(args.index >= 0, f"--index must be >= 0, got {args.index}")
    cli.check(args.top_k >= 0, f"--top-k must be >= 0, got {args.top_k}")
    cli.check(0 <= args.min_p < 1, f"--min-p must be in [0, 1), got {args.min_p}")
    cli.check(args.cutoff >= 2, f"--cutoff must be >= 2, got {args.cutoff}")
    cli.check(args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    cli.check(args.alpha0 is None or args.alpha0 > 0, f"--alpha0 must be > 0 (it is also α̃), got {args.alpha0}")
    cli.check(args.gamma is None or 0 < args.gamma <= 1, f"--gamma must be in (0, 1], got {args.gamma}")
    return args


def read_pair(path, index):
    """(prompt messages, [chosen, rejected]) of pair `index` in a preference file."""
    if not Path(path).exists():
        raise SystemExit(f"error: --pairs {path}: no such file")
    try:
        pairs = data.load_pairs(path)
    except data.DataError as e:
        raise SystemExit(f"error: --pairs {e}")
    if index >= len(pairs):
        raise SystemExit(f"error: --index {index}: {path} has {len(pairs)} usable pairs")
    return pairs[index].prompt, [pairs[index].chosen, pairs[index].rejected]


def main(argv=None):
    args = parse_args(argv)
    if args.pairs:  # read before the model loads: a bad file or index fails at once
        prompt, answers = read_pair(args.pairs, args.index)
        names = ["chosen", "rejected"]
    device, dtype, why = loading.pick_device(args.device)
    print(why)
    adapter, tok, _ = loading.load_policy(args.checkpoint, device, dtype, args.weights, args.alpha0,
                                          args.trust_remote_code)
    alpha0, alpha_tilde = adapter.alpha0, adapter.alpha_tilde
    config = loading.read_config(args.checkpoint[0])[0]
    gamma = args.gamma if args.gamma is not None else config.get("gamma", 1.0)
    if not args.pairs:
        prompt = [{"role": "user", "content": args.prompt}]
        if args.generate:
            opts = dict(max_new_tokens=args.max_new_tokens, alpha0=alpha0, alpha_tilde=alpha_tilde)
            answers = [generate(adapter, tok, [prompt], **opts)[0][0],
                       generate(adapter, tok, [prompt], frozen_only=True, **opts)[0][0]]
            names = ["customised pi~ (greedy)", "frozen pi1 (greedy)"]
        else:
            answers = args.answer
            names = ["answer"] if len(answers) == 1 else ["answer 1", "answer 2"]
    batch = encode(tok, prompt, answers, args.cutoff)
    rows = explain(adapter, tok, batch, alpha0, alpha_tilde, gamma, args.top_k, args.min_p)
    prompt_text = "\n".join(m["content"] for m in prompt)
    print(f"prompt: {prompt_text}")
    show_terminal(rows, names, alpha0, alpha_tilde, gamma, color=sys.stdout.isatty() and not args.no_color)
    meta = f"checkpoint {' + '.join(args.checkpoint)}; α0 = {alpha0:g}, α̃ = {alpha_tilde:g}, γ = {gamma:g}"
    if args.html:
        Path(args.html).write_text(html_page(rows, names, prompt_text, meta, alpha0, alpha_tilde, gamma),
                                   encoding="utf-8")
        print(f"wrote {args.html}")
    if args.json:
        result = {"checkpoint": args.checkpoint, "alpha0": alpha0, "alpha_tilde": alpha_tilde, "gamma": gamma,
                  "prompt": prompt, "answers": [{"name": n, "text": a, **row} for n, a, row in zip(names, answers, rows)]}
        Path(args.json).write_text(json.dumps(result, indent=1, ensure_ascii=False), encoding="utf-8")
        print(f"wrote {args.json}")
    return rows


if __name__ == "__main__":
    cli.run(main)
