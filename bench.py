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
  LoRA Q-head's step (--q-head lora) frozen forward                                  none: what the paper's head costs

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

Without the weights (a GPU machine that gets only the repository), --random-model builds a real
model's shape with random weights directly on the device, and the batch from random token ids
(each pair: one prompt of cutoff/16 tokens, two answers filling the rest, every answer token
scored). Speed and memory depend on the shape, not on the weights. It adds two figures, measured
by default in that mode (elsewhere with --extra): decode_hf, the customised decoding against
Hugging Face's own greedy `generate` on the same prompts and number of new tokens; and max_batch,
the largest batch of --max-batch-length-token pairs whose training step fits in the GPU's memory
(doubling, then bisection; --memory-gib caps the memory to emulate a smaller card), next to what
docs/speed.md's arithmetic predicts. cold_start loads --base-model, so it is not measured there.

    python bench.py --random-model llama-3.1-8b --batch-size 4 --cutoff 512 --memory-gib 24   # on a GPU
    python bench.py --random-model smollm2-135m --random-layers 2 --device cpu --dtype float32 \
        --batch-size 1 --cutoff 64 --repeats 1 --decode-tokens 4 --memory-gib 0.5 --max-batch-length 64 \
        --max-batch-limit 8 --skip train_step_kept,train_step_disk,official,decode   # a smoke test
