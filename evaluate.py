"""Did it learn, did it forget: score customised policies and the frozen model side by side.

Every method is a *policy* over the next token, read at the states of a batch of sequences:

  frozen      pi1(·|s)  = softmax(base logits)
  q-adapter   pi~(·|s)  = softmax((Q_R(s,·) + α0·log pi1(·|s)) / α̃)      (train.py checkpoints)
  dpo, sft    pi(·|s)   = softmax(logits of the base with its LoRA adapter)  (baselines.py checkpoints)

One forward pass of a checkpoint gives its policy and pi1 together (Q-Adapter: the head reads the
frozen hidden states; LoRA: the same model with the adapter switched off), and for Q-Adapter every
decode-time α0 of `--alpha0` at once. From them (the benchmarks: lm-eval runs each policy on its
own, but the α0 of one Q-Adapter share their log-likelihood passes, support/lm_eval_model.Sweep;
answers written for generation tasks are decoded once per α0):

Learned the preference?
  pairwise accuracy on held-out pairs, with each method's own implicit reward: Q-Adapter the
    return R(x,y) = Σ_t r2 (residual_q.py); DPO and SFT β·Σ_t log pi/pi1 (Rafailov et al.); the
    frozen model its log-likelihood log pi1(y|x). Plus the mean margin reward(y_w) − reward(y_l).
  adherence (`--adherence`): greedy answers to the test prompts, scored by demo/child.py (the
    demo's; share "child"), or on DSP by judge.py's style
    classifier (--scorer judge: the share judged in style and the mean style probability, on the
    checkpoint's held-out queries); and the share of degenerate (looping) answers.
Forgot what it knew?
  benchmarks through lm-evaluation-harness (`--tasks`, support/lm_eval_model.py): each policy is an
    lm-eval model whose log-likelihoods are its own (log pi~ for Q-Adapter, never the head alone),
    so every lm-eval task runs under it. Ours, in tasks/, read local JSON lines with lm-eval's own
    prompts: arc_easy_local (ARC-Easy validation, "Question: {question}\\nAnswer:" + " {choice}",
    acc and acc_norm: the sum of log p(continuation), and that divided by its length in characters),
    mmlu_local (MMLU validation, lettered choices, acc) and mmlu_continuation_local (its answers as
    text, acc and acc_norm), from the folder --retention-data (or $QADAPTER_RETENTION_DATA) names.
    lm-eval's own tasks (arc_easy, mmlu, ...) load from the hub.
  KL(pi ‖ pi1) per token, teacher-forced on the chosen responses of `--kl-data` (default the demo's
    held-out prompts: general questions, answered in the frozen model's own words), averaged over
    tokens.

A decode-time α0 sweep (`--alpha0 0.5 1 2 4`) sets α0 = α̃ = a: pi~ ∝ pi1·exp(Q_R / a), so a is the
weight on the frozen model relative to the head, without changing pi1's temperature; a → ∞ is pi1.
A head trained at α0 = α̃ = a (train.py's default: 0.1) is the trained policy at that a; other values are an extrapolation.
Its twin for the LoRA baselines is `--lora-scale 0.25 0.5 1`: the trained update scaled at decode
time, W + s·(α/r)·B·A (s = 0 is pi1, s = 1 as trained). Comparing the two curves, not two points,
says whether one method reaches a style at lower KL. `--queries training` answers training prompts
instead of held-out ones, so that a dial is picked without looking at the answers it is scored on.

    python evaluate.py --checkpoint runs/demo --checkpoint runs/demo-dpo --checkpoint runs/demo-sft \\
        --alpha0 0.5 1 2 4 --adherence --limit 50 --out results/demo --plot

    python evaluate.py --checkpoint runs/demo --tasks arc_easy_local,mmlu_continuation_local --mc-limit 100 \
        --retention-data DIR     # DIR holds arc_easy_validation.jsonl and mmlu_validation.jsonl

    python evaluate.py --checkpoint runs/dsp-qa-s0 --checkpoint runs/dsp-dpo-s0 --adherence --scorer judge \
        --gen-limit 32 --tasks arc_easy_local --out results/dsp-academy-s0
    python evaluate.py --combine results/dsp-academy-s0.json results/dsp-academy-s1.json --out results/dsp --plot

Writes OUT.json (every number), OUT.md (the table, to paste) and with --plot OUT.png (preference
against retention). --limit N takes the first N held-out pairs, KL sequences and prompts, and N
evenly spaced questions of each benchmark task (MMLU is sorted by subject).
"""
import argparse
import functools
import importlib
import importlib.util
import json
import re
import statistics
import time
from pathlib import Path

import torch
from tqdm import tqdm

import data
import model as M
from bt_loss import longer_wins, reward_metrics
from residual_q import (IGNORE, customised_logprobs, derived_reward, gather_actions, kl_divergence, next_tokens,
                        response_return, scored_states, soft_value)
from support import cli, data_files, loading

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------------------------------------
# policies: one forward pass -> per-token log-probs, KL to pi1 and implicit returns, per policy


def token_stats(logp, logp1, labels):
    """logp, logp1: (B, W, V) log-probs of a policy and of pi1 at the window's states; labels: (B, W).
    Returns (token_logp, kl), each (B, W-1), zero where no response token is taken:
    log pi(a_t|s_t), and KL(pi(·|s_t) ‖ pi1(·|s_t)) = Σ_a pi (log pi − log pi1)."""
    _, mask = next_tokens(labels)  # (B, W-1)
    kl = kl_divergence(logp, logp1)[:, :-1] * mask  # (B, W-1)
    return gather_actions(logp, labels), kl


