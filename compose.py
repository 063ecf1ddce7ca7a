"""Compose heads trained on the same base for different preferences, and sweep their weights.

    pi_w(a|s) ∝ exp((Σ_i w_i·Q_R^i(s,a) + α0·log pi1(a|s)) / α̃)          (model.WeightedHeads)

For two heads the sweep runs w = (1 − t, t) for t from 0 to 1 (--steps values; --weights gives
any list instead). For each w it measures, on each head's own held-out pairs (rebuilt from its
checkpoint's config: the same file, split and cutoff train.py used), the pairwise accuracy and
mean margin of the composed policy's return R (train.evaluate), the accuracy of its log-ratio to
the frozen base model (logratio_accuracy: for a head stacked on others, the whole chain's reward
rather than the top head's R), and the per-token KL(pi_w ‖ pi1) on those responses. With --joint (a head trained on both data sets together) it also reports
KL(pi_w ‖ pi_joint): how far composing separately trained heads is from training on the union,
which it approximates (model.WeightedHeads says why). With --arc-easy FILE.jsonl, ARC-Easy accuracy
under pi_w at each weight and under the frozen model (once), as a second retention measure:
lm-evaluation-harness's arc_easy_local task on that file (evaluate.Benchmarks), on --mc-limit evenly
spaced questions.

The frozen model's hidden states are computed once per test set and kept across weights, so each
extra weight costs only the heads and the vocabulary projection.

    python compose.py --checkpoint runs/academy --checkpoint runs/business --steps 5 \\
        --joint runs/both --arc-easy arc_easy_validation.jsonl --out results/compose

Writes OUT.json, OUT.md (a table to paste) and OUT.png (held-out accuracy against the weight, one
curve per preference; needs matplotlib).
"""
import argparse
import importlib.util
import json
from pathlib import Path

import torch
from tqdm import tqdm

import data
import model as M
import train
from support import cli, fused_path, loading, run_state, vocab_chunks
from support.frozen_cache import FrozenCache

ARC_TASK = "arc_easy_local"  # lm-eval's arc_easy prompt and metrics on a local file (tasks/arc_easy_local.yaml)


def parse_args(argv=None):
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", required=True,
                    help="a train.py run trained on the base model (repeat: one per preference)")
    ap.add_argument("--steps", type=int, default=5, help="two heads: weights (1 − t, t) at this many t in [0, 1]")
    ap.add_argument("--weights", nargs="+", default=None, metavar="W1,W2,...",
                    help="the weight vectors to try instead of --steps, e.g. 1,0 0.5,0.5 1,1")
    ap.add_argument("--joint", default=None, help="a head trained on all the preferences' data at once")
    ap.add_argument("--reference", action="append", default=[],
                    help="another run (e.g. a head stacked on another with --base-head) evaluated on the same "
                         "held-out pairs, as one more row (repeatable)")
    ap.add_argument("--limit", type=int, default=0, help="held-out pairs per preference at most (0: all)")
    ap.add_argument("--arc-easy", default=None,
                    help="ARC-Easy .jsonl (Hugging Face layout): accuracy under pi_w and the frozen model, "
                         "through lm-eval (arc_easy_local; needs requirements-eval.txt)")
    ap.add_argument("--mc-limit", type=int, default=100, help="ARC-Easy questions, evenly spaced (0: all)")
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass")
    ap.add_argument("--out", default="results/compose", help="writes OUT.json, OUT.md, OUT.png")
    ap.add_argument("--device", default="auto", help="cpu, cuda, ... (auto: a GPU if there is one)")
    args = ap.parse_args(argv)
    cli.check(len(args.checkpoint) >= 2, "give at least two --checkpoint runs to compose")
    if args.weights is None:
        cli.check(len(args.checkpoint) == 2, "--steps sweeps two heads; give --weights for more")
        cli.check(args.steps >= 2, f"--steps must be >= 2, got {args.steps}")
        ts = [i / (args.steps - 1) for i in range(args.steps)]
        args.weights = [[round(1 - t, 6), round(t, 6)] for t in ts]
    else:
        try:
            args.weights = [[float(w) for w in v.split(",")] for v in args.weights]
        except ValueError:
            raise SystemExit(f"error: --weights: expected comma-separated numbers, got {args.weights}")
        cli.check(all(len(v) == len(args.checkpoint) for v in args.weights),
                  f"--weights: each vector needs {len(args.checkpoint)} numbers")
    for flag in ("limit", "mc_limit"):
        cli.check(getattr(args, flag) >= 0, f"--{flag.replace('_', '-')} must be >= 0")
    cli.check(args.batch_size >= 1, "--batch-size must be >= 1")
    if args.arc_easy:
        check_arc_easy(args.arc_easy)
    return args


