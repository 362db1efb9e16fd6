"""What constrained decoding costs per token (issue 22): the grammar's mask at two vocabulary sizes.

    python scripts/bench_grammar.py [--answers N] [--tokenizer tokenizer.json ...] [--json OUT]

For each tokenizer — the demo model's (512 logits) and a synthetic Qwen2.5-sized byte-level
vocabulary of 151,668 tokens (`synthetic_qwen_tokenizer`; Qwen's own tokenizer cannot be fetched
offline and transformers cannot build it from a config alone) — and each product task, it
decodes N answers through `citrus_edge.grammar` and times the grammar's share of every step:
the allowed-token mask, the argmax over it and the automaton's advance (what `runtime.decode`
adds to a step). Half of the answers walk the canonical tokens of a typical long answer (three
boxes, three lesions: the model's own path through the grammar), half follow random logits.
It prints ms per token (mean, p50, p99), the per-answer grammar compile time and the
tokenizer's one-time load, and compares them with a decode step: 1.25 ms for the demo's INT8
LLM and 34.8 ms for the 8B-width INT8 slice (README, `scripts/profile_ops.py`, same CPU kind).
The first line printed is the processor (`citrus_edge.cpu_features`).

With `--bundle DIR` it also runs that bundle on pydicom's ultrasound examples (palette_color,
rgb_color, and every frame of the ybr_color cine) with the three task prompts, constrained and
free (`RuntimeConfig.constrained_decoding`), and prints the share of answers that parse in their
task's format (`citrus_edge.quality.answer_parses`), of report answers that state a count
(`tasks.parse_count`), and how many answers the DICOM's Modality US kept from "This is not an
ultrasound image." (the model's first choice, overridden and warned).
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import sys
import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer, decoders, models, pre_tokenizers

from citrus_edge import tasks
from citrus_edge.atomic import write_text_atomic
from citrus_edge.cpu_features import describe, instruction_sets
from citrus_edge.grammar import AnswerGrammars
from citrus_edge.quality import NOT_US_OVERRIDDEN
from citrus_edge.tokenizer import DEMO_SPECIALS, QWEN_FIRST_SPECIAL, QWEN_SPECIALS, load_tokenizer

DEMO_DIR = Path(__file__).resolve().parents[1] / "citrus_edge" / "demo_model"
DEMO_VOCAB = 512  # the demo model's logits (config text.vocab_size); its tokenizer holds 467
QWEN_VOCAB = 151_668  # the 8B's vocab_size
# Decode-step times of the INT8 LLM after 200 cached tokens (README, issue 19 profile).
DECODE_STEP_MS = {DEMO_VOCAB: 1.25, QWEN_VOCAB: 34.8}
RESIZED_HW = (448, 336)

TYPICAL_ANSWERS = {
    "segment": tasks.SEGMENT_ANSWER,
    "detect": tasks.detect_answer([(12, 40, 80, 96), (200, 148, 336, 252), (4, 300, 60, 448)]),
    "report": tasks.report_answer(
        [
            {"echogenicity": e, "location": loc, "margin": m, "size_mm": s, "posterior": p}
            for e, loc, m, s, p in (
                ("hypoechoic", "upper left", "circumscribed", 12, "shadowing"),
                ("anechoic", "lower right", "irregular", 7, "none"),
                ("hyperechoic", "upper right", "circumscribed", 15, "enhancement"),
            )
        ]
    ),
}

_SYLLABLES = (
    "a e i o u an en in on un ar er ir or ur al el il ol ul as es is os us at et it ot ut "
    "ba be bi bo ca ce ci co da de di do fa fe fi fo ga ge gi go ha he hi ho la le li lo ma me "
    "mi mo na ne ni no pa pe pi po ra re ri ro sa se si so ta te ti to va ve vi vo st str tion "
    "ing ed ly ment ness ous ive able ical sion pre pro con com dis ex im per sub trans"
).split()


def synthetic_qwen_tokenizer(size: int = QWEN_VOCAB, seed: int = 0) -> Tokenizer:
    """A byte-level BPE tokenizer of `size` ids with Qwen2.5's special tokens at their ids.

    Ordinary tokens (ids below 151,643): the 256 byte symbols; every prefix of the words and
    punctuation runs of the task answers (so the answers have multi-character tokens, as with a
    real vocabulary: "Ġlesion", '":', '"},'); all 2- and 3-character runs of JSON punctuation;
    then seeded pseudo-words of syllables, each with its prefixes, bare, with a leading space
    ("Ġ") and capitalised, until the ordinary range is full. Digits stay one per token (as in
    Qwen2). Every multi-character token has the merge (token[:-1], token[-1]), so the vocabulary
    is prefix-closed and tokenizes like a trained BPE's longest-match chains.
    """
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab: dict[str, int] = {}
    merges: list[tuple[str, str]] = []

    def add(token: str) -> None:
        for end in range(1, len(token) + 1):
            piece = token[:end]
            if piece in vocab or len(vocab) >= QWEN_FIRST_SPECIAL:
                continue
            if end > 1:
                merges.append((piece[:-1], piece[-1]))
            vocab[piece] = len(vocab)

    for ch in sorted(alphabet):
        add(ch)
    texts = [*TYPICAL_ANSWERS.values(), tasks.NO_LESION, *tasks.PROMPTS.values()]
    for text in texts:
        for piece in re.findall(r" ?[A-Za-z_]+|[^\w\s]+|\n", text.replace("[SEG]", "")):
            add(piece.replace(" ", "Ġ").replace("\n", "Ċ"))
    punct = ['"', "[", "]", "{", "}", ",", ":", ".", "`", "Ġ", "Ċ", "_", "(", ")", "'", "-"]
    for a in punct:
        for b in punct:
            add(a + b)
            for c in punct:
                add(a + b + c)
    rng = np.random.default_rng(seed)
    while len(vocab) < QWEN_FIRST_SPECIAL:
        word = "".join(rng.choice(_SYLLABLES, size=int(rng.integers(1, 5))))
        for form in (word, "Ġ" + word, "Ġ" + word.capitalize(), word.capitalize()):
            add(form)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(list(QWEN_SPECIALS))
    if tok.get_vocab_size(with_added_tokens=True) != size:
        raise RuntimeError(f"synthetic vocabulary has {tok.get_vocab_size()} ids, not {size}")
    return tok


def special_ids(tokenizer: Tokenizer) -> tuple[int, int]:
    """(`[SEG]`, EOS `<|im_end|>`) ids of a demo or Qwen-layout tokenizer."""
    seg, eos = tokenizer.token_to_id("[SEG]"), tokenizer.token_to_id("<|im_end|>")
    if seg is None or eos is None:
        raise ValueError("the tokenizer has no [SEG] or <|im_end|> token")
    return seg, eos


def demo_grammars() -> AnswerGrammars:
    tok = load_tokenizer(DEMO_DIR)
    if tok.token_to_id(DEMO_SPECIALS[10]) != 10:
        raise RuntimeError("demo tokenizer: [SEG] is not id 10")
    return AnswerGrammars(tok, 10, 1, DEMO_VOCAB)


def qwen_grammars(tokenizer: Tokenizer | None = None) -> AnswerGrammars:
    tok = synthetic_qwen_tokenizer() if tokenizer is None else tokenizer
    seg, eos = special_ids(tok)
    return AnswerGrammars(tok, seg, eos, max(QWEN_VOCAB, tok.get_vocab_size()))


def time_answers(grammars: AnswerGrammars, task: str, n: int, seed: int = 0) -> dict:
    """Decode `n` answers to `task` with the grammar; ms per grammar step and per compile."""
    tok, v = grammars.tokenizer, grammars.vocab_size
    path = tok.encode(TYPICAL_ANSWERS[task], add_special_tokens=False).ids  # [SEG]: its id
    rng = np.random.default_rng(seed)
    steps, compiles, lengths, canonical = [], [], [], []
    for i in range(n):
        t0 = time.perf_counter()
        c = grammars.constraint(task, RESIZED_HW)
        compiles.append(time.perf_counter() - t0)
        follow = i % 2 == 0
        out: list[int] = []
        while True:
            logits = rng.normal(size=v).astype(np.float32)
            if follow:
                logits[path[len(out)] if len(out) < len(path) else grammars.eos] = 1e4
            t0 = time.perf_counter()
            token = c.choose(logits)
            if token != grammars.eos:
                c.advance(token)
            steps.append(time.perf_counter() - t0)
            canonical.append(follow)
            if token == grammars.eos:
                break
            out.append(token)
        lengths.append(len(out))
        if follow and out != path:
            raise RuntimeError(f"{task}: the grammar refused the canonical answer's tokens")
    ms, on_path = np.array(steps) * 1e3, np.array(canonical)
    return {
        "task": task,
        "answers": n,
        "tokens": int(sum(lengths)) + n,
        "ms_per_token": float(ms.mean()),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
        "canonical_ms_per_token": float(ms[on_path].mean()),
        "random_ms_per_token": float(ms[~on_path].mean()),
        "compile_ms": float(np.mean(compiles) * 1e3),
    }


def bench(grammars: AnswerGrammars, name: str, load_s: float, n: int) -> dict:
    rows = [time_answers(grammars, task, n) for task in tasks.TASKS]
    tokens = sum(r["tokens"] for r in rows)
    mean = sum(r["ms_per_token"] * r["tokens"] for r in rows) / tokens
    step = DECODE_STEP_MS.get(grammars.vocab_size)
    return {
        "vocabulary": name,
        "vocab_size": grammars.vocab_size,
        "load_s": load_s,
        "tasks": rows,
        "ms_per_token": mean,
        "decode_step_ms": step,
        "overhead_share": None if step is None else mean / step,
    }


US_EXAMPLES = ("palette_color", "rgb_color", "ybr_color")


def pydicom_answers(bundle: Path, constrained: bool) -> list[dict]:
    """Every task answer of `bundle` on every frame of pydicom's ultrasound examples."""
    import pydicom
    from pydicom import examples

    from citrus_edge.runtime import Pipeline

    logging.getLogger("citrus_edge").setLevel(logging.ERROR)  # pydicom's calibration notes
    pipe = Pipeline.from_bundle(bundle, constrained_decoding=constrained)
    rows = []
    for name in US_EXAMPLES:
        path = examples.get_path(name)
        frames = int(pydicom.dcmread(path, stop_before_pixels=True).get("NumberOfFrames", 1))
        for frame in range(frames):
            for task in tasks.TASKS:
                r = pipe(path, tasks.PROMPTS[task], frame=frame)
                rows.append(
                    {
                        "example": name,
                        "frame": frame,
                        "task": task,
                        "text": r.text,
                        "parses": bool(r.quality.parses),
                        "count": tasks.parse_count(r.text) if task == "report" else None,
                        "stopped_by": r.stopped_by,
                        "grammar_ms": r.timings_ms.get("grammar", 0.0),
                        "decode_ms": r.timings_ms.get("decode", 0.0),
                        "tokens": len(r.token_ids),
                        # the grammar overrode the model's "not ultrasound" first choice
                        "doubted_us": any(w.startswith(NOT_US_OVERRIDDEN) for w in r.warnings),
                    }
                )
    return rows