class FrozenPolicy:
    """pi1 alone: what every other policy is compared with."""

    def __init__(self, base, name="frozen"):
        self.base, self.names, self.kind = base, [], "frozen"
        self.name = name

    def lm_policies(self):
        """{policy name: what support/lm_eval_model.PolicyLM scores}, "frozen" included."""
        from support.lm_eval_model import CausalLMPolicy
        return {"frozen": CausalLMPolicy(self.base)}

    def window_logp1(self, ids, mask, states):
        hidden = self.base.get_decoder()(input_ids=ids, attention_mask=mask,
                                         position_ids=M.positions(mask)).last_hidden_state  # (B, T, D)
        logits = self.base.get_output_embeddings()(M.pick(hidden, states)).float()  # (B, W, V)
        return torch.log_softmax(logits, dim=-1)

    @torch.no_grad()
    def score(self, ids, mask, labels):
        """ids, mask, labels: (B, T), right-padded. Returns {policy name: (token_logp, kl, ret)} with
        token_logp, kl (B, W-1) and ret (B,) the policy's implicit return, and "frozen" for pi1."""
        n = int(mask.sum(-1).max())  # columns that are padding in every row are skipped
        ids, mask, labels = ids[:, :n], mask[:, :n], labels[:, :n]
        states, window_labels = scored_states(labels)  # (B, W)
        out = self._score(ids, mask, states, window_labels)
        return out, window_labels

    def _score(self, ids, mask, states, labels):
        logp1 = self.window_logp1(ids, mask, states)  # (B, W, V)
        token_logp, kl = token_stats(logp1, logp1, labels)
        return {"frozen": (token_logp, kl, token_logp.sum(-1))}


class QAdapterPolicy(FrozenPolicy):
    """pi~ at each decode-time α0 of alphas ((α0, α̃) pairs), and pi1, from one forward pass."""

    def __init__(self, adapter, config, alphas, name):
        self.adapter, self.config, self.kind, self.name = adapter, config, "q-adapter", name
        self.base = adapter.base
        self.alphas = alphas
        self.names = [self.policy_name(a0, at) for a0, at in alphas]

    def lm_policies(self):
        from support.lm_eval_model import CausalLMPolicy, CustomisedPolicy
        return {"frozen": CausalLMPolicy(self.base),
                **{name: CustomisedPolicy(self.adapter, a0, at) for (a0, at), name in zip(self.alphas, self.names)}}

    def policy_name(self, alpha0, alpha_tilde):
        trained = (alpha0, alpha_tilde) == (self.config["alpha0"], self.config["alpha_tilde"])
        return self.name if trained and len(self.alphas) == 1 else f"{self.name} α0={alpha0:g}"

    def _score(self, ids, mask, states, labels):
        q_r, logp1, *_ = self.adapter(ids, mask, states)  # (B, W, V) each
        # a head stacked on earlier heads customises their policy (model.QAdapter.prior): its log pi1
        # is then not the base model's, which the frozen row and the KL are about
        base_logp = self.window_logp1(ids, mask, states) if len(getattr(self.adapter, "below", ())) else logp1
        token_logp1, _ = token_stats(base_logp, base_logp, labels)
        out = {"frozen": (token_logp1, torch.zeros_like(token_logp1), token_logp1.sum(-1))}
        gamma = self.config.get("gamma", 1.0)
        for (alpha0, alpha_tilde), name in zip(self.alphas, self.names):
            logp = customised_logprobs(q_r, logp1, alpha0, alpha_tilde)  # (B, W, V) log pi~
            v = soft_value(q_r, logp1, alpha0, alpha_tilde)  # (B, W)
            r2 = derived_reward(gather_actions(q_r, labels), v, labels, gamma)  # (B, W-1)
            out[name] = (*token_stats(logp, base_logp, labels), response_return(r2, labels))  # R(x, y)
        return out

    def generate(self, tokenizer, conversations, max_new_tokens, batch_size):
        from sample import generate_batched
        return {name: generate_batched(self.adapter, tokenizer, conversations, batch_size, desc=name,
                                       alpha0=a0, alpha_tilde=at, max_new_tokens=max_new_tokens)
                for (a0, at), name in zip(self.alphas, self.names)}


class LoraPolicy(FrozenPolicy):
    """A base model with an SFT or DPO LoRA adapter; pi1 is the same model with the adapter off.
    At each decode-time scale s of `scales` the update is scaled, W + s·(α/r)·B·A
    (baselines.scaled_update): one policy per s, the twin of Q-Adapter's α0 dial."""

    def __init__(self, peft_model, config, name, scales=None):
        self.peft_model, self.config, self.kind, self.name = peft_model, config, config["method"], name
        self.base = peft_model.get_base_model()
        self.scales = list(scales or [1.0])
        self.names = [name] if self.scales == [1.0] else [f"{name} s={s:g}" for s in self.scales]

    def at_scale(self, s):
        from baselines import scaled_update
        return scaled_update(self.peft_model, s)

    def lm_policies(self):
        from support.lm_eval_model import CausalLMPolicy
        return {"frozen": CausalLMPolicy(self.base, setting=self.peft_model.disable_adapter),
                **{name: CausalLMPolicy(self.base, setting=functools.partial(self.at_scale, s))  # the base with
                   for s, name in zip(self.scales, self.names)}}                                  # its LoRA layers: pi

    def _score(self, ids, mask, states, labels):
        with self.peft_model.disable_adapter():
            logp1 = self.window_logp1(ids, mask, states)  # (B, W, V) without the adapter: pi1
        token_logp1, _ = token_stats(logp1, logp1, labels)
        out = {"frozen": (token_logp1, torch.zeros_like(token_logp1), token_logp1.sum(-1))}
        beta = self.config.get("dpo_beta", 0.1)
        for s, name in zip(self.scales, self.names):
            with self.at_scale(s):
                logp = self.window_logp1(ids, mask, states)  # (B, W, V) with the (scaled) adapter: pi
            token_logp, kl = token_stats(logp, logp1, labels)
            out[name] = (token_logp, kl, beta * (token_logp.sum(-1) - token_logp1.sum(-1)))  # β·log pi/pi1
        return out

    def generate(self, tokenizer, conversations, max_new_tokens, batch_size):
        from baselines import hf_generate
        answers = {}
        for s, name in zip(self.scales, self.names):
            answers[name] = []
            with self.at_scale(s):
                for i in tqdm(range(0, len(conversations), batch_size), desc=name, leave=False):
                    answers[name] += hf_generate(self.peft_model, tokenizer, conversations[i:i + batch_size],
                                                 max_new_tokens)
        return answers


