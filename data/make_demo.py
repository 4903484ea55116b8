"""Generate sdpo's built-in demo preference data and its tokenizer (deterministic).

    python data/make_demo.py            # rewrites data/demo/ and data/tokenizer/
    python data/make_demo.py --out DIR  # writes DIR/demo/ and DIR/tokenizer/

Two sDPO steps a tiny random-init model can learn on a CPU in minutes:
  D1 = demo/orca_pairs      Intel/orca_dpo_pairs schema, easier tasks (copy, upper)
  D2 = demo/ultrafeedback   allenai/ultrafeedback_binarized_cleaned schema, harder
                            tasks (reverse, sort, add) named in the `source` column
chosen is the correct answer, rejected a subtly wrong one (one character substituted,
swapped, dropped or doubled; a wrong sum), so the preference is learnable and the
"spot the one-character error" skill transfers from D1 to D2.
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


def task_copy(rng):
    w = rand_word(rng, 3, 5)
    return f"copy: {w}", w, corrupt(w, rng, ["substitute", "swap", "drop", "double"], LOWER)


def task_upper(rng):
    w = rand_word(rng, 3, 5)
    a = w.upper()
    return f"upper: {w}", a, corrupt(a, rng, ["substitute", "lower_one", "swap", "drop"], UPPER)


def task_reverse(rng):
    w = rand_word(rng, 3, 6)
    a = w[::-1]
    return f"reverse: {w}", a, corrupt(a, rng, ["substitute", "swap", "drop", "unreversed"], LOWER, source=w)


def task_sort(rng):
    w = rand_word(rng, 3, 6, distinct=True)
    a = "".join(sorted(w))
    return f"sort: {w}", a, corrupt(a, rng, ["swap", "substitute", "drop", "double"], LOWER)


def task_add(rng):
    # single digits: 100 facts, so train and test share sums by design (see data/README.md)
    x, y = rng.randrange(10), rng.randrange(10)
    n = x + y
    wrong = [m for m in (n - 1, n + 1, n + 10, n - 10, int(str(n)[::-1])) if m >= 0 and m != n]
    return f"add: {x}+{y}", str(n), str(rng.choice(wrong))


def make_examples(rng: random.Random, n: int, tasks, seen: set[str]) -> list[tuple[str, str, str, str]]:
    """n (task name, prompt, chosen, rejected); string prompts never repeat within a dataset."""
    out = []
    names = [t[0] for t in tasks]
    weights = [t[1] for t in tasks]
    fns = {"copy": task_copy, "upper": task_upper, "reverse": task_reverse, "sort": task_sort, "add": task_add}
    while len(out) < n:
        name = rng.choices(names, weights)[0]
        prompt, chosen, rejected = fns[name](rng)
        if name != "add":
            if prompt in seen:
                continue
            seen.add(prompt)
        out.append((name, prompt, chosen, rejected))
    return out


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
    seen: set[str] = set()
    for split, n in SPLITS["orca_pairs"].items():
        files[f"demo/orca_pairs/{split}.jsonl"] = orca_rows(rng, n, seen)
    seen = set()
    for split, n in SPLITS["ultrafeedback"].items():
        files[f"demo/ultrafeedback/{split}.jsonl"] = ultrafeedback_rows(rng, n, seen)
    texts = []
    for rows in files.values():
        for r in rows:
            if "question" in r:
                texts += [r["system"], r["question"], r["chosen"], r["rejected"]]
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
        print(f"{args.out / rel}: {n} pairs")
    print(f"{args.out / 'tokenizer'}: tokenizer.json, tokenizer_config.json, special_tokens_map.json")


if __name__ == "__main__":
    main()
