"""Train a Q-head: customise a frozen LLM to a new preference (Q-Adapter, arXiv 2407.03856).

Per batch of preference pairs: the frozen model gives its hidden states (no gradients), the head
reads them, and QAdapter.scores (model.py) gives Q_R(s,a), log pi1(a|s) and V(s) at the states
that take a response action; the derived per-token reward r2 and the returns R come from
residual_q.py, the Bradley–Terry loss from bt_loss.py. Only the head is trained. Evaluation uses
the whole Q_R and log pi1 vectors (model.QAdapter.forward) for the KL to the frozen model.

    python train.py                                   # the embedded demo: SmolLM2-135M, concise answers, CPU
    python train.py --base-model meta-llama/Llama-3.1-8B-Instruct \\
        --data dsp_academy_pairs.jsonl --test-data "" --cutoff 512 \\
        --batch-size 8 --grad-accum 8 --head-width 1024 --lr 3e-4 --out-dir runs/dsp-academy   # one GPU, bf16
    python train.py --out-dir runs/demo --resume      # continue from runs/demo/checkpoint
    torchrun --standalone --nproc_per_node 4 train.py --batch-size 4 ...      # 4 GPUs, data parallel
    python train.py --base-model meta-llama/Llama-3.1-70B-Instruct --device-map auto ...   # frozen model over all GPUs

Writes to --out-dir: metrics.jsonl (one JSON record per step and per evaluation), summary.json, and
checkpoint/ (head.safetensors, config.json, trainer_state.pt), replaced atomically at each save.

Stopping and resuming: Ctrl-C or SIGTERM finishes the current step, saves a checkpoint and exits
(130 / 143); `--resume` then continues exactly where the uninterrupted run would have been (head,
optimizer, schedule, data order and RNG restored), and so it does from the last checkpoint after a
kill -9 (`--save-every N` saves more often than `--eval-every`). A loss or gradient that is not
finite stops the run (exit 1) without saving over the last good checkpoint. Bad flags, files and
checkpoints give one line and exit code 2 (cli.py).

Several processes (torchrun): each holds the whole frozen model and a copy of the head, whose
gradients DistributedDataParallel averages (gloo on CPUs, NCCL on GPUs). --batch-size is per
process: an optimiser step sees batch-size x grad-accum x processes pairs, and gives what one
process with that batch gives. Only rank 0 prints, evaluates, writes metrics and checkpoints.
"""
import os

if int(os.environ.get("RANK", "0")) > 0:  # under torchrun only rank 0 draws progress bars (tqdm reads this on import)
    os.environ["TQDM_DISABLE"] = "1"

import argparse
import json
import math
import random
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

import cli
import data
import model as M
from bt_loss import bt_loss
from residual_q import IGNORE, derived_reward, next_tokens, scored_states
from sample import generate

HERE = Path(__file__).resolve().parent


