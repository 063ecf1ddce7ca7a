"""Train a Q-head: customise a frozen LLM to a new preference (Q-Adapter, arXiv 2407.03856).

One batch of preference pairs, in the paper's order (`batch_loss`):
  1. data.py         the pairs as 2B token rows, chosen first, with the response tokens labelled;
  2. model.py        the frozen model gives log pi1(·|s), the head gives Q_R(s,·), over the vocabulary;
  3. residual_q.py   V(s) = α̃·logsumexp((Q_R + α0·log pi1)/α̃) and Q_R(s_t, a_t) of every response token;
  4. bt_loss.py      q_adapter_loss, the paper's loss on one screen: r2 = Q_R(s_t, a_t) − γ·V(s_{t+1}),
                     R = Σ_t r2, L = −log σ(R(y_w) − R(y_l)) + β·mean r2².
`python train.py` trains exactly that loss. Two terms beyond the paper are opt-in: --nll (pi~ writes
the chosen answers) and --unlikelihood (pi~ does not repeat what the answer already said); the
demo (`make demo`) passes both. Only the head is trained: by default a small transformer on the
frozen hidden states (model.QHead); `--q-head lora`, LoRA on the frozen model's layers as in the
paper's Q-adapter (model.LoraHead), whose Q_R is the logits with the adapter minus those without.
`--path plain` runs exactly these steps (`scores_plain`). The default, `--path fused`, gets the same
Q_R(s_t, a_t), V(s_t) and log pi1(a_t|s_t) without (2B, T, V) tensors and keeps the frozen model's
outputs across epochs (support/fused_path.py; tested equal, values and gradients); both then call
q_adapter_loss. Evaluation reads the same numbers on held-out pairs, plus KL(pi~ ‖ pi1) at every
response state.

    python train.py --epochs 3 --nll 1 --unlikelihood 3   # the embedded demo (make demo): SmolLM2-135M, answers for a child, CPU
    python train.py --base-model meta-llama/Llama-3.1-8B-Instruct \\
        --data dsp_academy_pairs.jsonl --test-data "" --cutoff 512 \\
        --batch-size 8 --grad-accum 8 --head-width 1024 --out-dir runs/dsp-academy   # one GPU, bf16
    python train.py --q-head lora --out-dir runs/lora  # LoRA Q-head (r 8 on q_proj,v_proj; lr 1e-4)
    python train.py --out-dir runs/demo --resume      # continue from runs/demo/checkpoint
    torchrun --standalone --nproc_per_node 4 train.py --batch-size 4 ...      # 4 GPUs, data parallel
    python train.py --base-model meta-llama/Llama-3.1-70B-Instruct --device-map auto ...   # frozen model over all GPUs

Writes to --out-dir: metrics.jsonl (one JSON record per step and per evaluation), summary.json, and
checkpoint/ (head.safetensors, config.json, trainer_state.pt), replaced atomically at each save.
Ctrl-C, SIGTERM or a hang-up (SIGHUP) finishes the step, saves and exits (130 / 143 / 129); `--resume`
then continues exactly where the uninterrupted run would have been (support/run_state.py). A loss
or gradient that is not finite, a step out of GPU memory, or a checkpoint that cannot be written (a
full disk) stops the run with one line and exit code 1, the last complete checkpoint kept. Output
nobody reads any more (`| head`, a dead `tee`) is dropped and the run goes on. Bad flags, files and
checkpoints give one line and exit code 2 (support/cli.py). Several processes: support/distributed.py.
"""
import os

if int(os.environ.get("RANK", "0")) > 0:  # under torchrun only rank 0 draws progress bars (tqdm reads this on import)
    os.environ["TQDM_DISABLE"] = "1"

import argparse
import math
import random
import sys
import time
from pathlib import Path
from types import SimpleNamespace
from typing import NamedTuple

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import data
import model as M
from bt_loss import longer_wins, q_adapter_loss
from residual_q import customised_logprobs, gather_actions, kl_divergence, next_tokens, soft_value
from sample import generate
from support import cli, distributed, fused_path, loading, run_state
from support.frozen_cache import FrozenCache

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------
# flags


# The default learning rate of each Q-head at α0 = α̃ = 0.1 (the official code: 3e-4 at α̃ = 1).
DEFAULT_LR = {"small": 2e-4, "lora": 1e-4}


