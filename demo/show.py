"""What `make demo` ends with: does the customised model *write* the preference?

The frozen model and the customised policy of a trained run answer the run's held-out prompts
(its --test-data, demo/child_test.jsonl for the demo), greedily (or sampled, --temperature), a
batch at a time with KV caches (sample.generate_batched); demo/child.py judges every answer.
Printed: a few prompts with the two answers side by side and the verdicts, then for all held-out
prompts the share of answers in the preferred style, the share of degenerate ones (empty or
looping), how varied the answers are (demo/child.variety: the share of distinct 3-word openings,
and distinct-2, the share of distinct word bigrams), and the per-token KL(pi~ ‖ pi1) along the
customised answers (teacher-forced: model.QAdapter.forward, then residual_q.kl_divergence of
residual_q.customised_logprobs and log pi1 at every answer state). A third column is the
reference the head aims at: the frozen model *asked* for the style (the prompt ends with --asked,
the instruction the chosen answers were written with, demo/build_child.py). Last, the customised
answers' commonest opening and how many open with it. Everything goes to RUN/demo.json
(RUN/demo-alphaA.json with --alpha0 A; -tT before .json with --temperature T).

    python demo/show.py runs/demo                 # after `python train.py --out-dir runs/demo`
    python demo/show.py runs/demo --alpha0 0.08   # the head turned up: what `make demo` shows
    python demo/show.py runs/demo --shown 6 --max-new-tokens 128
    python demo/show.py runs/demo --alpha0 0.08 --temperature 0.7   # sampled, top-p 0.9
"""
import argparse
import json
import sys
import textwrap
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import data  # noqa: E402
from demo.build_child import INSTRUCTION  # noqa: E402
from demo.child import adherence, judge, variety  # noqa: E402
from residual_q import customised_logprobs, kl_divergence, next_tokens, scored_states  # noqa: E402
from sample import generate_batched  # noqa: E402
from support import cli, loading, run_state  # noqa: E402


@torch.no_grad()
def kl_along(adapter, tok, conversations, answers, alpha0, alpha_tilde, batch_size):
    """Mean over the answers' tokens of KL(pi~(·|s_t) ‖ pi1(·|s_t)), the answers teacher-forced."""
    pairs = [data.Pair(c, a or ".", ".", f"answer {i}") for i, (c, a) in enumerate(zip(conversations, answers))]
    examples = [e for e in data.tokenize_pairs(tok, pairs, cutoff=1024, max_prompt=512) if e is not None]
    total, tokens = 0.0, 0
    for i in range(0, len(examples), batch_size):
        part = examples[i:i + batch_size]
        batch = {k: v[:len(part)].to(adapter.out_weight.device)  # the chosen rows: the answers
                 for k, v in data.collate(part, tok.pad_token_id).items()}
        states, labels = scored_states(batch["labels"])  # (B, W) the answer's states
        q_r, logp1, *_ = adapter(batch["input_ids"], batch["attention_mask"], states)  # (B, W, V)
        kl = kl_divergence(customised_logprobs(q_r, logp1, alpha0, alpha_tilde), logp1)[:, :-1]  # (B, W-1)
        _, mask = next_tokens(labels)  # (B, W-1) states that take an answer token
        total, tokens = total + float((kl * mask).sum()), tokens + int(mask.sum())
    return total / max(tokens, 1)


def scores(answers):
    """One column of the table: the verdicts' shares (demo/child.adherence) and how varied the
    answers are (demo/child.variety). answers: list of (text, finished)."""
    texts, finished = zip(*answers)
    return {**adherence(texts, finished), **variety(texts)}


def side_by_side(prompt, frozen, custom, width=58):
    left, right = (textwrap.wrap(a, width) or [""] for a in (frozen, custom))
    print(f"\n### {prompt}")
    print(f"{'frozen pi1: ' + judge(frozen):<{width}} | customised pi~: {judge(custom)}")
    for k in range(max(len(left), len(right))):
        print(f"{left[k] if k < len(left) else '':<{width}} | {right[k] if k < len(right) else ''}")