"""
import argparse
import gc
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

# --random-model: two real models' shapes (LlamaConfig fields), built with random weights on the device
RANDOM_MODELS = {
    "smollm2-135m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                         num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                         rms_norm_eps=1e-5, rope_theta=100000.0, tie_word_embeddings=True,
                         bos_token_id=1, eos_token_id=2, pad_token_id=2),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072,
                         rms_norm_eps=1e-5, rope_theta=500000.0, tie_word_embeddings=False,
                         bos_token_id=128000, eos_token_id=128009, pad_token_id=128009),
}
# what docs/speed.md's arithmetic predicts: a first-pass step over the frozen forward, worst case (every
# token scored, no padding); and, for Llama-3.1-8B in bf16 ("Peak memory" table), GiB that do not grow
# with the batch and KiB per token, by head width
PREDICTED_STEP_RATIO = {"smollm2-135m": 1.46, "llama-3.1-8b": 1.15}
PREDICTED_MEMORY = {"llama-3.1-8b": {256: (16.14, 196), 1024: (16.59, 336)}}
EXTRA = ("decode_hf", "max_batch")  # figures measured by default with --random-model only


def parse_args(argv=None):
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--base-model", default="embedded:SmolLM2-135M-Instruct",
                    help="frozen model: a Hugging Face hub name or local path (default: the embedded SmolLM2)")
    ap.add_argument("--data", default=str(HERE / "demo" / "child_train.jsonl"),
                    help="preference pairs; the benchmark batch is the first --batch-size of them")
    ap.add_argument("--batch-size", type=int, default=8, help="pairs per training step (2x sequences)")
    ap.add_argument("--cutoff", type=int, default=256, help="tokens per sequence at most")
    ap.add_argument("--repeats", type=int, default=3, help="timed runs per figure; the best counts")
    ap.add_argument("--decode-tokens", type=int, default=32, help="new tokens per decoding run")
    ap.add_argument("--head-width", type=int, default=256, help="width of the Q-head (train.py's default)")
    ap.add_argument("--head-layers", type=int, default=2, help="layers of the Q-head")
    ap.add_argument("--head-heads", type=int, default=4, help="attention heads of the Q-head")
    ap.add_argument("--lora-rank", type=int, default=8, help="LoRA rank of the official design and of the LoRA Q-head "
                                                          "(on q and v projections)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: a GPU if there is one)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="dtype of the frozen model (auto: bf16 on a GPU, float32 on a CPU)")
    ap.add_argument("--skip", default="", help="comma-separated figures not to measure, of: frozen_forward, train_step, train_step_kept, "
                         "train_step_disk, train_step_lora, official, decode, cold_start (and decode_hf, max_batch)")
    ap.add_argument("--json", help="also write every number to this JSON file")
    r = ap.add_argument_group("without the weights: a real model's shape with random weights")
    r.add_argument("--random-model", choices=sorted(RANDOM_MODELS),
                   help="build this shape with random weights directly on the device (instead of loading "
                        "--base-model) and benchmark on random token ids (instead of --data)")
    r.add_argument("--random-layers", type=int, help="with --random-model: this many layers instead (a smoke test)")
    r.add_argument("--extra", default="", help="comma-separated figures measured by default only with --random-model, "
                   "to measure here too: decode_hf, max_batch")
    r.add_argument("--max-batch-length", type=int, default=512, help="max_batch: tokens of each sequence of a pair")
    r.add_argument("--max-batch-limit", type=int, default=4096, help="max_batch: pairs tried at most")
    r.add_argument("--memory-gib", type=float, default=0.0,
                   help="max_batch: GPU memory to fit in, GiB (torch.cuda.set_per_process_memory_fraction; 0: the "
                        "whole GPU). On a CPU (a smoke test), the step's peak above the loaded model must stay under it")
    ap.add_argument("--measure", help=argparse.SUPPRESS)  # set when bench.py runs itself for one figure
    args = ap.parse_args(argv)
    for flag in ("batch_size", "cutoff", "repeats", "decode_tokens", "lora_rank", "max_batch_length", "max_batch_limit"):
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.random_layers is not None and (args.random_layers < 1 or not args.random_model):
        ap.error("--random-layers needs --random-model and must be >= 1")
    if args.memory_gib < 0:
        ap.error(f"--memory-gib must be >= 0, got {args.memory_gib}")
    unknown = {s for s in (args.skip + "," + args.extra).split(",") if s} - {*MEASURES, "cold_start"}
    if unknown:
        ap.error(f"unknown figure(s): {', '.join(sorted(unknown))}")
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


def random_config(name, layers=None):
    """The LlamaConfig of a RANDOM_MODELS shape (layers: fewer, for a smoke test)."""
    from transformers import LlamaConfig
    shape = dict(RANDOM_MODELS[name])
    theta = shape.pop("rope_theta")
    if layers:
        shape["num_hidden_layers"] = layers
    return LlamaConfig(**shape, rope_parameters={"rope_type": "default", "rope_theta": theta})


def random_model(name, layers, device, dtype):
    """LlamaForCausalLM of that shape with random weights, allocated and initialised on the device in
    dtype (never a float32 copy on the CPU first): frozen, in eval mode."""
    import torch
    from transformers import LlamaForCausalLM
    torch.manual_seed(0)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = LlamaForCausalLM(random_config(name, layers))
    finally:
        torch.set_default_dtype(default)
    wrong = {str(p.dtype) for p in model.parameters() if p.dtype != dtype}  # buffers (RoPE's) stay as made
    if wrong:
        raise SystemExit(f"error: --random-model {name}: parameters made in {', '.join(sorted(wrong))}, not {dtype}")
    return model.eval().requires_grad_(False)


def random_batch(pairs, length, vocab, seed, device):
    """data.collate's layout from random token ids: 2 x pairs rows of `length` tokens, chosen rows
    first; each pair's two rows share a prompt of length/16 tokens, the rest is the answer, scored."""
    import torch
    from residual_q import IGNORE
    g = torch.Generator().manual_seed(seed)
    prompt = max(1, length // 16)
    ids = torch.randint(vocab, (2 * pairs, length), generator=g)
    ids[pairs:, :prompt] = ids[:pairs, :prompt]
    labels = ids.clone()
    labels[:, :prompt] = IGNORE
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}
    return {k: v.to(device) for k, v in batch.items()}