def build_parser(description=__doc__):
    """The flags of train.py; baselines.py adds its own to the same parser."""
    ap = cli.Parser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    a = ap.add_argument_group("model")
    a.add_argument("--base-model", default=M.EMBEDDED,
                   help=f"frozen model pi1: a Hugging Face hub name or local path ({M.EMBEDDED}: the embedded default)")
    a.add_argument("--head-width", type=int, default=256, help="width of the Q-head's transformer")
    a.add_argument("--head-layers", type=int, default=2, help="layers of the Q-head's transformer")
    a.add_argument("--head-heads", type=int, default=4, help="attention heads of the Q-head")
    a.add_argument("--trust-remote-code", action="store_true", help="allow the base model's own code (opt-in)")
    a.add_argument("--base-head", action="append", default=[], metavar="CHECKPOINT",
                   help="customise the customised policy of this trained head (stacking): it stays frozen "
                        "and only the new head trains; the heads it was itself stacked on come along "
                        "(repeatable, bottom up, to name them explicitly)")
    a = ap.add_argument_group("residual Q-learning")
    a.add_argument("--alpha0", type=float, default=1.0,
                   help="α0 = λ·α1, weight of the frozen model's log pi1 in the customised policy; with a "
                        "zero head and α0 = α̃ the customised policy is the frozen one (the official code uses 0.01 "
                        "with a head initialised to the base logits)")
    a.add_argument("--alpha-tilde", type=float, default=1.0, help="α̃, temperature of the customised policy")
    a.add_argument("--gamma", type=float, default=1.0, help="γ, discount in r2 = Q_R − γ·V(s')")
    a.add_argument("--beta", type=float, default=0.01,
                   help="β, weight of the mean r2² regulariser (0: off; the official code uses 0.1)")
    a = ap.add_argument_group("data")
    a.add_argument("--data", default=str(HERE / "demo" / "concise_train.jsonl"),
                   help="preference pairs: .jsonl/.json/.parquet file or a hub data set name")
    a.add_argument("--test-data", default=str(HERE / "demo" / "concise_test.jsonl"),
                   help="held-out pairs; '' splits --data by prompt instead")
    a.add_argument("--split", default="train", help="split of a hub data set")
    a.add_argument("--test-fraction", type=float, default=0.2, help="share of prompts held out when splitting")
    a.add_argument("--cutoff", type=int, default=256, help="tokens per sequence at most (prompt + response)")
    a.add_argument("--max-prompt", type=int, default=None, help="prompt tokens kept at most, its end (default cutoff/2)")
    a = ap.add_argument_group("optimisation")
    a.add_argument("--lr", type=float, default=2e-3, help="peak learning rate (AdamW), linear warm-up then cosine")
    a.add_argument("--warmup", type=float, default=0.05, help="share of the steps spent warming up")
    a.add_argument("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a.add_argument("--epochs", type=int, default=1, help="passes over the training pairs")
    a.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass")
    a.add_argument("--grad-accum", type=int, default=1, help="forward passes per optimiser step")
    a.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping")
    a.add_argument("--cache-gb", type=float, default=4.0,
                   help="memory for keeping the frozen hidden states across epochs (0: recompute each time)")
    a.add_argument("--cache-disk-gb", type=float, default=0.0,
                   help="disk for the frozen hidden states past --cache-gb, a temporary file in --out-dir "
                        "deleted at the end (0: recompute what does not fit in memory)")
    a.add_argument("--seed", type=int, default=0, help="seed of the head's init, the split and the data order")
    a = ap.add_argument_group("run")
    a.add_argument("--out-dir", default="runs/demo", help="metrics, summary and checkpoint go here")
    a.add_argument("--eval-every", type=int, default=0, help="evaluate and save every N steps (0: each epoch)")
    a.add_argument("--save-every", type=int, default=0,
                   help="also save a checkpoint every N steps, without evaluating (0: only when evaluating)")
    a.add_argument("--train-limit", type=int, default=0, help="train on the first N training pairs (0: all)")
    a.add_argument("--eval-limit", type=int, default=0, help="evaluate on the first N test pairs (0: all)")
    a.add_argument("--samples", type=int, default=3, help="test prompts shown before/after training")
    a.add_argument("--max-new-tokens", type=int, default=96, help="tokens per shown sample at most")
    a.add_argument("--resume", action="store_true", help="continue from --out-dir/checkpoint")
    a.add_argument("--overwrite", action="store_true",
                   help="start again in an --out-dir that already holds a run (its checkpoint is replaced)")
    a.add_argument("--max-steps", type=int, default=0,
                   help="stop (with a checkpoint) after this many steps, schedule unchanged; --resume continues")
    a.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: a GPU if there is one)")
    a.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="dtype of the frozen model (auto: bf16 on a GPU, float32 on a CPU)")
    a.add_argument("--device-map", default=None,
                   help="spread a frozen model too large for one GPU over all visible GPUs ('auto', via "
                        "accelerate); the head goes where the output layer is")
    return ap


