"""How close Q-Adapter comes to the cost floor: the frozen model's own forward pass and decoding.

The frozen model never changes, so training and decoding should cost about what running it costs.
This script measures each figure against that floor, and against the official code's design (a
LoRA copy of the whole model, trained through it), on real batches of the demo pairs:

  figure                            floor                                           target
  training step, first pass         frozen forward (HF, logits) over the same batch ≤ 1.5× time, ≤ 1.5× peak memory
  training step, later epoch        the same forward; frozen outputs kept (memory)  ≤ 0.6× time
  training step, later epoch, disk  the same; frozen outputs kept in a disk file    ≤ 0.6× time
  decoding tokens/s, batch 1 and 8  the frozen model decoded by the same loop       ≥ 0.85×
  cold start to the first step      import transformers + load the frozen model     ≤ 1.5×
  official design's training step   ours                                            ours ≥ 2.5× faster, ≤ 0.5× memory

Each figure is measured in a fresh process (bench.py runs itself with --measure NAME), so one
figure's memory never inflates another's, and timed alternately with its floor in that process,
best of --repeats after one untimed round: the ratio is then taken under the same load, which
matters on a shared machine. The official design's speed-up is the ratio of the two ratios.
Peak memory is the peak above what the process held once the model was loaded and the batch
built: on a GPU the allocator's count (torch.cuda.max_memory_allocated), on a CPU the resident set
(VmHWM, reset through /proc/self/clear_refs). A training step is what train.py does per batch:
forward, backward, clipping and the optimizer step.

    python bench.py                            # the embedded SmolLM2-135M on this machine (about 10 min on 2 cores)
    python bench.py --repeats 5 --json bench.json
    python bench.py --base-model meta-llama/Llama-3.1-8B-Instruct --batch-size 4 --cutoff 512   # on a GPU
"""
import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from support import cli  # no torch here: each figure imports it in its own process

HERE = Path(__file__).resolve().parent
RESULT = "BENCH-RESULT "  # a child's one line of results on stdout