class TokenIds:
    """What sample.generate needs of a tokenizer, with --random-model: each "conversation" is already a
    1-D tensor of token ids (all of one length: no padding), and an answer decodes to its ids."""
    padding_side = "left"

    def __init__(self, config):
        self.pad_token_id, self.eos_token_id, self.vocab = config.pad_token_id, config.eos_token_id, config.vocab_size

    def apply_chat_template(self, conversations, **_):
        import torch
        ids = torch.stack(list(conversations))
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}

    def decode(self, ids, **_):
        return " ".join(str(int(i)) for i in ids)

    def __len__(self):
        return self.vocab


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
        if args.random_model:  # a real model's shape, random weights made on the device; random token ids
            self.base = random_model(args.random_model, args.random_layers, self.device, dtype)
            self.tok = TokenIds(self.base.config)
        else:
            self.base, self.tok = loading.load_base(args.base_model, self.device, dtype)
        with torch.no_grad():  # read every weight once: on a CPU they may be mapped from the file
            for p in self.base.parameters():  # lazily, and pages read later would count as the figure's memory
                p.sum()
        if args.random_model:
            self.batch = random_batch(args.batch_size, args.cutoff, self.base.config.vocab_size, 0, self.device)
            self.keys = list(range(args.batch_size))
            g = torch.Generator().manual_seed(1)
            self.prompts = list(torch.randint(self.base.config.vocab_size, (8, min(32, args.cutoff)), generator=g))
        else:
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
        self.adapter = M.QAdapter(self.base, self.head, alpha0=self.train_args.alpha0,
                                  alpha_tilde=self.train_args.alpha_tilde)

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


def training_step(setup, cache, adapter=None):
    """One step as train.py takes it: loss, backward, clipping, AdamW (adapter: default the small head's)."""
    adapter = adapter or setup.adapter
    torch, head, a = setup.torch, adapter.head, setup.train_args
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-6)

    def step():
        loss, _ = setup.train.batch_loss(adapter, setup.batch, setup.keys, cache, a)
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


def measure_train_step_lora(setup, args):
    """The LoRA Q-head, as the paper's Q-adapter (train.py --q-head lora, model.LoraHead): LoRA rank --lora-rank on
    q and v of every layer, Q_R = logits with it − logits without. Its step adds a second forward and
    a backward through the whole model to ours; no target, the figure says what that costs."""
    M = setup.M
    head = M.LoraHead(setup.base, M.LoraHeadConfig(setup.base.config.hidden_size, args.lora_rank,
                                                   ("q_proj", "v_proj"), 2.0 * args.lora_rank))
    return against_floor(setup, training_step(setup, setup.FrozenCache(0), M.QAdapter(setup.base, head)), args.repeats)


def measure_official(setup, args):
    """The official code's design, rebuilt here so its cost is measured, not quoted: LoRA (rank r on
    the q and v projections of every layer) makes the whole model the Q-function, Q_R = its
    logits (B, T, V), trained through the whole model; a second full forward with LoRA off gives
    log pi1; the loss reads full (B, T, V) tensors. Its own constants: α0 = 0.01, α̃ = 1, β = 0.1.
    (Its index conventions differ from the paper's; that changes no cost, so ours are used.)"""
    import torch
    import torch.nn as nn
    from bt_loss import q_adapter_loss
    from residual_q import gather_actions, soft_value

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
        loss, _ = q_adapter_loss(gather_actions(q_r, labels), v, gather_actions(logp1, labels), labels, 0.01, 1.0,
                                 1.0, 0.1)
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


def measure_decode(setup, args, hf=False):
    """Tokens/s of sample.generate, frozen pi1 alone and the customised policy, batch 1 and 8,
    exactly --decode-tokens new tokens each (no stop at EOS); the four alternate, best of repeats.
    hf (the decode_hf figure): Hugging Face's greedy generate on the same prompts alternates with
    them, exactly as many new tokens (min_new_tokens: no stop at EOS either); agree_b1/b8: the
    share of prompts whose greedy answer from the frozen model is Hugging Face's, token for token."""
    from sample import generate
    setup.torch.nn.init.normal_(setup.head.up.weight, std=0.02)  # a non-zero head: Q_R ≠ 0, as after training
    setup.head.eval()
    runs = {f"{who}_b{b}": (b, who) for b in (1, 8) for who in ("frozen", "custom") + (("hf",) if hf else ())}
    prompts = (setup.prompts * 8)[:8]
    best, answers = {name: 0.0 for name in runs}, {}
    for r in range(args.repeats + 1):  # the first round warms up
        for name, (b, who) in runs.items():
            setup.sync()
            t0 = time.perf_counter()
            if who == "hf":
                out = hf_generate(setup, prompts[:b], args.decode_tokens)
            else:
                out = [a for a, _ in generate(setup.adapter, setup.tok, prompts[:b], max_new_tokens=args.decode_tokens,
                                              frozen_only=who == "frozen", stop_at_eos=False)]
            setup.sync()
            answers[name] = out
            if r:
                best[name] = max(best[name], b * args.decode_tokens / (time.perf_counter() - t0))
    result = {"tokens_per_s": best}
    if hf:
        result.update({f"agree_b{b}": sum(x == y for x, y in zip(answers[f"frozen_b{b}"], answers[f"hf_b{b}"])) / b
                       for b in (1, 8)})
    return result


