"""The methods Q-Adapter is compared with: SFT and DPO, each training a LoRA adapter on the base model.

Same pipeline as train.py: the same flags (train.build_parser, plus the ones below), data loading,
chat template, cutoff and masks (data.py), AdamW with the same warm-up and cosine schedule, the same
metrics.jsonl keys, summary.json and an atomically replaced checkpoint/, so evaluate.py scores all
three the same way. Only the loss and what is trained differ:

  SFT   L = −mean_t log pi(a_t | s_t)        over the chosen responses' tokens (y_w only)
  DPO   L = −log σ( β·[(log pi(y_w|x) − log pi_ref(y_w|x)) − (log pi(y_l|x) − log pi_ref(y_l|x))] )
        (Rafailov et al. 2023, eq. 7; TRL's "sigmoid" loss), log p(y|x) summed over response tokens
  RPO   DPO + λ·(SFT's loss on the chosen responses), with --method dpo --nll λ (Pang et al. 2024):
        the twin of train.py --nll λ, the same term added to Q-Adapter's loss

pi is the base model with a trainable LoRA adapter (peft); the reference pi_ref is the same model with
the adapter disabled, i.e. the frozen pi1. Unlike Q-Adapter, pi's weights change, so what the base
model knew can be forgotten. The implicit reward β·(log pi − log pi_ref) is reported as rewards/*
for both methods (SFT does not train on it; it is the same yardstick).

    python baselines.py --method dpo --out-dir runs/demo-dpo --lr 5e-4
    python baselines.py --method sft --data dsp_academy_pairs.jsonl --test-data '' \\
        --cutoff 384 --out-dir runs/dsp-sft

Writes to --out-dir: metrics.jsonl, summary.json, and checkpoint/ = adapter_model.safetensors +
adapter_config.json (peft's format) + config.json ({"method": "dpo" | "sft", "base_model", ...}).
The Q-head flags (--q-head, --head-*, --lora-rank, --lora-modules, --alpha0, --alpha-tilde, --gamma, --beta,
--path, --cache-*) are ignored here; --nll is RPO's weight (DPO only); --unlikelihood is refused.
"""
import contextlib
import json
import math
import os
import random
import shutil
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

import data
import model as M
import train
from bt_loss import reward_metrics
from residual_q import gather_actions, kl_divergence, next_tokens, scored_states
from support import cli, loading, run_state

METHODS = ("sft", "dpo")


def build_parser():
    ap = train.build_parser(__doc__)
    a = ap.add_argument_group("baselines")
    a.add_argument("--method", required=True, choices=METHODS,
                   help="sft: maximise the likelihood of the chosen answers; dpo: the DPO loss on the pairs")
    a.add_argument("--dpo-beta", type=float, default=0.1,
                   help="β of DPO, the weight of the log-ratio to the reference (TRL's default 0.1); also "
                        "scales the implicit rewards reported for SFT")
    a.add_argument("--lora-r", type=int, default=8, help="LoRA rank (the paper's baselines: 8)")
    a.add_argument("--lora-alpha", type=float, default=16, help="LoRA scaling numerator (scale = alpha / r)")
    a.add_argument("--lora-dropout", type=float, default=0.0, help="dropout on the LoRA input")
    a.add_argument("--lora-targets", default="q_proj,v_proj",
                   help="comma-separated names of the linear layers that get an adapter (the paper: q_proj,v_proj)")
    return ap


def parse_args(argv=None):
    args = train.parse_args(argv, build_parser())
    if args.resume:
        raise SystemExit("error: --resume: baselines.py always trains from the start (use --max-steps for a short run)")
    for flag in ("lora_r", "batch_size", "grad_accum", "epochs", "cutoff"):
        if getattr(args, flag) <= 0:
            raise SystemExit(f"error: --{flag.replace('_', '-')} must be positive, got {getattr(args, flag)}")
    if args.dpo_beta <= 0:
        raise SystemExit(f"error: --dpo-beta must be positive, got {args.dpo_beta}")
    if args.unlikelihood:
        raise SystemExit("error: --unlikelihood is a term of train.py's Q-head loss; baselines.py does not add it")
    if args.nll and args.method != "dpo":
        raise SystemExit("error: --nll adds the chosen answers' NLL to DPO (RPO); SFT's loss is that NLL already")
    return args


# ------------------------------------------------------------------------------------------------
# the losses, pure functions of per-sequence log-probabilities (tests feed them hand-made tensors)