def parse_args(argv=None):
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", default="embedded:SmolLM2-135M-Instruct",
                    help="frozen model: a Hugging Face hub name or local path (default: the embedded SmolLM2)")
    ap.add_argument("--data", default=str(HERE / "demo" / "concise_train.jsonl"),
                    help="preference pairs; the benchmark batch is the first --batch-size of them")
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per training step (2x sequences)")
    ap.add_argument("--cutoff", type=int, default=256, help="tokens per sequence at most")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the best counts")
    ap.add_argument("--decode-tokens", type=int, default=32, help="new tokens per decoding run")
    ap.add_argument("--head-width", type=int, default=256, help="width of the Q-head (train.py's default)")
    ap.add_argument("--head-layers", type=int, default=2, help="layers of the Q-head")
    ap.add_argument("--head-heads", type=int, default=4, help="attention heads of the Q-head")
    ap.add_argument("--lora-rank", type=int, default=8, help="LoRA rank of the official design (on q and v projections)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: a GPU if there is one)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="dtype of the frozen model (auto: bf16 on a GPU, float32 on a CPU)")
    ap.add_argument("--skip", default="", help="comma-separated figures not to measure, of: frozen_forward, train_step, train_step_kept, "
                         "train_step_disk, official, decode, cold_start")
    ap.add_argument("--json", help="also write every number to this JSON file")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # set when bench.py runs itself for one figure
    args = ap.parse_args(argv)
    for flag in ("batch_size", "cutoff", "repeats", "decode_tokens", "lora_rank"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    return args


# ------------------------------------------------------------------------------------------------
# in a child process: load, build the batch, time one figure


class PeakMemory:
    """Peak memory above the level at start(), in bytes."""

    def __init__(self, device):
        import torch
        self.torch, self.cuda = torch, device.type == "cuda"

    def start(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.level = self.torch.cuda.memory_allocated()
            return
        try:
            Path("/proc/self/clear_refs").write_text("5")  # Linux: reset the peak resident set to now
            self.resettable = True
        except OSError:
            self.resettable = False
        self.level = self._status("VmRSS") if self.resettable else self._maxrss()

    def peak(self):
        if self.cuda:
            return self.torch.cuda.max_memory_allocated() - self.level
        return (self._status("VmHWM") if self.resettable else self._maxrss()) - self.level

    @staticmethod
    def _status(field):
        return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024

    @staticmethod
    def _maxrss():  # the peak since the process began, where the peak cannot be reset (kB on Linux, B on macOS)
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024


class Setup:
    """The frozen model, a fresh head and the benchmark batch, on the device loading.pick_device picks."""

    def __init__(self, args):
        import torch
        import data
        import model as M
        import train
        from support import fused_path, loading
        from support.frozen_cache import FrozenCache
        self.torch, self.M, self.train, self.fused_path, self.FrozenCache = torch, M, train, fused_path, FrozenCache
        self.device, dtype, _ = loading.pick_device(args.device, args.dtype)
        self.base, self.tok = loading.load_base(args.base_model, self.device, dtype)
        with torch.no_grad():  # read every weight once: on a CPU they may be mapped from the file
            for p in self.base.parameters():  # lazily, and pages read later would count as the figure's memory
                p.sum()
        try:
            pairs = data.load_pairs(args.data)[:args.batch_size]
            examples = data.PairDataset(self.tok, pairs, args.cutoff).examples
        except data.DataError as e:
            raise SystemExit(f"error: {e}")
        self.batch = {k: v.to(self.device) for k, v in data.collate(examples, self.tok.pad_token_id).items()}
        self.keys = list(range(len(examples)))
        self.prompts = [p.prompt for p in pairs]
        self.train_args = train.parse_args([])  # train.py's defaults: α0, α̃, γ, β, gradient clipping
        torch.manual_seed(0)
        cfg = M.head_config_for(self.base, args.head_width, args.head_layers, args.head_heads)
        self.head = M.QHead(cfg).to(self.device)
        self.adapter = M.QAdapter(self.base, self.head)

    def sync(self):
        if self.device.type == "cuda":
            self.torch.cuda.synchronize()


def peak_memory(setup, step):
    """Bytes above the level before `step` at its peak, over two runs (the first one warms up)."""
    memory = PeakMemory(setup.device)
    memory.start()
    step()
    step()
    return memory.peak()


def best_times(setup, runs, repeats):
    """runs: {name: function}. Runs them in turn, one untimed round then `repeats` timed rounds,
    and returns the best seconds of each. Alternating them puts a figure and its floor under the
    same load, so their ratio holds on a busy machine even when the seconds do not."""
    best = {name: float("inf") for name in runs}
    for r in range(repeats + 1):
        for name, run in runs.items():
            setup.sync()
            t0 = time.perf_counter()
            run()
            setup.sync()
            if r:
                best[name] = min(best[name], time.perf_counter() - t0)
    return best


def frozen_forward(setup):
    """The floor: the frozen model's forward over the batch as Hugging Face runs it, logits included."""
    ids, mask = setup.batch["input_ids"], setup.batch["attention_mask"]

    def forward():
        with setup.torch.no_grad():
            setup.base(input_ids=ids, attention_mask=mask)
    return forward


def against_floor(setup, step, repeats):
    """A figure's peak memory, then its best time and the floor's, alternating."""
    memory = peak_memory(setup, step)
    t = best_times(setup, {"figure": step, "floor": frozen_forward(setup)}, repeats)
    return {"time_s": t["figure"], "floor_s": t["floor"], "ratio": t["figure"] / t["floor"], "peak_bytes": memory}


def measure_frozen_forward(setup, args):
    """The floor: the frozen model's forward over the batch as Hugging Face runs it, logits included."""
    ids, mask = setup.batch["input_ids"], setup.batch["attention_mask"]
    memory = peak_memory(setup, frozen_forward(setup))

    def body():  # for the breakdown: the body alone, on each half cut to its own length, as our first pass runs it
        with setup.torch.no_grad():
            [setup.fused_path.frozen_hidden(setup.adapter, i, m, mask.shape[1]) for i, m in zip(ids.chunk(2), mask.chunk(2))]
    t = best_times(setup, {"floor": frozen_forward(setup), "body": body}, args.repeats)
    return {"time_s": t["floor"], "peak_bytes": memory, "body_trimmed_s": t["body"], "tokens": int(mask.sum()), "rows": mask.shape[0],
            "padded_tokens": mask.numel(), "scored_states": int((setup.batch["labels"] != -100).sum()),
            "vocab": setup.adapter.out_weight.shape[0], "hidden": setup.adapter.out_weight.shape[1],
            "base_parameters": sum(p.numel() for p in setup.base.parameters()),
            "head_parameters": setup.M.head_parameter_count(setup.head)}


def training_step(setup, cache):
    """One step as train.py takes it: loss, backward, clipping, AdamW."""
    torch, head, a = setup.torch, setup.head, setup.train_args
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-6)

    def step():
        loss, _ = setup.train.batch_loss(setup.adapter, setup.batch, setup.keys, cache, a)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), a.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


def measure_train_step(setup, args):
    return against_floor(setup, training_step(setup, setup.FrozenCache(0)), args.repeats)  # nothing kept


def measure_train_step_kept(setup, args):
    """Later epochs: the warm-up step computes and keeps the frozen outputs, the timed ones read them."""
    return against_floor(setup, training_step(setup, setup.FrozenCache(64)), args.repeats)


def measure_train_step_disk(setup, args):
    with tempfile.TemporaryDirectory() as tmp:
        cache = setup.FrozenCache(0, 64, tmp)  # no memory: everything through the disk file
        return {**against_floor(setup, training_step(setup, cache), args.repeats), "disk_bytes": cache.disk_used}


def measure_official(setup, args):
    """The official code's design, rebuilt here so its cost is measured, not quoted: LoRA (rank r on
    the q and v projections of every layer) makes the whole model the Q-function, Q_R = its
    logits (B, T, V), trained through the whole model; a second full forward with LoRA off gives
    log pi1; the loss reads full (B, T, V) tensors. Its own constants: α0 = 0.01, α̃ = 1, β = 0.1.
    (Its index conventions differ from the paper's; that changes no cost, so ours are used.)"""
    import torch
    import torch.nn as nn
    from bt_loss import bt_loss
    from residual_q import derived_reward, gather_actions, soft_value

    class LoRA(nn.Module):
        """y = W·x + (α/r)·B·A·x, with A random and B zero (so it starts as the frozen layer)."""

        def __init__(self, frozen: nn.Linear, rank, alpha=16):
            super().__init__()
            self.frozen, self.scale, self.enabled = frozen, alpha / rank, True
            self.A = nn.Parameter(torch.randn(rank, frozen.in_features, device=frozen.weight.device) / rank)
            self.B = nn.Parameter(torch.zeros(frozen.out_features, rank, device=frozen.weight.device))

        def forward(self, x):
            y = self.frozen(x)
            if not self.enabled:
                return y
            return y + (self.scale * (x.float() @ self.A.T) @ self.B.T).to(y.dtype)

    loras = []
    for layer in setup.base.get_decoder().layers:
        for name in ("q_proj", "v_proj"):
            loras.append(LoRA(getattr(layer.self_attn, name), args.lora_rank))
            setattr(layer.self_attn, name, loras[-1])
    params = [p for m in loras for p in (m.A, m.B)]
    optimizer = torch.optim.AdamW(params, lr=1e-6)
    ids, mask, labels = (setup.batch[k] for k in ("input_ids", "attention_mask", "labels"))

    def step():
        q_r = setup.base(input_ids=ids, attention_mask=mask).logits.float()  # (B, T, V), with gradients
        with torch.no_grad():
            for m in loras:
                m.enabled = False
            logp1 = torch.log_softmax(setup.base(input_ids=ids, attention_mask=mask).logits.float(), -1)  # (B, T, V)
            for m in loras:
                m.enabled = True
        v = soft_value(q_r, logp1, 0.01, 1.0)  # (B, T)
        r2 = derived_reward(gather_actions(q_r, labels), v, labels, 1.0)  # (B, T-1)
        loss, _ = bt_loss(r2, labels, 0.1)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def floor():  # the frozen model: LoRA off
        for m in loras:
            m.enabled = False
        frozen_forward(setup)()
        for m in loras:
            m.enabled = True
    memory = peak_memory(setup, step)
    t = best_times(setup, {"figure": step, "floor": floor}, args.repeats)
    return {"time_s": t["figure"], "floor_s": t["floor"], "ratio": t["figure"] / t["floor"], "peak_bytes": memory,
            "lora_parameters": sum(p.numel() for p in params)}


def measure_decode(setup, args):
    """Tokens/s of sample.generate, frozen pi1 alone and the customised policy, batch 1 and 8,
    exactly --decode-tokens new tokens each (no stop at EOS); the four alternate, best of repeats."""
    from sample import generate
    setup.torch.nn.init.normal_(setup.head.up.weight, std=0.02)  # a non-zero head: Q_R ≠ 0, as after training
    setup.head.eval()
    runs = {f"{who}_b{b}": (b, who == "frozen") for b in (1, 8) for who in ("frozen", "custom")}
    prompts = (setup.prompts * 8)[:8]
    best = {name: 0.0 for name in runs}
    for r in range(args.repeats + 1):  # the first round warms up
        for name, (b, frozen_only) in runs.items():
            setup.sync()
            t0 = time.perf_counter()
            generate(setup.adapter, setup.tok, prompts[:b], max_new_tokens=args.decode_tokens,
                     frozen_only=frozen_only, stop_at_eos=False)
            setup.sync()
            if r:
                best[name] = max(best[name], b * args.decode_tokens / (time.perf_counter() - t0))
    return {"tokens_per_s": best}


def measure_cold_floor(args, t_start):
    """Import transformers and load the frozen model, nothing else."""
    import transformers  # noqa: F401
    from support import loading
    device, dtype, _ = loading.pick_device(args.device, args.dtype)
    loading.load_base(args.base_model, device, dtype)
    return {"at": time.time()}


def measure_cold_train(args, t_start):
    """train.py from the start to its first training step (--samples 0: no samples shown first)."""
    import train

    def first_step(*a, **k):  # called when the first step begins: report, and stop there
        print(RESULT + json.dumps({"at": time.time()}), flush=True)
        os._exit(0)
    train.batch_loss = first_step
    with tempfile.TemporaryDirectory() as tmp:
        train.main(["--base-model", args.base_model, "--data", args.data, "--cutoff", str(args.cutoff),
                    "--batch-size", str(args.batch_size), "--samples", "0", "--out-dir", tmp,
                    "--device", args.device, "--dtype", args.dtype])
    raise SystemExit("error: train.py ended without a training step")


MEASURES = {"frozen_forward": measure_frozen_forward, "train_step": measure_train_step,
            "train_step_kept": measure_train_step_kept, "train_step_disk": measure_train_step_disk,
            "official": measure_official, "decode": measure_decode}


def child(args):
    """Runs one figure and prints its result as one line."""
    t_start = time.time()
    if args.measure.startswith("cold_"):
        result = {"cold_floor": measure_cold_floor, "cold_train": measure_cold_train}[args.measure](args, t_start)
    else:
        setup = Setup(args)
        result = MEASURES[args.measure](setup, args)
        result["device"] = str(setup.device)
    print(RESULT + json.dumps(result), flush=True)


# ------------------------------------------------------------------------------------------------
# in the parent: run each figure in its own process, then the table


def run_child(argv, name):
    """Runs bench.py --measure name; returns (its result, seconds from launch to its result)."""
    t0 = time.time()
    done = subprocess.run([sys.executable, str(HERE / "bench.py"), *argv, "--measure", name],
                          capture_output=True, text=True, cwd=HERE)
    lines = [line for line in done.stdout.splitlines() if line.startswith(RESULT)]
    if not lines:
        why = (done.stderr.strip().splitlines() or done.stdout.strip().splitlines() or ["no output"])[-1]
        raise SystemExit(f"error: measuring {name} failed: {why}")
    result = json.loads(lines[-1][len(RESULT):])
    return result, result.get("at", t0) - t0


def cold_start(argv, repeats):
    """Launch-to-ready seconds of the floor and of train.py, alternating, best of repeats."""
    best = {"cold_floor": float("inf"), "cold_train": float("inf")}
    for _ in range(repeats):
        for name in best:
            best[name] = min(best[name], run_child(argv, name)[1])
    return best


def verdict(ratio, target, at_most=True):
    """(the target as text, met as text, met); an infinite target is no target (a figure shown for reference)."""
    if target == float("inf"):
        return "", "", True
    met = ratio <= target if at_most else ratio >= target
    return f"{'≤' if at_most else '≥'} {target:g}", "yes" if met else "NO", met


def main(argv=None):
    args = parse_args(argv)
    if args.measure:
        return child(args)
    from tqdm import tqdm
    argv = list(sys.argv[1:] if argv is None else argv)  # the children get the same flags
    skip = {s for s in args.skip.split(",") if s}
    names = [n for n in MEASURES if n not in skip] + ([] if "cold_start" in skip else ["cold_start"])
    results = {}
    for name in tqdm(names, desc="measuring", unit="figure"):
        results[name] = cold_start(argv, args.repeats) if name == "cold_start" else run_child(argv, name)[0]

    floor = results.get("frozen_forward", {})  # the floor's own run: its memory, and the batch's shape
    mb = lambda b: f"{b / 2**20:,.0f} MB"  # noqa: E731
    rows, checks = [], {}

    def row(key, label, value, floor_value, ratio, target, at_most=True):
        bound, met_text, met = verdict(ratio, target, at_most)
        if target != float("inf"):
            checks[key] = {"ratio": ratio, "target": target, "at_most": at_most, "met": met}
        rows.append((label, value, floor_value, f"{ratio:.2f}", bound, met_text))

    f_m = floor.get("peak_bytes")
    if "train_step" in results:
        r = results["train_step"]
        row("train_time", "training step, first pass", f"{r['time_s']:.3f} s", f"{r['floor_s']:.3f} s", r["ratio"], 1.5)
        if f_m:
            row("train_memory", "  peak memory above the model", mb(r["peak_bytes"]), mb(f_m), r["peak_bytes"] / f_m, 1.5)
    for key, label in (("train_step_kept", "training step, later epoch (memory)"),
                       ("train_step_disk", "training step, later epoch (disk)")):
        if key in results:
            r = results[key]
            row(key, label, f"{r['time_s']:.3f} s", f"{r['floor_s']:.3f} s", r["ratio"], 0.6)
    if "decode" in results:
        tps = results["decode"]["tokens_per_s"]
        for b in (1, 8):
            row(f"decode_b{b}", f"decoding, batch {b} (tokens/s)", f"{tps[f'custom_b{b}']:.1f}",
                f"{tps[f'frozen_b{b}']:.1f}", tps[f"custom_b{b}"] / tps[f"frozen_b{b}"], 0.85, at_most=False)
    if "cold_start" in results:
        c = results["cold_start"]
        row("cold_start", "cold start to the first step", f"{c['cold_train']:.2f} s", f"{c['cold_floor']:.2f} s",
            c["cold_train"] / c["cold_floor"], 1.5)
    if "official" in results:
        o = results["official"]
        row("official_time", "official design's step", f"{o['time_s']:.3f} s", f"{o['floor_s']:.3f} s", o["ratio"],
            float("inf"))
        if f_m:
            row("official_memory", "  its peak memory above the model", mb(o["peak_bytes"]), mb(f_m),
                o["peak_bytes"] / f_m, float("inf"))
        if "train_step" in results:
            r = results["train_step"]
            row("official_speedup", "ours faster than the official design, ×", f"{o['ratio'] / r['ratio']:.2f}",
                "", o["ratio"] / r["ratio"], 2.5, at_most=False)
            row("official_memory_share", "ours / official design, peak memory", mb(r["peak_bytes"]),
                mb(o["peak_bytes"]), r["peak_bytes"] / o["peak_bytes"], 0.5)

    device = next((r["device"] for r in results.values() if "device" in r), "?")
    if floor:
        print(f"\n{args.base_model} on {device}: batch of {floor['rows'] // 2} pairs = {floor['rows']} sequences, "
              f"{floor['tokens']} tokens ({floor['padded_tokens']} with padding), {floor['scored_states']} scored; "
              f"head {floor['head_parameters'] / 1e6:.2f}M parameters; best of {args.repeats}")
        print(f"floor: the frozen model's forward over the batch, {floor['time_s']:.3f} s, {mb(f_m)} above the "
              f"loaded model (of which the body alone, padding columns skipped: {floor['body_trimmed_s']:.3f} s)")
    header = ("figure", "measured", "floor", "ratio", "target", "met")
    widths = [max(len(str(x[i])) for x in rows + [header]) for i in range(6)]
    for line in [header, tuple("-" * w for w in widths)] + rows:
        print("  ".join(str(x).ljust(w) for x, w in zip(line, widths)))
    missed = [k for k, c in checks.items() if not c["met"]]
    print("all targets met" if not missed else f"not met: {', '.join(missed)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"base_model": args.base_model, "device": device,
                                               "args": {k: v for k, v in vars(args).items() if k != "measure"},
                                               "results": results, "checks": checks}, indent=2))
        print(f"wrote {args.json}")


if __name__ == "__main__":
    cli.run(main)