def parse_args(argv=None, parser=None):
    """The flags, range-checked: a value out of range is a one-line error (exit code 2, cli.py)."""
    args = (parser or build_parser()).parse_args(argv)
    cli.check(args.alpha_tilde > 0, f"--alpha-tilde must be > 0 (it divides the logits), got {args.alpha_tilde}")
    cli.check(args.alpha0 >= 0, f"--alpha0 must be >= 0 (a weight on log pi1), got {args.alpha0}")
    cli.check(0 < args.gamma <= 1, f"--gamma must be in (0, 1], got {args.gamma}")
    cli.check(args.beta >= 0, f"--beta must be >= 0, got {args.beta}")
    cli.check(args.cutoff >= 2, f"--cutoff must leave room for a prompt token and a response token (>= 2), got {args.cutoff}")
    cli.check(args.max_prompt is None or args.max_prompt >= 1, f"--max-prompt must be >= 1, got {args.max_prompt}")
    cli.check(0 < args.test_fraction < 1, f"--test-fraction must be in (0, 1), got {args.test_fraction}")
    cli.check(args.lr > 0, f"--lr must be > 0, got {args.lr}")
    cli.check(0 <= args.warmup < 1, f"--warmup must be in [0, 1), got {args.warmup}")
    cli.check(args.max_grad_norm > 0, f"--max-grad-norm must be > 0, got {args.max_grad_norm}")
    cli.check(args.cache_gb >= 0, f"--cache-gb must be >= 0, got {args.cache_gb}")
    cli.check(args.cache_disk_gb >= 0, f"--cache-disk-gb must be >= 0, got {args.cache_disk_gb}")
    for flag in ("epochs", "batch_size", "grad_accum", "head_width", "head_layers", "head_heads"):
        cli.check(getattr(args, flag) >= 1, f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    for flag in ("eval_every", "save_every", "train_limit", "eval_limit", "samples", "max_steps"):
        cli.check(getattr(args, flag) >= 0, f"--{flag.replace('_', '-')} must be >= 0, got {getattr(args, flag)}")
    cli.check(args.head_width % (2 * args.head_heads) == 0,
              f"--head-width {args.head_width} must be a multiple of 2 x --head-heads {args.head_heads} (even head size for RoPE)")
    cli.check(not (args.resume and args.overwrite), "--resume and --overwrite contradict each other")
    return args


# ------------------------------------------------------------------------------------------------
# the frozen model's hidden states, kept across epochs


class FrozenCache:
    """The frozen model's outputs per sequence, kept after their first computation: its hidden
    states h (T, D) and log Z1 at the scored states, what the head and the loss read from it. A
    later epoch or evaluation then skips the frozen forward and the log Z1 projection, the
    costliest part of a step. Kept in memory up to budget_gb, then on disk up to disk_gb (one
    temporary file in disk_dir, deleted when the run ends); a sequence kept nowhere is recomputed.
    Both keep the exact bits: the frozen model never changes, so what is read back is what a
    recomputation of the same batch gives (tests/test_speed_paths.py)."""

    def __init__(self, budget_gb, disk_gb=0.0, disk_dir=None):
        self.budget, self.used, self.store = budget_gb * 2**30, 0, {}
        self.disk_budget, self.disk_used, self.disk_dir, self.file = disk_gb * 2**30, 0, disk_dir, None

    def get(self, keys, mask, width):
        """keys: one per row; mask: (N, T). Right-padded hidden (N, T, D) and logz1 (N, W), each
        None when a row has none kept."""
        rows = [self.store.get(k) for k in keys]
        if any(r is None for r in rows):
            return None, None
        rows = [(self._read(h), self._read(z)) for h, z in rows]
        hidden = rows[0][0].new_zeros(len(rows), mask.shape[1], rows[0][0].shape[-1])  # (N, T, D)
        for i, (h, _) in enumerate(rows):
            hidden[i, :len(h)] = h
        if any(z is None for _, z in rows):
            return hidden, None
        logz1 = hidden.new_zeros(len(rows), width, dtype=torch.float32)  # (N, W)
        for i, (_, z) in enumerate(rows):
            logz1[i, :len(z)] = z
        return hidden, logz1

    def put(self, keys, hidden, mask, logz1=None, window_labels=None):
        lengths = mask.sum(-1).tolist()
        widths = [None] * len(keys) if logz1 is None else ((window_labels != IGNORE).sum(-1) + 1).tolist()
        for i, (k, n, w) in enumerate(zip(keys, lengths, widths)):
            if k in self.store:
                continue
            entry = (hidden[i, :n], None if logz1 is None else logz1[i, :w])  # (n, D), (w,)
            size = sum(x.nbytes for x in entry if x is not None)
            if self.used + size <= self.budget:
                self.store[k] = tuple(None if x is None else x.clone() for x in entry)
                self.used += size
            elif self.disk_used + size <= self.disk_budget:
                self.store[k] = tuple(self._write(x) for x in entry)
                self.disk_used += size

    def _write(self, x):
        """Appends x's bytes to the cache file; returns where to find them: (offset, shape, dtype, device)."""
        if x is None:
            return None
        if self.file is None:
            self.file = tempfile.TemporaryFile(prefix="frozen-cache-", dir=self.disk_dir)  # gone when closed
        offset = self.file.seek(0, os.SEEK_END)
        self.file.write(x.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy())
        return offset, x.shape, x.dtype, x.device

    def _read(self, x):
        """A kept tensor, from memory or from the cache file, on the device it came from."""
        if not isinstance(x, tuple):
            return x
        offset, shape, dtype, device = x
        buffer = bytearray(shape.numel() * dtype.itemsize)
        self.file.seek(offset)
        self.file.readinto(buffer)
        return torch.frombuffer(buffer, dtype=torch.uint8).view(dtype).view(shape).to(device)


# ------------------------------------------------------------------------------------------------
# one batch through the model and the loss


def frozen_hidden(adapter, ids, mask, width):
    """The frozen hidden states of right-padded rows, run without the columns that are padding in
    every row (chosen answers are often much shorter than rejected ones), padded back to width."""
    n = int(mask.sum(-1).max())
    hidden, _ = adapter.hidden(ids[:, :n], mask[:, :n], M.positions(mask[:, :n]))  # (B, n, D)
    hidden = hidden.masked_fill(mask[:, :n, None] == 0, 0)  # padding reads as zeros, as FrozenCache.get gives it
    return torch.nn.functional.pad(hidden, (0, 0, 0, width - n))


def action_window(labels):
    """labels (2B, T) -> (states, window_labels, actions, valid), each (2B, W): the scored window
    (residual_q.scored_states), the action a_t taken in each state (0 in the last, which takes
    none), and which states take one (the window minus its padding and the terminal state)."""
    states, window_labels = scored_states(labels)  # (2B, W) each
    actions, _ = next_tokens(window_labels)  # (2B, W-1) a_t of each state
    actions = torch.cat([actions, torch.zeros_like(actions[:, :1])], dim=1)  # (2B, W)
    valid = torch.arange(states.shape[1], device=labels.device) < (window_labels != IGNORE).sum(-1, keepdim=True)
    return states, window_labels, actions, valid


def pair_scores(adapter, batch, keys, cache, args, device):
    """batch: data.collate output (2B sequences, chosen first); keys name its pairs for the cache.
    Q_R(s, a), log pi1(a|s) and V(s) at the states that take a response action (QAdapter.scores:
    no (2B, W, V) tensor), with the frozen outputs read from the cache or computed and kept.
    Returns (q_sa, logp1_sa, v, valid) (2B, W) each, window_labels (2B, W), and the hidden states."""
    ids, mask, labels = (batch[k].to(device) for k in ("input_ids", "attention_mask", "labels"))
    rows = [(k, "chosen") for k in keys] + [(k, "rejected") for k in keys]
    states, window_labels, actions, valid = action_window(labels)  # (2B, W) each
    hidden, logz1 = cache.get(rows, mask, states.shape[1])
    if hidden is None:  # the chosen and the rejected rows separately, each cut to its own length
        hidden = torch.cat([frozen_hidden(adapter, i, m, mask.shape[1])
                            for i, m in zip(ids.chunk(2), mask.chunk(2))])  # (2B, T, D)
    q_sa, logp1_sa, v, hidden, logz1 = adapter.scores(ids, mask, states, actions, valid, args.alpha0,
                                                      args.alpha_tilde, hidden, logz1)  # (2B, W) each
    cache.put(rows, hidden, mask, logz1, window_labels)
    return q_sa, logp1_sa, v, valid, window_labels, hidden


def batch_loss(adapter, batch, keys, cache, args, device):
    """The Bradley-Terry loss of one batch (see pair_scores). Returns (loss, metrics)."""
    q_sa, _, v, _, window_labels, _ = pair_scores(adapter, batch, keys, cache, args, device)
    r2 = derived_reward(q_sa[:, :-1], v, window_labels, args.gamma)  # (2B, W-1)
    return bt_loss(r2, window_labels, args.beta)


@torch.no_grad()
def evaluate(adapter, test_set, cache, args, device, collate):
    """Held-out BT metrics, per-token KL(pi~‖pi1) on the responses, and two reference accuracies:
    the frozen model's own log-prob margin, and "the longer answer wins". Like training, it never
    builds a (2B, W, V) tensor: the KL goes through the vocabulary a chunk of states at a time."""
    adapter.head.eval()
    sums, n_pairs, kl_sum, kl_tokens = {}, 0, 0.0, 0
    for start in tqdm(range(0, len(test_set), args.batch_size), desc="evaluating", leave=False):
        idx = list(range(start, min(start + args.batch_size, len(test_set))))
        batch = collate([test_set[i] for i in idx])
        q_sa, logp1_sa, v, valid, labels, hidden = pair_scores(adapter, batch, [("test", i) for i in idx],
                                                               cache, args, device)  # (2B, W) each
        r2 = derived_reward(q_sa[:, :-1], v, labels, args.gamma)  # (2B, W-1)
        _, metrics = bt_loss(r2, labels, args.beta)
        B = len(idx)
        states, *_ = action_window(batch["labels"].to(device))  # (2B, W)
        x_tilde, x1 = adapter.directions(hidden, batch["attention_mask"].to(device), states, valid,
                                         args.alpha0, args.alpha_tilde)  # (N, D) each
        kl_sum += float(M.projected_kl(x_tilde, x1, adapter.out_weight).sum())
        kl_tokens += int(valid.sum())
        frozen_chosen, frozen_rejected = (logp1_sa * valid).sum(-1).chunk(2)  # log pi1(y|x) of each response
        len_chosen, len_rejected = valid.sum(-1).chunk(2)
        metrics["frozen_logp_accuracy"] = (frozen_chosen > frozen_rejected).float().mean()
        metrics["longer_wins_accuracy"] = ((len_chosen > len_rejected).float()
                                           + 0.5 * (len_chosen == len_rejected).float()).mean()
        for k, value in metrics.items():
            sums[k] = sums.get(k, 0.0) + float(value) * B
        n_pairs += B
    adapter.head.train()
    out = {f"eval/{k}": value / n_pairs for k, value in sums.items()}
    out["eval/kl"] = kl_sum / max(kl_tokens, 1)
    return out


# ------------------------------------------------------------------------------------------------
# checkpoints: written to a temporary folder, then swapped in, so a crash (even kill -9) never
# leaves half of one; weights as safetensors, the optimizer's tensors loaded with weights_only=True

# flags a resumed run must share with the checkpoint: the model's shape, and the data order
RESUME_MUST_MATCH = ("base_model", "base_heads", "head_width", "head_layers", "head_heads", "batch_size",
                     "grad_accum", "seed", "world_size")


def save_checkpoint(out_dir, adapter, optimizer, scheduler, progress, args, world):
    final, tmp, old = out_dir / "checkpoint", out_dir / ".checkpoint-tmp", out_dir / ".checkpoint-old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"base_model": args.base_model, "base_vocab_size": adapter.out_weight.shape[0], "world_size": world,
            "base_heads": args.chain,  # the heads this one is stacked on (model.chain_of)
            **{k: getattr(args, k) for k in
               ("alpha0", "alpha_tilde", "gamma", "beta", "cutoff", "max_prompt", "lr", "epochs", "batch_size",
                "grad_accum", "seed", "head_width", "head_layers", "head_heads", "data", "test_data", "split",
                "test_fraction", "train_limit", "eval_limit")}, **progress}
    M.save_adapter(tmp, adapter.head, meta)
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), **progress}, tmp / "trainer_state.pt")
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)  # the moment the new checkpoint becomes the checkpoint
    shutil.rmtree(old, ignore_errors=True)