def build_parser(description=__doc__):
    """The flags of train.py, the ones a first run needs first; baselines.py adds its own to the same parser."""
    ap = cli.Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    for add_flags in (_method_flags, _data_flags, _optimisation_flags, _run_flags, _extra_terms_flags,
                      _head_shape_flags, _more_data_flags, _devices_flags):
        add_flags(ap)
    return ap


def _method_flags(ap):
    a = ap.add_argument_group("the method (residual Q-learning, the paper's loss)")
    a.add_argument("--base-model", default=loading.EMBEDDED,
                   help=f"frozen model pi1: a Hugging Face hub name or local path ({loading.EMBEDDED}: the embedded default)")
    a.add_argument("--q-head", default="small", choices=["small", "lora"],
                   help="what learns Q_R: small, a 2-layer transformer on the frozen hidden states (model.QHead); "
                        "lora, LoRA on the frozen model's layers as in the paper's Q-adapter, with Q_R = logits with "
                        "it − logits without (model.LoraHead: a second forward and a backward through the whole "
                        "model per step)")
    a.add_argument("--alpha0", type=float, default=0.1,
                   help="α0 = λ·α1, weight of the frozen model's log pi1 in the customised policy (λ is the paper's "
                        "knob; α1 = 1 for a softmax LM). With a zero head and α0 = α̃ the customised policy is the "
                        "frozen one, and with α0 = α̃ = b the BT loss is DPO's with β = b (the official code: 0.01)")
    a.add_argument("--alpha-tilde", type=float, default=0.1,
                   help="α̃, temperature of the customised policy (the official code: 1)")
    a.add_argument("--gamma", type=float, default=1.0, help="γ, discount in r2 = Q_R − γ·V(s')")
    a.add_argument("--beta", type=float, default=0.1,
                   help="β, weight of the mean r2² regulariser (0: off; the official code uses 0.1)")


def _data_flags(ap):
    a = ap.add_argument_group("data")
    a.add_argument("--data", default=str(HERE / "demo" / "child_train.jsonl"),
                   help="preference pairs: .jsonl/.json/.parquet file or a hub data set name")
    a.add_argument("--test-data", default=str(HERE / "demo" / "child_test.jsonl"),
                   help="held-out pairs; '' splits --data by prompt instead")
    a.add_argument("--cutoff", type=int, default=256,
                   help="tokens per sequence at most (prompt + response); a response cut there ends where it is cut")
    a.add_argument("--max-prompt", type=int, default=None, help="prompt tokens kept at most, its end (default cutoff/2)")


def _optimisation_flags(ap):
    a = ap.add_argument_group("optimisation")
    a.add_argument("--lr", type=float, default=None,
                   help=f"peak learning rate (AdamW), linear warm-up then cosine; default {DEFAULT_LR['small']:g}, "
                        f"{DEFAULT_LR['lora']:g} with --q-head lora")
    a.add_argument("--epochs", type=int, default=1, help="passes over the training pairs")
    a.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass")
    a.add_argument("--grad-accum", type=int, default=1, help="forward passes per optimiser step")
    a.add_argument("--seed", type=int, default=0, help="seed of the head's init and the data order")
    a.add_argument("--warmup", type=float, default=0.05, help="share of the steps spent warming up")
    a.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")


def _run_flags(ap):
    a = ap.add_argument_group("run")
    a.add_argument("--out-dir", default="runs/demo", help="metrics, summary and checkpoint go here")
    a.add_argument("--resume", action="store_true", help="continue from --out-dir/checkpoint")
    a.add_argument("--overwrite", action="store_true",
                   help="start again in an --out-dir that already holds a run (its checkpoint is replaced)")
    a.add_argument("--eval-every", type=int, default=0, help="evaluate and save every N steps (0: each epoch)")
    a.add_argument("--save-every", type=int, default=0,
                   help="also save a checkpoint every N steps, without evaluating (0: only when evaluating)")
    a.add_argument("--max-steps", type=int, default=0,
                   help="stop (with a checkpoint) after this many steps, schedule unchanged; --resume continues")
    a.add_argument("--samples", type=int, default=3, help="test prompts answered before and after training")
    a.add_argument("--max-new-tokens", type=int, default=96, help="tokens per shown sample at most")