def dpo_loss(policy_logps, ref_logps, beta):
    """policy_logps, ref_logps: (2B,) log p(y|x) summed over the response tokens, chosen rows first
    then rejected (data.collate). Returns (loss, metrics), metrics with TRL's names.

        L = −log σ( β·[(log pi(y_w) − log ref(y_w)) − (log pi(y_l) − log ref(y_l))] )"""
    rewards = beta * (policy_logps - ref_logps)  # (2B,) implicit rewards β·log pi/ref
    chosen, rejected = rewards.chunk(2)  # (B,), (B,)
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, {"loss": loss.detach(), **reward_metrics(chosen, rejected)}


def sft_loss(token_logps, mask):
    """token_logps: (B, T-1) log pi(a_t | s_t) of the chosen rows; mask: (B, T-1) their response
    tokens. L = −(Σ log pi over the chosen response tokens) / (number of those tokens)."""
    return -(token_logps * mask).sum() / mask.sum().clamp(min=1)


# ------------------------------------------------------------------------------------------------
# log-probabilities of the responses under a causal LM (with or without its LoRA adapter)


def token_logprobs(lm, ids, mask, labels):
    """log p(a_t | s_t) of every response token: (2B, W-1), and its mask, on the window of states that
    take a response action (residual_q.scored_states, the same window train.py scores). Only the
    window goes through the output layer, the (·, V) part; columns that are padding in every row are
    skipped."""
    n = int(mask.sum(-1).max())
    ids, mask, labels = ids[:, :n], mask[:, :n], labels[:, :n]
    hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask,
                              position_ids=M.positions(mask)).last_hidden_state  # (2B, T, D)
    states, window_labels = scored_states(labels)  # (2B, W)
    logits = lm.get_output_embeddings()(M.pick(hidden, states)).float()  # (2B, W, V)
    logp = gather_actions(torch.log_softmax(logits, dim=-1), window_labels)  # (2B, W-1)
    return logp, next_tokens(window_labels)[1]


def batch_loss(peft_model, batch, args, device):
    """One batch of 2B sequences (chosen first) -> (loss, metrics).

    DPO scores all 2B rows under pi (with gradients) and pi_ref (without). SFT never looks at the
    rejected answers: it scores the B chosen rows only, so its training records carry loss and
    rewards/chosen (β·log pi/ref of y_w) but no rejected-side keys; its evaluation records carry
    all of them, as DPO's and Q-Adapter's do."""
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    if args.method == "sft":
        B = ids.shape[0] // 2
        ids, mask, labels = ids[:B], mask[:B], labels[:B]  # (B, T) the chosen rows
    lm = peft_model.get_base_model()  # the LoRA layers live inside it; disable_adapter() switches them off
    with torch.no_grad(), peft_model.disable_adapter():
        ref_logps = token_logprobs(lm, ids, mask, labels)[0].sum(-1)  # (rows,) log pi_ref(y|x)
    token_logps, response = token_logprobs(lm, ids, mask, labels)  # (rows, W-1)
    policy_logps = token_logps.sum(-1)  # (rows,) log pi(y|x)
    if args.method == "dpo":
        loss, metrics = dpo_loss(policy_logps, ref_logps, args.dpo_beta)
        if args.nll > 0:  # RPO: the chosen answers' NLL, as train.py --nll adds it to Q-Adapter's loss
            B = ids.shape[0] // 2
            nll = sft_loss(token_logps[:B], response[:B])
            loss, metrics["loss/nll"] = loss + args.nll * nll, nll.detach()
            metrics["loss"] = loss.detach()
        return loss, metrics
    loss = sft_loss(token_logps, response)
    chosen_reward = args.dpo_beta * (policy_logps - ref_logps).detach().mean()
    return loss, {"loss": loss.detach(), "rewards/chosen": chosen_reward}