NON_US_EXAMPLES = ("ct", "mr")


def non_us_answers(bundle: Path) -> list[dict]:
    """The three task answers of `bundle` on pydicom's CT and MR examples (constrained): whether
    each is "This is not an ultrasound image." and whether the result warns of the Modality."""
    from pydicom import examples

    from citrus_edge.runtime import Pipeline

    pipe = Pipeline.from_bundle(bundle)
    rows = []
    for name in NON_US_EXAMPLES:
        for task in tasks.TASKS:
            r = pipe(examples.get_path(name), tasks.PROMPTS[task])
            rows.append(
                {
                    "example": name,
                    "task": task,
                    "text": r.text,
                    "not_us_answer": r.text.strip() == tasks.NOT_US_ANSWER,
                    "modality_warning": any(
                        w.startswith("not an ultrasound image: the DICOM") for w in r.warnings
                    ),  # fmt: skip
                }
            )
    return rows


def summarize_answers(rows: list[dict]) -> dict:
    """Shares that parse (per task and all), report answers stating a count, texts seen."""
    out: dict = {"answers": len(rows)}
    for task in (*tasks.TASKS, "all"):
        sel = [r for r in rows if task in ("all", r["task"])]
        out[task] = {"n": len(sel), "parses": sum(r["parses"] for r in sel) / len(sel)}
    reports = [r for r in rows if r["task"] == "report"]
    out["report"]["states_count"] = sum(r["count"] is not None for r in reports) / len(reports)
    out["stopped_by_eos"] = sum(r["stopped_by"] == "eos" for r in rows) / len(rows)
    out["answered_not_us"] = sum(r["text"].strip() == tasks.NOT_US_ANSWER for r in rows)
    out["doubted_us"] = sum(r["doubted_us"] for r in rows)
    tokens = sum(r["tokens"] for r in rows)
    out["grammar_ms_per_token"] = sum(r["grammar_ms"] for r in rows) / max(tokens, 1)
    out["decode_ms_per_token"] = sum(r["decode_ms"] for r in rows) / max(tokens, 1)
    out["texts"] = {}
    for r in rows:
        key = f"{r['task']}: {r['text'][:90]!r}"
        out["texts"][key] = out["texts"].get(key, 0) + 1
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--answers", type=int, default=20, help="answers per task and vocabulary")
    ap.add_argument("--tokenizer", action="append", default=[], help="also a tokenizer.json")
    ap.add_argument("--json", type=Path, help="write the figures here")
    ap.add_argument("--bundle", type=Path, help="also: pydicom's ultrasound, free vs constrained")
    ap.add_argument("--skip-vocab", action="store_true", help="only the --bundle measurement")
    args = ap.parse_args(argv)
    if args.answers < 1:
        ap.error("--answers must be >= 1")
    sets = instruction_sets()
    print(describe(sets))
    runs = [("demo", demo_grammars), ("synthetic-qwen-151k", qwen_grammars)]
    runs += [(p, lambda p=p: qwen_grammars(load_tokenizer(Path(p)))) for p in args.tokenizer]
    results = []
    for name, make in [] if args.skip_vocab else runs:
        t0 = time.perf_counter()
        grammars = make()
        res = bench(grammars, name, time.perf_counter() - t0, args.answers)
        results.append(res)
        share = res["overhead_share"]
        versus = "" if share is None else f" = {share:.1%} of a {res['decode_step_ms']} ms step"
        print(
            f"{name} ({res['vocab_size']} logits, load {res['load_s']:.2f} s): "
            f"{res['ms_per_token']:.3f} ms/token{versus}"
        )
        for r in res["tasks"]:
            print(
                f"  {r['task']:8s} {r['ms_per_token']:.3f} ms/token (p50 {r['p50_ms']:.3f}, "
                f"p99 {r['p99_ms']:.3f}; canonical path {r['canonical_ms_per_token']:.3f}, random "
                f"{r['random_ms_per_token']:.3f}) over {r['tokens']} tokens; compile "
                f"{r['compile_ms']:.2f} ms/answer"
            )
    pydicom_rows = {}
    if args.bundle:
        for mode, constrained in (("free", False), ("constrained", True)):
            rows = pydicom_answers(args.bundle, constrained)
            pydicom_rows[mode] = {"summary": summarize_answers(rows), "answers": rows}
            s = pydicom_rows[mode]["summary"]
            print(
                f"pydicom ultrasound, {mode}: {s['answers']} answers, parse "
                f"{s['all']['parses']:.1%} (segment {s['segment']['parses']:.1%}, detect "
                f"{s['detect']['parses']:.1%}, report {s['report']['parses']:.1%}); reports "
                f"stating a count {s['report']['states_count']:.1%}; ended by EOS "
                f"{s['stopped_by_eos']:.1%}; grammar {s['grammar_ms_per_token']:.3f} of "
                f"{s['decode_ms_per_token']:.3f} ms/token decode"
            )
            print(
                f"  answered 'not an ultrasound image': {s['answered_not_us']} of {s['answers']}; "
                f"the model's first choice, overridden (the DICOM states US) and warned: "
                f"{s['doubted_us']}"
            )
            for text, n in sorted(s["texts"].items(), key=lambda kv: -kv[1])[:8]:
                print(f"  {n:3d} x {text}")
        non_us = non_us_answers(args.bundle)
        pydicom_rows["ct_mr"] = non_us
        print(
            f"pydicom CT and MR, constrained: {sum(r['not_us_answer'] for r in non_us)} of "
            f"{len(non_us)} answered 'not an ultrasound image', "
            f"{sum(r['modality_warning'] for r in non_us)} warned of the Modality"
        )
    if args.json:
        doc = {
            "cpu": {**sets, "line": describe(sets)},
            "results": results,
            "pydicom": pydicom_rows,
        }
        write_text_atomic(args.json, json.dumps(doc, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
