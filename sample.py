"""Decoding from the customised policy pi~(a|s) = softmax((Q_R(s,a) + α0·log pi1(a|s)) / α̃).

Each step runs the frozen model and the head on the newest token only: both keep a KV cache, so
the prefix is never re-run. `--path plain` takes the step's logits as residual_q.customised_logits
writes them, from Q_R and log pi1 over the vocabulary (model.QAdapter.forward); the default,
`--path fused`, projects u + α0·h once instead (support/fused_path.next_logits; tested equal). The prompts of a batch are left-padded and decoded together; a
sequence stops at its end-of-turn token. `--compare` decodes the same prompts with the frozen model
alone (same loop, same seed) and prints the two answers side by side.

Several preferences: a head trained with `train.py --base-head` is loaded with the heads below it
(model.QAdapter.prior); several --checkpoint flags compose independently trained heads with
--weights (model.WeightedHeads). Either way the frozen model runs once per step, and each head
keeps its own cache.

    python sample.py --checkpoint runs/demo --prompt "Why is the sky blue?" --compare
    python sample.py --checkpoint runs/demo --prompts-file prompts.txt --temperature 0.7 --top-p 0.9
    python sample.py --checkpoint runs/academy --checkpoint runs/business --weights 0.5 0.5 --prompt "..."
"""
import argparse
import importlib
import json
import os
import textwrap
from pathlib import Path

import torch
from tqdm import tqdm
from transformers import DynamicCache

import data
from model import positions
from residual_q import customised_logits
from support import cli, fused_path, loading


def pick_next(logits, temperature, top_k, top_p, generator):
    """logits: (B, V) -> next tokens (B,). temperature 0 is greedy."""
    if temperature <= 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k > 0:
        kth = logits.topk(min(top_k, logits.shape[-1]), dim=-1).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)  # (B, V)
        probs = sorted_logits.softmax(-1)
        drop = probs.cumsum(-1) - probs > top_p  # keep the smallest prefix whose mass reaches top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


def stop_ids(tokenizer, base):
    ids = {tokenizer.eos_token_id}
    gen_eos = getattr(base.generation_config, "eos_token_id", None)
    ids.update(gen_eos if isinstance(gen_eos, list) else [gen_eos])
    return sorted(i for i in ids if i is not None)


def next_logits(adapter, ids, mask, position_ids, base_cache, head_cache, alpha0, alpha_tilde, path="fused"):
    """(B, V) logits of pi~ at the newest position: z = (Q_R + α0·log pi1) / α̃; caches filled in place.
    head_cache None: the frozen base model's own logits, the same on both paths."""
    if path == "fused" or head_cache is None:
        return fused_path.next_logits(adapter, ids, mask, position_ids, base_cache, head_cache, alpha0, alpha_tilde)
    newest = torch.full((ids.shape[0], 1), ids.shape[1] - 1, device=ids.device)  # (B, 1)
    q_r, logp1, base_cache, head_cache = adapter(ids, mask, newest, position_ids, base_cache, head_cache)  # (B, 1, V)
    return customised_logits(q_r, logp1, alpha0, alpha_tilde)[:, -1], base_cache, head_cache