def hf_generate(setup, conversations, new_tokens):
    """Hugging Face's greedy decoding of the frozen model, the prompts encoded as sample.generate
    encodes them; exactly new_tokens each. Returns the answers decoded as sample.generate does."""
    tok = setup.tok
    tok.padding_side = "left"
    enc = tok.apply_chat_template(conversations, add_generation_prompt=True, padding=True, return_tensors="pt",
                                  return_dict=True)
    ids, mask = enc["input_ids"].to(setup.device), enc["attention_mask"].to(setup.device)
    out = setup.base.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                              do_sample=False, pad_token_id=tok.pad_token_id)
    return [tok.decode(row[ids.shape[1]:], skip_special_tokens=True).strip() for row in out.tolist()]


def out_of_memory(error):
    """Whether a RuntimeError is the GPU running out of memory (torch.cuda.OutOfMemoryError, or cuBLAS
    failing to allocate its workspace, which surfaces as a plain RuntimeError)."""
    import torch
    return isinstance(error, torch.cuda.OutOfMemoryError) or any(
        text in str(error) for text in ("out of memory", "CUBLAS_STATUS_ALLOC_FAILED"))


def measure_max_batch(setup, args):
    """The largest batch of random pairs of --max-batch-length tokens each whose training step (as
    train.py takes it, nothing kept) fits: batch sizes doubled from 1 until one does not fit, then
    bisection between the last that fit and the first that did not, at most --max-batch-limit pairs.
    On a GPU a batch does not fit when the step raises an out-of-memory error (the cache emptied
    between tries), within --memory-gib GiB (set_per_process_memory_fraction) or the whole GPU; on a
    CPU (a smoke test) when its peak above the loaded model exceeds --memory-gib."""
    torch, cuda = setup.torch, setup.device.type == "cuda"
    cap = int(args.memory_gib * 2**30) if args.memory_gib else None
    result = {"length": args.max_batch_length, "memory_cap_bytes": cap}
    if cuda:
        total = torch.cuda.get_device_properties(setup.device).total_memory
        result["device_total_bytes"] = total
        if cap and cap < total:
            torch.cuda.set_per_process_memory_fraction(cap / total, setup.device)
            result["capped_by"] = "torch.cuda.set_per_process_memory_fraction"
        else:
            result["capped_by"] = "the whole GPU"
            cap = result["memory_cap_bytes"] = total
    elif cap is None:
        raise SystemExit("error: max_batch on a CPU needs --memory-gib (no out-of-memory error to catch there: "
                         "the step's peak above the loaded model is held to it instead)")
    else:
        result["capped_by"] = "the step's peak resident memory above the loaded model (CPU, a smoke test)"
    head, a = setup.head, setup.train_args
    optimizer = torch.optim.AdamW([p for p in head.parameters() if p.requires_grad], lr=1e-6)
    vocab, tries = setup.base.config.vocab_size, []

    def step(batch, n):
        loss, _ = setup.train.batch_loss(setup.adapter, batch, list(range(n)), setup.FrozenCache(0), a)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(head.parameters(), a.max_grad_norm)
        optimizer.step()

    def fits(n):
        batch = random_batch(n, args.max_batch_length, vocab, n, setup.device)
        memory, seconds = PeakMemory(setup.device), None
        memory.start()
        try:
            setup.sync()
            t0 = time.perf_counter()
            step(batch, n)
            setup.sync()
            seconds = time.perf_counter() - t0
        except RuntimeError as e:
            if not (cuda and out_of_memory(e)):
                raise
        optimizer.zero_grad(set_to_none=True)
        del batch
        gc.collect()  # what the failed step held goes with its frame
        if cuda:
            torch.cuda.empty_cache()
        peak = memory.peak()
        ok = seconds is not None and (cuda or peak <= cap)
        tries.append({"pairs": n, "fits": ok, "step_s": seconds, "peak_bytes": peak,
                      **({"device_peak_bytes": torch.cuda.max_memory_allocated(setup.device)} if cuda else {})})
        print(f"max_batch: {n} pairs {'fit' if ok else 'do not fit'}", file=sys.stderr, flush=True)
        return ok

    good, bad, n = 0, None, 1
    while n <= args.max_batch_limit:
        if not fits(n):
            bad = n
            break
        good, n = n, 2 * n
    while bad is not None and bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    best = next((t for t in tries if t["pairs"] == good and t["fits"]), {})
    return {**result, "pairs": good, "at_limit": bad is None, "tokens": 2 * good * args.max_batch_length,
            "step_s": best.get("step_s"), "peak_bytes": best.get("peak_bytes"),
            "device_peak_bytes": best.get("device_peak_bytes"), "tries": tries}


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
            "train_step_lora": measure_train_step_lora, "official": measure_official, "decode": measure_decode,
            "decode_hf": lambda setup, args: measure_decode(setup, args, hf=True), "max_batch": measure_max_batch}