def frozen_generate(policy, tokenizer, conversations, max_new_tokens, batch_size):
    """Greedy answers of pi1 (HF generate on the base; equal to sample.generate(frozen_only))."""
    from baselines import hf_generate
    lm = policy.peft_model if isinstance(policy, LoraPolicy) else policy.base
    answers = []
    for i in tqdm(range(0, len(conversations), batch_size), desc="frozen", leave=False):
        batch = conversations[i:i + batch_size]
        if isinstance(policy, LoraPolicy):
            with policy.peft_model.disable_adapter():
                answers += hf_generate(lm, tokenizer, batch, max_new_tokens)
        else:
            answers += hf_generate(lm, tokenizer, batch, max_new_tokens)
    return answers


def policy_to_evaluate(path, alphas, device, dtype, trust_remote_code=False, scales=None):
    """A train.py or baselines.py output directory (told apart by config.json's "method"), as a
    policy this script scores: Q-Adapter's loaded by support/loading.load_policy (at each α0 of
    alphas), DPO's and SFT's by baselines.load_checkpoint (at each scale of scales). Returns (policy, tokenizer)."""
    path = Path(path)
    ckpt = path / "checkpoint" if (path / "checkpoint" / loading.CONFIG_FILE).exists() else path
    if not (ckpt / loading.CONFIG_FILE).exists():
        raise SystemExit(f"error: --checkpoint {path}: no config.json (not a train.py or baselines.py output)")
    try:
        config = json.loads((ckpt / loading.CONFIG_FILE).read_text())
    except ValueError as e:
        raise SystemExit(f"error: {ckpt / loading.CONFIG_FILE}: not JSON ({e})")
    name = path.name if path.name != "checkpoint" else path.parent.name
    if "method" in config:
        from baselines import load_checkpoint
        peft_model, tok, config = load_checkpoint(ckpt, device, dtype, trust_remote_code=trust_remote_code)
        return LoraPolicy(peft_model, config, name, scales), tok
    adapter, tok, config = loading.load_policy(ckpt, device, dtype, trust_remote_code=trust_remote_code)
    adapter.head.eval()
    pairs = [(a, a) for a in alphas] if alphas else [(config["alpha0"], config["alpha_tilde"])]
    return QAdapterPolicy(adapter, config, pairs, name), tok


# ------------------------------------------------------------------------------------------------
# data: held-out pairs, sequences for the KL


def adherence_prompts_and_scorer(args, config):
    """(conversations to answer, score(texts, finished) -> {'adherence', 'degenerate', ...}) for --adherence.

    child: the demo's rule-based scorer (demo/child.py). judge: judge.py's classifier of the DSP
    style, fitted on the training queries of the checkpoint's split, so the held-out queries answered
    here are unseen by it (--queries training: the training queries instead, to pick a dial on them);
    'adherence' is the share judged in style, 'mean_prob' its mean probability,
    'degenerate' the share of looping answers (demo.child.is_degenerate)."""
    limit, training = args.gen_limit or None, args.queries == "training"
    if args.scorer == "none":
        from demo.child import is_degenerate
        pairs = held_out_pairs(args.prompts, config, 0)
        return distinct_prompts(pairs)[:limit], lambda texts, finished: {
            "degenerate": sum(map(is_degenerate, texts)) / max(len(texts), 1), "n": len(texts)}
    if args.scorer != "judge":
        default = HERE / "demo" / ("child_train.jsonl" if training else "child_test.jsonl")
        pairs = held_out_pairs(args.prompts or str(default), {}, 0)
        return distinct_prompts(pairs)[:limit], importlib.import_module(f"demo.{args.scorer}").adherence
    import judge as style_judge
    from demo.child import is_degenerate
    source = args.judge_data or config.get("data")
    if not source:
        raise SystemExit("error: --scorer judge: give --judge-data FILE (the checkpoint names no --data)")
    style, train, test = style_judge.for_data(source, config.get("test_fraction", 0.2),
                                              config.get("split_seed", config.get("seed", 0)))
    pairs = held_out_pairs(args.prompts, {}, 0) if args.prompts else train if training else test

    def score(texts, finished):
        return {**style.adherence(texts), "degenerate": sum(map(is_degenerate, texts)) / max(len(texts), 1)}
    return distinct_prompts(pairs)[:limit], score


def distinct_prompts(pairs):
    seen = {}
    for p in pairs:
        seen.setdefault(json.dumps(p.prompt, sort_keys=True), p.prompt)
    return list(seen.values())


def pad_rows(rows, pad_id):
    """rows: list of (ids, labels) -> right-padded input_ids, attention_mask, labels: (N, T)."""
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), T), dtype=torch.long)
    labels = torch.full((len(rows), T), IGNORE, dtype=torch.long)
    for i, (row_ids, row_labels) in enumerate(rows):
        ids[i, :len(row_ids)], mask[i, :len(row_ids)] = torch.tensor(row_ids), 1
        labels[i, :len(row_labels)] = torch.tensor(row_labels)
    return ids, mask, labels


def held_out_pairs(source, config, limit):
    """The test pairs a checkpoint was evaluated on: --pairs FILE, or its config's test data (or the
    same split by prompt of its training data that train.py made)."""
    try:
        if source:
            return data.load_pairs(source)[:limit or None]
        return data.held_out_of(config)[:limit or None]
    except data.DataError as e:
        raise SystemExit(f"error: {e}")