def load_trainer_state(out_dir, adapter, optimizer, scheduler, args, world):
    ckpt = out_dir / "checkpoint"
    if not ckpt.exists() and (out_dir / ".checkpoint-old").exists():  # killed between the two renames
        os.replace(out_dir / ".checkpoint-old", ckpt)
    if not (ckpt / "trainer_state.pt").exists():
        raise SystemExit(f"error: --resume: no checkpoint in {ckpt}")
    try:
        config = json.loads((ckpt / M.CONFIG_FILE).read_text())
    except (OSError, ValueError):
        config = {}  # load_adapter below says what is wrong with it
    ours = {**vars(args), "world_size": world, "base_heads": args.chain}
    for key in RESUME_MUST_MATCH:  # checked first: another base model is named, not found by its shapes
        if key in config and config[key] != ours[key]:
            flag = {"world_size": "processes", "base_heads": "--base-head"}.get(key, "--" + key.replace("_", "-"))
            raise SystemExit(f"error: --resume: {ckpt} was trained with {flag} {config[key]}, not {ours[key]}")
    saved, _, _ = M.load_adapter(ckpt, base=adapter.base)  # safetensors only, with clear errors
    adapter.head.load_state_dict(saved.head.state_dict())
    try:
        state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        return {k: state[k] for k in ("step", "epoch", "batch_in_epoch")}
    except Exception as e:  # a truncated or foreign file; torch's messages run to many lines
        raise SystemExit(f"error: {ckpt / 'trainer_state.pt'}: unreadable ({str(e).splitlines()[0][:200]})")