def check_arc_easy(path):
    """--arc-easy, checked before any model loads: lm-eval installed, and a .jsonl of ARC rows, each
    with its answerKey among its labels (evaluate.check_task_file: a bad line is one error naming it)."""
    import evaluate
    cli.check(importlib.util.find_spec("lm_eval") is not None,
              "--arc-easy needs lm_eval, which is not installed: pip install -r requirements-eval.txt")
    cli.check(path.endswith(".jsonl"), f"--arc-easy {path}: expected an ARC-Easy .jsonl file")
    evaluate.check_task_file("--arc-easy", path, ARC_TASK)


def name_of(path):
    p = Path(path)
    return p.parent.name if p.name == "checkpoint" else p.name


def held_out_set(tok, config, limit):
    """The held-out pairs train.py evaluated this head on, tokenised the same way."""
    try:
        pairs = data.held_out_of(config)
        pairs = pairs[:config.get("eval_limit") or None][:limit or None]
        return data.PairDataset(tok, pairs, config["cutoff"], config.get("max_prompt"))
    except data.DataError as e:
        raise SystemExit(f"error: {e}")


def frozen_window(adapter, batch, idx, cache, device):
    """The frozen hidden states of held-out pairs idx (from the cache, or computed and kept) and
    their action window (fused_path.action_window): mask (2B, T), states, actions, valid (2B, W), hidden."""
    ids, mask = batch["input_ids"].to(device), batch["attention_mask"].to(device)
    states, _, actions, valid = fused_path.action_window(batch["labels"].to(device))  # (2B, W) each
    rows = [(("test", i), side) for side in ("chosen", "rejected") for i in idx]
    hidden, _ = cache.get(rows, mask, states.shape[1])
    if hidden is None:
        hidden, _ = adapter.hidden(ids, mask, M.positions(mask))  # (2B, T, D)
        cache.put(rows, hidden, mask)
    return mask, states, actions, valid, hidden


@torch.no_grad()
def base_log_ratio_margins(adapter, test_set, cache, a, batch_size, device, collate):
    """Per held-out pair, how much likelier the whole customised policy pi (a = (α0, α̃)) makes the
    chosen response than the rejected one, *relative to the frozen base model*: (n_pairs,) of

        Σ_t log pi(a_t|s_t) − log pi_base(a_t|s_t) over the response, chosen minus rejected.

    For one head on the base with α0 = α̃ this ranks as its return R does (R = α̃·log pi~/pi1 +
    V(s_0), and V(s_0) is the same for both answers). For a head stacked on others, R is its reward
    relative to the policy below it; this is the reward of the whole chain, the number to compare
    with the heads it was built from. logratio_accuracy is the share of positive margins."""
    margins = []
    for start in range(0, len(test_set), batch_size):
        idx = list(range(start, min(start + batch_size, len(test_set))))
        mask, states, actions, valid, hidden = frozen_window(adapter, collate([test_set[i] for i in idx]), idx,
                                                             cache, device)
        x_pi, _ = fused_path.directions(adapter, hidden, mask, states, valid, *a)  # (N, D) pi = softmax(W_out·x_pi)
        h = M.pick(hidden, states)[valid].float()  # (N, D) pi_base = softmax(W_out·h)
        W = adapter.out_weight  # (V, D)
        w_a = W[actions[valid]].float()  # (N, D) output embeddings of the actions
        per_state = torch.zeros(valid.shape, device=device)  # (2B, W)
        per_state[valid] = ((w_a * x_pi).sum(-1) - vocab_chunks.projected_logsumexp(x_pi, W)
                            - (w_a * h).sum(-1) + vocab_chunks.projected_logsumexp(h, W))
        chosen, rejected = per_state.sum(-1).chunk(2)  # (B,) each
        margins.append(chosen - rejected)
    return torch.cat(margins)