def evenly_spaced(items, limit):
    if not limit or limit >= len(items):
        return items
    return [items[i * len(items) // limit] for i in range(limit)]


# ------------------------------------------------------------------------------------------------
# the measurements


def run_batches(policy, rows, pad_id, batch_size, desc):
    """Scores rows (list of (ids, labels)) in batches: {name: (token_logp list, kl sum, kl tokens, returns)}
    with per-row response log-likelihoods and returns."""
    out = {}
    # longest first, so that batches hold rows of similar length (less padding)
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    for start in tqdm(range(0, len(rows), batch_size), desc=desc, leave=False):
        idx = order[start:start + batch_size]
        ids, mask, labels = pad_rows([rows[i] for i in idx], pad_id)
        device = next(policy.base.parameters()).device
        scores, window_labels = policy.score(ids.to(device), mask.to(device), labels.to(device))
        _, response = next_tokens(window_labels)  # (B, W-1)
        for name, (token_logp, kl, ret) in scores.items():
            o = out.setdefault(name, {"logp": [0.0] * len(rows), "ret": [0.0] * len(rows), "kl": 0.0, "tokens": 0})
            for j, i in enumerate(idx):
                o["logp"][i], o["ret"][i] = float(token_logp[j].sum()), float(ret[j])
            o["kl"] += float(kl.sum())
            o["tokens"] += int(response.sum())
    return out


def pairwise(policy, tokenizer, pairs, cutoff, batch_size):
    """Held-out pairwise accuracy and mean margin of each policy's own implicit reward, and the
    share of pairs whose chosen answer the policy itself makes likelier (log pi(y_w|x) > log pi(y_l|x)),
    a yardstick common to all methods that moves only when the policy does."""
    examples = [e for e in (data.tokenize_pair(tokenizer, p, cutoff) for p in pairs) if e is not None]
    rows = [(e["chosen_ids"], e["chosen_labels"]) for e in examples] + \
           [(e["rejected_ids"], e["rejected_labels"]) for e in examples]
    n = len(examples)
    result = {}
    for name, o in run_batches(policy, rows, tokenizer.pad_token_id, batch_size, "pairs").items():
        returns, logp = torch.tensor(o["ret"], dtype=torch.float64), torch.tensor(o["logp"], dtype=torch.float64)
        implicit = reward_metrics(returns[:n], returns[n:])  # the policy's implicit reward
        likelihood = reward_metrics(logp[:n], logp[n:])  # the policy itself: pi(y_w|x) > pi(y_l|x)?
        result[name] = {"pairwise_accuracy": float(implicit["rewards/accuracies"]),
                        "margin": float(implicit["rewards/margins"]),
                        "likelihood_accuracy": float(likelihood["rewards/accuracies"]), "pairs": n}
    if "frozen" in result:  # a yardstick of the data, on the frozen row: the longer response wins (ties half)
        result["frozen"]["longer_wins_accuracy"] = float(longer_wins(
            [response_length(e["chosen_labels"]) for e in examples],
            [response_length(e["rejected_labels"]) for e in examples]))
    return result


def response_length(labels):
    """Response tokens of one tokenized answer (its labels not IGNORE)."""
    return sum(label != IGNORE for label in labels)


def kl_to_frozen(policy, tokenizer, pairs, cutoff, batch_size):
    """Mean per-token KL(pi ‖ pi1), teacher-forced on the chosen responses of pairs."""
    examples = [e for e in (data.tokenize_pair(tokenizer, p, cutoff) for p in pairs) if e is not None]
    rows = [(e["chosen_ids"], e["chosen_labels"]) for e in examples]
    out = run_batches(policy, rows, tokenizer.pad_token_id, batch_size, "KL")
    return {name: {"kl": o["kl"] / max(o["tokens"], 1), "kl_tokens": o["tokens"]} for name, o in out.items()}


def time_per_pair(run_dir):
    """Seconds of training steps per preference pair, from a run's metrics.jsonl (pairs_per_s of
    each step; evaluation and checkpointing not counted). None when the run has no such file."""
    run_dir = Path(run_dir)
    path = run_dir / "metrics.jsonl" if run_dir.name != "checkpoint" else run_dir.parent / "metrics.jsonl"
    if not path.exists():
        return None
    rates = [json.loads(line).get("pairs_per_s") for line in path.read_text().splitlines() if line.strip()]
    rates = [r for r in rates if r]
    return sum(1 / r for r in rates) / len(rates) if rates else None


# ------------------------------------------------------------------------------------------------
# benchmarks: lm-evaluation-harness tasks under each policy (support/lm_eval_model.py)


def task_names(args):
    """--tasks, plus what the older flags --arc-easy / --mmlu ask for: a .jsonl file is our local
    task on that file, another value lm-eval's own task (from the hub). Returns (names, {name: file})."""
    names, files = [t.strip() for t in (args.tasks or "").split(",") if t.strip()], {}
    for flag, local, hub in (("arc_easy", "arc_easy_local", "arc_easy"), ("mmlu", "mmlu_local", "mmlu")):
        value = getattr(args, flag)
        if value and value.endswith(".jsonl"):
            check_task_file(f"--{flag.replace('_', '-')}", value, local)
            names, files[local] = names + [local], value
        elif value:
            names.append(hub)
    return list(dict.fromkeys(names)), files


def _arc_row(row):
    choices = row.get("choices") if isinstance(row.get("choices"), dict) else {}
    return ("question" in row and isinstance(choices.get("text"), list) and isinstance(choices.get("label"), list)
            and row.get("answerKey") in choices["label"])


def _mmlu_row(row):
    choices, answer = row.get("choices"), row.get("answer")
    return ("question" in row and isinstance(choices, list) and isinstance(answer, int)
            and 0 <= answer < len(choices))


# what one row of a local task's file needs (tasks/*.yaml read these fields)
ROW_CHECKS = {"arc_easy_local": (_arc_row, "an ARC row", "question, choices with text and label, and answerKey "
                                                          "among the labels"),
              "mmlu_local": (_mmlu_row, "an MMLU row", "question, a list of choices, and answer, an index into them")}


def check_task_file(flag, path, task):
    """A local task's .jsonl, read up front: a missing file, a line that is not a JSON object, or a row
    without the fields the task reads is one line naming it (lm-eval would name no line, or fail later
    in a traceback)."""
    try:
        rows = data_files.read_rows(path)
    except data_files.DataError as e:
        raise SystemExit(f"error: {flag} {e}")
    ok, kind, needs = ROW_CHECKS[task]
    for where, row in rows:
        if not ok(row):
            raise SystemExit(f"error: {flag} {where}: not {kind} (needs {needs})")


class Benchmarks:
    """The run's lm-eval tasks, loaded once (names checked, data read, questions picked), then
    scored under each policy by lm_eval.simple_evaluate with a PolicyLM around it."""

    def __init__(self, names, files, data_dir, limit, num_fewshot, max_length):
        from support import lm_eval_model
        self.names, self.num_fewshot, self.max_length = names, num_fewshot, max_length
        self.specs = lm_eval_model.task_specs(names, data_dir, files)
        self.manager = lm_eval_model.task_manager(names)
        try:
            tasks = self.manager.load(self.specs)["tasks"]
        except Exception as e:  # an unknown name (KeyError), or the hub out of reach: many kinds, one line
            raise SystemExit(f"error: --tasks {','.join(names)}: cannot load ({type(e).__name__}: "
                             f"{str(e).splitlines()[0] if str(e) else ''})")
        # N evenly spaced questions of each task (lm-eval's own --limit would take the first N)
        self.samples = {name: evenly_spaced(list(range(len(task.eval_docs))), limit)
                        for name, task in tasks.items()} if limit else None

    def score(self, policy, tokenizer, names, batch_size):
        """{policy name: {task/acc, task/acc_stderr, task/acc_norm, task/acc_norm_stderr, task/n}} for
        the policies of `policy` (and pi1) that are in names."""
        import lm_eval
        from support.lm_eval_model import CustomisedPolicy, PolicyLM, Sweep
        result = {}
        policies = {name: p for name, p in policy.lm_policies().items() if name in names}
        customised = {name: p for name, p in policies.items() if isinstance(p, CustomisedPolicy)}
        sweep = Sweep(customised) if len(customised) > 1 else None  # the α0 of one checkpoint: one pass
        for name, lm_policy in policies.items():
            lm = PolicyLM(lm_policy, tokenizer, batch_size, max_length=self.max_length,
                          sweep=(sweep, name) if sweep is not None and name in customised else None)
            out = lm_eval.simple_evaluate(model=lm, tasks=self.specs, task_manager=self.manager,
                                          samples=self.samples, num_fewshot=self.num_fewshot,
                                          log_samples=False, bootstrap_iters=1000)
            result[name] = task_metrics(out, self.names)
        return result


def task_metrics(out, names):
    """Our row entries from simple_evaluate's output: each asked task's (or group's) acc and acc_norm,
    with their standard errors, and the number of questions."""

    def questions(name):  # a group (lm-eval's mmlu) counts the questions of its tasks
        if name in out.get("n-samples", {}):
            return out["n-samples"][name]["effective"]
        return sum(questions(child) for child in out.get("group_subtasks", {}).get(name, []))

    row = {}
    for name in names:
        measured = out["results"].get(name, {})
        for metric in ("acc", "acc_norm"):
            for key, value in ((metric, measured.get(f"{metric},none")),
                               (f"{metric}_stderr", measured.get(f"{metric}_stderr,none"))):
                if isinstance(value, (int, float)):
                    row[f"{name}/{key}"] = float(value)
        row[f"{name}/n"] = questions(name)
    return row


# ------------------------------------------------------------------------------------------------
# output: JSON, Markdown, picture

BEFORE = [("pairwise_accuracy", "pairwise acc", "{:.3f}"), ("margin", "margin", "{:.2f}"),
          ("likelihood_accuracy", "π(y_w)>π(y_l)", "{:.3f}"), ("longer_wins_accuracy", "longer wins", "{:.3f}"),
          ("adherence", "adherence", "{:.3f}"), ("mean_prob", "style prob", "{:.3f}"),
          ("degenerate", "degenerate", "{:.3f}")]
AFTER = [("kl", "KL(pi‖pi1)/token", "{:.4f}"), ("s_per_pair", "train s/pair", "{:.2f}")]


def task_columns(results):
    """The benchmark keys of the results, in the order they first appear: TASK/acc, TASK/acc_norm."""
    keys = [k for r in results.values() for k in r if k.split("/")[-1] in ("acc", "acc_norm") and "/" in k]
    return list(dict.fromkeys(keys))


def markdown_table(results):
    """One row per policy; a benchmark cell is "acc ± its standard error" where lm-eval gave one."""
    cols = [c for c in BEFORE if any(c[0] in r for r in results.values())]
    cols += [(k, k.replace("/", " "), "{:.3f}") for k in task_columns(results)]
    cols += [c for c in AFTER if any(c[0] in r for r in results.values())]
    lines = ["| policy | " + " | ".join(c[1] for c in cols) + " |", "| --- |" + " --- |" * len(cols)]
    for name, r in results.items():
        cells = []
        for key, _, fmt in cols:
            value, spread = r.get(key), r.get(f"{key}_std", r.get(f"{key}_stderr"))
            cells.append("" if value is None else fmt.format(value) + (f" ± {fmt.format(spread)}" if spread is not None
                                                                       else ""))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_tradeoff(results, path, preference_key):
    """Preference (y) against retention (x): benchmark accuracy under the policy, and KL to pi1.
    Q-Adapter's α0 sweep is a line, as is a LoRA baseline's --lora-scale sweep; single policies are
    points, the frozen model is the reference."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib==3.11.2): no picture, the table has the numbers")
        return None
    tasks = task_columns(results)  # each benchmark's acc_norm, or its acc where it has no acc_norm
    retention = [k for k in tasks if k.endswith("/acc_norm") or k[:-len("acc")] + "acc_norm" not in tasks]
    retention += ["kl"] if any("kl" in r for r in results.values()) else []
    if not retention:
        print("no retention measurement to plot against")
        return None
    fig, axes = plt.subplots(1, len(retention), figsize=(5 * len(retention), 4), squeeze=False)
    # a marker per method, a colour per run (a second run of a method gets the next shade)
    styles = {"frozen": ("*", ["black"]), "q-adapter": ("o", ["tab:blue", "tab:cyan", "navy"]),
              "dpo": ("s", ["tab:red", "tab:orange", "darkred"]), "sft": ("^", ["tab:green", "olive", "darkgreen"])}
    for ax, key in zip(axes[0], retention):
        groups = {}
        for name, r in results.items():
            if r.get(key) is None or r.get(preference_key) is None:
                continue
            dial = ("α0", r["alpha0"]) if r.get("alpha0") is not None else ("s", r.get("lora_scale", 1.0))
            groups.setdefault((r["kind"], r.get("run")), []).append(
                (dial, r[key], r[preference_key], name,
                 r.get(f"{key}_std", 0.0), r.get(f"{preference_key}_std", 0.0)))  # spread over seeds (--combine)
        runs_of_kind, labelled = {}, set()
        for (kind, run), points in groups.items():
            points.sort()
            marker, colors = styles.get(kind, ("x", ["gray"]))
            nth = runs_of_kind.setdefault(kind, []) + [run]
            runs_of_kind[kind] = nth
            color = colors[(len(nth) - 1) % len(colors)]
            xs, ys = [p[1] for p in points], [p[2] for p in points]
            ax.plot(xs, ys, marker=marker, color=color, linestyle="-" if len(points) > 1 else "",
                    markersize=12 if kind == "frozen" else 7, label=points[0][3] if len(points) == 1 else
                    f"{points[0][3].split(' ')[0]} ({points[0][0][0]} sweep)")
            if any(p[4] or p[5] for p in points):
                ax.errorbar(xs, ys, xerr=[p[4] for p in points], yerr=[p[5] for p in points], fmt="none",
                            ecolor=color, alpha=0.5, capsize=3)
            if len(points) > 1:
                for (dial, value), x, y, *_ in points:  # α0 labels above their points, s labels below
                    spot = (f"{dial}={value:g}", f"{x:.1g}", f"{y:.2f}")  # one label where two runs' points meet
                    if spot in labelled:
                        continue
                    labelled.add(spot)
                    ax.annotate(f"{dial}={value:g}", (x, y), textcoords="offset points", fontsize=8,
                                xytext=(4, 4) if dial == "α0" else (4, -11))
        ax.set_xlabel({"kl": "KL(π‖π1) per token (lower: closer to frozen)"}.get(key, f"{key} under the policy"))
        if key == "kl":  # from 1e-4 to 1: logarithmic past 1e-3, linear below it (the frozen model is at 0)
            ax.set_xscale("symlog", linthresh=1e-3)
        ax.set_ylabel(preference_key.replace("_", " "))
        ax.grid(alpha=0.3)
    legend = {}  # every panel's entries (a run without a benchmark is only in the KL panel), below the panels
    for ax in axes[0]:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(label, handle)
    handles, labels = list(legend.values()), list(legend)
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 3), fontsize=8)
    title = "learning the preference vs keeping what the frozen model knew"
    fig.suptitle(title if len(axes[0]) > 1 else title.replace(" vs ", "\nvs "), fontsize=11)  # one panel: two lines
    fig.tight_layout(rect=(0, 0.06 * (1 + (len(labels) - 1) // 3), 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ------------------------------------------------------------------------------------------------


def build_parser():
    ap = cli.Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", action="append", default=[],
                    help="a train.py or baselines.py output directory (repeatable); the frozen model is "
                         "always scored beside them")
    ap.add_argument("--alpha0", type=float, nargs="+", default=None,
                    help="decode-time α0 values for Q-Adapter checkpoints, each with α̃ = α0 (pi~ ∝ pi1·exp(Q_R/α0)); "
                         "default: the trained α0 and α̃")
    ap.add_argument("--lora-scale", type=float, nargs="+", default=None, metavar="S",
                    help="decode-time scales s for DPO/SFT checkpoints, the twin of --alpha0: the LoRA update "
                         "scaled, W + s·(α/r)·B·A (0: the frozen model; default: 1, as trained)")
    ap.add_argument("--pairs", default=None,
                    help="held-out preference pairs (default: each checkpoint's own test data or split)")
    ap.add_argument("--kl-data", default=str(HERE / "demo" / "child_test.jsonl"),
                    help="pairs whose chosen responses are scored teacher-forced for the KL (default: the demo's "
                         "held-out prompts, general questions)")
    ap.add_argument("--tasks", default="",
                    help="lm-evaluation-harness tasks scored under every policy, comma-separated. Offline, ours "
                         "(tasks/*.yaml, read from --retention-data): arc_easy_local, mmlu_local (lm-eval's mmlu "
                         "prompt, lettered choices), mmlu_continuation_local (answers as text). With internet, "
                         "lm-eval's own names load from the hub: arc_easy, mmlu, hellaswag, ... (default: none)")
    ap.add_argument("--retention-data", default=None,
                    help="folder holding the local tasks' JSON lines (arc_easy_validation.jsonl, mmlu_validation.jsonl; "
                         "default: the folder $QADAPTER_RETENTION_DATA names)")
    ap.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples per question (default: the task's, 0)")
    ap.add_argument("--arc-easy", default=None,
                    help="older spelling: a .jsonl file adds arc_easy_local on that file, a hub name (allenai/ai2_arc) "
                         "lm-eval's arc_easy")
    ap.add_argument("--mmlu", default=None,
                    help="older spelling: a .jsonl file adds mmlu_local on that file, a hub name (cais/mmlu) "
                         "lm-eval's mmlu")
    ap.add_argument("--adherence", action="store_true",
                    help="generate greedy answers to --prompts and score them with --scorer")
    ap.add_argument("--scorer", default="child", choices=["child", "judge", "none"],
                    help="what --adherence scores: demo/child.py (the demo's preference), "
                         "judge.py's style classifier fitted on the training queries of --judge-data (DSP), or "
                         "none: only the answers (to the checkpoint's held-out prompts) and the share that loop")
    ap.add_argument("--judge-data", default=None,
                    help="--scorer judge: the preference file the judge learns the style from (default: the first "
                         "checkpoint's --data), split as that checkpoint split it")
    ap.add_argument("--prompts", default=None,
                    help="prompts for --adherence: a preference .jsonl (its distinct prompts; default: the demo's "
                         "held-out prompts, or with --scorer judge the first checkpoint's held-out queries)")
    ap.add_argument("--queries", default="held-out", choices=["held-out", "training"],
                    help="whose prompts --adherence answers when --prompts is not given: the held-out ones, or the "
                         "training ones, to pick a decode-time --alpha0 / --lora-scale without looking at the answers "
                         "it is then scored on")
    ap.add_argument("--limit", type=int, default=0,
                    help="at most N pairs, KL sequences and prompts, N questions per benchmark task (0: all)")
    ap.add_argument("--mc-limit", type=int, default=None,
                    help="questions per benchmark task, evenly spaced (default --limit)")
    ap.add_argument("--gen-limit", type=int, default=None, help="prompts for --adherence (default --limit)")
    ap.add_argument("--cutoff", type=int, default=None,
                    help="tokens per pair and KL sequence (default: the checkpoint's cutoff)")
    ap.add_argument("--mc-cutoff", type=int, default=None,
                    help="tokens per benchmark forward pass, a longer question keeps its end (default: the model's "
                         "context length, as lm-eval's HFLM)")
    ap.add_argument("--max-new-tokens", type=int, default=128, help="tokens per generated answer at most")
    ap.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass")
    ap.add_argument("--out", default="results/eval", help="writes OUT.json and OUT.md (and OUT.png with --plot)")
    ap.add_argument("--plot", action="store_true", help="draw preference against retention into OUT.png (matplotlib)")
    ap.add_argument("--combine", nargs="+", default=None, metavar="OUT.json",
                    help="no model is run: merge the outputs of runs named RUN-s0, RUN-s1, ... (one file per seed) "
                         "into OUT.md/.json, each number the mean ± standard deviation over the seeds")
    ap.add_argument("--replot", action="store_true",
                    help="only redraw OUT.png from an existing OUT.json (no model is run; --checkpoint not needed)")
    ap.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: a GPU if there is one)")
    ap.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                    help="dtype of the frozen model (auto: bf16 on a GPU, float32 on a CPU)")
    ap.add_argument("--trust-remote-code", action="store_true", help="allow the base model's own code (opt-in)")
    return ap


def parse_args(argv=None):
    args = build_parser().parse_args(argv)
    if not args.checkpoint and not args.replot and not args.combine:
        raise SystemExit("error: give at least one --checkpoint DIR (a train.py or baselines.py output)")
    for flag in ("limit", "mc_limit", "gen_limit", "max_new_tokens", "batch_size", "cutoff", "mc_cutoff", "num_fewshot"):
        value = getattr(args, flag)
        if value is not None and (value < 0 or (value == 0 and flag in ("batch_size", "cutoff", "mc_cutoff",
                                                                         "max_new_tokens"))):
            raise SystemExit(f"error: --{flag.replace('_', '-')} must be positive, got {value}")
    if args.alpha0 and any(a <= 0 for a in args.alpha0):
        raise SystemExit(f"error: --alpha0 values must be positive, got {args.alpha0}")
    if args.queries == "training" and args.scorer == "none":
        raise SystemExit("error: --queries training is for picking a dial by a score: give --scorer child or judge")
    if args.lora_scale and any(s < 0 for s in args.lora_scale):
        raise SystemExit(f"error: --lora-scale values must be 0 or more, got {args.lora_scale}")
    args.mc_limit = args.limit if args.mc_limit is None else args.mc_limit
    args.gen_limit = args.limit if args.gen_limit is None else args.gen_limit
    args.task_names, args.task_files = task_names(args)
    for wanted, module, flag in ((args.task_names, "lm_eval", "--tasks"),
                                 (args.adherence and args.scorer == "judge", "sklearn", "--scorer judge")):
        if wanted and importlib.util.find_spec(module) is None:
            raise SystemExit(f"error: {flag} needs {module}, which is not installed: "
                             f"pip install -r requirements-eval.txt (make test installs it)")
    return args


def write_results(args, results, t_start, settings=None):
    """OUT.json (settings and every number) and OUT.md (the table), each replaced atomically.
    settings: what produced the numbers (default: this call's flags)."""
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = settings or {**vars(args), "wall_time_s": round(time.time() - t_start, 1)}
    table = markdown_table(results)
    for path, text in ((out.with_suffix(".json"), json.dumps({"settings": settings, "results": results}, indent=2,
                                                             ensure_ascii=False)),
                       (out.with_suffix(".md"), table)):
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(text)
        tmp.replace(path)
    return table


def combine(paths):
    """Several evaluate.py OUT.json files (one per seed) as one set of rows: a policy named RUN-sSEED
    is grouped with the same RUN of the other seeds (a Q-Adapter one by its decode-time α0 too); each number is the mean over the
    seeds, with KEY_std the standard deviation (n - 1) and "seeds" the count."""
    groups = {}
    for path in paths:
        try:
            results = json.loads(Path(path).read_text())["results"]
        except (OSError, ValueError, KeyError) as e:
            raise SystemExit(f"error: --combine {path}: not an evaluate.py output ({e})")
        for name, row in results.items():  # "RUN-s1" (its trained α0) and "RUN-s0 α0=0.1" are one group
            key = re.sub(r"-s\d+$", "", name.split(" ")[0])
            if row.get("alpha0") is not None:
                key += f" α0={row['alpha0']:g}"
            elif row.get("lora_scale", 1.0) != 1.0:  # s = 1 is the trained policy, a run without --lora-scale
                key += f" s={row['lora_scale']:g}"
            groups.setdefault(key, []).append(row)
    combined = {}
    for name, rows in groups.items():
        out = {k: rows[0][k] for k in ("kind", "alpha0", "alpha_tilde", "lora_scale") if k in rows[0]}
        out.update(run=name.split(" ")[0], seeds=len(rows))  # one run's α0 (or s) values are one line in the plot
        numbers = [k for k, v in rows[0].items() if isinstance(v, (int, float)) and not isinstance(v, bool)
                   and not k.endswith(("_stderr", "/n")) and k not in out and k not in ("n", "pairs")]
        for k in numbers:
            values = [r[k] for r in rows if isinstance(r.get(k), (int, float))]
            out[k] = statistics.fmean(values)
            if len(values) > 1:
                out[f"{k}_std"] = statistics.stdev(values)
        combined[name] = out
    return combined


def replot(args):
    path = Path(args.out).with_suffix(".json")
    try:
        saved = json.loads(path.read_text())
        results, adherence = saved["results"], saved["settings"].get("adherence")
    except (OSError, ValueError, KeyError) as e:
        raise SystemExit(f"error: --replot: cannot read {path} ({e})")
    return plot_tradeoff(results, path.with_suffix(".png"), "adherence" if adherence else "pairwise_accuracy")


def main(argv=None):
    args = parse_args(argv)
    if args.replot:
        print(f"wrote {replot(args)}")
        return None
    if args.combine:
        results = combine(args.combine)
        args.adherence = any("adherence" in r for r in results.values())
        sources = {path: json.loads(Path(path).read_text()).get("settings") for path in args.combine}
        settings = {"combine": args.combine, "adherence": args.adherence, "sources": sources}
        print("\n" + write_results(args, results, time.time(), settings))
        if args.plot:
            print(f"wrote {replot(args)}")
        return results
    t_start = time.time()
    device, dtype, why = loading.pick_device(args.device, args.dtype)
    print(why)
    benchmarks = Benchmarks(args.task_names, args.task_files, args.retention_data, args.mc_limit, args.num_fewshot,
                            args.mc_cutoff) if args.task_names else None
    kl_pairs = held_out_pairs(args.kl_data, {}, args.limit) if args.kl_data else []
    prompts, score_answers = [], None

    results, frozen_done = {}, False
    for run in args.checkpoint:
        policy, tok = policy_to_evaluate(run, args.alpha0, device, dtype, args.trust_remote_code, args.lora_scale)
        cutoff = args.cutoff or policy.config.get("cutoff", 256)
        names = policy.names + ([] if frozen_done else ["frozen"])
        rows = {n: {"kind": "frozen" if n == "frozen" else policy.kind, "run": None if n == "frozen" else run}
                for n in names}
        if isinstance(policy, QAdapterPolicy):
            for (a0, at), n in zip(policy.alphas, policy.names):
                rows[n].update(alpha0=a0, alpha_tilde=at)
        if isinstance(policy, LoraPolicy) and policy.scales != [1.0]:
            for s, n in zip(policy.scales, policy.names):
                rows[n].update(lora_scale=s)
        rows[policy.names[0]]["s_per_pair"] = time_per_pair(run)
        if len(policy.names) > 1:
            for n in policy.names[1:]:
                rows[n]["s_per_pair"] = rows[policy.names[0]]["s_per_pair"]
        print(f"{run}: {policy.kind}, scoring {', '.join(names)}")

        def merge(measured):
            for n, values in measured.items():
                if n in rows:
                    rows[n].update(values)

        pairs = held_out_pairs(args.pairs, policy.config, args.limit)
        merge(pairwise(policy, tok, pairs, cutoff, args.batch_size))
        if kl_pairs:
            merge(kl_to_frozen(policy, tok, kl_pairs, cutoff, args.batch_size))
        if benchmarks:
            merge(benchmarks.score(policy, tok, set(names), args.batch_size))
        if args.adherence and score_answers is None:  # the first checkpoint decides the prompts and the judge
            prompts, score_answers = adherence_prompts_and_scorer(args, policy.config)
        if prompts:
            answers = policy.generate(tok, prompts, args.max_new_tokens, args.batch_size)
            if not frozen_done:
                answers["frozen"] = frozen_generate(policy, tok, prompts, args.max_new_tokens, args.batch_size)
            for n, a in answers.items():
                rows[n].update(score_answers(*zip(*a)))
                rows[n]["answers"] = [{"prompt": p[-1]["content"], "answer": t, "finished": f}
                                      for p, (t, f) in zip(prompts, a)]
        if not frozen_done:  # the frozen row goes first; its pairwise numbers are on this run's pairs
            results = {"frozen": rows.pop("frozen"), **results}
            frozen_done = True
        results.update(rows)
        del policy
        table = write_results(args, results, t_start)  # after each checkpoint: a crash keeps what was done

    out = Path(args.out)
    print("\n" + table)
    written = [out.with_suffix(".json"), out.with_suffix(".md")]
    if args.plot:
        preference = "adherence" if args.adherence else "pairwise_accuracy"
        if plot_tradeoff(results, out.with_suffix(".png"), preference):
            written.append(out.with_suffix(".png"))
    print(f"wall time {time.time() - t_start:.0f} s; wrote {', '.join(map(str, written))}")
    return results


if __name__ == "__main__":
    cli.run(main)
