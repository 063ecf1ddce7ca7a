"""lm-evaluation-harness (the `lm-eval` package) as the benchmark engine, on any of our policies.

`PolicyLM` is an lm-eval model (a TemplateLM: lm-eval tokenises the requests, we score them) over
one policy, which gives log-probabilities over the next token at chosen states of a batch and one
KV-cached decoding step:

  CausalLMPolicy(model)               pi1, a Hugging Face causal LM as it is (the frozen model), or a
                                      peft model's base with its LoRA adapter on (DPO / SFT baselines);
                                      setting=peft_model.disable_adapter scores pi1 of that model
  CustomisedPolicy(adapter, α0, α̃)    pi~ = softmax((Q_R + α0·log pi1) / α̃) of a model.QAdapter: one
                                      head, a stacked chain or a weighted composition (never the head alone)
  Sweep({name: CustomisedPolicy})     several pi~ of one adapter from one forward pass (an α0 sweep):
                                      PolicyLM(policy, ..., sweep=(sweep, name)) for each

The three request kinds of lm-eval, as its own HFLM answers them (the same tokenisation, truncation
and windows, so a zero head with α0 = α̃ gives HFLM's numbers: tests/test_lm_eval.py):
  loglikelihood(context, continuation)  Σ log pi(continuation token | everything before it), and
                                        whether greedy decoding from pi would give the continuation;
  loglikelihood_rolling(text)           the same over a whole text, in windows of max_length tokens;
  generate_until(context, gen_kwargs)   decoding from pi with KV caches (sample.next_logits for pi~),
                                        up to max_gen_toks tokens, cut at the first `until` string.

Tasks: lm-eval's own by name (arc_easy, mmlu, ...: they load from the hub), or ours in tasks/
(arc_easy_local, mmlu_local, mmlu_continuation_local), which read local JSON-lines copies from a
folder that evaluate.py --retention-data or $QADAPTER_RETENTION_DATA names. `task_manager` and
`task_specs` load them, with their data files made absolute in that folder.

    lm = PolicyLM(CustomisedPolicy(adapter, alpha0=1.0, alpha_tilde=1.0), tokenizer, batch_size=8)
    names = ["arc_easy_local"]
    out = lm_eval.simple_evaluate(model=lm, tasks=task_specs(names), task_manager=task_manager(names))
    out["results"]["arc_easy_local"]["acc,none"]
"""
import contextlib
import os
from pathlib import Path

import torch
from lm_eval.api.model import TemplateLM
from lm_eval.models.utils import (Collator, handle_stop_sequences, normalize_gen_kwargs,
                                  postprocess_generated_text, resolve_max_length)
from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
from tqdm import tqdm
from transformers import DynamicCache

from model import pick, positions
from residual_q import customised_logits
from support.compat import run_decoder

REPO = Path(__file__).resolve().parents[1]
TASKS_DIR = REPO / "tasks"
DATA_ENV = "QADAPTER_RETENTION_DATA"


# ------------------------------------------------------------------------------------------------
# policies: log pi at chosen states, and one decoding step


class CausalLMPolicy:
    """A Hugging Face causal LM's own softmax: pi1 for the frozen model; for a peft model's base
    (peft_model.get_base_model()) the policy with its LoRA adapter, or pi1 with setting=
    peft_model.disable_adapter: setting() is a context the forward passes run in."""

    def __init__(self, model, setting=None):
        self.model, self.setting = model, setting or contextlib.nullcontext

    def logp(self, ids, mask, states):
        """ids, mask: (B, T) right-padded; states: (B, W) -> log pi(·|s): (B, W, V) float32."""
        with self.setting():
            hidden, _ = run_decoder(self.model.get_decoder(), None, input_ids=ids, attention_mask=mask,
                                    position_ids=positions(mask))  # (B, T, D)
            logits = self.model.get_output_embeddings()(pick(hidden, states)).float()  # (B, W, V)
        return torch.log_softmax(logits, dim=-1)

    def new_caches(self):
        return DynamicCache(config=self.model.config)

    def step(self, ids, mask, position_ids, cache):
        """ids: (B, t) the tokens not yet in the cache -> logits at the newest position (B, V), cache."""
        with self.setting():
            hidden, cache = run_decoder(self.model.get_decoder(), cache, input_ids=ids, attention_mask=mask,
                                        position_ids=position_ids)  # (B, t, D)
            return self.model.get_output_embeddings()(hidden[:, -1]).float(), cache