def main(argv=None):
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("run", help="a train.py output directory")
    ap.add_argument("--prompts", default=None, help="held-out pairs whose prompts are answered (default: the run's --test-data)")
    ap.add_argument("--limit", type=int, default=0, help="answer only the first N prompts (0: all)")
    ap.add_argument("--shown", type=int, default=4, help="prompts printed with both answers side by side")
    ap.add_argument("--max-new-tokens", type=int, default=96, help="tokens per answer at most")
    ap.add_argument("--batch-size", type=int, default=16, help="prompts decoded together")
    ap.add_argument("--asked", default=INSTRUCTION,
                    help="the reference column: the frozen model with this appended to each prompt ('' leaves it out)")
    ap.add_argument("--alpha0", type=float, default=None,
                    help="decode-time dial a, as in sample.py: α0 = α̃ = a, pi~ ∝ pi1·exp(Q_R/a), so a smaller a is "
                         "a stronger head (default: the run's trained values)")
    ap.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy (the default); above 0, every column is sampled at this temperature, "
                         "with --top-p and --seed as in sample.py")
    ap.add_argument("--top-p", type=float, default=0.9, help="nucleus sampling mass, with --temperature > 0")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed, with --temperature > 0")
    ap.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: a GPU if there is one)")
    args = ap.parse_args(argv)
    cli.check(args.alpha0 is None or args.alpha0 > 0, f"--alpha0 must be > 0, got {args.alpha0}")
    cli.check(args.temperature >= 0, f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
    cli.check(0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}")
    device, dtype, why = loading.pick_device(args.device)
    adapter, tok, config = loading.load_policy(args.run, device, dtype, alpha0=args.alpha0)
    source = args.prompts or config.get("test_data")
    cli.check(bool(source), f"{args.run}: the run split its data by prompt; give --prompts FILE")
    try:
        conversations = [p.prompt for p in data.load_pairs(source)][:args.limit or None]
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    alphas = dict(alpha0=adapter.alpha0, alpha_tilde=adapter.alpha_tilde)  # the run's, or the dial's
    opts = dict(max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, temperature=args.temperature,
                top_p=args.top_p, seed=args.seed)
    frozen = generate_batched(adapter, tok, conversations, desc="frozen answers", frozen_only=True, **opts)
    custom = generate_batched(adapter, tok, conversations, desc="customised answers", **alphas, **opts)
    asked = [c[:-1] + [{**c[-1], "content": f"{c[-1]['content']} {args.asked}"}] for c in conversations]
    asked = generate_batched(adapter, tok, asked, desc="frozen answers, asked", frozen_only=True,
                             **opts) if args.asked else None
    for conv, f, c in list(zip(conversations, frozen, custom))[:args.shown]:
        side_by_side(conv[-1]["content"], f[0], c[0])
    kl = kl_along(adapter, tok, conversations, [a for a, _ in custom], batch_size=8, **alphas)
    sampling = dict(top_p=args.top_p, seed=args.seed) if args.temperature else {}
    result = {"prompts": len(conversations), "max_new_tokens": args.max_new_tokens, **alphas,
              "temperature": args.temperature, **sampling,
              "frozen": scores(frozen), "customised": {**scores(custom), "kl": kl},
              "answers": [{"prompt": c[-1]["content"], "frozen": f[0], "customised": a[0]}
                          for c, f, a in zip(conversations, frozen, custom)]}
    result["frozen"]["kl"] = 0.0  # KL(pi1 ‖ pi1)
    if asked is not None:
        result["asked"] = {**scores(asked), "instruction": args.asked}
    how = f"sampled at temperature {args.temperature:g}, top-p {args.top_p:g}, seed {args.seed}" if args.temperature \
        else "greedy"
    print(f"\n{len(conversations)} held-out prompts, {how}, at most {args.max_new_tokens} new tokens")
    print(f"  {'':<36}{'frozen pi1':>10}   {'customised pi~':>14}" + ("   frozen, asked" if asked else ""))
    for key, label in (("adherence", "answers a child would understand"), ("degenerate", "degenerate (empty, looping)"),
                       ("openings", "distinct openings (first 3 words)"), ("distinct2", "distinct-2 (word bigrams)"),
                       ("kl", "per-token KL(pi~ ‖ pi1)")):
        ref = f"{result['asked'][key]:>16.3f}" if asked and key in result["asked"] else ""
        print(f"  {label:<36}{result['frozen'][key]:>10.3f}   {result['customised'][key]:>14.3f}{ref}")
    top = result["customised"]
    print(f"  the customised answers' commonest opening: \"{top['top_opening']}\" ({top['top_count']} of {top['n']})")
    out = Path(args.run).parent if Path(args.run).name == "checkpoint" else Path(args.run)
    name = "demo" if args.alpha0 is None else f"demo-alpha{args.alpha0:g}"
    out = out / (f"{name}-t{args.temperature:g}.json" if args.temperature else f"{name}.json")
    run_state.write_atomic(out, json.dumps(result, indent=2, ensure_ascii=False))
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    cli.run(main)