@torch.no_grad()
def evaluate(peft_model, test_set, args, device, collate):
    """Held-out metrics with train.py's names: the DPO loss and implicit rewards (loss is the
    method's own), per-token KL(pi ‖ pi_ref) on the responses, and the two reference accuracies."""
    lm = peft_model.get_base_model()
    lm.eval()
    sums, n_pairs, kl_sum, kl_tokens = {}, 0, 0.0, 0
    for start in tqdm(range(0, len(test_set), args.batch_size), desc="evaluating", leave=False):
        batch = collate([test_set[i] for i in range(start, min(start + args.batch_size, len(test_set)))])
        ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
        states, window_labels = scored_states(labels)  # (2B, W)
        actions, response = next_tokens(window_labels)  # (2B, W-1)

        def window_logp():
            hidden = lm.get_decoder()(input_ids=ids, attention_mask=mask,
                                      position_ids=M.positions(mask)).last_hidden_state  # (2B, T, D)
            return torch.log_softmax(lm.get_output_embeddings()(M.pick(hidden, states)).float(), -1)  # (2B, W, V)

        logp = window_logp()
        with peft_model.disable_adapter():
            logp_ref = window_logp()
        policy, ref = gather_actions(logp, window_labels), gather_actions(logp_ref, window_labels)  # (2B, W-1)
        loss, metrics = dpo_loss(policy.sum(-1), ref.sum(-1), args.dpo_beta)
        if args.method == "sft":
            metrics["loss"] = sft_loss(policy.chunk(2)[0], response.chunk(2)[0])
        kl = kl_divergence(logp, logp_ref)[:, :-1]  # (2B, W-1) KL(pi ‖ pi_ref) at the states s_t
        kl_sum += float((kl * response).sum())
        kl_tokens += int(response.sum())
        frozen_chosen, frozen_rejected = ref.sum(-1).chunk(2)
        len_chosen, len_rejected = response.sum(-1).chunk(2)
        metrics["frozen_logp_accuracy"] = (frozen_chosen > frozen_rejected).float().mean()
        metrics["longer_wins_accuracy"] = ((len_chosen > len_rejected).float()
                                           + 0.5 * (len_chosen == len_rejected).float()).mean()
        B = ids.shape[0] // 2
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * B
        n_pairs += B
    lm.train()
    out = {f"eval/{k}": v / n_pairs for k, v in sums.items()}
    out["eval/kl"] = kl_sum / max(kl_tokens, 1)
    return out


# ------------------------------------------------------------------------------------------------
# the LoRA model and its checkpoint


def lora_model(base, args):
    from peft import LoraConfig, get_peft_model
    targets = [t.strip() for t in args.lora_targets.split(",") if t.strip()]
    names = {name.rsplit(".", 1)[-1] for name, _ in base.named_modules()}
    missing = [t for t in targets if t not in names]
    if not targets or missing:
        raise SystemExit(f"error: --lora-targets: no layer named {missing or targets} in {args.base_model} "
                         f"(linear layers are named e.g. q_proj, k_proj, v_proj, o_proj)")
    config = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                        target_modules=targets, task_type="CAUSAL_LM")
    return get_peft_model(base, config)


def save_checkpoint(out_dir, peft_model, progress, args):
    """adapter_model.safetensors + adapter_config.json (peft) + config.json, swapped in atomically."""
    final, tmp, old = out_dir / "checkpoint", out_dir / ".checkpoint-tmp", out_dir / ".checkpoint-old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    peft_model.save_pretrained(tmp, safe_serialization=True)
    meta = {"method": args.method, "base_model": args.base_model, **{k: getattr(args, k) for k in
            ("dpo_beta", "nll", "lora_r", "lora_alpha", "lora_dropout", "lora_targets", "cutoff", "max_prompt",
             "lr", "epochs", "batch_size", "grad_accum", "seed", "data", "test_data", "split", "data_dir",
             "test_fraction", "split_seed")}, **progress}
    (tmp / loading.CONFIG_FILE).write_text(json.dumps(meta, indent=2))
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def load_checkpoint(directory, device="cpu", dtype=torch.float32, base=None, trust_remote_code=False):
    """A saved SFT/DPO adapter on its base model: returns (PeftModel, tokenizer, config dict).
    peft reads adapter_model.safetensors (never a pickle: a checkpoint without it is refused)."""
    from peft import PeftModel
    directory = Path(directory)
    if (directory / "checkpoint" / loading.CONFIG_FILE).exists():
        directory = directory / "checkpoint"
    for name in (loading.CONFIG_FILE, "adapter_model.safetensors", "adapter_config.json"):
        if not (directory / name).exists():
            raise SystemExit(f"error: {directory}: no {name} (not a checkpoint written by baselines.py)")
    try:
        config = json.loads((directory / loading.CONFIG_FILE).read_text())
        method, base_name = config["method"], config["base_model"]
    except (ValueError, KeyError) as e:
        raise SystemExit(f"error: {directory / loading.CONFIG_FILE}: unreadable checkpoint config ({e})")
    if method not in METHODS:
        raise SystemExit(f"error: {directory / loading.CONFIG_FILE}: unknown method {method!r}")
    base, tokenizer = loading.load_base(base_name, device, dtype, trust_remote_code) if base is None else (base, None)
    tokenizer = tokenizer or loading.load_tokenizer(base_name, trust_remote_code)
    try:
        peft_model = PeftModel.from_pretrained(base, str(directory), use_safetensors=True)
    except (OSError, ValueError, RuntimeError, KeyError) as e:
        raise SystemExit(f"error: {directory}: cannot load the LoRA adapter ({str(e).splitlines()[0]})")
    return peft_model.eval().requires_grad_(False), tokenizer, config


