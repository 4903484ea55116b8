"""Evaluate sDPO models: preference metrics, γ_πref (the paper's Figure 2), H4 (Table 2).

    python eval.py preference --model M --ref R --data FILE...
    python eval.py gamma --models S M1 M2 --data FILE...
    python eval.py h4 --model M --data-dir DIR [--tasks arc,hellaswag,mmlu,truthfulqa] [--limit N]
    python eval.py report RESULT.json...
    python eval.py plot RUN_DIR [--out PNG]
    python eval.py generate --model M --prompts FILE [--max-new-tokens N] [--temperature T --top-p P --seed S]
                            [--format jsonl | alpaca_eval | arena_hard] [--name NAME]

Each writes its results to --out (JSON; markdown for report; jsonl for generate) and prints a table.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from sdpo import metrics as M
from sdpo.data.pairs import encode_prompt, tokenize_pairs
from sdpo.data.read import DataError, read_preferences
from sdpo.data.tokenizer import TokenizerError, check_vocab, load_tokenizer, parse_template_kwargs
from sdpo.eval import h4, outputs
from sdpo.eval.loglikelihood import LoglikelihoodRunner, model_next_token_fn, model_score_fn
from sdpo.eval.plots import PlotError, plot_run
from sdpo.eval.report import Progress, format_table, plot_gamma_histogram, write_histogram_csv
from sdpo.loss import preference_loss
from sdpo.models.checkpoint import load_model
from sdpo.models.generate import PromptFileError, generate, read_prompts
from sdpo.models.hf_config import CheckpointError
from sdpo.reference import pair_logps

class UsageError(ValueError):
    """Arguments that parse but do not fit together."""


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


# ---------------------------------------------------------------- shared helpers

def _device(name: str | None) -> torch.device:
    if name:
        return torch.device(name)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(name: str, device: torch.device):
    # auto: the checkpoint's own dtype on a GPU; float32 on CPU (bf16 matmuls there are slow and lossy)
    if name == "auto":
        return None if device.type == "cuda" else torch.float32
    return DTYPES[name]


def _load_model(path: str, args):
    device = _device(args.device)
    model = load_model(path, dtype=_dtype(args.dtype, device), device=device)
    model.eval()
    return model


def _load_tokenizer(path: str, args, model_config=None):
    tok = load_tokenizer(path, chat_template=getattr(args, "chat_template", None),
                         template_kwargs=parse_template_kwargs(args.template_kwarg))
    if model_config is not None:
        check_vocab(tok, model_config)
    return tok


def _name(path: str) -> str:
    return Path(path).resolve().name or str(path)


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    tmp.replace(path)


def _out_path(args, default: str) -> Path:
    return Path(args.out) if args.out else Path("results") / default


def _read_pairs(args, tok):
    examples, _ = read_preferences(args.data, schema=args.schema)
    if args.limit is not None:
        examples = examples[: args.limit]
    pairs, stats = tokenize_pairs(examples, tok, max_length=args.max_length,
                                  max_prompt_length=args.max_prompt_length or args.max_length // 2)
    if not pairs:
        raise h4.H4DataError(f"{', '.join(args.data)}: no pairs left after tokenization ({stats})")
    return examples, pairs, stats


def _model_logps(path: str, pairs, tok, args, label: str):
    model = _load_model(path, args)
    check_vocab(tok, model.config)
    bar = Progress(label, len(pairs))
    chosen, rejected = pair_logps(model, pairs, pad_id=tok.pad_id, batch_size=args.batch_size,
                                  device=_device(args.device), progress=bar)
    bar.close()
    del model  # the next model can reuse the memory
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return chosen, rejected


# ---------------------------------------------------------------- subcommands

def cmd_preference(args) -> int:
    tok = _load_tokenizer(args.tokenizer or args.model, args)
    examples, pairs, stats = _read_pairs(args, tok)
    pc, pr = _model_logps(args.model, pairs, tok, args, "policy")
    rc, rr = _model_logps(args.ref, pairs, tok, args, "reference")
    losses, chosen_rewards, rejected_rewards = preference_loss(
        pc, pr, rc, rr, loss_type=args.loss_type, beta=args.beta)
    metrics = M.preference_metrics(pc, pr, rc, rr, beta=args.beta, losses=losses)
    result = {
        "kind": "preference", "model": args.model, "ref": args.ref, "data": args.data,
        "beta": args.beta, "loss_type": args.loss_type, "metrics": metrics,
        "tokenization": {k: v for k, v in stats.items() if k != "dropped_indices"},
        "pairs": [{"origin": examples[p.index].origin,
                   "policy_chosen": pc[i].item(), "policy_rejected": pr[i].item(),
                   "ref_chosen": rc[i].item(), "ref_rejected": rr[i].item()} for i, p in enumerate(pairs)],
    }
    out = _out_path(args, f"preference-{_name(args.model)}.json")
    _write_json(out, result)
    print(f"preference: {_name(args.model)} against {_name(args.ref)}, β={args.beta}, {metrics['n']} pairs")
    print(format_table(["metric", "value"], [[k, v] for k, v in metrics.items() if k != "n"]))
    print(f"wrote {out}")
    return 0


def cmd_gamma(args) -> int:
    names = args.names or [_name(m) for m in args.models]
    if len(names) != len(args.models) or len(set(names)) != len(names):
        raise UsageError(f"--names needs {len(args.models)} distinct names (one per --models entry), got {names}")
    tok = _load_tokenizer(args.tokenizer or args.models[0], args)
    examples, pairs, _ = _read_pairs(args, tok)
    gammas, stats = {}, {}
    for name, path in zip(names, args.models):
        chosen, rejected = _model_logps(path, pairs, tok, args, name)
        gammas[name] = M.gamma(chosen, rejected).tolist()
        stats[name] = M.gamma_stats(gammas[name])
    hist = M.histogram(gammas, bins=args.bins)
    out = _out_path(args, "gamma.json")
    plot = Path(args.plot) if args.plot else out.with_suffix(".png")
    plot.parent.mkdir(parents=True, exist_ok=True)
    means = {n: s["mean"] for n, s in stats.items()}
    if plot_gamma_histogram(hist, means, plot):
        figure, note = str(plot), f"wrote {plot}"
    else:
        csv = plot.with_suffix(".csv")
        write_histogram_csv(hist, csv)
        figure = None
        note = (f"note: matplotlib is not installed, so no PNG; the histogram bins are in {csv} and in "
                f"{out} ('histogram'). pip install matplotlib for the figure.")
    result = {"kind": "gamma", "models": dict(zip(names, args.models)), "data": args.data,
              "stats": stats, "histogram": hist, "figure": figure,
              "pairs": {"origin": [examples[p.index].origin for p in pairs], "gamma": gammas}}
    _write_json(out, result)
    print(f"γ = log π(y_w|x) − log π(y_l|x) over {len(pairs)} pairs")
    print(format_table(["model", "n", "mean", "std", "q1", "median", "q3", "min", "max"],
                          [[n, s["n"], s["mean"], s["std"], s["q1"], s["median"], s["q3"], s["min"], s["max"]]
                           for n, s in stats.items()]))
    print(note)
    print(f"wrote {out}")
    return 0


def cmd_h4(args) -> int:
    tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in tasks if t not in h4.TASKS]
    if unknown or not tasks:
        raise UsageError(f"--tasks: unknown {unknown or tasks}; choose from {','.join(h4.TASKS)}")
    model = _load_model(args.model, args)
    tok = _load_tokenizer(args.tokenizer or args.model, args, model.config)
    prefix = [tok.bos_id] if args.add_bos and tok.bos_id is not None else []
    runner = LoglikelihoodRunner(
        model_score_fn(model, _device(args.device)), lambda s: tok.encode(s, add_special_tokens=False),
        batch_size=args.batch_size, max_length=args.max_length or model.config.max_position_embeddings,
        pad_id=tok.pad_id, prefix_ids=prefix, next_token_fn=model_next_token_fn(model, _device(args.device)))
    result = h4.evaluate_h4(runner, args.data_dir, tasks=tasks, num_fewshot=args.num_fewshot,
                            seed=args.seed, limit=args.limit, sampler=args.fewshot_sampler,
                            log_samples=args.log_samples is not None)
    result.update(kind="h4", model=args.model, name=args.name or _name(args.model),
                  data_dir=str(args.data_dir), add_bos=bool(prefix))
    if args.log_samples is not None:
        samples = Path(args.log_samples)
        samples.parent.mkdir(parents=True, exist_ok=True)
        samples.write_text("".join(json.dumps(r) + "\n" for r in result.pop("samples")))
        result["samples_file"] = str(samples)
    out = _out_path(args, f"h4-{_name(args.model)}.json")
    _write_json(out, result)
    rows = [[t, r["metric"], r["num_fewshot"], r["n"], f"{100 * r['score']:.2f}"] for t, r in result["tasks"].items()]
    print(format_table(["task", "metric", "shots", "n", "score (%)"], rows))
    if result["h4"] is not None:
        print(f"H4 = {100 * result['h4']:.2f}")
    else:
        print(f"mean of {len(tasks)} task(s) = {100 * result['mean']:.2f} (H4 needs all four)")
    print(f"wrote {out}" + (f" and {result['samples_file']}" if "samples_file" in result else ""))
    return 0


def _stop_ids(tok, model_config) -> list[int]:
    # the tokenizer's EOS and the model config's (Llama-3 lists several end tokens there)
    ids = [tok.eos_id] if tok is not None and tok.eos_id is not None else []
    cfg_eos = model_config.eos_token_id
    ids += cfg_eos if isinstance(cfg_eos, list) else [cfg_eos] if cfg_eos is not None else []
    return sorted(set(ids))


def cmd_generate(args) -> int:
    if args.max_new_tokens < 1 or args.batch_size < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise UsageError("need --max-new-tokens >= 1, --batch-size >= 1, --temperature >= 0, 0 < --top-p <= 1")
    if args.format != "jsonl":
        return _generate_for_judges(args)
    prompts = read_prompts(args.prompts)
    model = _load_model(args.model, args)
    V = model.config.vocab_size
    needs_text = any(p.input_ids is None for p in prompts)
    try:
        tok = _load_tokenizer(args.tokenizer or args.model, args, model.config)
    except TokenizerError:
        if needs_text:
            raise
        tok = None  # token-id prompts on a model without tokenizer files: ids out, no text
    ids = []
    for p in prompts:
        if p.input_ids is not None:
            if max(p.input_ids) >= V:
                raise UsageError(f"{args.prompts}:{p.line}: input_ids has id {max(p.input_ids)} >= vocab_size {V}")
            ids.append(list(p.input_ids))
        else:
            ids.append(encode_prompt(p.messages or [{"role": "user", "content": p.text}], tok))
            if not ids[-1]:
                raise UsageError(f"{args.prompts}:{p.line}: the prompt encodes to no tokens")
    g = torch.Generator().manual_seed(args.seed)  # on the CPU: the same seed draws the same on any device
    completions = _decode(model, tok, ids, args, g, Progress("generate", len(ids)))
    out_path = _out_path(args, f"generate-{_name(args.model)}.jsonl")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for p, prompt_ids, out in zip(prompts, ids, completions):
        rows.append({"line": p.line, "prompt": p.text if p.text is not None else p.messages if p.messages else None,
                     "prompt_tokens": len(prompt_ids), "completion": tok.decode(out) if tok is not None else None,
                     "completion_ids": out, "tokens": len(out),
                     "stopped": "eos" if len(out) < args.max_new_tokens else "length"})
    _write_text(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))
    _generate_summary(args, [r["tokens"] for r in rows], out_path)
    return 0


def _decode(model, tok, ids: list[list[int]], args, g: torch.Generator, bar) -> list[list[int]]:
    """Generated ids per prompt, in batches of --batch-size, longest prompts together (little padding);
    results in the prompts' order."""
    stops = _stop_ids(tok, model.config)
    pad = tok.pad_id if tok is not None else (model.config.pad_token_id or 0)
    order = sorted(range(len(ids)), key=lambda i: -len(ids[i]))
    completions: list[list[int]] = [[] for _ in ids]
    for start in range(0, len(order), args.batch_size):
        chunk = order[start:start + args.batch_size]
        for i, out in zip(chunk, generate(model, [ids[i] for i in chunk], max_new_tokens=args.max_new_tokens,
                                          eos_id=stops, pad_id=pad, temperature=args.temperature,
                                          top_p=args.top_p, generator=g)):
            completions[i] = out
        bar.update(len(chunk))
    bar.close()
    return completions