def check_out_dir(out_dir, args):
    """A new run never overwrites an old one by accident."""
    if args.resume or args.overwrite:
        return
    if (out_dir / "checkpoint").exists() or (out_dir / "metrics.jsonl").exists():
        raise SystemExit(f"error: {out_dir} already holds a run: --resume continues it, --overwrite starts again")


def write_atomic(path, text):
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def records_until(path, step):
    """The metrics.jsonl records up to `step`, as lines; a last line cut short by a kill is dropped."""
    kept = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line)
        except (ValueError, KeyError, TypeError):
            continue
    return "".join(line + "\n" for line in kept)


def append_jsonl(path, record):
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


# ------------------------------------------------------------------------------------------------
# stopping: Ctrl-C and SIGTERM finish the step and save; a loss that is not finite saves nothing


class StopSignals:
    """While active, SIGINT (Ctrl-C) and SIGTERM (a scheduler's pre-emption, torchrun passing one
    on) only set `code`; the training loop checks it after each step, saves a checkpoint and exits
    with 130 or 143. A second signal stops at once (KeyboardInterrupt)."""

    def __enter__(self):
        self.code, self.previous = 0, {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
        for s in self.previous:
            signal.signal(s, self.handler)
        return self

    def handler(self, signum, frame):
        if self.code:
            raise KeyboardInterrupt
        self.code = cli.INTERRUPTED if signum == signal.SIGINT else cli.TERMINATED
        tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint after this step (again: stop at once)")

    def __exit__(self, *exc):
        for s, h in self.previous.items():
            signal.signal(s, h)


class NotFinite(Exception):
    """The loss or the gradient became NaN or infinite."""


# ------------------------------------------------------------------------------------------------
# more than one process: `torchrun --nproc_per_node N train.py ...` (see the module docstring)


def start_processes(device):
    """(rank, world size, device) of this process. torchrun sets RANK, WORLD_SIZE and LOCAL_RANK;
    each process holds the whole frozen model and a copy of the head, whose gradients DDP averages."""
    if "RANK" not in os.environ:
        return 0, 1, device
    use_gpu = torch.cuda.is_available() and device != "cpu"
    dist.init_process_group("nccl" if use_gpu else "gloo")
    if use_gpu:
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    if dist.get_rank() > 0:
        sys.stdout = open(os.devnull, "w")  # only rank 0 prints, writes metrics and saves
    return dist.get_rank(), dist.get_world_size(), f"cuda:{os.environ['LOCAL_RANK']}" if use_gpu else "cpu"


def global_batches(n_pairs, args, world, epoch):
    """The epoch's batches of pair indices, batch_size x world pairs each, in an order fixed by the
    seed and the epoch (so a resumed run sees what the uninterrupted one would). Each process takes
    its share of every batch (`my_share`); a last batch with fewer pairs than processes is dropped."""
    order = torch.randperm(n_pairs, generator=torch.Generator().manual_seed(args.seed * 1000 + epoch))
    size = args.batch_size * world
    batches = [order[i:i + size] for i in range(0, n_pairs, size)]
    if world > 1 and len(batches[-1]) < world:
        batches.pop()
    return batches


def my_share(batch, rank, world):
    return batch.tensor_split(world)[rank].tolist()


def all_reduce_sum(values, world):
    """{name: float} summed over the processes (a no-op with one)."""
    if world == 1:
        return values
    t = torch.tensor(list(values.values()), dtype=torch.float64)
    dist.all_reduce(t)
    return dict(zip(values, t.tolist()))


# ------------------------------------------------------------------------------------------------


def main(argv=None):
    args = parse_args(argv)
    t_start = time.time()
    rank, world, device = start_processes(args.device)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    out_dir = Path(args.out_dir)
    check_out_dir(out_dir, args)
    device, dtype, why = M.pick_device(device, args.dtype)
    print(why + (f"; {world} processes" if world > 1 else ""))

    # data: read and tokenise before loading the model, so a bad file fails fast (and before
    # anything is written)
    tok = M.load_tokenizer(args.base_model, args.trust_remote_code)
    try:
        train_pairs = data.load_pairs(args.data, args.split)
        if args.test_data:
            test_pairs = data.load_pairs(args.test_data, args.split)
        else:
            train_pairs, test_pairs = data.split_by_prompt(train_pairs, args.test_fraction, args.seed)
        train_pairs, test_pairs = train_pairs[:args.train_limit or None], test_pairs[:args.eval_limit or None]
        train_set = data.PairDataset(tok, train_pairs, args.cutoff, args.max_prompt)
        test_set = data.PairDataset(tok, test_pairs, args.cutoff, args.max_prompt)
    except data.DataError as e:
        raise SystemExit(f"error: {e}")
    print(f"{len(train_set)} training pairs, {len(test_set)} test pairs")
    cli.check(len(train_set) >= world, f"{len(train_set)} training pairs cannot be shared by {world} processes")
    args.chain = M.chain_of(args.base_head, args.base_model)  # stacked on these frozen heads (none: on pi1)

    base, _ = M.load_base(args.base_model, device, dtype, args.trust_remote_code, args.device_map, tokenizer=tok)
    device = base.get_output_embeddings().weight.device  # where the head lives (not `device` with --device-map)
    head = M.QHead(M.head_config_for(base, args.head_width, args.head_layers, args.head_heads)).to(device)
    below = M.load_chain(args.chain, args.base_model, device)
    adapter = M.QAdapter(base, head, below)  # evaluation, sampling and checkpoints use the head itself
    trained = adapter if world == 1 else M.QAdapter(base, DDP(head), below)  # gradients averaged over processes
    n_head, n_base = M.head_parameter_count(head), sum(p.numel() for p in base.parameters())
    print(f"head: {n_head / 1e6:.2f}M trainable parameters, {100 * n_head / n_base:.2f}% of the "
          f"frozen {n_base / 1e6:.0f}M" + (f"; stacked on {len(below)} frozen head(s)" if below else ""))

    collate = lambda examples: data.collate(examples, tok.pad_token_id)  # noqa: E731
    cache = FrozenCache(args.cache_gb, args.cache_disk_gb, out_dir)
    batches_per_epoch = len(global_batches(len(train_set), args, world, 0))
    total_steps = args.epochs * math.ceil(batches_per_epoch / args.grad_accum)
    warmup = max(1, int(args.warmup * total_steps))
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=args.lr,
                                  weight_decay=args.weight_decay)
    schedule = lambda s: min((s + 1) / warmup, 0.5 * (1 + math.cos(math.pi * min(s / total_steps, 1.0))))  # noqa: E731
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)

    main_process = rank == 0
    metrics_path = out_dir / "metrics.jsonl"
    progress = {"step": 0, "epoch": 0, "batch_in_epoch": 0}
    if args.resume:
        progress = load_trainer_state(out_dir, adapter, optimizer, scheduler, args, world)
        print(f"resumed at step {progress['step']} (epoch {progress['epoch']}, batch {progress['batch_in_epoch']})")
    if main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(metrics_path, records_until(metrics_path, progress["step"]) if args.resume else "")

    test_conversations = [p.prompt for p in test_pairs[:args.samples]] if main_process else []
    sample_opts = dict(alpha0=args.alpha0, alpha_tilde=args.alpha_tilde, max_new_tokens=args.max_new_tokens)
    before = generate(adapter, tok, test_conversations, frozen_only=True, **sample_opts) if test_conversations else []

    def run_eval_and_save(step, progress):
        """Rank 0 evaluates and saves; the others wait for it."""
        record = None
        if main_process:
            record = {"step": step, **evaluate(adapter, test_set, cache, args, device, collate)}
            append_jsonl(metrics_path, record)
            tqdm.write(f"step {step}: held-out accuracy {record['eval/rewards/accuracies']:.3f}, "
                       f"margin {record['eval/rewards/margins']:.3f}, KL {record['eval/kl']:.4f}")
            save_checkpoint(out_dir, adapter, optimizer, scheduler, progress, args, world)
        if world > 1:
            dist.barrier()
        return record

    def save(progress):
        if main_process:
            save_checkpoint(out_dir, adapter, optimizer, scheduler, progress, args, world)
        if world > 1:
            dist.barrier()

    head.train()
    step, saved_step, evaluated_step = progress["step"], progress["step"], None
    eval_record = None
    bar = tqdm(total=total_steps, initial=step, desc="training", disable=not main_process)
    with StopSignals() as stop:
        for epoch in range(progress["epoch"], args.epochs):
            batches = global_batches(len(train_set), args, world, epoch)
            start = progress["batch_in_epoch"] if epoch == progress["epoch"] else 0
            for b in range(start, len(batches), args.grad_accum):
                t0 = time.time()
                group = batches[b:b + args.grad_accum]
                n_step = sum(len(g) for g in group)  # pairs in this optimiser step, over all processes
                sums = {}
                for j, global_batch in enumerate(group):
                    idx = my_share(global_batch, rank, world)
                    weight = len(idx) / n_step  # each pair counts the same, however the step is cut up
                    if world > 1:  # average the gradients over the processes once, after the last part
                        trained.head.require_backward_grad_sync = j == len(group) - 1
                    batch = collate([train_set[i] for i in idx])
                    loss, metrics = batch_loss(trained, batch, [("train", i) for i in idx], cache, args, device)
                    (loss * weight * world).backward()  # DDP divides by world when it averages
                    for k, v in metrics.items():
                        sums[k] = sums.get(k, 0.0) + float(v) * weight
                sums = all_reduce_sum(sums, world)
                grad_norm = torch.nn.utils.clip_grad_norm_(head.parameters(), args.max_grad_norm)
                if not (math.isfinite(sums["loss"]) and torch.isfinite(grad_norm)):
                    bar.close()
                    where = f"step {step + 1} (epoch {epoch}, batches {b}-{b + len(group) - 1})"
                    kept = f"{out_dir / 'checkpoint'} (step {saved_step}) is kept" if saved_step else "no checkpoint was saved yet"
                    print(f"error: the loss is {sums['loss']} and the gradient norm {float(grad_norm)} at {where}: "
                          f"stopped without saving; {kept}. Try a lower --lr or a larger --beta", file=sys.stderr)
                    raise SystemExit(1)
                optimizer.step()
                scheduler.step()
                optimizer.zero_grad(set_to_none=True)
                step += 1
                record = {"step": step, "epoch": epoch, **sums, "grad_norm": float(grad_norm),
                          "lr": scheduler.get_last_lr()[0], "pairs_per_s": n_step / (time.time() - t0)}
                if main_process:
                    append_jsonl(metrics_path, record)
                bar.update(1)
                bar.set_postfix(loss=f"{sums['loss']:.3f}", acc=f"{sums['rewards/accuracies']:.2f}")
                at_end_of_epoch = b + args.grad_accum >= len(batches)
                progress = {"step": step, "epoch": epoch + at_end_of_epoch,
                            "batch_in_epoch": 0 if at_end_of_epoch else b + args.grad_accum}
                if (args.eval_every and step % args.eval_every == 0) or (not args.eval_every and at_end_of_epoch):
                    eval_record = run_eval_and_save(step, progress)
                    saved_step = evaluated_step = step
                elif args.save_every and step % args.save_every == 0:
                    save(progress)
                    saved_step = step
                signalled = all_reduce_sum({"code": stop.code}, world)["code"] > 0  # every process stops together
                if signalled:
                    if saved_step != step:
                        save(progress)
                    bar.close()
                    print(f"stopped at step {step}: checkpoint saved in {out_dir / 'checkpoint'}; "
                          f"continue with --resume", file=sys.stderr)
                    raise SystemExit(stop.code or cli.TERMINATED)
                if step == args.max_steps:
                    break
            if step == args.max_steps:
                break
    bar.close()
    if evaluated_step != step:
        eval_record = run_eval_and_save(step, progress)
    if world > 1:
        dist.destroy_process_group()
    if not main_process:
        return None

    after = generate(adapter, tok, test_conversations, **sample_opts) if test_conversations else []
    summary = {"wall_time_s": round(time.time() - t_start, 1), "steps": step, "processes": world,
               "train_pairs": len(train_set), "test_pairs": len(test_set),
               "head_parameters": n_head, "base_parameters": n_base, **eval_record,
               "samples": [{"prompt": c[-1]["content"], "frozen": b[0], "customised": a[0]}
                           for c, b, a in zip(test_conversations, before, after)],
               "args": vars(args)}
    write_atomic(out_dir / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False))

    for s in summary["samples"]:
        print(f"\n### {s['prompt']}\n  frozen:     {s['frozen']}\n  customised: {s['customised']}")
    print(f"\n{'held-out pairs':<34}{len(test_set)}")
    for key, label in (("eval/rewards/accuracies", "pairwise accuracy (Q-Adapter R)"),
                       ("eval/frozen_logp_accuracy", "  frozen log-prob margin"),
                       ("eval/longer_wins_accuracy", "  the longer answer wins"),
                       ("eval/rewards/margins", "mean margin R(y_w) − R(y_l)"),
                       ("eval/kl", "per-token KL(pi~ ‖ pi1)")):
        print(f"{label:<34}{eval_record[key]:.4f}")
    print(f"{'wall time':<34}{summary['wall_time_s']:.0f} s")
    print(f"wrote {out_dir}/checkpoint, {metrics_path.name}, summary.json")
    return summary


if __name__ == "__main__":
    cli.run(main)
