"""``python -m sdpo.data check FILE_OR_DIR... [--schema S] [--tokenizer DIR --max-length N
--max-prompt-length N --chat-template NAME --template-kwarg KEY=VALUE]``: validate preference files,
print a summary, exit 1 when any record is invalid (2 when a file cannot be read at all). With a
tokenizer it also says which chat template it rendered with and how BOS was handled.

It sits above the reader (sdpo/data/read.py) and the tokenization (sdpo/data/pairs.py), so
neither of those imports the other's command line.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from typing import Iterable

import numpy as np

from sdpo.data.pairs import bos_handling, tokenize_pairs
from sdpo.data.read import SCHEMAS, DataError, read_preferences
from sdpo.data.tokenizer import TokenizerError, load_tokenizer, parse_template_kwargs


def main(argv: Iterable[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m sdpo.data", description="Preference data tools.")
    sub = ap.add_subparsers(dest="command", required=True)
    check = sub.add_parser("check", help="validate preference files and print a summary")
    check.add_argument("paths", nargs="+", help=".jsonl / .json / .parquet files or directories")
    check.add_argument("--schema", default="auto", choices=SCHEMAS)
    check.add_argument("--max-errors", type=int, default=50, help="error lines to print")
    check.add_argument("--tokenizer", help="also tokenize with this tokenizer directory and report lengths")
    check.add_argument("--max-length", type=int, default=1024)
    check.add_argument("--max-prompt-length", type=int, help="default: half of --max-length")
    check.add_argument("--chat-template", help="a built-in template name or jinja text instead of the tokenizer's")
    check.add_argument("--template-kwarg", action="append", default=[], metavar="KEY=VALUE",
                       help="a variable for the chat template, VALUE as JSON (enable_thinking=false); repeatable")
    args = ap.parse_args(list(argv) if argv is not None else None)
    try:
        examples, report = read_preferences(args.paths, schema=args.schema, on_error="skip")
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(report.summary(max_errors=args.max_errors))
    sources = Counter(ex.source for ex in examples)
    print("sources: " + ", ".join(f"{s}={n}" for s, n in sorted(sources.items())))
    if args.tokenizer and examples:
        try:
            tok = load_tokenizer(args.tokenizer, args.chat_template, parse_template_kwargs(args.template_kwarg))
        except (TokenizerError, ValueError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
        origin = tok.template_origin
        print("chat template: " + ("none" if origin is None else f"from {origin}" if os.path.isfile(origin) else origin))
        if tok.template_kwargs:
            print("template keywords: " + ", ".join(f"{k}={v!r}" for k, v in tok.template_kwargs.items()))
        try:
            pairs, stats = tokenize_pairs(examples, tok, max_length=args.max_length,
                                          max_prompt_length=args.max_prompt_length or args.max_length // 2)
        except DataError as e:  # a prompt the chat template rejects
            print(f"error: {e}", file=sys.stderr)
            return 1
        print(f"BOS: {bos_handling(examples[0].prompt, tok)}")
        lens = np.array([len(p.prompt_ids) + max(len(p.chosen_ids), len(p.rejected_ids)) for p in pairs] or [0])
        print("tokens: " + ", ".join(f"{k}={v}" for k, v in stats.items() if k != "dropped_indices"))
        print(f"pair length (prompt + longer response): mean {lens.mean():.1f}, max {lens.max()}")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
