"""Run state: a run's files in --out-dir, checkpoints, --resume, and stopping on a signal.

    metrics.jsonl   one JSON record per step and per evaluation (append_jsonl; cut back on --resume)
    summary.json    the end of a run (write_atomic: a reader never sees half a file)
    checkpoint/     head.safetensors, config.json, trainer_state.pt

A checkpoint is written to a temporary folder, then swapped in with two renames, so a crash (even
kill -9) never leaves half of one, and a write that fails (a full disk, no permission) leaves the
previous one in place; weights are safetensors, the optimizer's tensors are loaded with
weights_only=True. --resume restores head, optimizer, schedule, data position and RNG, so the run
continues exactly where the uninterrupted one would have been.

What stops a run: a signal (StopSignals: save, then exit 130 / 143 / 129), and, with one line and
exit code 1 (cli.Stopped), a checkpoint that cannot be written or a step out of GPU memory.
"""
import io
import json
import os
import re
import shutil
import signal
import time

import torch
from safetensors import SafetensorError
from tqdm import tqdm

from support import cli, loading

# flags a resumed run must share with the checkpoint: the model's shape, and the data order
RESUME_MUST_MATCH = ("base_model", "base_heads", "q_head", "head_width", "head_layers", "head_heads", "lora_rank",
                     "lora_modules", "batch_size", "grad_accum", "seed", "world_size")