class CustomisedPolicy:
    """pi~(a|s) = softmax((Q_R(s,a) + α0·log pi1(a|s)) / α̃) of a model.QAdapter, on the plain path:
    QAdapter.forward gives Q_R and log pi1 over the vocabulary at the asked states, and
    residual_q.customised_logits combines them. Decoding: sample.next_logits (path "fused" by
    default, tested equal to "plain")."""

    def __init__(self, adapter, alpha0=1.0, alpha_tilde=1.0, path="fused"):
        self.adapter, self.alpha0, self.alpha_tilde, self.path = adapter, float(alpha0), float(alpha_tilde), path
        self.model = adapter.base

    def logp(self, ids, mask, states):
        q_r, logp1, *_ = self.adapter(ids, mask, states)  # (B, W, V) each
        return self.logp_from(q_r, logp1)

    def logp_from(self, q_r, logp1):
        """log pi~ (B, W, V) from the adapter's Q_R and log pi1 at the same states (B, W, V each)."""
        return torch.log_softmax(customised_logits(q_r, logp1, self.alpha0, self.alpha_tilde), dim=-1)

    def new_caches(self):
        return DynamicCache(config=self.model.config), self.adapter.new_head_cache()

    def step(self, ids, mask, position_ids, caches):
        from sample import next_logits
        logits, base_cache, head_cache = next_logits(self.adapter, ids, mask, position_ids, *caches,
                                                     self.alpha0, self.alpha_tilde, self.path)  # (B, V)
        return logits, (base_cache, head_cache)


class Sweep:
    """Several CustomisedPolicy of one model.QAdapter, {name: policy}, scored together: one forward
    pass gives Q_R and log pi1, and each policy's log pi~ is read from them, so an α0 sweep costs
    one pass instead of one per α0 (the plain way: each policy's own logp; tested equal). Each
    policy gets its own PolicyLM(policy, ..., sweep=(sweep, name)); the first to score a
    log-likelihood request keeps the other policies' answers here, and their PolicyLMs read them
    instead of scoring."""

    def __init__(self, policies):
        self.policies = dict(policies)
        adapters = {id(policy.adapter) for policy in self.policies.values()}
        if len(adapters) != 1:
            raise ValueError(f"Sweep: the policies must share one adapter (got {len(adapters)})")
        self.adapter = next(iter(self.policies.values())).adapter
        self.answers = {name: {} for name in self.policies}  # name -> {(context ids, continuation ids): answer}

    def logps(self, ids, mask, states):
        """(name, log pi~ (B, W, V)) for each policy, from one QAdapter.forward."""
        q_r, logp1, *_ = self.adapter(ids, mask, states)  # (B, W, V) each
        for name, policy in self.policies.items():
            yield name, policy.logp_from(q_r, logp1)

    @staticmethod
    def key(request):
        _, context, continuation = request
        return tuple(context), tuple(continuation)

    def keep(self, name, request, answer):
        self.answers[name][self.key(request)] = answer

    def kept(self, name, requests):
        """name's kept answers to the requests, in order; None unless every one was kept."""
        keys = [self.key(request) for request in requests]
        answers = self.answers[name]
        return [answers[k] for k in keys] if all(k in answers for k in keys) else None


# ------------------------------------------------------------------------------------------------
# the lm-eval model