@torch.no_grad()
def generate(adapter, tokenizer, conversations, alpha0=None, alpha_tilde=None, max_new_tokens=128,
             temperature=0.0, top_k=0, top_p=1.0, seed=0, frozen_only=False, stop_at_eos=True, path="fused"):
    """conversations: list of message lists. Returns a list of (answer text, finished at EOS).

    alpha0, alpha_tilde: those of pi~; default the adapter's own, the values its head was trained
    with (model.QAdapter). frozen_only decodes the frozen base model alone (no head is run).
    stop_at_eos=False always decodes max_new_tokens (bench.py times it)."""
    alpha0 = adapter.alpha0 if alpha0 is None else alpha0
    alpha_tilde = adapter.alpha_tilde if alpha_tilde is None else alpha_tilde
    if not frozen_only and (alpha0 is None or alpha_tilde is None):
        raise ValueError("generate: this adapter carries no trained α0 and α̃ (built by hand): pass alpha0 and alpha_tilde")
    device = adapter.out_weight.device
    tokenizer.padding_side = "left"
    enc = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, padding=True,
                                        return_tensors="pt", return_dict=True)
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # (B, T)
    B = ids.shape[0]
    stops = torch.tensor(stop_ids(tokenizer, adapter.base) if stop_at_eos else [], dtype=torch.long, device=device)
    base_cache = DynamicCache(config=adapter.base.config)
    head_cache = None if frozen_only else adapter.new_head_cache()
    generator = torch.Generator(device=device).manual_seed(seed)
    out = torch.empty(B, 0, dtype=torch.long, device=device)
    done = torch.zeros(B, dtype=torch.bool, device=device)
    step_ids, step_pos = ids, positions(mask)
    for _ in range(max_new_tokens):
        logits, base_cache, head_cache = next_logits(adapter, step_ids, mask, step_pos, base_cache, head_cache,
                                                     alpha0, alpha_tilde, path)  # (B, V)
        nxt = pick_next(logits, temperature, top_k, top_p, generator)  # (B,)
        nxt = nxt.masked_fill(done, tokenizer.pad_token_id)
        out = torch.cat([out, nxt[:, None]], dim=1)
        done |= torch.isin(nxt, stops)
        if done.all():
            break
        step_ids = nxt[:, None]  # (B, 1)
        step_pos = step_pos[:, -1:] + 1
        mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=device)], dim=1)
    answers = []
    for row, finished in zip(out.tolist(), done.tolist()):
        answers.append((tokenizer.decode(row, skip_special_tokens=True).strip(), finished))
    return answers


def generate_batched(adapter, tokenizer, conversations, batch_size, desc="decoding", **kwargs):
    """`generate` over many prompts, a batch at a time, with a progress bar."""
    answers = []
    for i in tqdm(range(0, len(conversations), batch_size), desc=desc, leave=False):
        answers += generate(adapter, tokenizer, conversations[i:i + batch_size], **kwargs)
    return answers