def _generate_for_judges(args) -> int:
    """--format alpaca_eval | arena_hard: a benchmark's questions (or any prompts) answered in the layout
    its judge reads (sdpo/eval/outputs.py). A question of several turns is answered turn by turn, each
    round a batched decode of the conversations so far."""
    questions = outputs.read_questions(args.prompts)
    several = next((q for q in questions if len(q.turns) > 1), None)
    if args.format == "alpaca_eval" and several is not None:
        raise UsageError(f"{args.prompts}:{several.line}: {len(several.turns)} turns; AlpacaEval scores single-turn "
                         f"instructions (--format arena_hard answers several turns)")
    model = _load_model(args.model, args)
    tok = _load_tokenizer(args.tokenizer or args.model, args, model.config)
    name = args.name or _name(args.model)
    answers: list[list[outputs.Answer]] = [[] for _ in questions]
    conversations: list[list[dict]] = [[] for _ in questions]
    g = torch.Generator().manual_seed(args.seed)  # one generator for every round: a seed repeats the whole file
    rounds = max(len(q.turns) for q in questions)
    for r in range(rounds):
        todo = [i for i, q in enumerate(questions) if r < len(q.turns)]
        ids = []
        for i in todo:
            conversations[i].append({"role": "user", "content": questions[i].turns[r]})
            ids.append(encode_prompt(conversations[i], tok))
            if not ids[-1]:
                raise UsageError(f"{args.prompts}:{questions[i].line}: the prompt encodes to no tokens")
        label = "generate" if rounds == 1 else f"generate, turn {r + 1}/{rounds}"
        for i, out in zip(todo, _decode(model, tok, ids, args, g, Progress(label, len(ids)))):
            text = tok.decode(out)
            answers[i].append(outputs.Answer(text, len(out), "eos" if len(out) < args.max_new_tokens else "length"))
            conversations[i].append({"role": "assistant", "content": text})
    sampling = {"model": str(args.model), "max_new_tokens": args.max_new_tokens, "temperature": args.temperature,
                "top_p": args.top_p, "seed": args.seed, "batch_size": args.batch_size,
                "chat_template": args.chat_template or "the tokenizer's", "dtype": args.dtype,
                "template_kwargs": tok.template_kwargs}
    if args.format == "alpaca_eval":
        out_path = _out_path(args, f"alpaca_eval-{name}.json")
        records = outputs.alpaca_eval_outputs(questions, answers, generator=name, dataset=Path(args.prompts).stem,
                                              sampling=sampling)
        _write_text(out_path, json.dumps(records, indent=2, ensure_ascii=False) + "\n")
    else:
        # arena-hard-auto names a model by its answer file: data/<bench>/model_answer/<name>.jsonl
        out_path = _out_path(args, f"model_answer/{name}.jsonl")
        records = outputs.arena_hard_answers(questions, answers, model=name, sampling=sampling)
        _write_text(out_path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))
    _generate_summary(args, [t.tokens for a in answers for t in a], out_path)
    return 0


