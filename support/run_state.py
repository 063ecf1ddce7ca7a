"""Run state: a run's files in --out-dir, checkpoints, --resume, and stopping on a signal.

    metrics.jsonl   one JSON record per step and per evaluation (append_jsonl; cut back on --resume)
    summary.json    the end of a run (write_atomic: a reader never sees half a file)
    checkpoint/     head.safetensors, config.json, trainer_state.pt

A checkpoint is written to a temporary folder, then swapped in with two renames, so a crash (even
kill -9) never leaves half of one; weights are safetensors, the optimizer's tensors are loaded with
weights_only=True. --resume restores head, optimizer, schedule, data position and RNG, so the run
continues exactly where the uninterrupted one would have been.
"""
import json
import os
import shutil
import signal
import time

import torch
from tqdm import tqdm

from support import cli, loading

# flags a resumed run must share with the checkpoint: the model's shape, and the data order
RESUME_MUST_MATCH = ("base_model", "base_heads", "q_head", "head_width", "head_layers", "head_heads", "lora_rank",
                     "lora_modules", "batch_size", "grad_accum", "seed", "world_size")


def save_checkpoint(out_dir, adapter, optimizer, scheduler, progress, args, world):
    final, tmp, old = out_dir / "checkpoint", out_dir / ".checkpoint-tmp", out_dir / ".checkpoint-old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    meta = {"base_model": args.base_model, "base_vocab_size": adapter.out_weight.shape[0], "world_size": world,
            "base_heads": args.chain,  # the heads this one is stacked on (model.chain_of)
            **{k: getattr(args, k) for k in
               ("alpha0", "alpha_tilde", "gamma", "beta", "nll", "unlikelihood", "cutoff", "max_prompt", "lr",
                "epochs", "batch_size", "grad_accum", "seed", "head_width", "head_layers", "head_heads", "lora_rank",
                "lora_modules", "data", "test_data", "split", "test_fraction", "split_seed", "train_limit", "eval_limit")}, **progress}
    loading.save_adapter(tmp, adapter.head, meta)
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