def _extra_terms_flags(ap):
    a = ap.add_argument_group("beyond the paper: extra loss terms, off by default (bt_loss.py)")
    a.add_argument("--nll", type=float, default=0.0,
                   help="weight of −mean_t log pi~(a_t|s_t) over the chosen answers' tokens, so that pi~ learns to "
                        "write them, not only to rank them (DPO with this term is RPO, Pang et al. 2024; "
                        "baselines.py --method dpo --nll is its twin). 0: the paper's loss")
    a.add_argument("--unlikelihood", type=float, default=0.0,
                   help="weight of token-level unlikelihood against loops (Welleck et al. 2019) on the chosen "
                        "answers: −Σ log(1 − pi~(c|s_t)) over every token c the answer used before t other than a_t. "
                        "0: the paper's loss")


def _head_shape_flags(ap):
    a = ap.add_argument_group("the head's shape, and stacking on trained heads")
    a.add_argument("--head-width", type=int, default=256, help="--q-head small: width of its transformer")
    a.add_argument("--head-layers", type=int, default=2, help="--q-head small: layers of its transformer")
    a.add_argument("--head-heads", type=int, default=4, help="--q-head small: attention heads")
    a.add_argument("--lora-rank", type=int, default=8, help="--q-head lora: rank r of each LoRA update (the paper: 8)")
    a.add_argument("--lora-modules", default="q_proj,v_proj",
                   help="--q-head lora: comma-separated names of the frozen model's linear layers that get a LoRA "
                        "update (the paper: q_proj,v_proj)")
    a.add_argument("--base-head", action="append", default=[], metavar="CHECKPOINT",
                   help="customise the customised policy of this trained head (stacking): it stays frozen "
                        "and only the new head trains; the heads it was itself stacked on come along "
                        "(repeatable, bottom up, to name them explicitly)")


def _more_data_flags(ap):
    a = ap.add_argument_group("more data options")
    a.add_argument("--split", default="train", help="split of a hub data set")
    a.add_argument("--data-dir", default=None,
                   help="hub data sets: the folder inside the repository, e.g. harmless-base for Anthropic/hh-rlhf "
                        "(read like --split: for --data and --test-data; a local file ignores both)")
    a.add_argument("--test-fraction", type=float, default=0.2, help="share of prompts held out when splitting")
    a.add_argument("--split-seed", type=int, default=0,
                   help="seed of the split by prompt; kept apart from --seed so that runs with different seeds are "
                        "scored on the same held-out prompts")
    a.add_argument("--train-limit", type=int, default=0, help="train on the first N training pairs (0: all)")
    a.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N test pairs (0: all)")


def _devices_flags(ap):
    a = ap.add_argument_group("speed, memory and devices")
    a.add_argument("--path", default="fused", choices=["fused", "plain"],
                   help="how Q_R and log pi1 reach the loss: plain builds them over the whole vocabulary and "
                        "applies residual_q.py as written (the reference); fused gets the same numbers without "
                        "(2B, T, V) tensors and keeps the frozen outputs across epochs (support/fused_path.py)")
    a.add_argument("--cache-gb", type=float, default=4.0,
                   help="memory for keeping the frozen hidden states across epochs (0: recompute each time)")
    a.add_argument("--cache-disk-gb", type=float, default=0.0,
                   help="disk for the frozen hidden states past --cache-gb, a temporary file in --out-dir "
                        "deleted at the end (0: recompute what does not fit in memory)")
    a.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: a GPU if there is one)")
    a.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the frozen model (auto: bf16 on a GPU, float32 on a CPU)")
    a.add_argument("--device-map", default=None,
                   help="spread a frozen model too large for one GPU over all visible GPUs ('auto', via "
                        "accelerate); the head goes where the output layer is")
    a.add_argument("--trust-remote-code", action="store_true", help="allow the base model's own code (opt-in)")