def save_checkpoint(out_dir, adapter, optimizer, scheduler, progress, args, world):
    """Writes checkpoint/ whole or not at all. A write that fails (a full disk, no permission) removes
    the temporary folder, keeps the previous checkpoint, and stops the run with one line (exit 1)."""
    final, tmp, old = out_dir / "checkpoint", out_dir / ".checkpoint-tmp", out_dir / ".checkpoint-old"
    meta = {"base_model": args.base_model, "base_vocab_size": adapter.out_weight.shape[0], "world_size": world,
            "base_heads": args.chain,  # the heads this one is stacked on (model.chain_of)
            **{k: getattr(args, k) for k in
               ("alpha0", "alpha_tilde", "gamma", "beta", "nll", "unlikelihood", "cutoff", "max_prompt", "lr",
                "epochs", "batch_size", "grad_accum", "seed", "head_width", "head_layers", "head_heads", "lora_rank",
                "lora_modules", "data", "test_data", "split", "data_dir", "test_fraction", "split_seed", "train_limit",
                "eval_limit")}, **progress}
    trainer_state = io.BytesIO()  # through memory: torch.save straight to a full disk says only "unexpected pos"
    torch.save({"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "torch_rng": torch.get_rng_state(), **progress}, trainer_state)
    try:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        loading.save_adapter(tmp, adapter.head, meta)
        (tmp / "trainer_state.pt").write_bytes(trainer_state.getbuffer())
        if final.exists():
            os.replace(final, old)
        os.replace(tmp, final)  # the moment the new checkpoint becomes the checkpoint
    except (OSError, SafetensorError) as e:  # safetensors wraps the OS error in its own
        shutil.rmtree(tmp, ignore_errors=True)
        if old.exists() and not final.exists():  # failed between the two renames: the previous one goes back
            os.replace(old, final)
        raise cli.Stopped(f"error: cannot save the checkpoint in {final}: {os_cause(e)} "
                          f"({kept_checkpoint(out_dir)})") from None
    shutil.rmtree(old, ignore_errors=True)


def os_cause(e):
    """The system's words for a failed write ("No space left on device"), also from a library's error."""
    if isinstance(e, OSError) and e.strerror:
        return e.strerror
    code = re.search(r"os error (\d+)", str(e))  # safetensors: "... No space left on device (os error 28)"
    return os.strerror(int(code[1])) if code else str(e).splitlines()[0][:200]


def kept_checkpoint(out_dir):
    """What --resume would continue from, as the checkpoint on disk says."""
    try:
        step = json.loads((out_dir / "checkpoint" / loading.CONFIG_FILE).read_text())["step"]
    except (OSError, ValueError, KeyError, TypeError):
        return "no checkpoint was saved yet"
    return f"the last complete checkpoint, step {step}, is kept"


def load_trainer_state(out_dir, adapter, optimizer, scheduler, args, world):
    ckpt = out_dir / "checkpoint"
    if not ckpt.exists() and (out_dir / ".checkpoint-old").exists():  # killed between the two renames
        os.replace(out_dir / ".checkpoint-old", ckpt)
    if not (ckpt / "trainer_state.pt").exists():
        raise SystemExit(f"error: --resume: no checkpoint in {ckpt}")
    try:
        config = json.loads((ckpt / loading.CONFIG_FILE).read_text())
    except (OSError, ValueError):
        config = {}  # load_adapter below says what is wrong with it
    ours = {**vars(args), "world_size": world, "base_heads": args.chain}
    for key in RESUME_MUST_MATCH:  # checked first: another base model is named, not found by its shapes
        if key in config and config[key] != ours[key]:
            flag = {"world_size": "processes", "base_heads": "--base-head"}.get(key, "--" + key.replace("_", "-"))
            raise SystemExit(f"error: --resume: {ckpt} was trained with {flag} {config[key]}, not {ours[key]}")
    saved, _, _ = loading.load_adapter(ckpt, base=adapter.base)  # safetensors only, with clear errors
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



# stopping: a signal finishes the step and saves; a loss that is not finite saves nothing; a step out
# of GPU memory, or a checkpoint that cannot be written, stops with one line and the last checkpoint


STOP_CODES = {signal.SIGINT: cli.INTERRUPTED, signal.SIGTERM: cli.TERMINATED, signal.SIGHUP: cli.HUNG_UP}


class StopSignals:
    """While active, SIGINT (Ctrl-C), SIGTERM (a scheduler's pre-emption, torchrun passing one on)
    and SIGHUP (the SSH connection or terminal went away) only set `code`; the training loop checks it
    after each step, saves a checkpoint and exits with 130, 143 or 129. A second Ctrl-C or SIGTERM
    stops at once (KeyboardInterrupt); a second hang-up does not (a dropped connection may send two). A
    signal the run was started ignoring stays ignored (`nohup` ignores SIGHUP; a script's `cmd &`, SIGINT),
    and after a hang-up, SIGHUP stays ignored while the run saves and exits (a terminal that goes away
    sends one, and the SSH daemon or the shell may send another)."""

    def __enter__(self):
        self.code = 0
        self.previous = {s: signal.getsignal(s) for s in STOP_CODES if signal.getsignal(s) != signal.SIG_IGN}
        for s in self.previous:
            signal.signal(s, self.handler)
        return self

    def handler(self, signum, frame):
        if self.code:
            if signum == signal.SIGHUP:
                return
            raise KeyboardInterrupt
        self.code = STOP_CODES[signum]
        tqdm.write(f"{signal.Signals(signum).name}: saving a checkpoint after this step (again: stop at once)")

    def __exit__(self, *exc):
        for s, h in self.previous.items():  # after a hang-up, the ones that follow it stay harmless while the run exits
            signal.signal(s, signal.SIG_IGN if s == signal.SIGHUP and self.code == cli.HUNG_UP else h)


def out_of_memory(where, args, out_dir):
    """The one line (cli.Stopped, exit 1) for a step that did not fit in GPU memory: where, the batch,
    and what to try: fewer pairs per forward pass, more passes per step, the same pairs per step."""
    b, per_step = args.batch_size, args.batch_size * args.grad_accum
    smaller = max((d for d in range(1, b // 2 + 1) if b % d == 0), default=0)  # the largest divisor up to b/2
    try_this = (f"--batch-size {smaller} --grad-accum {per_step // smaller} (the same {per_step} pairs per step; "
                f"a new run, as --resume keeps the batch size)" if smaller
                else f"a shorter --cutoff (now {args.cutoff})")
    return cli.Stopped(
        f"error: out of GPU memory at {where} with --batch-size {b} ({kept_checkpoint(out_dir)}). Try {try_this}, "
        f"or find the largest batch that fits: python bench.py --base-model {args.base_model} "
        f"--max-batch-length {args.cutoff} --extra max_batch")


def report(run, record, before, after):
    """summary.json, and what a person reads at the end: samples before/after, then the numbers."""
    summary = {"wall_time_s": round(time.time() - run.t_start, 1), "steps": run.progress["step"],
               "processes": run.world, "train_pairs": len(run.train_set), "test_pairs": len(run.test_set),
               "head_parameters": sum(p.numel() for p in run.adapter.head.parameters() if p.requires_grad),
               "base_parameters": sum(p.numel() for p in run.adapter.base.parameters()), **record,
               "samples": [{"prompt": c[-1]["content"], "frozen": b[0], "customised": a[0]}
                           for c, b, a in zip(run.shown, before, after)],
               "args": vars(run.args)}
    write_atomic(run.out_dir / "summary.json", json.dumps(summary, indent=2, ensure_ascii=False))
    for s in summary["samples"]:
        print(f"\n### {s['prompt']}\n  frozen:     {s['frozen']}\n  customised: {s['customised']}")
    print(f"\n{'held-out pairs':<34}{len(run.test_set)}")
    for key, label in (("eval/rewards/accuracies", "pairwise accuracy (Q-Adapter R)"),
                       ("eval/frozen_logp_accuracy", "  frozen log-prob margin"),
                       ("eval/longer_wins_accuracy", "  the longer answer wins"),
                       ("eval/rewards/margins", "mean margin R(y_w) − R(y_l)"),
                       ("eval/kl", "per-token KL(pi~ ‖ pi1)")):
        print(f"{label:<34}{record[key]:.4f}")
    print(f"{'wall time':<34}{summary['wall_time_s']:.0f} s")
    print(f"wrote {run.out_dir}/checkpoint, {run.metrics_path.name}, summary.json")
    return summary