@contextlib.contextmanager
def scaled_update(peft_model, s):
    """Within the block, every LoRA layer's weight is W + s·(α/r)·B·A instead of W + (α/r)·B·A:
    the trained update scaled at decode time (s = 0: the frozen model, s = 1: as trained). It is
    the LoRA baselines' twin of Q-Adapter's decode-time dial; nothing is retrained."""
    from peft.tuners.lora import LoraLayer
    layers = [m for m in peft_model.modules() if isinstance(m, LoraLayer)]
    for layer in layers:
        for adapter in layer.active_adapters:
            layer.set_scale(adapter, s)  # scaling[adapter] = s·α/r
    try:
        yield
    finally:
        for layer in layers:
            for adapter in layer.active_adapters:
                layer.set_scale(adapter, 1.0)


# ------------------------------------------------------------------------------------------------
# greedy answers from a causal LM, for the samples in the summary (evaluate.py uses it too)


@torch.no_grad()
def hf_generate(lm, tokenizer, conversations, max_new_tokens=128):
    """Greedy answers of a Hugging Face causal LM (a PeftModel included) to chat conversations:
    a list of (text, finished at EOS). For the frozen model this equals sample.generate(frozen_only)."""
    from sample import stop_ids
    tokenizer.padding_side = "left"
    enc = tokenizer.apply_chat_template(conversations, add_generation_prompt=True, padding=True,
                                        return_tensors="pt", return_dict=True)
    device = next(lm.parameters()).device
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)  # (B, T)
    stops = stop_ids(tokenizer, lm)
    out = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                      eos_token_id=stops, pad_token_id=tokenizer.pad_token_id)[:, ids.shape[1]:]  # (B, new)
    answers = []
    for row in out.tolist():
        finished = any(t in stops for t in row)
        if finished:
            row = row[:min(row.index(t) for t in stops if t in row)]
        answers.append((tokenizer.decode(row, skip_special_tokens=True).strip(), finished))
    return answers