def _write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def _generate_summary(args, tokens: list[int], out_path: Path) -> None:
    n_eos = sum(t < args.max_new_tokens for t in tokens)
    mode = ("greedy" if args.temperature == 0
            else f"temperature {args.temperature}, top-p {args.top_p}, seed {args.seed}")
    print(f"generate: {args.name or _name(args.model)}, {len(tokens)} completions, {mode}, format {args.format}")
    print(format_table(["completions", "mean tokens", "stopped at EOS", "hit max_new_tokens"],
                       [[len(tokens), f"{sum(tokens) / len(tokens):.1f}", n_eos, len(tokens) - n_eos]]))
    print(f"wrote {out_path}")


REPORT_COLUMNS = [("arc", "ARC"), ("hellaswag", "HellaSwag"), ("mmlu", "MMLU"), ("truthfulqa", "TruthfulQA")]


def report_table(results: list[tuple[str, dict]]) -> str:
    """Table 2 of the paper: Model | H4 | ARC | HellaSwag | MMLU | TruthfulQA, in percent."""
    rows = []
    for origin, r in results:
        if r.get("kind") != "h4" or not isinstance(r.get("tasks"), dict):
            raise h4.H4DataError(f"{origin}: not an `eval.py h4` result (field 'kind' is {r.get('kind')!r}, "
                                 "expected 'h4' with a 'tasks' object)")
        cells = []
        for key, _ in REPORT_COLUMNS:
            t = r["tasks"].get(key)
            cells.append(f"{100 * t['score']:.2f}" if t else "—")
        score = f"{100 * r['h4']:.2f}" if r.get("h4") is not None else "—"
        rows.append([r.get("name") or r.get("model", origin), score, *cells])
    return format_table(["Model", "H4", *(title for _, title in REPORT_COLUMNS)], rows)