def logratio_accuracy(*args):
    return float((base_log_ratio_margins(*args) > 0).float().mean())


@torch.no_grad()
def kl_between(adapter, other, test_set, cache, a, b, batch_size, device, collate):
    """Mean per-token KL(pi_a ‖ pi_b) on the held-out responses (chosen and rejected), where
    a, b = (α0, α̃) of the two adapters (same frozen model, so the hidden states are shared), a
    chunk of states at a time through the vocabulary (vocab_chunks.projected_kl)."""
    total, tokens = 0.0, 0
    for start in range(0, len(test_set), batch_size):
        idx = list(range(start, min(start + batch_size, len(test_set))))
        batch = collate([test_set[i] for i in idx])
        mask, states, _, valid, hidden = frozen_window(adapter, batch, idx, cache, device)
        x_a, _ = fused_path.directions(adapter, hidden, mask, states, valid, *a)  # (N, D)
        x_b, _ = fused_path.directions(other, hidden, mask, states, valid, *b)  # (N, D)
        total += float(vocab_chunks.projected_kl(x_a, x_b, adapter.out_weight).sum())
        tokens += int(valid.sum())
    return total / max(tokens, 1)


def plot(rows, names, frozen, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no PNG (pip install matplotlib)")
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    x = [r["weights"][-1] for r in rows]
    for name in names:
        line, = ax.plot(x, [r[f"{name}/accuracy"] for r in rows], marker="o", label=f"{name} pairs")
        ax.axhline(frozen[name], color=line.get_color(), linestyle=":", linewidth=1)
    ax.set_xlabel(f"weight on {names[-1]} (w = 1 − t, t)" if len(names) == 2 else "weight on the last head")
    ax.set_ylabel("held-out pairwise accuracy")
    ax.set_title("composed heads (dotted: the frozen model's log-prob margin)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def main(argv=None):
    args = parse_args(argv)
    device, dtype, why = loading.pick_device(args.device)
    print(why)
    names = [name_of(c) for c in args.checkpoint]
    adapter, tok, configs = loading.load_composition(args.checkpoint, args.weights[0], device, dtype)
    alphas = (configs[0]["alpha0"], configs[0]["alpha_tilde"])
    eval_args = argparse.Namespace(alpha0=alphas[0], alpha_tilde=alphas[1], gamma=configs[0].get("gamma", 1.0),
                                   beta=configs[0].get("beta", 0.0),
                                   batch_size=args.batch_size, path="fused")
    collate = lambda examples: data.collate(examples, tok.pad_token_id)  # noqa: E731
    tests = {n: held_out_set(tok, c, args.limit) for n, c in zip(names, configs)}
    # the frozen outputs per test set, kept across the weights; log Z1 belongs to the policy below
    # the head, so a run stacked on other heads gets caches of its own
    caches = {}
    cache_for = lambda n, a: caches.setdefault((n, id(a) if a.below else "base"), FrozenCache(8.0))  # noqa: E731
    joint = joint_alphas = None
    if args.joint:
        joint_adapter, _, joint_config = loading.load_adapter(args.joint, device, dtype, base=adapter.base, tokenizer=tok)
        joint, joint_alphas = joint_adapter, (joint_config["alpha0"], joint_config["alpha_tilde"])
    arc = arc_policy = None
    if args.arc_easy:  # the task is loaded and its questions picked once; the policy follows the weights
        import evaluate
        arc = evaluate.Benchmarks([ARC_TASK], {ARC_TASK: args.arc_easy}, None, args.mc_limit, None, None)
        arc_policy = evaluate.QAdapterPolicy(adapter, configs[0], [alphas], "composed")

    rows, frozen = [], {}
    for weights in tqdm(args.weights, desc="weights"):
        adapter.head.weights = [float(w) for w in weights]
        row = {"weights": weights}
        for n in names:
            m = train.evaluate(adapter, tests[n], cache_for(n, adapter), eval_args, device, collate)
            row[f"{n}/accuracy"], row[f"{n}/margin"] = m["eval/rewards/accuracies"], m["eval/rewards/margins"]
            row[f"{n}/logratio_accuracy"] = logratio_accuracy(adapter, tests[n], cache_for(n, adapter), alphas,
                                                                    args.batch_size, device, collate)
            row[f"{n}/kl_to_frozen"] = m["eval/kl"]
            frozen[n] = m["eval/frozen_logp_accuracy"]
            if joint is not None:
                row[f"{n}/kl_to_joint"] = kl_between(adapter, joint, tests[n], cache_for(n, adapter), alphas,
                                                     joint_alphas, args.batch_size, device, collate)
        if arc is not None:
            scores = arc.score(arc_policy, tok, {"composed"}, args.batch_size)
            row["arc_easy/acc"] = scores["composed"][f"{ARC_TASK}/acc"]
        rows.append(row)
    if arc is not None:  # the frozen model does not depend on the weights: scored once
        scores = arc.score(arc_policy, tok, {"frozen"}, args.batch_size)
        frozen["arc_easy/acc"] = scores["frozen"][f"{ARC_TASK}/acc"]
    references = {}  # name -> {column: value}: the joint head and any --reference run, each on every test set
    for path in ([args.joint] if args.joint else []) + args.reference:
        other, _, config = loading.load_adapter(path, device, dtype, base=adapter.base, tokenizer=tok)
        other_args = argparse.Namespace(**{**vars(eval_args), "alpha0": config["alpha0"],
                                           "alpha_tilde": config["alpha_tilde"], "gamma": config.get("gamma", 1.0)})
        ref = references.setdefault(name_of(path) + (" (joint)" if path == args.joint else ""), {})
        for n in names:
            m = train.evaluate(other, tests[n], cache_for(n, other), other_args, device, collate)
            ref[f"{n}/accuracy"], ref[f"{n}/margin"] = m["eval/rewards/accuracies"], m["eval/rewards/margins"]
            ref[f"{n}/logratio_accuracy"] = logratio_accuracy(
                other, tests[n], cache_for(n, other), (config["alpha0"], config["alpha_tilde"]), args.batch_size,
                device, collate)
            ref[f"{n}/kl_to_frozen"] = m["eval/kl"]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {"checkpoints": dict(zip(names, args.checkpoint)), "alpha0": alphas[0], "alpha_tilde": alphas[1],
              "test_pairs": {n: len(t) for n, t in tests.items()}, "frozen": frozen, "references": references,
              "rows": rows}
    columns = [k for k in rows[0] if k != "weights"]
    lines = ["| weights | " + " | ".join(columns) + " |", "|" + " --- |" * (len(columns) + 1)]
    for r in rows:
        lines.append(f"| {', '.join(f'{w:g}' for w in r['weights'])} | " + " | ".join(f"{r[c]:.3f}" for c in columns) + " |")
    lines.append("| frozen | " + " | ".join(f"{frozen[c.split('/')[0]]:.3f}" if c.endswith("/accuracy")
                                           else f"{frozen[c]:.3f}" if c in frozen else "" for c in columns) + " |")
    for ref_name, ref in references.items():
        lines.append(f"| {ref_name} | " + " | ".join(f"{ref[c]:.3f}" if c in ref else "" for c in columns) + " |")
    table = "\n".join(lines) + "\n"
    for suffix, text in ((".json", json.dumps(result, indent=2)), (".md", table)):
        run_state.write_atomic(out.with_suffix(suffix), text)
    png = plot(rows, names, frozen, out.with_suffix(".png"))
    print("\n" + table)
    print(f"held-out pairs: {result['test_pairs']}; accuracy of the frozen model's log-prob margin: "
          + ", ".join(f"{n} {frozen[n]:.3f}" for n in names))
    print(f"wrote {out.with_suffix('.json')}, {out.with_suffix('.md')}" + (f", {png}" if png else ""))
    return result


if __name__ == "__main__":
    cli.run(main)