def child(args):
    """Runs one figure and prints its result as one line."""
    t_start = time.time()
    if args.measure.startswith("cold_"):
        result = {"cold_floor": measure_cold_floor, "cold_train": measure_cold_train}[args.measure](args, t_start)
    else:
        setup = Setup(args)
        result = MEASURES[args.measure](setup, args)
        result["device"] = str(setup.device)
        if args.random_model:
            result["dtype"] = str(next(setup.base.parameters()).dtype).replace("torch.", "")
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
    if args.random_model:
        skip.add("cold_start")  # it loads --base-model from disk: nothing to load here
    else:
        skip |= set(EXTRA) - {s for s in args.extra.split(",") if s}
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
    decode = results.get("decode", results.get("decode_hf"))  # decode_hf times the frozen model too
    if decode:
        tps = decode["tokens_per_s"]
        for b in (1, 8):
            row(f"decode_b{b}", f"decoding, batch {b} (tokens/s)", f"{tps[f'custom_b{b}']:.1f}",
                f"{tps[f'frozen_b{b}']:.1f}", tps[f"custom_b{b}"] / tps[f"frozen_b{b}"], 0.85, at_most=False)
    if "decode_hf" in results:
        tps = results["decode_hf"]["tokens_per_s"]
        for b in (1, 8):
            row(f"decode_hf_b{b}", f"  against HF generate, batch {b}", f"{tps[f'custom_b{b}']:.1f}",
                f"{tps[f'hf_b{b}']:.1f}", tps[f"custom_b{b}"] / tps[f"hf_b{b}"], float("inf"), at_most=False)
            row(f"decode_hf_frozen_b{b}", f"  frozen, our loop against HF, batch {b}", f"{tps[f'frozen_b{b}']:.1f}",
                f"{tps[f'hf_b{b}']:.1f}", tps[f"frozen_b{b}"] / tps[f"hf_b{b}"], float("inf"), at_most=False)
    if "max_batch" in results:
        m = results["max_batch"]
        predicted = predicted_pairs(args, m)
        rows.append((f"largest batch, pairs of 2 × {m['length']} tokens", f"{'≥ ' if m['at_limit'] else ''}{m['pairs']}",
                     "" if predicted is None else f"{predicted} predicted",
                     "" if not predicted else f"{m['pairs'] / predicted:.2f}", "", ""))
    if "cold_start" in results:
        c = results["cold_start"]
        row("cold_start", "cold start to the first step", f"{c['cold_train']:.2f} s", f"{c['cold_floor']:.2f} s",
            c["cold_train"] / c["cold_floor"], 1.5)
    if "train_step_lora" in results:
        r = results["train_step_lora"]
        row("lora_time", "LoRA Q-head's step (--q-head lora)", f"{r['time_s']:.3f} s", f"{r['floor_s']:.3f} s",
            r["ratio"], float("inf"))
        if f_m:
            row("lora_memory", "  its peak memory above the model", mb(r["peak_bytes"]), mb(f_m), r["peak_bytes"] / f_m,
                float("inf"))
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
    dtype = next((r["dtype"] for r in results.values() if "dtype" in r), args.dtype)
    model_name = args.base_model if not args.random_model else (
        f"{args.random_model} shape, random weights ({args.random_layers or RANDOM_MODELS[args.random_model]['num_hidden_layers']} "
        f"layers, {dtype})")
    if floor:
        print(f"\n{model_name} on {device}: batch of {floor['rows'] // 2} pairs = {floor['rows']} sequences, "
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
    notes = random_model_notes(args, results) if args.random_model else {}
    for line in notes.values():
        print(line)
    if args.json:
        Path(args.json).write_text(json.dumps({"base_model": args.base_model, "device": device,
                                               "args": {k: v for k, v in vars(args).items() if k != "measure"},
                                               "results": results, "checks": checks,
                                               **({"notes": notes} if notes else {})}, indent=2))
        print(f"wrote {args.json}")


def predicted_pairs(args, m):
    """docs/speed.md's arithmetic for the largest batch (Llama-3.1-8B shape in bf16 at head width 256
    or 1024): (memory − what does not grow with the batch) / (2 × length × memory per token)."""
    fixed_per_token = PREDICTED_MEMORY.get(args.random_model or "", {}).get(args.head_width)
    if (fixed_per_token is None or not m.get("memory_cap_bytes") or args.random_layers
            or m.get("dtype", args.dtype) not in ("bfloat16", "auto")):
        return None
    fixed_gib, per_token_kib = fixed_per_token
    return max(0, int((m["memory_cap_bytes"] / 2**30 - fixed_gib) * 2**20 // (2 * m["length"] * per_token_kib)))


def random_model_notes(args, results):
    """With --random-model: what each figure is set against, in words (printed and in the JSON)."""
    notes = {}
    predicted = PREDICTED_STEP_RATIO.get(args.random_model)
    if "train_step" in results and predicted and not args.random_layers:
        notes["train_step"] = (f"training step / frozen forward: {results['train_step']['ratio']:.2f}x measured; "
                               f"docs/speed.md's arithmetic predicts at most {predicted}x for this shape (every "
                               f"token scored, no padding; here 15/16 of the tokens are answer tokens)")
    if "decode_hf" in results:
        d = results["decode_hf"]
        notes["decode_hf"] = (f"decoding against Hugging Face generate (greedy, same prompts, {args.decode_tokens} new "
                              f"tokens each): the frozen model's greedy answers agree with HF's for "
                              f"{d['agree_b1']:.0%} (batch 1) and {d['agree_b8']:.0%} (batch 8) of the prompts, all "
                              f"{args.decode_tokens} tokens (in bf16 HF's logits are rounded to bf16 and ours are "
                              f"float32, so a near-tie, common with random weights, can split them)")
    if "max_batch" in results:
        m = results["max_batch"]
        gib = lambda b: f"{b / 2**30:.{1 if b >= 2**30 else 2}f} GiB"  # noqa: E731
        where = (f"within {gib(m['memory_cap_bytes'])}" + (f" of the GPU's {gib(m['device_total_bytes'])}"
                 if "device_total_bytes" in m else "") + f", held by {m['capped_by']}")
        line = (f"largest batch: {'at least ' if m['at_limit'] else ''}{m['pairs']} pairs × 2 × {m['length']} "
                f"tokens ({m['tokens']} tokens) fit a training step {where}")
        if m.get("step_s"):
            line += f"; that step took {m['step_s']:.2f} s ({m['tokens'] / m['step_s']:,.0f} tokens/s)"
        if m.get("device_peak_bytes"):
            line += f", peak {gib(m['device_peak_bytes'])} allocated (torch.cuda.max_memory_allocated)"
        predicted = predicted_pairs(args, m)
        if predicted is not None:
            line += (f". docs/speed.md's arithmetic for {gib(m['memory_cap_bytes'])} at head width "
                     f"{args.head_width}: {predicted} pairs (24 GiB: 41 at width 256, 22 at 1024)")
        notes["max_batch"] = line
    return notes


if __name__ == "__main__":
    cli.run(main)