# ------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out_dir = Path(args.out_dir)
    if not getattr(args, "overwrite", True) and ((out_dir / "checkpoint").exists() or (out_dir / "metrics.jsonl").exists()):
        raise SystemExit(f"error: {out_dir} already holds a run: --overwrite starts again")
    out_dir.mkdir(parents=True, exist_ok=True)
    device, dtype, why = loading.pick_device(args.device, args.dtype)
    print(why)

    tok = loading.load_tokenizer(args.base_model, args.trust_remote_code)
    train_set, test_set, test_pairs = data.train_and_test_sets(args, tok)  # train.py's data path
    print(f"{len(train_set)} training pairs, {len(test_set)} test pairs")

    base, _ = loading.load_base(args.base_model, device, dtype, args.trust_remote_code, tokenizer=tok)
    n_base = sum(p.numel() for p in base.parameters())
    peft_model = lora_model(base, args)
    lora_params = [p for p in peft_model.parameters() if p.requires_grad]
    n_lora = sum(p.numel() for p in lora_params)
    print(f"{args.method.upper()}: LoRA r={args.lora_r} on {args.lora_targets}, {n_lora / 1e6:.2f}M trainable "
          f"parameters, {100 * n_lora / n_base:.2f}% of the base's {n_base / 1e6:.0f}M")

    collate = lambda examples: data.collate(examples, tok.pad_token_id)  # noqa: E731
    batches_per_epoch = math.ceil(len(train_set) / args.batch_size)
    total_steps = args.epochs * math.ceil(batches_per_epoch / args.grad_accum)
    warmup = max(1, int(args.warmup * total_steps))
    optimizer = torch.optim.AdamW(lora_params, lr=args.lr, weight_decay=args.weight_decay)
    schedule = lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / total_steps, 1.0))))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    metrics_path = out_dir / "metrics.jsonl"
    metrics_path.write_text("")

    conversations = [p.prompt for p in test_pairs[:args.samples]]
    with peft_model.disable_adapter():
        before = hf_generate(peft_model, tok, conversations, args.max_new_tokens) if args.samples else []

    def run_eval(step):
        record = {"step": step, **evaluate(peft_model, test_set, args, device, collate)}
        run_state.append_jsonl(metrics_path, record)
        tqdm.write(f"step {step}: held-out accuracy {record['eval/rewards/accuracies']:.3f}, "
                   f"margin {record['eval/rewards/margins']:.3f}, KL {record['eval/kl']:.4f}")
        return record

    peft_model.train()
    step, eval_record, train_time = 0, None, 0.0
    bar = tqdm(total=total_steps, desc=f"training ({args.method})")
    for epoch in range(args.epochs):
        order = torch.randperm(len(train_set), generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
        batches = [order[i:i + args.batch_size].tolist() for i in range(0, len(order), args.batch_size)]
        for b in range(0, len(batches), args.grad_accum):
            t0 = time.time()
            group = batches[b:b + args.grad_accum]
            sums = {}
            for idx in group:
                loss, metrics = batch_loss(peft_model, collate([train_set[i] for i in idx]), args, device)
                (loss / len(group)).backward()
                for k, v in metrics.items():
                    sums[k] = sums.get(k, 0.0) + float(v) / len(group)
            grad_norm = torch.nn.utils.clip_grad_norm_(lora_params, args.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            train_time += time.time() - t0
            record = {"step": step, "epoch": epoch, **sums, "grad_norm": float(grad_norm),
                      "lr": scheduler.get_last_lr()[0], "pairs_per_s": sum(map(len, group)) / (time.time() - t0)}
            run_state.append_jsonl(metrics_path, record)
            bar.update(1)
            bar.set_postfix(loss=f"{sums['loss']:.3f}")
            at_end_of_epoch = b + args.grad_accum >= len(batches)
            progress = {"step": step, "epoch": epoch + at_end_of_epoch,
                        "batch_in_epoch": 0 if at_end_of_epoch else b + args.grad_accum}
            if (args.eval_every and step % args.eval_every == 0) or (not args.eval_every and at_end_of_epoch):
                eval_record = run_eval(step)
                save_checkpoint(out_dir, peft_model, progress, args)
            if step == args.max_steps:
                break
        if step == args.max_steps:
            break
    bar.close()
    if eval_record is None or eval_record["step"] != step:
        eval_record = run_eval(step)
        save_checkpoint(out_dir, peft_model, progress, args)

    peft_model.eval()
    after = hf_generate(peft_model, tok, conversations, args.max_new_tokens) if args.samples else []
    summary = {"method": args.method, "wall_time_s": round(time.time() - t_start, 1), "steps": step,
               "train_time_s": round(train_time, 1), "train_pairs": len(train_set), "test_pairs": len(test_set),
               "lora_parameters": n_lora, "base_parameters": n_base, **eval_record,
               "samples": [{"prompt": c[-1]["content"], "frozen": b[0], "customised": a[0]}
                           for c, b, a in zip(conversations, before, after)],
               "args": vars(args)}
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2, ensure_ascii=False))

    for s in summary["samples"]:
        print(f"\n### {s['prompt']}\n  frozen:     {s['frozen']}\n  {args.method}: {s['customised']}")
    print(f"\n{'held-out pairs':<34}{len(test_set)}")
    for key, label in (("eval/rewards/accuracies", f"pairwise accuracy ({args.method.upper()})"),
                       ("eval/frozen_logp_accuracy", "  frozen log-prob margin"),
                       ("eval/longer_wins_accuracy", "  the longer answer wins"),
                       ("eval/rewards/margins", "mean implicit-reward margin"),
                       ("eval/kl", "per-token KL(pi ‖ pi_ref)")):
        print(f"{label:<34}{eval_record[key]:.4f}")
    print(f"{'wall time':<34}{summary['wall_time_s']:.0f} s ({summary['train_time_s']:.0f} s in training steps)")
    print(f"wrote {out_dir}/checkpoint, {metrics_path.name}, summary.json")
    return summary


if __name__ == "__main__":
    cli.run(main)