def parse_args(argv=None, parser=None):
    """The flags, range-checked: a value out of range is a one-line error (exit code 2, support/cli.py)."""
    args = (parser or build_parser()).parse_args(argv)
    if args.lr is None:
        args.lr = DEFAULT_LR[args.q_head]
    cli.check(args.alpha_tilde > 0, f"--alpha-tilde must be > 0 (it divides the logits), got {args.alpha_tilde}")
    cli.check(args.alpha0 >= 0, f"--alpha0 must be >= 0 (a weight on log pi1), got {args.alpha0}")
    cli.check(0 < args.gamma <= 1, f"--gamma must be in (0, 1], got {args.gamma}")
    cli.check(args.beta >= 0, f"--beta must be >= 0, got {args.beta}")
    cli.check(args.nll >= 0, f"--nll must be >= 0, got {args.nll}")
    cli.check(args.unlikelihood >= 0, f"--unlikelihood must be >= 0, got {args.unlikelihood}")
    cli.check(args.cutoff >= 2, f"--cutoff must leave room for a prompt token and a response token (>= 2), got {args.cutoff}")
    cli.check(args.max_prompt is None or args.max_prompt >= 1, f"--max-prompt must be >= 1, got {args.max_prompt}")
    cli.check(0 < args.test_fraction < 1, f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    for flag in ("lr", "max_grad_norm"):
        cli.check(getattr(args, flag) > 0, f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    cli.check(0 <= args.warmup < 1, f"--warmup must be in [0, 1), got {args.warmup}")
    for flag in ("epochs", "batch_size", "grad_accum", "head_width", "head_layers", "head_heads", "lora_rank"):
        cli.check(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("eval_every", "save_every", "train_limit", "eval_limit", "samples", "max_steps", "cache_gb",
                 "cache_disk_gb"):
        cli.check(getattr(args, flag) >= 0, f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    cli.check(args.head_width % (2 * args.head_heads) == 0,
              f"--head-width {args.head_width} must be a multiple of 2 x --head-heads {args.head_heads} (even head size for RoPE)")
    cli.check(not (args.resume and args.overwrite), "--resume and --overwrite contradict each other")
    cli.check(not (args.q_head == "lora" and args.device_map), "--device-map is not supported with --q-head lora")
    return args


# ------------------------------------------------------------------------------------------------
# the loss of a batch


class Scores(NamedTuple):
    """What the loss and evaluation read, per response token of the 2B rows (chosen first)."""
    q_sa: torch.Tensor  # (2B, T-1) Q_R(s_t, a_t)
    v: torch.Tensor  # (2B, T) V(s_t)
    logp1_sa: torch.Tensor  # (2B, T-1) log pi1(a_t | s_t)
    kl: torch.Tensor | None  # (2B, T-1) KL(pi~ ‖ pi1) at s_t (evaluation only)
    labels: torch.Tensor  # (2B, T) IGNORE except at the response tokens
    logp_every: torch.Tensor | None  # (2B, T-1, T-1) log pi~(a_j | s_t), every action of the row (--unlikelihood)


def scores_plain(adapter, batch, args, with_kl=False, every_action=False):
    """The paper's quantities as written: Q_R and log pi1 over the whole vocabulary, then residual_q.py."""
    labels = batch["labels"]  # (2B, T)
    q_r, logp1, *_ = adapter(batch["input_ids"], batch["attention_mask"])  # (2B, T, V) Q_R(s, ·), log pi1(·|s)
    v = soft_value(q_r, logp1, args.alpha0, args.alpha_tilde)  # (2B, T) V(s_t)
    q_sa = gather_actions(q_r, labels)  # (2B, T-1) Q_R(s_t, a_t)
    logp1_sa = gather_actions(logp1, labels)  # (2B, T-1) log pi1(a_t | s_t)
    kl = logp_every = None
    if with_kl or every_action:
        logp = customised_logprobs(q_r, logp1, args.alpha0, args.alpha_tilde)[:, :-1]  # (2B, T-1, V) log pi~(·|s_t)
    if with_kl:  # (2B, T-1) KL(pi~ ‖ pi1) at the states that take a response action
        kl = kl_divergence(logp, logp1[:, :-1]) * next_tokens(labels)[1]
    if every_action:  # (2B, T-1, T-1) log pi~(a_j | s_t): row t of log pi~ read at every action a_j
        actions, _ = next_tokens(labels)  # (2B, T-1)
        logp_every = logp.gather(-1, actions[:, None, :].expand(-1, actions.shape[1], -1))
    return Scores(q_sa, v, logp1_sa, kl, labels, logp_every)


def scores(adapter, batch, keys, cache, args, with_kl=False, every_action=False):
    """--path plain: scores_plain. --path fused: the same numbers on the scored window alone (labels
    then describe the window), from cached frozen outputs where kept (support/fused_path.py)."""
    if args.path == "plain":
        return scores_plain(adapter, batch, args, with_kl, every_action)
    return Scores(*fused_path.pair_scores(adapter, batch, keys, cache, args.alpha0, args.alpha_tilde, with_kl,
                                          every_action))


def batch_loss(adapter, batch, keys, cache, args):
    """The loss of one batch (bt_loss.q_adapter_loss: the paper's, plus the opt-in --nll and
    --unlikelihood terms); keys name its pairs for the frozen-output cache."""
    s = scores(adapter, batch, keys, cache, args, every_action=args.unlikelihood > 0)
    return q_adapter_loss(s.q_sa, s.v, s.logp1_sa, s.labels, args.alpha0, args.alpha_tilde, args.gamma, args.beta,
                          args.nll, args.unlikelihood, s.logp_every)


@torch.no_grad()
def evaluate(adapter, test_set, cache, args, device, collate):
    """Held-out BT metrics, per-token KL(pi~‖pi1) on the responses, and two reference accuracies:
    the frozen model's own log-prob margin, and "the longer answer wins"."""
    adapter.head.eval()
    sums, n_pairs, kl_sum, kl_tokens = {}, 0, 0.0, 0
    for start in tqdm(range(0, len(test_set), args.batch_size), desc="evaluating", leave=False):
        idx = list(range(start, min(start + args.batch_size, len(test_set))))
        batch = {k: v.to(device) for k, v in collate([test_set[i] for i in idx]).items()}
        s = scores(adapter, batch, [("test", i) for i in idx], cache, args, with_kl=True)
        _, metrics = q_adapter_loss(s.q_sa, s.v, s.logp1_sa, s.labels, args.alpha0, args.alpha_tilde, args.gamma,
                                    args.beta)  # the paper's loss and TRL's metrics, without the extra terms
        _, mask = next_tokens(s.labels)  # (2B, T-1) response tokens
        kl_sum, kl_tokens = kl_sum + float(s.kl.sum()), kl_tokens + int(mask.sum())
        frozen_chosen, frozen_rejected = s.logp1_sa.sum(-1).chunk(2)  # log pi1(y|x) of each response
        len_chosen, len_rejected = mask.sum(-1).chunk(2)
        metrics["frozen_logp_accuracy"] = (frozen_chosen > frozen_rejected).float().mean()
        metrics["longer_wins_accuracy"] = longer_wins(len_chosen, len_rejected)
        for k, value in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(value) * len(idx)
        n_pairs += len(idx)
    adapter.head.train()
    return {**{f"eval/{k}": value / n_pairs for k, value in sums.items()}, "eval/kl": kl_sum / max(kl_tokens, 1)}


# ------------------------------------------------------------------------------------------------
# setting up a run


def new_head(args, base):
    """--q-head small: model.QHead; lora: model.LoraHead, LoRA on the --lora-modules layers of the base."""
    if args.q_head == "small":
        return M.QHead(M.head_config_for(base, args.head_width, args.head_layers, args.head_heads))
    targets = tuple(t.strip() for t in args.lora_modules.split(",") if t.strip())
    names = {name.rsplit(".", 1)[-1] for name, _ in base.get_decoder().named_modules()}
    cli.check(targets and all(t in names for t in targets),
              f"--lora-modules: no layer named {[t for t in targets if t not in names] or args.lora_modules!r} in "
              f"{args.base_model} (linear layers are named e.g. q_proj, k_proj, v_proj, o_proj)")
    return M.LoraHead(base, M.LoraHeadConfig(base.config.hidden_size, args.lora_rank, targets, 2.0 * args.lora_rank))


def build_model(args, device, dtype, tok, world):
    """(adapter, trained): the frozen base with a new head on the chain it is stacked on; trained is
    what the loss runs through (with several processes, the head wrapped in DDP)."""
    args.chain = loading.chain_of(args.base_head, args.base_model)  # stacked on these frozen heads (none: on pi1)
    base, _ = loading.load_base(args.base_model, device, dtype, args.trust_remote_code, args.device_map, tokenizer=tok)
    device = base.get_output_embeddings().weight.device  # where the head lives (not `device` with --device-map)
    head = new_head(args, base).to(device)
    below = loading.load_chain(args.chain, args.base_model, device)
    alphas = dict(alpha0=args.alpha0, alpha_tilde=args.alpha_tilde)  # what decoding the trained head uses
    adapter = M.QAdapter(base, head, below, **alphas)  # evaluation, sampling and checkpoints use the head itself
    n_head, n_base = M.head_parameter_count(head), sum(p.numel() for p in base.parameters())
    kind = f"LoRA r={args.lora_rank} on {args.lora_modules}" if args.q_head == "lora" else "head"
    print(f"{kind}: {n_head / 1e6:.2f}M trainable parameters, {100 * n_head / n_base:.2f}% of the "
          f"frozen {n_base / 1e6:.0f}M" + (f"; stacked on {len(below)} frozen head(s)" if below else ""))
    return adapter, adapter if world == 1 else M.QAdapter(base, DDP(head), below, **alphas)


def setup(args):
    """Everything a run needs before its first step."""
    run = SimpleNamespace(args=args, t_start=time.time(), out_dir=Path(args.out_dir))
    run.rank, run.world, device = distributed.start_processes(args.device)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    run_state.check_out_dir(run.out_dir, args)
    device, dtype, why = loading.pick_device(device, args.dtype)
    print(why + (f"; {run.world} processes" if run.world > 1 else ""))
    run.tok = loading.load_tokenizer(args.base_model, args.trust_remote_code)
    run.train_set, run.test_set, test_pairs = data.train_and_test_sets(args, run.tok)
    cli.check(len(run.train_set) >= run.world, f"{len(run.train_set)} training pairs cannot be shared by {run.world} processes")
    run.adapter, run.trained = build_model(args, device, dtype, run.tok, run.world)
    run.device = run.adapter.out_weight.device
    run.collate = lambda examples: data.collate(examples, run.tok.pad_token_id)
    run.cache = FrozenCache(args.cache_gb, args.cache_disk_gb, run.out_dir)
    batches_per_epoch = len(distributed.global_batches(len(run.train_set), args, run.world, 0))
    run.total_steps = args.epochs * math.ceil(batches_per_epoch / args.grad_accum)
    warmup = max(1, int(args.warmup * run.total_steps))
    run.optimizer = torch.optim.AdamW([p for p in run.adapter.head.parameters() if p.requires_grad], lr=args.lr,
                                      weight_decay=args.weight_decay)
    schedule = lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / run.total_steps, 1.0))))  # noqa: E731
    run.scheduler = torch.optim.lr_scheduler.LambdaLR(run.optimizer, schedule)
    run.progress = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    if args.resume:
        run.progress = run_state.load_trainer_state(run.out_dir, run.adapter, run.optimizer, run.scheduler, args, run.world)
        print(f"resumed at step {run.progress['step']} (epoch {run.progress['epoch']}, batch {run.progress['batch_in_epoch']})")
    run.main_process, run.metrics_path = run.rank == 0, run.out_dir / "metrics.jsonl"
    if run.main_process:
        run.out_dir.mkdir(parents=True, exist_ok=True)
        run_state.write_atomic(run.metrics_path, run_state.records_until(run.metrics_path, run.progress["step"])
                               if args.resume else "")
    run.shown = [p.prompt for p in test_pairs[:args.samples]] if run.main_process else []
    return run