class PolicyLM(TemplateLM):
    """An lm-eval model over one policy (CausalLMPolicy or CustomisedPolicy).

    batch_size: sequences per forward pass; max_scored bounds the states scored together (each is a
    (V,) row of log-probs, three times over on the Q-Adapter plain path), so a batch of long
    windows is split. max_length: tokens per forward (default: the model's context, as HFLM).
    share_inputs: requests whose model inputs are the same token for token (the choices of a
    multiple-choice question that differ only in their last token: MMLU's " A" .. " D") share one
    forward pass, as HFLM's logits cache does; False scores every request on its own (the plain
    path; tests/test_lm_eval.py checks both give the same numbers).
    sweep: (Sweep, this policy's name in it), for the policies of an α0 sweep: log-likelihoods are
    scored for all of them at once, or read from what an earlier one kept (decoding is not shared)."""

    def __init__(self, policy, tokenizer, batch_size=8, max_length=None, max_gen_toks=256, max_scored=4096,
                 seed=0, share_inputs=True, sweep=None):
        super().__init__()
        self.policy, self.tokenizer, self.share_inputs = policy, tokenizer, share_inputs
        self.sweep, self.sweep_name = sweep if sweep is not None else (None, None)
        if self.sweep is not None and self.sweep.policies.get(self.sweep_name) is not policy:
            raise ValueError(f"PolicyLM: {self.sweep_name!r} is not this policy's name in the sweep "
                             f"({', '.join(self.sweep.policies)})")
        self.batch_size, self.max_scored, self._max_gen_toks, self.seed = int(batch_size), max_scored, max_gen_toks, seed
        self._max_length = max_length
        self._device = next(policy.model.parameters()).device

    # what TemplateLM asks for, decided as lm-eval's HFLM decides it

    @property
    def eot_token_id(self):
        return self.tokenizer.eos_token_id

    @property
    def prefix_token_id(self):
        """What an empty context is replaced with (and a rolling window starts from): BOS, else EOS."""
        bos = self.tokenizer.bos_token_id
        return bos if bos is not None else self.tokenizer.eos_token_id

    @property
    def max_length(self):
        return self._max_length or resolve_max_length(self.policy.model.config, self.tokenizer)

    @property
    def max_gen_toks(self):
        return self._max_gen_toks

    @property
    def tokenizer_name(self):
        return self.tokenizer.name_or_path.replace("/", "__")

    def tok_encode(self, string, add_special_tokens=None, **kwargs):
        """The tokenizer's own special tokens (a BOS where it adds one), unless the text already starts with it."""
        if add_special_tokens is None:
            prefix = self.tokenizer.decode(self.prefix_token_id)
            special = {"add_special_tokens": False} if string.startswith(prefix) else {}
        else:
            special = {"add_special_tokens": add_special_tokens}
        return self.tokenizer.encode(string, **special)

    def apply_chat_template(self, chat_history, add_generation_prompt=True):
        return self.tokenizer.apply_chat_template(chat_history, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    # scoring

    def _batches(self, rows):
        """Indices of rows (each (input ids, number of scored states)), longest first, in batches of
        at most batch_size rows and max_scored scored states (a longer row goes alone)."""
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
        batch = []
        for i in order:
            widest = max([rows[j][1] for j in batch + [i]])
            if batch and (len(batch) == self.batch_size or widest * (len(batch) + 1) > self.max_scored):
                yield batch
                batch = []
            batch.append(i)
        if batch:
            yield batch

    @torch.no_grad()
    def _loglikelihood_tokens(self, requests, disable_tqdm=False, **kwargs):
        """requests: [((context, continuation) or None, context ids, continuation ids)] ->
        [(Σ log pi(continuation | context), greedy)], as HFLM: the input is context + continuation
        without its last token, cut from the left to max_length; the last len(continuation) states
        score the continuation. Requests with the same input and number of scored states read the
        same log-probs (they differ at most in the continuation's last token): with share_inputs,
        one row of the batch serves them all. In a sweep, every policy's answers come from the same
        rows: this policy's are returned, the others' kept for them."""
        kept = self.sweep.kept(self.sweep_name, requests) if self.sweep is not None else None
        if kept is not None:
            for request, answer in zip(requests, kept):
                if request[0] is not None:
                    self.cache_hook.add_partial("loglikelihood", request[0], answer)
            return kept
        rows, readers, row_of = [], [], {}  # readers[i]: the requests that row i scores
        for k, (_, ctx, cont) in enumerate(requests):
            assert ctx and cont and len(cont) <= self.max_length
            inp = (ctx + cont)[-(self.max_length + 1):][:-1]
            key = (tuple(inp), len(cont)) if self.share_inputs else k
            if key not in row_of:
                row_of[key] = len(rows)
                rows.append((inp, len(cont)))
                readers.append([])
            readers[row_of[key]].append(k)
        results = [None] * len(requests)
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="loglikelihood", leave=False)
        for idx in self._batches(rows):
            T, W = max(len(rows[i][0]) for i in idx), max(rows[i][1] for i in idx)
            ids = torch.full((len(idx), T), self.tokenizer.pad_token_id, dtype=torch.long)
            mask = torch.zeros((len(idx), T), dtype=torch.long)
            states = torch.zeros((len(idx), W), dtype=torch.long)  # padding states read position 0
            for j, i in enumerate(idx):
                inp, n = rows[i]
                ids[j, :len(inp)], mask[j, :len(inp)] = torch.tensor(inp), 1
                states[j, :n] = torch.arange(len(inp) - n, len(inp))
            for name, logp in self._logps(ids.to(self._device), mask.to(self._device), states.to(self._device)):
                for j, i in enumerate(idx):
                    row = logp[j, :rows[i][1]]  # (n, V)
                    for k in readers[i]:
                        cont = torch.tensor(requests[k][2], device=logp.device)  # (n,)
                        answer = (float(row.gather(-1, cont[:, None]).sum()), bool((row.argmax(-1) == cont).all()))
                        if name != self.sweep_name:  # another policy of the sweep: kept for it
                            self.sweep.keep(name, requests[k], answer)
                            continue
                        results[k] = answer
                        if requests[k][0] is not None:
                            self.cache_hook.add_partial("loglikelihood", requests[k][0], answer)
            bar.update(sum(len(readers[i]) for i in idx))
        bar.close()
        return results

    def _logps(self, ids, mask, states):
        """(policy name, log pi (B, W, V)) at the states: this policy's alone (name None), or in a
        sweep every policy's from one forward pass."""
        if self.sweep is None:
            yield None, self.policy.logp(ids, mask, states)
        else:
            yield from self.sweep.logps(ids, mask, states)

    def loglikelihood_rolling(self, requests, disable_tqdm=False):
        """Σ log pi over each whole text, each token predicted once, in disjoint windows of at most
        max_length tokens (lm_eval.utils.get_rolling_token_windows, starting from prefix_token_id)."""
        windows, owner = [], []
        for k, (text,) in enumerate(req.args for req in requests):
            for ctx, cont in map(make_disjoint_window, get_rolling_token_windows(
                    token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length, context_len=1)):
                windows.append((None, ctx, cont))
                owner.append(k)
        totals = [0.0] * len(requests)
        for k, (logp, _) in zip(owner, self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)):
            totals[k] += logp
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # decoding

    @torch.no_grad()
    def generate_until(self, requests, disable_tqdm=False):
        """Decodes each context with KV caches (left-padded batches, positions that skip the padding,
        as sample.generate does) until an end-of-turn token, an `until` string or max_gen_toks;
        returns the text before the first `until` string. Greedy unless gen_kwargs ask to sample
        (temperature, top_k, top_p: sample.pick_next)."""
        from sample import stop_ids
        eos = self.tokenizer.decode(self.eot_token_id, skip_special_tokens=False)
        stops = torch.tensor(stop_ids(self.tokenizer, self.policy.model), dtype=torch.long, device=self._device)
        results = []
        batches = Collator([req.args for req in requests], sort_fn=lambda r: (-len(self.tok_encode(r[0])), r[0]),
                           group_by="gen_kwargs", group_fn=lambda r: r[1])
        bar = tqdm(total=len(requests), disable=disable_tqdm, desc="generate_until", leave=False)
        for chunk in batches.get_batched(n=self.batch_size):
            contexts, all_kwargs = zip(*chunk)
            kwargs = normalize_gen_kwargs(dict(all_kwargs[0]), self.max_gen_toks)
            until = handle_stop_sequences(kwargs.pop("until", None), eos=eos)
            max_gen_toks = kwargs.pop("max_gen_toks")
            texts = self._decode(list(contexts), until, max_gen_toks, stops, float(kwargs.get("temperature") or 0.0),
                                 int(kwargs.get("top_k") or 0), float(kwargs.get("top_p") or 1.0))
            for context, gen_kwargs, text in zip(contexts, all_kwargs, texts):
                results.append(text)
                self.cache_hook.add_partial("generate_until", (context, gen_kwargs), text)
            bar.update(len(chunk))
        bar.close()
        return batches.get_original(results)

    def _decode(self, contexts, until, max_gen_toks, stops, temperature, top_k, top_p):
        from sample import pick_next
        room = self.max_length - max_gen_toks
        assert room > 0, f"max_gen_toks {max_gen_toks} leaves no room for a context in {self.max_length} tokens"
        encoded = [self.tok_encode(c)[-room:] for c in contexts]
        B, T = len(encoded), max(len(e) for e in encoded)
        ids = torch.full((B, T), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((B, T), dtype=torch.long)
        for j, e in enumerate(encoded):  # left padding: every row's newest token is in the last column
            ids[j, T - len(e):], mask[j, T - len(e):] = torch.tensor(e), 1
        ids, mask = ids.to(self._device), mask.to(self._device)
        generator = torch.Generator(device=self._device).manual_seed(self.seed)
        caches, step_ids, step_pos = self.policy.new_caches(), ids, positions(mask)
        out = [[] for _ in range(B)]
        done = torch.zeros(B, dtype=torch.bool, device=self._device)
        for _ in range(max_gen_toks):
            logits, caches = self.policy.step(step_ids, mask, step_pos, caches)  # (B, V)
            nxt = pick_next(logits, temperature, top_k, top_p, generator).masked_fill(done, self.tokenizer.pad_token_id)
            for j in (~done).nonzero().flatten().tolist():
                out[j].append(int(nxt[j]))
                text = self.tokenizer.decode(out[j], skip_special_tokens=True)
                if int(nxt[j]) in stops or any(u and u in text for u in until):
                    done[j] = True
            if done.all():
                break
            step_ids, step_pos = nxt[:, None], step_pos[:, -1:] + 1  # (B, 1)
            mask = torch.cat([mask, torch.ones(B, 1, dtype=mask.dtype, device=self._device)], dim=1)
        return [postprocess_generated_text(self.tokenizer.decode(o, skip_special_tokens=True), until, None)
                for o in out]


# ------------------------------------------------------------------------------------------------
# tasks: ours in tasks/ (local JSON lines), lm-eval's own by name


def local_task_names():
    return sorted(p.stem for p in TASKS_DIR.glob("*.yaml"))


def task_manager(names=()):
    """lm-eval's TaskManager over tasks/; with lm-eval's own tasks too (indexing them takes ~15 s on
    2 cores) only when `names` asks for one that is not ours."""
    from lm_eval.tasks import TaskManager
    ours = set(local_task_names())
    return TaskManager(include_path=str(TASKS_DIR), include_defaults=any(n not in ours for n in names))


def data_file(name, data_dir=None):
    """A data file named in one of our task configs, in the folder data_dir (else $QADAPTER_RETENTION_DATA)
    names, as an absolute path; None when neither names a folder."""
    data_dir = data_dir or os.environ.get(DATA_ENV)
    return str(Path(data_dir).expanduser().resolve() / Path(name).name) if data_dir else None


def task_specs(names, data_dir=None, files=None):
    """What lm_eval.simple_evaluate takes as `tasks`: for each of our tasks its config (tasks/NAME.yaml)
    with absolute data files (files={name: path} overrides one), else lm-eval's own task name.
    A local file that is missing or has no folder is an error here, in one line, not a hub lookup later."""
    import yaml
    specs = []
    for name in names:
        path = TASKS_DIR / f"{name}.yaml"
        if not path.is_file():
            specs.append(name)
            continue
        cfg = yaml.safe_load(path.read_text())
        data_files = cfg["dataset_kwargs"]["data_files"]
        for split, f in data_files.items():
            found = str(Path(files[name]).resolve()) if files and name in files else data_file(f, data_dir)
            if found is None:
                raise SystemExit(f"error: task {name} reads {f} from a local folder: give --retention-data DIR "
                                 f"or set ${DATA_ENV} to the folder holding it")
            if not Path(found).is_file():
                raise SystemExit(f"error: task {name}: no data file {found} (set --retention-data DIR or "
                                 f"${DATA_ENV} to the folder holding {f})")
            data_files[split] = found
        specs.append(cfg)
    return specs


def spec_name(spec):
    return spec if isinstance(spec, str) else spec["task"]