def read_prompts(args):
    prompts = list(args.prompt)
    if args.prompts_file:
        path = Path(args.prompts_file)
        if not path.exists():
            raise SystemExit(f"error: --prompts-file {path}: no such file")
        try:
            if path.suffix in data.FILE_FORMATS:  # a preference file: take each pair's prompt
                prompts += [p.prompt for p in data.load_pairs(str(path))]
            else:
                prompts += [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except data.DataError as e:
            raise SystemExit(f"error: --prompts-file {e}")
        except UnicodeDecodeError as e:
            raise SystemExit(f"error: --prompts-file {path}: not UTF-8 (byte 0x{e.object[e.start]:02x} at offset {e.start})")
    if not prompts:
        raise SystemExit("error: give --prompt TEXT (repeatable) or --prompts-file FILE")
    return [p if isinstance(p, list) else [{"role": "user", "content": p}] for p in prompts]


def parse_args(argv=None):
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", required=True,
                    help="a train.py output directory (or its checkpoint/); a head stacked on others brings "
                         "them along. Repeat to compose heads trained on the same base (see --weights)")
    ap.add_argument("--weights", type=float, nargs="+", default=None,
                    help="with several --checkpoint: w_i in pi ∝ exp((Σ w_i·Q_R^i + α0·log pi1)/α̃) "
                         "(default 1 each; α0 and α̃ are the first checkpoint's)")
    ap.add_argument("--prompt", action="append", default=[], help="a user message; repeatable")
    ap.add_argument("--prompts-file", help="one prompt per line, or a preference .jsonl (its prompts)")
    ap.add_argument("--limit", type=int, default=0, help="use only the first N prompts (0: all)")
    ap.add_argument("--alpha0", type=float, default=None,
                    help="decode-time dial a, as in evaluate.py: α0 = α̃ = a, so pi~ ∝ pi1·exp(Q_R / a); larger "
                         "keeps closer to the frozen model (a → ∞ is pi1). Default: the checkpoint's α0 and α̃, "
                         "the values the head was trained for; others are an extrapolation")
    ap.add_argument("--path", default="fused", choices=["fused", "plain"],
                    help="plain: each step's logits from Q_R and log pi1 over the vocabulary, as residual_q.py "
                         "writes them; fused: one projection of u + α0·h (the same logits, faster)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="tokens per answer at most")
    ap.add_argument("--temperature", type=float, default=0.0, help="0 is greedy")
    ap.add_argument("--top-k", type=int, default=0, help="keep the k likeliest tokens (0: off)")
    ap.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass (1: off)")
    ap.add_argument("--seed", type=int, default=0, help="sampling seed, the same for both models in --compare")
    ap.add_argument("--batch-size", type=int, default=8, help="prompts decoded together")
    ap.add_argument("--compare", action="store_true", help="also decode with the frozen model, side by side")
    ap.add_argument("--score", choices=["child"], default=None,
                    help="score the answers' adherence to the demo preference: demo/child.py")
    ap.add_argument("--out", help="write prompts and answers to this JSON file")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: a GPU if there is one)")
    ap.add_argument("--trust-remote-code", action="store_true", help="allow the base model's own code (opt-in)")
    args = ap.parse_args(argv)
    cli.check(args.max_new_tokens >= 1, f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    cli.check(args.temperature >= 0, f"--temperature must be >= 0 (0 is greedy), got {args.temperature}")
    cli.check(args.top_k >= 0, f"--top-k must be >= 0, got {args.top_k}")
    cli.check(0 < args.top_p <= 1, f"--top-p must be in (0, 1], got {args.top_p}")
    cli.check(args.batch_size >= 1, f"--batch-size must be >= 1, got {args.batch_size}")
    cli.check(args.alpha0 is None or args.alpha0 > 0,
              f"--alpha0 must be > 0 (it is also α̃, which divides the logits), got {args.alpha0}")
    return args


def show(conversations, custom, frozen, title, width=60):
    """The answers; with --compare, the frozen one on the left and the customised one on the right."""
    for i, conv in enumerate(conversations):
        print(f"\n### {conv[-1]['content']}")
        if frozen is None:
            print(custom[i][0])
            continue
        left = textwrap.wrap(frozen[i][0], width) or [""]
        right = textwrap.wrap(custom[i][0], width) or [""]
        print(f"{'frozen pi1':<{width}} | {title}")
        for k in range(max(len(left), len(right))):
            print(f"{left[k] if k < len(left) else '':<{width}} | {right[k] if k < len(right) else ''}")


def main(argv=None):
    args = parse_args(argv)
    device, dtype, why = loading.pick_device(args.device)
    print(why)
    adapter, tok, _ = loading.load_policy(args.checkpoint, device, dtype, args.weights, args.alpha0,
                                          args.trust_remote_code)
    alpha0, alpha_tilde = adapter.alpha0, adapter.alpha_tilde
    if len(args.checkpoint) > 1 or args.weights:
        print("composed: " + " + ".join(f"{w:g}·Q_R[{c}]" for w, c in zip(adapter.head.weights, args.checkpoint)))
    conversations = read_prompts(args)[:args.limit or None]
    opts = dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_k=args.top_k,
                top_p=args.top_p, seed=args.seed, path=args.path)
    custom = generate_batched(adapter, tok, conversations, args.batch_size, "customised", **opts)
    frozen = generate_batched(adapter, tok, conversations, args.batch_size, "frozen", frozen_only=True,
                              **opts) if args.compare else None
    show(conversations, custom, frozen, f"customised pi~ (α0={alpha0:g}, α̃={alpha_tilde:g})")
    results = {"alpha0": alpha0, "alpha_tilde": alpha_tilde,
               "answers": [{"prompt": c, "customised": a[0], "finished": a[1]} for c, a in zip(conversations, custom)]}
    for r, a in zip(results["answers"], frozen or []):
        r.update(frozen=a[0], frozen_finished=a[1])
    if args.score:
        adherence = importlib.import_module(f"demo.{args.score}").adherence
        for name, answers in (("customised", custom), ("frozen", frozen)):
            if answers is not None:
                results[f"{args.score}/{name}"] = adherence(*zip(*answers))
                print(f"{args.score} adherence, {name + ':':<12}{results[f'{args.score}/{name}']}")
    if args.out:
        out = Path(args.out)
        tmp = out.with_name(f".{out.name}.tmp")
        tmp.write_text(json.dumps(results, indent=2, ensure_ascii=False))
        os.replace(tmp, out)  # a reader never sees half a file
        print(f"wrote {args.out}")


if __name__ == "__main__":
    cli.run(main)