# ------------------------------------------------------------------------------------------------
# one optimiser step, and the loop


def train_step(run, group, where):
    """One optimiser step over the global batches of `group` (grad_accum of them): each process
    takes its share of each, and every pair counts the same. Returns the step's metrics."""
    args, n_step, sums = run.args, sum(len(g) for g in group), {}
    for j, global_batch in enumerate(group):
        idx = distributed.my_share(global_batch, run.rank, run.world)
        if run.world > 1:  # average the gradients over the processes once, after the last part
            run.trained.head.require_backward_grad_sync = j == len(group) - 1
        batch = {k: v.to(run.device) for k, v in run.collate([run.train_set[i] for i in idx]).items()}
        loss, metrics = batch_loss(run.trained, batch, [("train", i) for i in idx], run.cache, args)
        weight = len(idx) / n_step
        (loss * weight * run.world).backward()  # DDP divides by world when it averages
        for k, v in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(v) * weight
    sums = distributed.all_reduce_sum(sums, run.world)
    grad_norm = torch.nn.utils.clip_grad_norm_(run.adapter.head.parameters(), args.max_grad_norm)
    if not (math.isfinite(sums["loss"]) and torch.isfinite(grad_norm)):
        kept = (f"{run.out_dir / 'checkpoint'} (step {run.saved_step}) is kept" if run.saved_step
                else "no checkpoint was saved yet")
        raise cli.Stopped(f"error: the loss is {sums['loss']} and the gradient norm {float(grad_norm)} at {where}: "
                          f"stopped without saving; {kept}. Try a lower --lr or a larger --beta")
    run.optimizer.step()
    run.scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    return {**sums, "grad_norm": float(grad_norm), "lr": run.scheduler.get_last_lr()[0]}