def cmd_plot(args) -> int:
    out = plot_run(args.run_dir, args.out or Path(args.run_dir) / "curves.png")
    print(f"wrote {out}")
    return 0


def cmd_report(args) -> int:
    results = []
    for path in args.results:
        try:
            results.append((path, json.loads(Path(path).read_text())))
        except OSError as e:
            raise h4.H4DataError(f"{path}: cannot read ({e.strerror})") from None
        except json.JSONDecodeError as e:
            raise h4.H4DataError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    table = report_table(results)
    out = _out_path(args, "report.md")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table + "\n")
    print(table)
    print(f"wrote {out}")
    return 0


# ---------------------------------------------------------------- command line

def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="eval.py", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)

    def common(sp, out_help):
        sp.add_argument("--out", help=out_help)
        sp.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when available)")
        sp.add_argument("--dtype", default="auto", choices=["auto", *DTYPES],
                        help="auto: the checkpoint's dtype on GPU, float32 on CPU")
        sp.add_argument("--batch-size", type=int, default=8)
        sp.add_argument("--tokenizer", help="tokenizer directory (default: the (first) model's)")
        sp.add_argument("--template-kwarg", action="append", default=[], metavar="KEY=VALUE",
                        help="a chat-template variable, VALUE as JSON (enable_thinking=false: Qwen3's and "
                             "SmolLM3's no-reasoning prompt, as model.enable_thinking in training); repeatable")

    def pairs_args(sp):
        sp.add_argument("--data", nargs="+", required=True, help="preference files or directories")
        sp.add_argument("--schema", default="auto", help="auto | generic | orca | ultrafeedback | conversational")
        sp.add_argument("--chat-template", help="a built-in template name or jinja text (default: the tokenizer's)")
        sp.add_argument("--max-length", type=int, default=1024)
        sp.add_argument("--max-prompt-length", type=int, help="default: half of --max-length")
        sp.add_argument("--limit", type=int, help="use only the first N pairs")

    sp = sub.add_parser("preference", help="reward accuracy/margins of --model against --ref on held-out pairs")
    sp.add_argument("--model", required=True)
    sp.add_argument("--ref", required=True)
    sp.add_argument("--beta", type=float, default=0.1)
    sp.add_argument("--loss-type", default="sigmoid")
    pairs_args(sp)
    common(sp, "JSON results (default: results/preference-<model>.json)")
    sp.set_defaults(func=cmd_preference)

    sp = sub.add_parser("gamma", help="γ = log π(y_w|x) − log π(y_l|x) per model: statistics and histogram")
    sp.add_argument("--models", nargs="+", required=True)
    sp.add_argument("--names", nargs="+", help="labels for the models (default: directory names)")
    sp.add_argument("--bins", type=int, default=40)
    sp.add_argument("--plot", help="PNG path (default: --out with .png); needs matplotlib, else a .csv")
    pairs_args(sp)
    common(sp, "JSON results (default: results/gamma.json)")
    sp.set_defaults(func=cmd_gamma)

    sp = sub.add_parser("h4", help="ARC, HellaSwag, MMLU, TruthfulQA as the Open LLM Leaderboard v1 scored them")
    sp.add_argument("--model", required=True)
    sp.add_argument("--data-dir", required=True, help="task files in the HF layouts (see sdpo/eval/h4.py)")
    sp.add_argument("--tasks", default=",".join(h4.H4_TASKS))
    sp.add_argument("--limit", type=int, help="at most N documents per task (per subject for MMLU)")
    sp.add_argument("--num-fewshot", type=int, help="override the shots of ARC/HellaSwag/MMLU (TruthfulQA stays 0)")
    sp.add_argument("--fewshot-sampler", default="leaderboard", choices=list(h4.SAMPLERS),
                    help="leaderboard: lm-evaluation-harness b281b09 as the Open LLM Leaderboard v1 ran it "
                         "(documents shuffled, shots sampled, Random(42)); lm-eval: lm-eval 0.4 (file order, "
                         "shots sampled from Random(1234))")
    sp.add_argument("--seed", type=int, help="override the sampler's seed (42 / 1234)")
    sp.add_argument("--log-samples", metavar="FILE",
                    help="write one jsonl line per item: task, doc id, prompt, per-choice log-likelihoods and "
                         "lengths, prediction, gold")
    sp.add_argument("--max-length", type=int, help="context window in tokens (default: max_position_embeddings)")
    sp.add_argument("--add-bos", action="store_true", help="prefix every request with BOS (the harness did not)")
    sp.add_argument("--name", help="the model's name in the results and report")
    common(sp, "JSON results (default: results/h4-<model>.json)")
    sp.set_defaults(func=cmd_h4)

    sp = sub.add_parser(
        "generate", help="completions for a prompts file (greedy or sampled, KV-cached, batched)",
        description="Prompts FILE: a .jsonl with one object per line holding \"prompt\" (a string: one user "
                    "turn), \"messages\" (a list of {\"role\", \"content\"}) or \"input_ids\" (token ids, "
                    "used as they are: no tokenizer needed); any other file is one prompt string per non-empty "
                    "line. Prompts go through the chat template with the generation prompt (use "
                    "--chat-template none for raw text). Output: one jsonl line per prompt: line, prompt, "
                    "prompt_tokens, completion (text; null without a tokenizer), completion_ids, tokens, stopped "
                    "(eos | length). Decoding stops at the tokenizer's EOS or any eos_token_id of config.json. "
                    "--format alpaca_eval writes the JSON list of {instruction, output, generator, dataset} that "
                    "`alpaca_eval --model_outputs` reads; --format arena_hard writes Arena-Hard-Auto's answer "
                    "jsonl (data/<bench>/model_answer/<name>.jsonl); for both, FILE may be the benchmark's own "
                    "question file (alpaca_eval.json with \"instruction\"; question.jsonl with \"uid\" and "
                    "\"prompt\", or \"question_id\" and \"turns\"), and every record holds the sampling "
                    "settings (\"sampling\").")
    sp.add_argument("--model", required=True)
    sp.add_argument("--prompts", required=True, metavar="FILE")
    sp.add_argument("--format", default="jsonl", choices=list(outputs.FORMATS),
                    help="jsonl (default): one line per prompt with token ids; alpaca_eval; arena_hard")
    sp.add_argument("--name", help="the model's name in alpaca_eval / arena_hard outputs (generator, model; "
                                   "default: the model directory's name)")
    sp.add_argument("--max-new-tokens", type=int, default=256)
    sp.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    sp.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass when --temperature > 0")
    sp.add_argument("--seed", type=int, default=0, help="sampling seed; the same seed and --batch-size repeat a run")
    sp.add_argument("--chat-template", help="a built-in template name (none = raw text) or jinja text "
                                            "(default: the tokenizer's)")
    common(sp, "output file (default: results/generate-<model>.jsonl, results/alpaca_eval-<name>.json or "
               "results/model_answer/<name>.jsonl)")
    sp.set_defaults(func=cmd_generate)

    sp = sub.add_parser("report", help="a Table-2-style markdown table from h4 result files")
    sp.add_argument("results", nargs="+")
    sp.add_argument("--out", help="markdown file (default: results/report.md)")
    sp.set_defaults(func=cmd_report)

    sp = sub.add_parser("plot", help="loss, reward margins, reward accuracy and γ per sDPO step of a run (PNG)")
    sp.add_argument("run_dir", help="a train.py output directory (reads its metrics.jsonl)")
    sp.add_argument("--out", help="PNG path (default: RUN_DIR/curves.png); needs matplotlib")
    sp.set_defaults(func=cmd_plot)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UsageError, h4.H4DataError, DataError, CheckpointError, TokenizerError, PromptFileError,
            PlotError) as e:
        print(f"eval.py {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # unreadable input, unwritable output, full disk: the path, not a traceback
        print(f"eval.py {args.command}: error: {e}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
