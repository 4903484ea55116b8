"""Generate sdpo's built-in demo data and its tokenizer (deterministic).

    python data/make_demo.py            # rewrites data/demo/ and data/tokenizer/
    python data/make_demo.py --out DIR  # writes DIR/demo/ and DIR/tokenizer/

Five string/arithmetic tasks with checkable answers, in three disjoint sets of prompts:
  demo/sft                  the SFT demonstrations that make the base S. Written by a
                            sloppy annotator: in SFT_ERROR_RATE of the cases where it can
                            happen, a long answer (>= 5 characters) loses its last character
                            and a sum >= 10 loses its carry ("7+5" -> "2"), so S learns these
                            two systematic mistakes and makes them under greedy decoding.
  D1 = demo/orca_pairs      Intel/orca_dpo_pairs schema, easier tasks (copy, upper)
  D2 = demo/ultrafeedback   allenai/ultrafeedback_binarized_cleaned schema, harder
                            tasks (reverse, sort, add) named in the `source` column
In the pairs chosen is the correct answer and rejected is the mistake S makes (truncated
answer, forgotten carry) where that mistake applies, else a one-edit error. The pairs'
prompts never occur in the SFT set: as in the paper, S never saw the preference data.
Same seed, same bytes: tests/test_data.py regenerates into a temp dir and compares.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
from collections import Counter
from pathlib import Path

SEED = 20240325  # arXiv 2403.19270
LOWER = "abcdefghijklmnop"  # a small alphabet keeps the tasks learnable for a tiny model
UPPER = LOWER.upper()
DIGITS = "0123456789"
SYSTEMS = ["", "", "You are a helpful assistant.", "Answer exactly."]  # orca's system is often ""
SOURCES = [("reverse", 0.5), ("sort", 0.35), ("add", 0.15)]
SPLITS = {"orca_pairs": {"train": 600, "test": 100}, "ultrafeedback": {"train_prefs": 1500, "test_prefs": 200}}
SFT_SIZE = 2000
SFT_TASKS = [("copy", 0.2), ("upper", 0.2), ("reverse", 0.25), ("sort", 0.2), ("add", 0.15)]
SFT_ERROR_RATE = 0.65  # > 1/2: the annotator's mistake is S's most likely answer where it applies
LONG = 5  # answers this long are the ones the annotator truncates

SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>"]
# Zephyr-style: "<|role|>\n" + content + eos for every turn; the generation prompt is
# "<|assistant|>\n", so an assistant response is exactly content + "</s>".
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('roles must be system, user or assistant') }}"
    "{% endif %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + eos_token }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)


# ---------------------------------------------------------------------------
# Tasks: (prompt, correct answer, subtly wrong answer)
# ---------------------------------------------------------------------------


def rand_word(rng: random.Random, lo: int, hi: int, distinct: bool = False) -> str:
    n = rng.randint(lo, hi)
    if distinct:
        return "".join(rng.sample(LOWER, n))
    return "".join(rng.choice(LOWER) for _ in range(n))


def corrupt(s: str, rng: random.Random, kinds: list[str], alphabet: str, source: str | None = None) -> str:
    """One small edit that makes `s` wrong; kinds drawn until the result differs from s."""
    while True:
        kind = rng.choice(kinds)
        i = rng.randrange(len(s))
        if kind == "substitute":  # a character the answer should not contain at all
            pool = [c for c in alphabet if c not in s] or [c for c in alphabet if c != s[i]]
            out = s[:i] + rng.choice(pool) + s[i + 1:]
        elif kind == "swap" and len(s) > 1:
            i = rng.randrange(len(s) - 1)
            out = s[:i] + s[i + 1] + s[i] + s[i + 2:]
        elif kind == "drop" and len(s) > 1:
            out = s[:i] + s[i + 1:]
        elif kind == "double":
            out = s[:i] + s[i] + s[i:]
        elif kind == "lower_one":  # upper task: one letter left lowercase
            out = s[:i] + s[i].lower() + s[i + 1:]
        elif kind == "unreversed":  # reverse task: the input echoed back
            out = source or s
        else:
            continue
        if out != s:
            return out


def sloppy(answer: str) -> str | None:
    """The SFT annotator's systematic mistake on this answer, or None where it has none:
    a long answer loses its last character; a two-digit sum loses its carry."""
    if answer.isdigit():
        return answer[1:] if len(answer) > 1 else None
    return answer[:-1] if len(answer) >= LONG else None


def task_copy(rng):
    w = rand_word(rng, 3, 5)
    return f"copy: {w}", w, lambda a: corrupt(a, rng, ["substitute", "swap", "drop", "double"], LOWER)


def task_upper(rng):
    w = rand_word(rng, 3, 5)
    return f"upper: {w}", w.upper(), lambda a: corrupt(a, rng, ["substitute", "lower_one", "swap", "drop"], UPPER)


def task_reverse(rng):
    w = rand_word(rng, 3, 6)
    return f"reverse: {w}", w[::-1], lambda a: corrupt(a, rng, ["substitute", "swap", "drop", "unreversed"], LOWER, source=w)


def task_sort(rng):
    w = rand_word(rng, 3, 6, distinct=True)
    return f"sort: {w}", "".join(sorted(w)), lambda a: corrupt(a, rng, ["swap", "substitute", "drop", "double"], LOWER)


def task_add(rng):
    # single digits: 100 facts, so train and test share sums by design (see data/README.md)
    x, y = rng.randrange(10), rng.randrange(10)
    n = x + y
    wrong = [m for m in (n - 1, n + 1) if m >= 0]
    return f"add: {x}+{y}", str(n), lambda a: str(rng.choice(wrong))


def make_examples(rng: random.Random, n: int, tasks, seen: set[str], *, sft: bool = False):
    """n (task name, prompt, chosen, rejected); string prompts never repeat across `seen`.
    Pairs: chosen correct, rejected = S's mistake where it has one, else a one-edit error.
    SFT (sft=True): chosen is the annotator's answer (sloppy in SFT_ERROR_RATE of the cases
    where it can be), rejected a placeholder (sdpo reads SFT data from preference files)."""
    out = []
    names = [t[0] for t in tasks]
    weights = [t[1] for t in tasks]
    fns = {"copy": task_copy, "upper": task_upper, "reverse": task_reverse, "sort": task_sort, "add": task_add}
    while len(out) < n:
        name = rng.choices(names, weights)[0]
        prompt, answer, one_edit = fns[name](rng)
        mistake = sloppy(answer)
        if sft:
            chosen = mistake if mistake is not None and rng.random() < SFT_ERROR_RATE else answer
            rejected = "?"
        else:
            chosen, rejected = answer, mistake if mistake is not None else one_edit(answer)
        if name != "add":
            if prompt in seen:
                continue
            seen.add(prompt)
        out.append((name, prompt, chosen, rejected))
    return out


def sft_rows(rng, n, seen):
    # generic schema; the system prompts of orca's tasks, so S has seen the prompt formats of D1
    return [{"system": rng.choice(SYSTEMS) if name in ("copy", "upper") else "", "prompt": p, "chosen": c, "rejected": r}
            for name, p, c, r in make_examples(rng, n, SFT_TASKS, seen, sft=True)]


def orca_rows(rng, n, seen):
    rows = []
    for _, question, chosen, rejected in make_examples(rng, n, [("copy", 0.5), ("upper", 0.5)], seen):
        rows.append({"system": rng.choice(SYSTEMS), "question": question, "chosen": chosen, "rejected": rejected})
    return rows


def ultrafeedback_rows(rng, n, seen):
    rows = []
    for source, prompt, chosen, rejected in make_examples(rng, n, SOURCES, seen):
        user = {"content": prompt, "role": "user"}
        chosen_msgs = [user, {"content": chosen, "role": "assistant"}]
        rows.append({
            "prompt": prompt,
            "prompt_id": hashlib.sha256(prompt.encode()).hexdigest(),
            "chosen": chosen_msgs,
            "rejected": [dict(user), {"content": rejected, "role": "assistant"}],
            "messages": [dict(m) for m in chosen_msgs],
            "score_chosen": rng.choice([7.0, 7.5, 8.0, 8.5, 9.0, 10.0]),
            "score_rejected": rng.choice([2.0, 3.0, 4.0, 5.0, 6.0]),
            "source": source,
        })
    return rows


# ---------------------------------------------------------------------------
# Tokenizer: byte-level BPE whose merges never touch the task data
# ---------------------------------------------------------------------------


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character map that the ByteLevel pre-tokenizer uses."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


def train_bpe(texts: list[str], *, max_merges: int = 96, min_count: int = 40):
    """Greedy BPE (most frequent adjacent pair first, ties broken by the pair's text).

    Data characters (task letters, digits and the space marker) are never merged with each
    other, so every task string stays one token per character: a reversed or sorted answer
    tokenizes like its input, which is what makes the tasks learnable by a tiny model.
    Frequent words (task names, system prompts) become a few tokens each.
    """
    from tokenizers import pre_tokenizers

    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    data_chars = set(LOWER + UPPER + DIGITS) | {byte_to_unicode()[ord(" ")]}
    words = Counter()
    for t in texts:
        words.update(w for w, _ in pre.pre_tokenize_str(t))
    seqs = {w: list(w) for w in words}
    merges = []
    while len(merges) < max_merges:
        pairs = Counter()
        for w, n in words.items():
            s = seqs[w]
            for a, b in zip(s, s[1:]):
                if not (set(a) <= data_chars and set(b) <= data_chars):
                    pairs[(a, b)] += n
        if not pairs:
            break
        (a, b), n = min(pairs.items(), key=lambda kv: (-kv[1], kv[0]))
        if n < min_count:
            break
        merges.append((a, b))
        for w, s in seqs.items():
            i, out = 0, []
            while i < len(s):
                if i + 1 < len(s) and s[i] == a and s[i + 1] == b:
                    out.append(a + b)
                    i += 2
                else:
                    out.append(s[i])
                    i += 1
            seqs[w] = out
    return merges


def build_tokenizer(texts: list[str], out_dir: Path) -> None:
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

    merges = train_bpe(texts)
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for b in range(256):
        vocab[byte_to_unicode()[b]] = len(vocab)
    for a, b in merges:
        vocab[a + b] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    # add_special_tokens=True prepends <s>, as a Llama tokenizer does; sdpo itself encodes
    # with add_special_tokens=False and places BOS/EOS explicitly.
    tok.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", vocab["<s>"])])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.json").write_text(tok.to_str(pretty=True) + "\n", encoding="utf-8")
    specials = {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>",
                "additional_special_tokens": SPECIAL_TOKENS[3:]}
    config = {**specials, "add_bos_token": True, "add_eos_token": False, "model_max_length": 512,
              "tokenizer_class": "PreTrainedTokenizerFast", "chat_template": CHAT_TEMPLATE}
    write_json(out_dir / "tokenizer_config.json", config)
    write_json(out_dir / "special_tokens_map.json", specials)


# ---------------------------------------------------------------------------


def write_json(path: Path, obj) -> None:
    path.write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", encoding="utf-8", newline="\n") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")


def generate(out: Path) -> dict[str, int]:
    rng = random.Random(SEED)
    files: dict[str, list[dict]] = {}
    seen: set[str] = set()  # one set: no string prompt occurs twice anywhere (SFT, D1, D2; train or test)
    for split, n in SPLITS["orca_pairs"].items():
        files[f"demo/orca_pairs/{split}.jsonl"] = orca_rows(rng, n, seen)
    for split, n in SPLITS["ultrafeedback"].items():
        files[f"demo/ultrafeedback/{split}.jsonl"] = ultrafeedback_rows(rng, n, seen)
    # SFT last, so the pairs' prompts are drawn exactly as they would be without it
    files["demo/sft/train.jsonl"] = sft_rows(rng, SFT_SIZE, seen)
    texts = []
    for rows in files.values():
        for r in rows:
            if "question" in r:
                texts += [r["system"], r["question"], r["chosen"], r["rejected"]]
            elif isinstance(r["chosen"], str):
                texts += [r["prompt"], r["chosen"]]
            else:
                texts += [r["prompt"], r["chosen"][-1]["content"], r["rejected"][-1]["content"]]
    for rel, rows in files.items():
        write_jsonl(out / rel, rows)
    build_tokenizer(texts, out / "tokenizer")
    return {rel: len(rows) for rel, rows in files.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent,
                    help="directory to write demo/ and tokenizer/ into (default: data/)")
    args = ap.parse_args()
    for rel, n in generate(args.out).items():
        print(f"{args.out / rel}: {n} {'demonstrations' if 'sft' in rel else 'pairs'}")
    print(f"{args.out / 'tokenizer'}: tokenizer.json, tokenizer_config.json, special_tokens_map.json")


if __name__ == "__main__":
    main()