def evaluate_and_save(run, step, evaluate_too=True):
    """Rank 0 evaluates (when asked), writes the record and saves a checkpoint; the others wait."""
    record = None
    if run.main_process:
        if evaluate_too:
            record = {"step": step, **evaluate(run.adapter, run.test_set, run.cache, run.args, run.device, run.collate)}
            run_state.append_jsonl(run.metrics_path, record)
            tqdm.write(f"step {step}: held-out accuracy {record['eval/rewards/accuracies']:.3f}, "
                       f"margin {record['eval/rewards/margins']:.3f}, KL {record['eval/kl']:.4f}")
        run_state.save_checkpoint(run.out_dir, run.adapter, run.optimizer, run.scheduler, run.progress, run.args, run.world)
    distributed.barrier(run.world)
    run.saved_step = step
    return record


def train(run):
    """Epochs of shuffled batches, an optimiser step per --grad-accum batches; evaluates and saves on
    schedule; on Ctrl-C / SIGTERM / SIGHUP saves and exits; stops at --max-steps. Returns the last
    evaluation. A step out of GPU memory, or a checkpoint that cannot be written, stops with one line."""
    args, step = run.args, run.progress["step"]
    run.saved_step, evaluated_step, record = step, None, None
    run.adapter.head.train()
    bar = tqdm(total=run.total_steps, initial=step, desc="training", disable=not run.main_process)
    with bar, run_state.StopSignals() as stop:  # the bar ends its line before any last line is printed
        for epoch in range(run.progress["epoch"], args.epochs):
            batches = distributed.global_batches(len(run.train_set), args, run.world, epoch)
            start = run.progress["batch_in_epoch"] if epoch == run.progress["epoch"] else 0
            for b in range(start, len(batches), args.grad_accum):
                t0, group = time.time(), batches[b:b + args.grad_accum]
                where = f"step {step + 1} (epoch {epoch}, batches {b}-{b + len(group) - 1})"
                try:
                    metrics = train_step(run, group, where)
                except torch.cuda.OutOfMemoryError:
                    raise run_state.out_of_memory(where, args, run.out_dir) from None
                step += 1
                if run.main_process:
                    run_state.append_jsonl(run.metrics_path, {"step": step, "epoch": epoch, **metrics, "pairs_per_s":
                                                              sum(len(g) for g in group) / (time.time() - t0)})
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics['rewards/accuracies']:.2f}")
                end_of_epoch = b + args.grad_accum >= len(batches)
                run.progress = {"step": step, "epoch": epoch + end_of_epoch,
                                "batch_in_epoch": 0 if end_of_epoch else b + args.grad_accum}
                if (args.eval_every and step % args.eval_every == 0) or (not args.eval_every and end_of_epoch):
                    record, evaluated_step = evaluate_and_save(run, step), step
                elif args.save_every and step % args.save_every == 0:
                    evaluate_and_save(run, step, evaluate_too=False)
                if distributed.all_reduce_sum({"code": stop.code}, run.world)["code"] > 0:  # all stop together
                    if run.saved_step != step:
                        evaluate_and_save(run, step, evaluate_too=False)
                    bar.close()
                    print(f"stopped at step {step}: checkpoint saved in {run.out_dir / 'checkpoint'}; "
                          f"continue with --resume", file=sys.stderr)
                    raise SystemExit(stop.code or cli.TERMINATED)
                if step == args.max_steps:
                    break
            if step == args.max_steps:
                break
    return record if evaluated_step == step else evaluate_and_save(run, step)


def main(argv=None):
    run = setup(parse_args(argv))
    opts = dict(alpha0=run.args.alpha0, alpha_tilde=run.args.alpha_tilde, max_new_tokens=run.args.max_new_tokens,
                path=run.args.path)
    before = generate(run.adapter, run.tok, run.shown, frozen_only=True, **opts) if run.shown else []
    record = train(run)
    distributed.finish(run.world)
    if not run.main_process:
        return None
    after = generate(run.adapter, run.tok, run.shown, **opts) if run.shown else []
    return run_state.report(run, record, before, after)


if __name__ == "__main__":
    cli.run(main)
